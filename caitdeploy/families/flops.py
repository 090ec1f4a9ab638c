"""Analytic FLOP and parameter counts, per image: the shared formulas, and the entry points every command uses
(each asks the config's family, `families/base.py`; the ViT family's counts are in vit/flops.py, Swin's in
swin/model.py).

FLOPs follow `torch.utils.flop_counter`: 2 per multiply-accumulate, matmuls and convolutions only
(LayerNorm, GELU, softmax and additions are not counted). Divide by 2 for the MACs papers call "FLOPs".
"""

from __future__ import annotations

from typing import Any


def transformer_parts(n: int, d: int, h: int, qk: int, v: int, hidden: int, n_mlp: int | None = None) -> dict[str, int]:
    """FLOPs of one pre-norm block's matmuls for n tokens of width d, h heads of q/k width qk and v width v,
    an mlp of `hidden` channels run on n_mlp tokens (n unless tokens are merged between attention and mlp)."""
    n_mlp = n if n_mlp is None else n_mlp
    return {
        "qkv": 2 * n * d * h * (2 * qk + v),
        "attn": 2 * h * n * n * (qk + v),
        "proj": 2 * n * h * v * d,
        "mlp": 2 * 2 * n_mlp * d * hidden,
    }


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


def _of(cfg: Any):
    from caitdeploy.families.registry import family_of

    return family_of(cfg)


def model_flops(cfg: Any) -> dict:
    """{"total", "patch_embed", "head", "blocks": [per-block dicts with "total"]} per image."""
    return _of(cfg).flops(cfg)


def model_params(cfg: Any) -> int:
    return _of(cfg).params(cfg)


def block_rows(cfg: Any) -> list[dict]:
    """The one per-block table (fuse's report, inspect, benchmarks): widths, tokens, FLOPs by part, params."""
    return _of(cfg).block_rows(cfg)


def channel_savings(cfg: Any, j: int) -> dict[str, int]:
    """FLOPs per image one CDCP unit of block j saves: {"qk", "v", "mlp"}."""
    return _of(cfg).channel_savings(cfg, j)


def encoder_flops(cfg: Any, last_block: int | None = None) -> int:
    """FLOPs per image of a feature extractor: the stem and blocks 0..last_block (all by default), no head."""
    return _of(cfg).encoder_flops(cfg, last_block)


def activation_bytes(cfg: Any, batch: int, elem_bytes: int = 4) -> int:
    """Peak activation memory of one forward pass of `cfg` at `batch` (an estimate that does not overestimate)."""
    return _of(cfg).activation_bytes(cfg, batch, elem_bytes)


def param_bytes(cfg: Any, elem_bytes: int = 4) -> int:
    return int(model_params(cfg) * elem_bytes)
