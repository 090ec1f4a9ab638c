"""Analytic FLOP and parameter counts of a `CaitConfig`, per image.

FLOPs follow `torch.utils.flop_counter`: 2 per multiply-accumulate, matmuls and convolutions only
(LayerNorm, GELU, softmax and additions are not counted). Divide by 2 for the MACs papers call "FLOPs".
"""
from __future__ import annotations

from .config import BlockConfig, CaitConfig


def block_flops(cfg: CaitConfig, i: int) -> dict[str, int]:
    """FLOPs of block i per image, by part."""
    b: BlockConfig = cfg.blocks[i]
    d = cfg.embed_dim
    n = cfg.tokens()[i]
    h = b.num_heads
    parts = {
        "merge": 2 * (n - 1) * (2 * d) * d if b.merge else 0,
        "qkv": 2 * n * d * h * (2 * b.qk_dim + b.v_dim),
        "attn": 2 * h * n * n * (b.qk_dim + b.v_dim),
        "proj": 2 * n * h * b.v_dim * d,
        "mlp": 2 * 2 * n * d * b.mlp_hidden,
    }
    parts["total"] = sum(parts.values())
    return parts


def model_flops(cfg: CaitConfig) -> dict:
    """{"total", "patch_embed", "head", "blocks": [per-block dicts]} per image."""
    gh, gw = cfg.grid
    patch = 2 * gh * gw * cfg.embed_dim * cfg.in_chans * cfg.patch_size**2
    head = 2 * cfg.embed_dim * cfg.num_classes
    blocks = [block_flops(cfg, i) for i in range(cfg.depth)]
    return {"total": patch + head + sum(b["total"] for b in blocks), "patch_embed": patch, "head": head,
            "blocks": blocks}


def block_params(cfg: CaitConfig, i: int) -> int:
    b = cfg.blocks[i]
    d = cfg.embed_dim
    qkv_out = b.num_heads * (2 * b.qk_dim + b.v_dim)
    n = (2 * d * d + d) if b.merge else 0                        # merge fc: [D, 2D] + bias
    n += 4 * d                                                   # norm1, norm2
    n += qkv_out * d + (qkv_out if cfg.qkv_bias else 0)          # qkv
    n += b.num_heads * b.v_dim * d + d                           # proj
    n += d * b.mlp_hidden + b.mlp_hidden + b.mlp_hidden * d + d  # fc1, fc2
    return n


def model_params(cfg: CaitConfig) -> int:
    d = cfg.embed_dim
    gh, gw = cfg.grid
    n = d * cfg.in_chans * cfg.patch_size**2 + d      # patch embed
    n += d + (1 + gh * gw) * d                        # cls token, pos embed
    n += 2 * d + d * cfg.num_classes + cfg.num_classes  # final norm, head
    return n + sum(block_params(cfg, i) for i in range(cfg.depth))
