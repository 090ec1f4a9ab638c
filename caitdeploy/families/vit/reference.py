"""The forward pass a `cait-compactor/1` checkpoint defines, written literally from the format.

This is the oracle the fused model is checked against: compactors applied as matrices, no folding, no
slicing, by default in float64. It shares no code with `CaitViT` on purpose.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from caitdeploy.core.names import compactor_prefix, merge_prefix


def _merge(
    x: torch.Tensor, grid: tuple[int, int], kind: str, w: torch.Tensor, b: torch.Tensor, prefix: int
) -> torch.Tensor:
    cls_tok, patches = x[:, :prefix], x[:, prefix:]
    bsz, _, d = patches.shape
    gh, gw = grid
    grid_x = patches.reshape(bsz, gh, gw, d)
    if kind == "h":
        left, right = grid_x[:, :, 0::2], grid_x[:, :, 1::2]
        pairs = torch.cat([left, right], dim=-1)
    else:
        top, bottom = grid_x[:, 0::2], grid_x[:, 1::2]
        pairs = torch.cat([top, bottom], dim=-1)
    merged = pairs.reshape(bsz, -1, 2 * d) @ w.T + b
    return torch.cat([cls_tok, merged], dim=1)


def _restore(tokens: torch.Tensor, grid: tuple[int, int], full: tuple[int, int], mode: str) -> torch.Tensor:
    """[B, gh*gw, D] -> [B, D, Gh, Gw]: patch (r, c) takes merged token (r // fh, c // fw) ("repeat",
    written as an index map), or bilinear upsampling."""
    bsz, _, d = tokens.shape
    gh, gw = grid
    fmap = tokens.reshape(bsz, gh, gw, d).permute(0, 3, 1, 2)
    if mode == "bilinear":
        return fmap if grid == full else F.interpolate(fmap, size=full, mode="bilinear", align_corners=False)
    rows = torch.arange(full[0]) // (full[0] // gh)
    cols = torch.arange(full[1]) // (full[1] // gw)
    return fmap[:, :, rows][:, :, :, cols]


@torch.no_grad()
def reference_forward(
    ckpt: Any, images: torch.Tensor, dtype: torch.dtype = torch.float64, features=None, restore: str = "repeat"
):
    """Logits [B, num_classes] of the checkpoint's own forward pass (compactors included), at the size of
    `images` (the position embedding resampled as models/resize.py says when it differs from the
    checkpoint's). With `features` (block indices): a list of [B, D, Gh, Gw] maps, each block's output on
    the full patch grid (prefix tokens dropped, merged grids restored by `restore`) instead."""
    raw = ckpt.state_dict

    def opt(key: str) -> torch.Tensor | None:  # one tensor at a time: never a float64 copy of the whole checkpoint
        return raw[key].to(dtype) if key in raw else None

    def w(key: str) -> torch.Tensor:  # a tensor the forward cannot do without (the checkpoint was validated)
        return raw[key].to(dtype)

    from caitdeploy.families import family
    from caitdeploy.families.vit.resize import resample_pos_embed

    cfg, fmt = ckpt.config, ckpt.format_config
    cfg = cfg.at_size(tuple(images.shape[-2:]))
    wanted = cfg.feature_blocks(features) if features is not None else ()
    grids = cfg.grids()
    h = fmt["num_heads"]
    d = cfg.embed_dim
    hd = d // h
    scale = hd**-0.5
    eps = cfg.ln_eps
    lam = float(fmt.get("skip_lam", 1.0))  # LV-ViT: every residual branch is divided by skip_lam
    pre = cfg.num_prefix_tokens
    fam: Any = family(cfg.family)  # a VitFamily: its variant's hooks give the stem
    x = fam.reference_stem(cfg, opt, images.to(dtype))
    bsz = x.shape[0]
    prefix = [w(k).expand(bsz, -1, -1) for k in ("cls_token", "dist_token", "reg_token") if k in raw]
    pos = resample_pos_embed(w("pos_embed"), ckpt.config.grid, cfg.grid, 0 if cfg.no_embed_class else pre)
    if cfg.no_embed_class:  # pos_embed covers the patches only; prefix tokens are prepended after it
        x = torch.cat([*prefix, x + pos], dim=1)
    else:
        x = torch.cat([*prefix, x], dim=1) + pos
    maps: list[torch.Tensor] = []
    for i, blk in enumerate(cfg.blocks):
        if wanted and i > wanted[-1]:
            return maps
        p = f"blocks.{i}."
        if blk.merge:
            m = merge_prefix(i, blk.merge) + "."
            x = _merge(x, cfg.input_grid(i), blk.merge, w(m + "weight"), w(m + "bias"), pre)
        bsz, n, _ = x.shape
        y = F.layer_norm(x, (d,), opt(p + "norm1.weight"), opt(p + "norm1.bias"), eps)
        qkv = y @ w(p + "attn.qkv.weight").T
        if cfg.qkv_bias:
            qkv = qkv + w(p + "attn.qkv.bias")
        q, k, v = (t.reshape(bsz, n, h, hd) for t in qkv.split(d, dim=-1))  # [B, N, H, d]
        heads = []
        for name, t in zip("qkv", (q, k, v)):
            c = opt(compactor_prefix(i, name) + ".weight")
            if c is not None:  # t_h <- t_h @ C_h^T
                t = torch.einsum("bnhj,hij->bnhi", t, c)
            heads.append(t.transpose(1, 2))  # [B, H, N, d]
        q, k, v = heads
        attn = torch.softmax((q @ k.transpose(-2, -1)) * scale, dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(bsz, n, d)
        branch = out @ w(p + "attn.proj.weight").T + w(p + "attn.proj.bias")
        if (g := opt(p + "ls1.gamma")) is not None:  # layer scale (DeiT III)
            branch = branch * g
        x = x + branch / lam
        y = F.layer_norm(x, (d,), opt(p + "norm2.weight"), opt(p + "norm2.bias"), eps)
        y = y @ w(p + "mlp.fc1.weight").T + w(p + "mlp.fc1.bias")
        c = opt(compactor_prefix(i, "fc1") + ".weight")
        if c is not None:
            y = y @ c.T
        y = F.gelu(y)
        branch = y @ w(p + "mlp.fc2.weight").T + w(p + "mlp.fc2.bias")
        if (g := opt(p + "ls2.gamma")) is not None:
            branch = branch * g
        x = x + branch / lam
        if i in wanted:
            maps.append(_restore(x[:, pre:], grids[i], cfg.grid, restore))
    if wanted:
        return maps
    if not cfg.fc_norm:
        x = F.layer_norm(x, (d,), opt("norm.weight"), opt("norm.bias"), eps)
    pooled = x[:, pre:].mean(dim=1) if cfg.global_pool == "avg" else x[:, 0]  # patch-token mean or class token
    if cfg.fc_norm:  # timm's fc_norm: the final LayerNorm after pooling
        pooled = F.layer_norm(pooled, (d,), opt("fc_norm.weight"), opt("fc_norm.bias"), eps)
    logits = pooled @ w("head.weight").T + w("head.bias")
    if cfg.dist_token:  # timm's eval output of a distilled DeiT: the mean of both heads
        logits = (logits + x[:, 1] @ w("head_dist.weight").T + w("head_dist.bias")) / 2
    return logits
