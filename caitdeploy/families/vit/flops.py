"""Analytic FLOP and parameter counts of a ViT-family model (`CaitConfig`: ViT, LV-ViT/SiT, SPViT), per image.

FLOPs follow `torch.utils.flop_counter`: 2 per multiply-accumulate, matmuls and convolutions only
(LayerNorm, GELU, softmax and additions are not counted). The stem, mixer and slimming counts of a variant come
from its hooks (lvvit.py, spvit.py).
"""

from __future__ import annotations

from typing import Any

from caitdeploy.families.flops import merge_flops, transformer_parts
from caitdeploy.families.vit.config import BlockConfig, CaitConfig


def _family(cfg: CaitConfig):
    from caitdeploy.families.registry import family

    fam: Any = family(cfg.family)  # a VitFamily (the hooks module of the config's variant)
    return fam.hooks


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
    parts = {
        "merge": merge_flops(merged, d) if b.merge else 0,
        "slim": fam.slim_flops(cfg, i) if b.slim is not None else 0,
        **transformer_parts(n, d, b.num_heads, b.qk_dim, b.v_dim, b.mlp_hidden),
    }
    if b.kind != "attn":
        parts.update(qkv=0, attn=0, proj=fam.mixer_flops(cfg, i) if b.kind != "skip" else 0)
    parts["total"] = sum(parts.values())
    return parts


def channel_savings(cfg: CaitConfig, i: int) -> dict[str, int]:
    """FLOPs per image saved in block i by removing one channel from every head (q and k together for "qk",
    "v") or one mlp channel ("mlp"): differences of `transformer_parts`, so the CDCP units count exactly
    what `model_flops` counts."""
    b = cfg.blocks[i]
    n, d, h = cfg.tokens()[i], cfg.embed_dim, b.num_heads

    def total(qk, v, hidden):
        return sum(transformer_parts(n, d, h, qk, v, hidden).values())

    full = total(b.qk_dim, b.v_dim, b.mlp_hidden)
    return {
        "qk": full - total(b.qk_dim - 1, b.v_dim, b.mlp_hidden),
        "v": full - total(b.qk_dim, b.v_dim - 1, b.mlp_hidden),
        "mlp": full - total(b.qk_dim, b.v_dim, b.mlp_hidden - 1),
    }


def model_flops(cfg: CaitConfig) -> dict:
    """{"total", "patch_embed", "head", "blocks": [per-block dicts]} per image."""
    patch = patch_embed_flops(cfg)
    head = head_flops(cfg)
    blocks = [block_flops(cfg, i) for i in range(cfg.depth)]
    return {
        "total": patch + head + sum(b["total"] for b in blocks),
        "patch_embed": patch,
        "head": head,
        "blocks": blocks,
    }


def block_params(cfg: CaitConfig, i: int) -> int:
    b = cfg.blocks[i]
    d = cfg.embed_dim
    fam = _family(cfg)
    qkv_out = b.num_heads * (2 * b.qk_dim + b.v_dim)
    n = (2 * d * d + d) if b.merge else 0  # merge fc: [D, 2D] + bias
    n += fam.slim_params(cfg, i) if b.slim is not None else 0
    n += 4 * d  # norm1, norm2
    if b.kind == "attn":
        n += qkv_out * d + (qkv_out if cfg.qkv_bias else 0)  # qkv
        n += b.num_heads * b.v_dim * d + d  # proj
    elif b.kind != "skip":
        n += fam.mixer_params(cfg, i)
    n += d * b.mlp_hidden + b.mlp_hidden + b.mlp_hidden * d + d  # fc1, fc2
    return n


def model_params(cfg: CaitConfig) -> int:
    d = cfg.embed_dim
    n = _family(cfg).stem_params(cfg)  # patch embed (or the family's stem)
    n += cfg.num_prefix_tokens * d + cfg.pos_embed_len * d  # prefix tokens, pos embed
    heads = 2 if cfg.dist_token else 1
    n += 2 * d + heads * (d * cfg.num_classes + cfg.num_classes)  # final norm (or fc_norm), head(s)
    return n + sum(block_params(cfg, i) for i in range(cfg.depth))


def block_rows(cfg: CaitConfig) -> list[dict]:
    """The one per-block table (fuse's report, inspect, benchmarks): widths, tokens, FLOPs by part, params."""
    f = model_flops(cfg)
    tokens = cfg.tokens()
    return [
        {
            "block": i,
            "merge": b.merge,
            "kind": b.kind,
            "slim": b.slim,
            "tokens": tokens[i],
            "heads": b.num_heads,
            "qk_per_head": b.qk_dim,
            "v_per_head": b.v_dim,
            "mlp": b.mlp_hidden,
            "attn_scale": b.attn_scale,
            "flops": f["blocks"][i]["total"],
            "flops_parts": f["blocks"][i],
            "params": block_params(cfg, i),
        }
        for i, b in enumerate(cfg.blocks)
    ]


def encoder_flops(cfg: CaitConfig, last_block: int | None = None) -> int:
    """FLOPs per image of a feature extractor: the stem and blocks 0..last_block (all by default), no head.
    Restoring a merged grid (copies or bilinear upsampling) is not a matmul and is not counted."""
    last = cfg.depth - 1 if last_block is None else last_block
    return patch_embed_flops(cfg) + sum(block_flops(cfg, i)["total"] for i in range(last + 1))


def activation_bytes(config, batch: int, elem_bytes: int = 4) -> int:
    """Peak activation memory of one forward pass of `config` at `batch`, an estimate that does not
    overestimate: the largest block's live tensors (residual, qkv, attention scores and probabilities,
    mlp hidden) plus the patch embedding's input and output."""
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
