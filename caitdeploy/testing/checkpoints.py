"""Small CAIT checkpoints and fused files built from random weights (no downloads), shared by tests and benchmarks."""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from caitdeploy.families.vit.config import CaitConfig
from caitdeploy.families.vit.model import CaitViT
from caitdeploy.formats.checkpoint import FORMAT, MERGE_KEY
from caitdeploy.formats.fused import save_fused


def _orthogonal(n: int, g: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    return q


def random_checkpoint(
    *,
    embed_dim=48,
    depth=3,
    num_heads=3,
    mlp_ratio=2.0,
    img_size=32,
    patch_size=8,
    num_classes=10,
    merges=None,
    qkv_bias=True,
    keep=0.6,
    seed=0,
    dropped_scale=0.0,
    qk_differs=False,
    unequal_heads=False,
) -> dict:
    """A `cait-compactor/1` dict with random weights, random orthogonal compactors and CDCP-like masks.

    keep: fraction of channels kept (same count in every head, same q/k positions) unless
    qk_differs / unequal_heads break attention-/head-level consistency on purpose.
    dropped_scale: norm scale of the dropped compactor rows (0 = exactly zero, as converged CDCP leaves them).
    """
    g = torch.Generator().manual_seed(seed)
    merges = merges or {}
    fmt = {
        "img_size": img_size,
        "patch_size": patch_size,
        "in_chans": 3,
        "num_classes": num_classes,
        "embed_dim": embed_dim,
        "depth": depth,
        "num_heads": num_heads,
        "mlp_ratio": mlp_ratio,
        "qkv_bias": qkv_bias,
        "merges": {str(k): v for k, v in merges.items()},
    }
    cfg = CaitConfig.from_format({**fmt, "merges": merges})
    torch.manual_seed(seed)
    model = CaitViT(cfg)
    sd = {}
    for k, v in model.state_dict().items():
        if k.endswith("weight") and v.dim() >= 2:
            fan_in = v[0].numel()
            sd[k] = torch.randn(v.shape, generator=g) / math.sqrt(fan_in)
        elif "norm" in k and k.endswith("weight"):
            sd[k] = 1 + 0.1 * torch.randn(v.shape, generator=g)
        else:
            sd[k] = 0.1 * torch.randn(v.shape, generator=g)
    sd["head.weight"] *= 8  # a real logit spread, so top-1 comparisons mean something
    for i, kind in merges.items():
        sd[f"blocks.{i}.{MERGE_KEY[kind]}.fc.weight"] = sd.pop(f"blocks.{i}.merge.fc.weight")
        sd[f"blocks.{i}.{MERGE_KEY[kind]}.fc.bias"] = sd.pop(f"blocks.{i}.merge.fc.bias")
    d = embed_dim // num_heads
    hidden = int(embed_dim * mlp_ratio)
    for i in range(depth):
        n_keep = max(1, round(keep * d))
        masks = {}
        qk = torch.zeros(num_heads, d)
        for h in range(num_heads):
            n = n_keep - (1 if unequal_heads and h == 1 else 0)
            qk[h, torch.randperm(d, generator=g)[:n]] = 1
        masks["q"] = qk
        masks["k"] = qk.clone()
        if qk_differs:
            row = masks["k"][0]
            on, off = row.nonzero()[0], (row == 0).nonzero()[0]
            row[on], row[off] = 0, 1
        v = torch.zeros(num_heads, d)
        for h in range(num_heads):
            v[h, torch.randperm(d, generator=g)[: max(1, round(0.8 * keep * d))]] = 1
        masks["v"] = v
        f = torch.zeros(hidden)
        f[torch.randperm(hidden, generator=g)[: max(1, round(keep * hidden))]] = 1
        masks["fc1"] = f
        for name in ("q", "k", "v"):
            c = torch.stack([_orthogonal(d, g) for _ in range(num_heads)])
            m = masks[name].unsqueeze(-1)
            c = c * m + dropped_scale * torch.randn(c.shape, generator=g) / math.sqrt(d) * (1 - m)
            sd[f"blocks.{i}.attn.{name}_compactor.weight"] = c
            sd[f"blocks.{i}.attn.{name}_compactor.mask"] = masks[name]
        c = _orthogonal(hidden, g)
        m = masks["fc1"].unsqueeze(-1)
        sd[f"blocks.{i}.mlp.fc1_compactor.weight"] = c * m + dropped_scale * torch.randn(
            c.shape, generator=g
        ) / math.sqrt(hidden) * (1 - m)
        sd[f"blocks.{i}.mlp.fc1_compactor.mask"] = masks["fc1"]
    return {"format": FORMAT, "config": fmt, "state_dict": sd}


def write_tiny_fused(path, seed=0):
    """A fused CAIT model (pruned widths + one ATME merge) written like `caitdeploy fuse` writes it."""
    fmt = dict(
        img_size=64,
        patch_size=8,
        in_chans=3,
        num_classes=10,
        embed_dim=48,
        depth=4,
        num_heads=3,
        mlp_ratio=2.0,
        qkv_bias=True,
    )
    dense = CaitConfig.from_format({**fmt, "merges": {2: "h"}})
    blocks = tuple(replace(b, qk_dim=8, v_dim=8, mlp_hidden=64) for b in dense.blocks)
    cfg = replace(dense, blocks=blocks, source={**fmt, "merges": {"2": "h"}})
    torch.manual_seed(seed)
    save_fused(path, cfg, CaitViT(cfg).state_dict(), meta={})
    return path
