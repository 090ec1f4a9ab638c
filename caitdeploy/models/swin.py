"""Swin Transformer deploy model with CAIT widths and ATME merges (issue 15, first part: the model, its config,
its FLOPs and timm parity; not yet wired into fuse / export / the registry).

Layout: timm's `SwinTransformer` (NHWC stages, PatchMerging at the start of stages 1..3, relative position bias,
shifted windows on odd blocks). Per block, CAIT widths as in the ViT family: `qk_dim` per head for q and k (the
same positions, attention-level consistency), `v_dim` per head, `mlp_hidden`; the fused `qkv` Linear's rows are
[q (heads x qk) | k (heads x qk) | v (heads x v)], `proj` takes heads x v.

ATME inside a stage (paper Tab. XIV: HTM and VTM at the last two blocks of stage 3): a merge before block i of a
stage concatenates two neighbouring tokens (horizontal: (r, 2c) and (r, 2c+1); vertical: (2r, c) and (2r+1, c);
the first one's channels first) and fuses them with one Linear(2C -> C); the grid side it halves must be even.
The window rule is timm's (and Microsoft Swin's) rule for a grid smaller than the window, applied to the merged
grid: per axis, window = min(window, grid side), and a block shifts along an axis only if the grid side exceeds
the window there; grids that the window does not tile are zero-padded to a multiple of it (as Swin pads).
PatchMerging pads an odd grid to even first, as timm does: Swin-T's stage-3 grid 14x14 -> HTM 14x7 -> VTM 7x7,
then stage 4 runs on ceil(7/2) = 4 -> 4x4 tokens with a 4x4 window.

Every reshape keeps the batch dynamic (-1), so an exported ONNX serves any batch size (SPViT's and Microsoft's
`window_reverse` cast the batch to an int, which breaks dynamic-batch ONNX).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class SwinBlock:
    num_heads: int
    qk_dim: int            # per head, q and k
    v_dim: int             # per head
    mlp_hidden: int
    scale: float           # attention scale (the dense head width's ** -0.5, kept when q/k are pruned)
    merge: str | None = None   # "h" | "v": an ATME merge before this block


@dataclass(frozen=True)
class SwinConfig:
    img_size: int
    patch_size: int
    in_chans: int
    num_classes: int
    dims: tuple[int, ...]                      # channels per stage
    stages: tuple[tuple[SwinBlock, ...], ...]  # blocks per stage
    window: int = 7
    qkv_bias: bool = True
    ln_eps: float = 1e-5
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        if len(self.dims) != len(self.stages) or not self.stages:
            raise ValueError("dims and stages must have one entry per stage")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        for s, blocks in enumerate(self.stages):
            for i, b in enumerate(blocks):
                if b.merge not in (None, "h", "v"):
                    raise ValueError(f"stage {s} block {i}: merge must be 'h' or 'v', got {b.merge!r}")
                if min(b.num_heads, b.qk_dim, b.v_dim, b.mlp_hidden) < 1:
                    raise ValueError(f"stage {s} block {i}: widths must be positive")
        self.grids()   # raises on a merge over an odd side

    def grids(self) -> list[list[tuple[int, int]]]:
        """The (H, W) token grid each block runs on."""
        h = w = self.img_size // self.patch_size
        out = []
        for s, blocks in enumerate(self.stages):
            if s > 0:
                h, w = (h + 1) // 2, (w + 1) // 2   # PatchMerging pads an odd side
            row = []
            for i, b in enumerate(blocks):
                if b.merge == "h":
                    if w % 2:
                        raise ValueError(f"stage {s} block {i}: horizontal merge on an odd grid width {w} "
                                         f"(grid {h}x{w})")
                    w //= 2
                elif b.merge == "v":
                    if h % 2:
                        raise ValueError(f"stage {s} block {i}: vertical merge on an odd grid height {h} "
                                         f"(grid {h}x{w})")
                    h //= 2
                row.append((h, w))
            out.append(row)
        return out

    def window_shift(self, stage: int, block: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """timm's rule on the block's grid: per axis, window = min(window, side); shift (odd blocks) = window // 2
        only where the side exceeds the window."""
        h, w = self.grids()[stage][block]
        win = (min(self.window, h), min(self.window, w))
        shift = tuple(0 if (block % 2 == 0 or side <= self.window) else self.window // 2 for side in (h, w))
        return win, shift   # type: ignore[return-value]


def window_mask(grid: tuple[int, int], win: tuple[int, int], shift: tuple[int, int]) -> torch.Tensor | None:
    """Swin's shifted-window attention mask [nW, N, N] (0 / -100) on the padded grid, or None without a shift."""
    if not any(shift):
        return None
    hp, wp = (math.ceil(g / w) * w for g, w in zip(grid, win))
    img = torch.zeros(hp, wp)
    cnt = 0
    for hs in ((0, -win[0]), (-win[0], -shift[0]), (-shift[0], None)):
        for ws in ((0, -win[1]), (-win[1], -shift[1]), (-shift[1], None)):
            img[hs[0]:hs[1], ws[0]:ws[1]] = cnt
            cnt += 1
    m = img.view(hp // win[0], win[0], wp // win[1], win[1]).permute(0, 2, 1, 3).reshape(-1, win[0] * win[1])
    d = m.unsqueeze(1) - m.unsqueeze(2)
    return d.masked_fill(d != 0, -100.0).masked_fill(d == 0, 0.0)


def relative_position_index(win: tuple[int, int]) -> torch.Tensor:
    coords = torch.stack(torch.meshgrid(torch.arange(win[0]), torch.arange(win[1]), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)
    rel[:, :, 0] += win[0] - 1
    rel[:, :, 1] += win[1] - 1
    rel[:, :, 0] *= 2 * win[1] - 1
    return rel.sum(-1)


class SwinAttention(nn.Module):
    def __init__(self, dim: int, b: SwinBlock, win: tuple[int, int], qkv_bias: bool):
        super().__init__()
        self.heads, self.qk, self.v, self.scale = b.num_heads, b.qk_dim, b.v_dim, b.scale
        self.win = win
        self.qkv = nn.Linear(dim, b.num_heads * (2 * b.qk_dim + b.v_dim), bias=qkv_bias)
        self.proj = nn.Linear(b.num_heads * b.v_dim, dim)
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * win[0] - 1) * (2 * win[1] - 1), b.num_heads))
        self.register_buffer("relative_position_index", relative_position_index(win), persistent=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        n = x.shape[1]
        hq, hv = self.heads * self.qk, self.heads * self.v
        q, k, v = self.qkv(x).split([hq, hq, hv], dim=-1)
        q = q.reshape(-1, n, self.heads, self.qk).transpose(1, 2)
        k = k.reshape(-1, n, self.heads, self.qk).transpose(1, 2)
        v = v.reshape(-1, n, self.heads, self.v).transpose(1, 2)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        attn = attn + bias.view(n, n, self.heads).permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            nw = mask.shape[0]
            attn = (attn.view(-1, nw, self.heads, n, n) + mask.unsqueeze(1).unsqueeze(0)).view(-1, self.heads, n, n)
        out = attn.softmax(-1) @ v
        return self.proj(out.transpose(1, 2).reshape(-1, n, hv))


class SwinBlockModule(nn.Module):
    def __init__(self, dim: int, b: SwinBlock, grid: tuple[int, int], win, shift, qkv_bias: bool, eps: float):
        super().__init__()
        self.grid, self.win, self.shift = grid, win, shift
        self.merge = nn.Linear(2 * dim, dim) if b.merge else None
        self.merge_kind = b.merge
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = SwinAttention(dim, b, win, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.fc1 = nn.Linear(dim, b.mlp_hidden)
        self.fc2 = nn.Linear(b.mlp_hidden, dim)
        mask = window_mask(grid, win, shift)
        self.register_buffer("attn_mask", mask, persistent=False)

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        (h, w), (wh, ww), (sh, sw) = self.grid, self.win, self.shift
        c = x.shape[-1]
        if sh or sw:
            x = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2))
        ph, pw = (wh - h % wh) % wh, (ww - w % ww) % ww
        if ph or pw:
            x = F.pad(x, (0, 0, 0, pw, 0, ph))
        hp, wp = h + ph, w + pw
        xw = x.reshape(-1, hp // wh, wh, wp // ww, ww, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, wh * ww, c)
        yw = self.attn(xw, self.attn_mask)
        y = yw.reshape(-1, hp // wh, wp // ww, wh, ww, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, hp, wp, c)
        if ph or pw:
            y = y[:, :h, :w, :]
        if sh or sw:
            y = torch.roll(y, shifts=(sh, sw), dims=(1, 2))
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merge is not None:
            (h, w), c = self.grid, x.shape[-1]
            if self.merge_kind == "h":      # (r, 2c) and (r, 2c+1): adjacent in memory
                x = x.reshape(-1, h, w, 2 * c)
            else:                           # (2r, c) and (2r+1, c)
                x = x.reshape(-1, h, 2, w, c).permute(0, 1, 3, 2, 4).reshape(-1, h, w, 2 * c)
            x = self.merge(x)
        x = x + self._attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class PatchMerge(nn.Module):
    """timm's PatchMerging: pad odd sides, 2x2 neighbours -> 4C (timm's order), LayerNorm, Linear(4C -> C')."""

    def __init__(self, dim: int, out: int, grid: tuple[int, int], eps: float):
        super().__init__()
        self.grid = grid
        self.norm = nn.LayerNorm(4 * dim, eps=eps)
        self.reduction = nn.Linear(4 * dim, out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = self.grid
        c = x.shape[-1]
        if h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
            h, w = h + h % 2, w + w % 2
        x = x.reshape(-1, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 4, 2, 5).reshape(-1, h // 2, w // 2, 4 * c)
        return self.reduction(self.norm(x))


class CaitSwin(nn.Module):
    """Images [B, C, H, W] -> logits [B, classes]. Parameter names follow timm's SwinTransformer
    (`layers.{s}.downsample`, `layers.{s}.blocks.{i}.attn.qkv`, ...; fc1/fc2 at `blocks.{i}.fc1/fc2`)."""

    def __init__(self, cfg: SwinConfig):
        super().__init__()
        self.config = cfg
        self.patch_embed = nn.Conv2d(cfg.in_chans, cfg.dims[0], cfg.patch_size, cfg.patch_size)
        self.patch_norm = nn.LayerNorm(cfg.dims[0], eps=cfg.ln_eps)
        grids = cfg.grids()
        g = (cfg.img_size // cfg.patch_size,) * 2
        self.layers = nn.ModuleList()
        for s, blocks in enumerate(cfg.stages):
            stage = nn.Module()
            stage.downsample = PatchMerge(cfg.dims[s - 1], cfg.dims[s], g, cfg.ln_eps) if s else None
            stage.blocks = nn.ModuleList(
                SwinBlockModule(cfg.dims[s], b, grids[s][i], *cfg.window_shift(s, i), cfg.qkv_bias, cfg.ln_eps)
                for i, b in enumerate(blocks))
            self.layers.append(stage)
            g = grids[s][-1]
        self.norm = nn.LayerNorm(cfg.dims[-1], eps=cfg.ln_eps)
        self.head = nn.Linear(cfg.dims[-1], cfg.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_norm(self.patch_embed(x).permute(0, 2, 3, 1))
        for stage in self.layers:
            if stage.downsample is not None:
                x = stage.downsample(x)
            for blk in stage.blocks:
                x = blk(x)
        return self.head(self.norm(x).mean(dim=(1, 2)))


# ---- timm -----------------------------------------------------------------------------------------------
def swin_config_of(model, merges: dict[tuple[int, int], str] | None = None) -> SwinConfig:
    """The dense SwinConfig of a timm SwinTransformer; `merges` {(stage, block): "h"|"v"} adds ATME merges."""
    merges = merges or {}
    stages, dims = [], []
    for s, layer in enumerate(model.layers):
        dim = layer.blocks[0].norm1.normalized_shape[0]
        dims.append(dim)
        blocks = []
        for i, blk in enumerate(layer.blocks):
            a = blk.attn
            hd = a.qkv.out_features // 3 // a.num_heads
            blocks.append(SwinBlock(a.num_heads, hd, hd, blk.mlp.fc1.out_features, float(a.scale),
                                    merges.get((s, i))))
        stages.append(tuple(blocks))
    pe = model.patch_embed
    return SwinConfig(img_size=int(pe.img_size[0]), patch_size=int(pe.patch_size[0]),
                      in_chans=int(pe.proj.in_channels), num_classes=int(model.num_classes), dims=tuple(dims),
                      stages=tuple(stages), window=int(model.layers[0].blocks[0].attn.window_size[0]),
                      qkv_bias=model.layers[0].blocks[0].attn.qkv.bias is not None,
                      ln_eps=float(model.norm.eps))


def state_dict_from_timm(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm SwinTransformer keys -> CaitSwin keys (dense; merges, where a config has them, are not in timm)."""
    out = {}
    for k, v in sd.items():
        if k.endswith(("relative_position_index", "attn_mask")):
            continue
        k2 = (k.replace("patch_embed.proj.", "patch_embed.").replace("patch_embed.norm.", "patch_norm.")
              .replace(".mlp.fc1.", ".fc1.").replace(".mlp.fc2.", ".fc2.").replace("head.fc.", "head."))
        out[k2] = v
    return out


# ---- FLOPs ----------------------------------------------------------------------------------------------
def swin_flops(cfg: SwinConfig) -> dict[str, int]:
    """Analytic FLOPs per image (2 x multiply-accumulates of matmuls and convolutions, as flops.py counts), with
    the windows' zero padding counted (those tokens are computed)."""
    g = cfg.img_size // cfg.patch_size
    stem = 2 * g * g * cfg.in_chans * cfg.patch_size ** 2 * cfg.dims[0]
    total, per_stage = stem, []
    grids = cfg.grids()
    h = w = g
    for s, blocks in enumerate(cfg.stages):
        f = 0
        if s:
            h2, w2 = (h + 1) // 2, (w + 1) // 2
            f += 2 * h2 * w2 * 4 * cfg.dims[s - 1] * cfg.dims[s]
        c = cfg.dims[s]
        for i, b in enumerate(blocks):
            gh, gw = grids[s][i]
            if b.merge:
                f += 2 * gh * gw * 2 * c * c
            (wh, ww), _ = cfg.window_shift(s, i)
            hp, wp = math.ceil(gh / wh) * wh, math.ceil(gw / ww) * ww
            t, n = hp * wp, wh * ww          # tokens computed (padding included), tokens per window
            hq, hv = b.num_heads * b.qk_dim, b.num_heads * b.v_dim
            f += 2 * t * c * (2 * hq + hv)                    # qkv
            f += 2 * t * n * hq + 2 * t * n * hv              # q @ k^T, attn @ v (per window)
            f += 2 * t * hv * c                               # proj
            f += 2 * 2 * gh * gw * c * b.mlp_hidden           # fc1, fc2 (unpadded tokens)
        h, w = grids[s][-1]
        per_stage.append(f)
        total += f
    total += 2 * cfg.dims[-1] * cfg.num_classes
    return {"total": total, "stem": stem, "stages": per_stage}
