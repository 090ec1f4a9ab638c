"""The forward pass a Swin `cait-compactor/1` checkpoint defines, written literally from the format (timm's
SwinTransformer v1 keys, CDCP compactors, ATME merges inside a stage).

This is the oracle a fused Swin is checked against: compactors applied as matrices, no folding, no slicing, in
float64, on the checkpoint's own tensors. It shares no code with `CaitSwin` on purpose: its own window
partition, relative-position index, shift mask and patch merging. Only the geometry (each block's grid, window
and shift) comes from the config, as the format defines it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

MERGE_KEY = {"h": "htm", "v": "vtm"}


def _regions(side: int, win: int, shift: int) -> torch.Tensor:
    """Region label of each position along one padded axis after a cyclic shift: the three strips Swin masks
    apart ([0, side - win), [side - win, side - shift), [side - shift, side)); one region without a shift."""
    pos = torch.arange(side)
    if shift == 0:
        return torch.zeros(side, dtype=torch.long)
    return (pos >= side - win).long() + (pos >= side - shift).long()


def _shift_mask(hp: int, wp: int, win: tuple[int, int], shift: tuple[int, int], dtype) -> torch.Tensor:
    """[windows, N, N]: 0 where two tokens of a window come from the same region of the unshifted map, -100
    elsewhere."""
    label = _regions(hp, win[0], shift[0])[:, None] * 3 + _regions(wp, win[1], shift[1])[None, :]
    lw = _windows(label[None, :, :, None].to(dtype), win)[..., 0]  # [nW, N]
    return torch.where(lw[:, :, None] == lw[:, None, :], 0.0, -100.0).to(dtype)


def _windows(x: torch.Tensor, win: tuple[int, int]) -> torch.Tensor:
    """[B, Hp, Wp, C] -> [B * nW, wh * ww, C], windows in row-major order, tokens row-major inside."""
    b, hp, wp, c = x.shape
    wh, ww = win
    out = []
    for r in range(0, hp, wh):
        for q in range(0, wp, ww):
            out.append(x[:, r : r + wh, q : q + ww, :].reshape(b, wh * ww, c))
    return torch.stack(out, dim=1).reshape(-1, wh * ww, c)


def _unwindows(y: torch.Tensor, b: int, hp: int, wp: int, win: tuple[int, int]) -> torch.Tensor:
    wh, ww = win
    c = y.shape[-1]
    y = y.reshape(b, (hp // wh) * (wp // ww), wh, ww, c)
    out = torch.empty(b, hp, wp, c, dtype=y.dtype)
    k = 0
    for r in range(0, hp, wh):
        for q in range(0, wp, ww):
            out[:, r : r + wh, q : q + ww, :] = y[:, k]
            k += 1
    return out


def _relative_index(win: tuple[int, int]) -> torch.Tensor:
    """[N, N] row of the relative-position table for each pair of tokens of a window (timm's layout)."""
    wh, ww = win
    ys, xs = torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")
    ys, xs = ys.reshape(-1), xs.reshape(-1)
    return (ys[:, None] - ys[None, :] + wh - 1) * (2 * ww - 1) + (xs[:, None] - xs[None, :] + ww - 1)


@torch.no_grad()
def reference_forward(ckpt: Any, images: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Logits [B, num_classes] of the Swin checkpoint's own forward pass (compactors included)."""
    cfg, raw = ckpt.config, ckpt.state_dict

    def w(key: str) -> torch.Tensor | None:  # one tensor at a time: never a float64 copy of the checkpoint
        return raw[key].to(dtype) if key in raw else None

    def need(key: str) -> torch.Tensor:  # a weight the forward cannot do without (the checkpoint was validated)
        return raw[key].to(dtype)

    def ln(x, prefix):
        return F.layer_norm(x, (x.shape[-1],), w(prefix + ".weight"), w(prefix + ".bias"), cfg.ln_eps)

    def linear(x, prefix):
        return F.linear(x, need(prefix + ".weight"), w(prefix + ".bias"))

    x = F.conv2d(
        images.to(dtype), need("patch_embed.proj.weight"), w("patch_embed.proj.bias"), stride=cfg.patch_size
    ).permute(0, 2, 3, 1)  # [B, H, W, C]
    x = ln(x, "patch_embed.norm")
    grids = cfg.grids()
    for s, blocks in enumerate(cfg.stages):
        if s:  # PatchMerging: pad odd sides, the 2x2 neighbours (0,0), (1,0), (0,1), (1,1) -> 4C, LN, Linear
            h, wd = x.shape[1], x.shape[2]
            x = F.pad(x, (0, 0, 0, wd % 2, 0, h % 2))
            x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
            x = F.linear(ln(x, f"layers.{s}.downsample.norm"), need(f"layers.{s}.downsample.reduction.weight"))
        for i, b in enumerate(blocks):
            p = f"layers.{s}.blocks.{i}."
            if b.merge == "h":  # tokens (r, 2c) and (r, 2c + 1) side by side -> Linear(2C -> C)
                x = linear(torch.cat([x[:, :, 0::2], x[:, :, 1::2]], dim=-1), p + MERGE_KEY["h"] + ".fc")
            elif b.merge == "v":  # tokens (2r, c) and (2r + 1, c)
                x = linear(torch.cat([x[:, 0::2], x[:, 1::2]], dim=-1), p + MERGE_KEY["v"] + ".fc")
            assert tuple(x.shape[1:3]) == grids[s][i], (x.shape, grids[s][i])
            if b.kind != "attn":
                raise ValueError(f"stage {s} block {i}: the reference covers attention blocks only, not {b.kind!r}")
            x = x + _window_attention(ln(x, p + "norm1"), w, p, b, cfg.window_shift(s, i))
            hidden = linear(ln(x, p + "norm2"), p + "mlp.fc1")
            comp = w(p + "mlp.fc1_compactor.weight")
            if comp is not None:
                hidden = hidden @ comp.T
            x = x + linear(F.gelu(hidden), p + "mlp.fc2")
    return linear(ln(x, "norm").mean(dim=(1, 2)), "head.fc")


def _window_attention(y: torch.Tensor, w, p: str, b, win_shift) -> torch.Tensor:
    """Shifted-window multi-head attention of block `p` on [B, H, W, C], q/k/v compactors applied per head."""
    (wh, ww), (sh, sw) = win_shift
    bsz, h, wd, _ = y.shape
    y = torch.roll(y, shifts=(-sh, -sw), dims=(1, 2))
    ph, pw = -h % wh, -wd % ww
    y = F.pad(y, (0, 0, 0, pw, 0, ph))  # zero tokens, attended like any other
    hp, wp = h + ph, wd + pw
    t = _windows(y, (wh, ww))  # [B*nW, N, C]
    n, heads = wh * ww, b.num_heads
    qkv = F.linear(t, w(p + "attn.qkv.weight"), w(p + "attn.qkv.bias"))
    q, k, v = qkv.split([heads * b.qk_dim, heads * b.qk_dim, heads * b.v_dim], dim=-1)
    per_head = {
        "q": q.reshape(-1, n, heads, b.qk_dim).transpose(1, 2),  # [B*nW, heads, N, d]
        "k": k.reshape(-1, n, heads, b.qk_dim).transpose(1, 2),
        "v": v.reshape(-1, n, heads, b.v_dim).transpose(1, 2),
    }
    for name, y_ in per_head.items():
        comp = w(p + f"attn.{name}_compactor.weight")  # [heads, d, d]: y_h <- y_h C_h^T
        if comp is not None:
            per_head[name] = torch.einsum("bhnd,hed->bhne", y_, comp)
    q, k, v = per_head["q"], per_head["k"], per_head["v"]
    scores = (q * b.scale) @ k.transpose(-2, -1)
    table = w(p + "attn.relative_position_bias_table")  # [(2wh-1)(2ww-1), heads]
    scores = scores + table[_relative_index((wh, ww))].permute(2, 0, 1)[None]
    if sh or sw:
        mask = _shift_mask(hp, wp, (wh, ww), (sh, sw), scores.dtype)  # [nW, N, N]
        scores = (scores.reshape(bsz, -1, heads, n, n) + mask[None, :, None]).reshape(-1, heads, n, n)
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(-1, n, heads * b.v_dim)
    out = F.linear(out, w(p + "attn.proj.weight"), w(p + "attn.proj.bias"))
    out = _unwindows(out, bsz, hp, wp, (wh, ww))[:, :h, :wd]
    return torch.roll(out, shifts=(sh, sw), dims=(1, 2))
