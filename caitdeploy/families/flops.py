"""Analytic FLOP and parameter counts of a `CaitConfig`, per image.

FLOPs follow `torch.utils.flop_counter`: 2 per multiply-accumulate, matmuls and convolutions only
(LayerNorm, GELU, softmax and additions are not counted). Divide by 2 for the MACs papers call "FLOPs".
"""
from __future__ import annotations

from caitdeploy.families.vit.config import BlockConfig, CaitConfig


# ---- the formulas: every count in the package (CaitViT, ToMe, CDCP pruning units) derives from these ----
def transformer_parts(n: int, d: int, h: int, qk: int, v: int, hidden: int, n_mlp: int | None = None) -> dict[str, int]:
    """FLOPs of one pre-norm block's matmuls for n tokens of width d, h heads of q/k width qk and v width v,
    an mlp of `hidden` channels run on n_mlp tokens (n unless tokens are merged between attention and mlp)."""
    n_mlp = n if n_mlp is None else n_mlp
    return {"qkv": 2 * n * d * h * (2 * qk + v), "attn": 2 * h * n * n * (qk + v), "proj": 2 * n * h * v * d,
            "mlp": 2 * 2 * n_mlp * d * hidden}


def merge_flops(n_patches_out: int, d: int) -> int:
    """An ATME merge: Linear(2D -> D) on every output patch token."""
    return 2 * n_patches_out * (2 * d) * d


def flop_counter():
    """`torch.utils.flop_counter.FlopCounterMode` (no display) that also counts SDPA's fused CPU kernel.

    torch < 2.15 has no formula for `aten._scaled_dot_product_flash_attention_for_cpu`, the kernel CPU SDPA runs
    when q, k and v share a head width, so it counts such attention as 0 FLOPs (measured: torch 2.11.0 and
    2.14.1; torch 2.15 registers it). This supplies torch's own SDPA formula for that op where it is missing, so
    every count here is the same on every supported torch."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode, flop_registry, sdpa_flop_count

    def cpu_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    missing = op is not None and op not in flop_registry and op.default not in flop_registry
    return FlopCounterMode(display=False, custom_mapping={op: cpu_sdpa} if missing else None)


def _family(cfg: CaitConfig):
    from caitdeploy.families.registry import family

    return family(cfg.family)


def patch_embed_flops(cfg: CaitConfig) -> int:
    """The stem: a patch projection, or the family's (LV-ViT's convolutions)."""
    return _family(cfg).stem_flops(cfg)


def head_flops(cfg: CaitConfig) -> int:
    return 2 * cfg.embed_dim * cfg.num_classes * (2 if cfg.dist_token else 1)


def block_flops(cfg: CaitConfig, i: int) -> dict[str, int]:
    """FLOPs of block i per image, by part."""
    b: BlockConfig = cfg.blocks[i]
    d = cfg.embed_dim
    n = cfg.tokens()[i]
    fam = _family(cfg)
    merged = cfg.patch_tokens_in(i) // 2
    parts = {"merge": merge_flops(merged, d) if b.merge else 0,
             "slim": fam.slim_flops(cfg, i) if b.slim is not None else 0,
             **transformer_parts(n, d, b.num_heads, b.qk_dim, b.v_dim, b.mlp_hidden)}
    if b.kind != "attn":
        parts.update(qkv=0, attn=0, proj=fam.mixer_flops(cfg, i) if b.kind != "skip" else 0)
    parts["total"] = sum(parts.values())
    return parts


def _swin(cfg) -> bool:
    """A Swin config (models/swin.py) rather than a CaitConfig: its counts live in its family module."""
    return getattr(cfg, "family", None) == "swin" and not isinstance(cfg, CaitConfig)


def channel_savings(cfg: CaitConfig, i: int) -> dict[str, int]:
    """FLOPs per image saved in block i by removing one channel from every head (q and k together for "qk",
    "v") or one mlp channel ("mlp"): differences of `transformer_parts`, so the CDCP units count exactly
    what `model_flops` counts."""
    if _swin(cfg):
        from caitdeploy.families.swin.model import swin_channel_savings

        return swin_channel_savings(cfg, i)
    b = cfg.blocks[i]
    n, d, h = cfg.tokens()[i], cfg.embed_dim, b.num_heads

    def total(qk, v, hidden):
        return sum(transformer_parts(n, d, h, qk, v, hidden).values())

    full = total(b.qk_dim, b.v_dim, b.mlp_hidden)
    return {"qk": full - total(b.qk_dim - 1, b.v_dim, b.mlp_hidden),
            "v": full - total(b.qk_dim, b.v_dim - 1, b.mlp_hidden),
            "mlp": full - total(b.qk_dim, b.v_dim, b.mlp_hidden - 1)}


def model_flops(cfg: CaitConfig) -> dict:
    """{"total", "patch_embed", "head", "blocks": [per-block dicts]} per image."""
    if _swin(cfg):
        from caitdeploy.families.swin.model import swin_flops

        f = swin_flops(cfg)
        return {**f, "blocks": [{"total": b} for b in f["blocks"]]}
    patch = patch_embed_flops(cfg)
    head = head_flops(cfg)
    blocks = [block_flops(cfg, i) for i in range(cfg.depth)]
    return {"total": patch + head + sum(b["total"] for b in blocks), "patch_embed": patch, "head": head,
            "blocks": blocks}


def block_params(cfg: CaitConfig, i: int) -> int:
    b = cfg.blocks[i]
    d = cfg.embed_dim
    fam = _family(cfg)
    qkv_out = b.num_heads * (2 * b.qk_dim + b.v_dim)
    n = (2 * d * d + d) if b.merge else 0                        # merge fc: [D, 2D] + bias
    n += fam.slim_params(cfg, i) if b.slim is not None else 0
    n += 4 * d                                                   # norm1, norm2
    if b.kind == "attn":
        n += qkv_out * d + (qkv_out if cfg.qkv_bias else 0)      # qkv
        n += b.num_heads * b.v_dim * d + d                       # proj
    elif b.kind != "skip":
        n += fam.mixer_params(cfg, i)
    n += d * b.mlp_hidden + b.mlp_hidden + b.mlp_hidden * d + d  # fc1, fc2
    return n


def model_params(cfg: CaitConfig) -> int:
    if _swin(cfg):
        from caitdeploy.families.swin.model import swin_params

        return swin_params(cfg)
    d = cfg.embed_dim
    n = _family(cfg).stem_params(cfg)                   # patch embed (or the family's stem)
    n += cfg.num_prefix_tokens * d + cfg.pos_embed_len * d  # prefix tokens, pos embed
    heads = 2 if cfg.dist_token else 1
    n += 2 * d + heads * (d * cfg.num_classes + cfg.num_classes)  # final norm (or fc_norm), head(s)
    return n + sum(block_params(cfg, i) for i in range(cfg.depth))


def block_rows(cfg: CaitConfig) -> list[dict]:
    """The one per-block table (fuse's report, inspect, benchmarks): widths, tokens, FLOPs by part, params."""
    if _swin(cfg):
        from caitdeploy.families.swin.model import swin_block_rows

        return swin_block_rows(cfg)
    f = model_flops(cfg)
    tokens = cfg.tokens()
    return [{"block": i, "merge": b.merge, "kind": b.kind, "slim": b.slim, "tokens": tokens[i], "heads": b.num_heads, "qk_per_head": b.qk_dim,
             "v_per_head": b.v_dim, "mlp": b.mlp_hidden, "attn_scale": b.attn_scale,
             "flops": f["blocks"][i]["total"], "flops_parts": f["blocks"][i], "params": block_params(cfg, i)}
            for i, b in enumerate(cfg.blocks)]


def encoder_flops(cfg: CaitConfig, last_block: int | None = None) -> int:
    """FLOPs per image of a feature extractor: the stem and blocks 0..last_block (all by default), no head.
    Restoring a merged grid (copies or bilinear upsampling) is not a matmul and is not counted."""
    last = cfg.depth - 1 if last_block is None else last_block
    if _swin(cfg):   # the stem, the stages up to the block's (their PatchMerging included), its blocks up to it
        from caitdeploy.families.swin.model import swin_flops

        f = swin_flops(cfg)
        stage = cfg.flat()[last][0]
        in_stage = [j for j, (s, _, _) in enumerate(cfg.flat()) if s == stage]
        merge = f["stages"][stage] - sum(f["blocks"][j] for j in in_stage)   # its PatchMerging
        return f["stem"] + sum(f["stages"][:stage]) + merge + sum(f["blocks"][in_stage[0]:last + 1])
    return patch_embed_flops(cfg) + sum(block_flops(cfg, i)["total"] for i in range(last + 1))


def activation_bytes(config, batch: int, elem_bytes: int = 4) -> int:
    """Peak activation memory of one forward pass of `config` at `batch`, an estimate that does not
    overestimate: the largest block's live tensors (residual, qkv, attention scores and probabilities,
    mlp hidden) plus the patch embedding's input and output."""
    if getattr(config, "family", None) == "swin" and hasattr(config, "stages"):
        from caitdeploy.families.swin.model import swin_activation_bytes

        return swin_activation_bytes(config, batch, elem_bytes)
    d = config.embed_dim
    tokens = config.tokens()
    n0 = 1 + config.grid[0] * config.grid[1]
    c_in, h_in, w_in = config.input_shape
    peak = batch * (c_in * h_in * w_in + n0 * d)
    for b, n in zip(config.blocks, tokens):
        h = b.num_heads
        qkv = n * h * (2 * b.qk_dim + b.v_dim)
        attn = 2 * h * n * n
        mlp = n * b.mlp_hidden
        peak = max(peak, batch * (2 * n * d + qkv + max(attn, mlp)))
    return int(peak * elem_bytes)


def param_bytes(config, elem_bytes: int = 4) -> int:
    return int(model_params(config) * elem_bytes)
