"""Family "swin": the Swin Transformer with CAIT widths and ATME merges. `CaitSwin` is the deploy model (what a
fused file builds) and, with `compactors=True`, the checkpoint's own model (per-head q/k/v compactors and the
fc1 compactor applied at run time: the float64 reference `fuse` checks against). `SwinConfig` is its config,
with the surface export, bench and serve read (input_shape, size_text, depth, merges, unpruned, to_json).

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

import json
import math
import re
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from caitdeploy.core.errors import render
from caitdeploy.families.layers import Compactor
from caitdeploy.families.vit.config import ConfigError

NAME = "swin"
DESCRIPTION = "Swin Transformer: shifted-window attention, per-head CAIT widths, ATME merges inside a stage"
MAX_STAGES = 8
MAX_WINDOW = 64
KINDS = ("attn", "conv1", "conv3", "skip")
# Swin's index / mask buffers, which Microsoft's and upstream files save and the model rebuilds from its config
BUFFER_SUFFIXES = (".relative_position_index", ".attn_mask")
CONV_KERNEL = {"conv1": 1, "conv3": 3}


@dataclass(frozen=True)
class SwinBlock:
    num_heads: int
    qk_dim: int  # per head, q and k
    v_dim: int  # per head
    mlp_hidden: int
    scale: float  # attention scale (the dense head width's ** -0.5, kept when q/k are pruned)
    merge: str | None = None  # "h" | "v": an ATME merge before this block
    # the token mixer: window attention, SPViT-Swin's 1x1 / 3x3 convolution over the whole map (v_dim channels,
    # BatchNorm folded, ReLU, Linear back), or nothing (the block adds its LayerNorm output)
    kind: str = "attn"


@dataclass(frozen=True)
class SwinConfig:
    img_size: int
    patch_size: int
    in_chans: int
    num_classes: int
    dims: tuple[int, ...]  # channels per stage
    stages: tuple[tuple[SwinBlock, ...], ...]  # blocks per stage
    window: int = 7
    qkv_bias: bool = True
    ln_eps: float = 1e-5
    # the cait-compactor/1 config this model was fused from (empty for a dense model)
    source: dict = field(default_factory=dict, compare=False)

    family = "swin"

    def __post_init__(self):
        from caitdeploy.families.vit.config import LN_EPS_MAX, check_bound

        object.__setattr__(self, "dims", tuple(self.dims))
        object.__setattr__(self, "stages", tuple(tuple(b) for b in self.stages))
        for key in ("img_size", "patch_size", "in_chans", "num_classes"):
            check_bound(getattr(self, key), key)
        if not 1 <= len(self.stages) <= MAX_STAGES or len(self.dims) != len(self.stages):
            raise ConfigError(f"dims and stages must have one entry per stage (1..{MAX_STAGES} stages)")
        for d in self.dims:
            check_bound(d, "embed_dim", what="stage ")
        check_bound(sum(len(b) for b in self.stages), "depth")
        if isinstance(self.window, bool) or not isinstance(self.window, int) or not 1 <= self.window <= MAX_WINDOW:
            raise ConfigError(f"window must be an integer in 1..{MAX_WINDOW}, got {render(self.window)}")
        if not isinstance(self.qkv_bias, bool):
            raise ConfigError(f"qkv_bias must be true or false, got {render(self.qkv_bias)}")
        if (
            isinstance(self.ln_eps, bool)
            or not isinstance(self.ln_eps, (int, float))
            or not 0 < self.ln_eps <= LN_EPS_MAX
        ):
            raise ConfigError(f"ln_eps must be a number in (0, {LN_EPS_MAX:g}], got {render(self.ln_eps)}")
        if not isinstance(self.source, dict):
            raise ConfigError(f"source must be a dict, got {type(self.source).__name__}")
        if self.img_size % self.patch_size:
            raise ConfigError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        check_bound((self.img_size // self.patch_size) ** 2, "tokens (patch grid)", bound="tokens")
        for s, blocks in enumerate(self.stages):
            if not blocks:
                raise ConfigError(f"stage {s} has no blocks")
            for i, b in enumerate(blocks):
                if not isinstance(b, SwinBlock):
                    raise ConfigError(f"stage {s} block {i}: not a SwinBlock")
                for key in ("num_heads", "qk_dim", "v_dim", "mlp_hidden"):
                    check_bound(getattr(b, key), key, what=f"stage {s} block {i}: ")
                if b.merge not in (None, "h", "v"):
                    raise ConfigError(f"stage {s} block {i}: merge must be 'h' or 'v', got {b.merge!r}")
                if b.kind not in KINDS:
                    raise ConfigError(
                        f"stage {s} block {i}: kind must be one of {', '.join(KINDS)}, got {render(b.kind)}"
                    )
                if (
                    isinstance(b.scale, bool)
                    or not isinstance(b.scale, (int, float))
                    or not (b.scale > 0 and math.isfinite(b.scale))
                ):
                    raise ConfigError(f"stage {s} block {i}: scale must be a positive finite number")
        self.grids()  # raises on a merge over an odd side

    # ---- the surface shared with CaitConfig (export, bench, serve, describe) ----
    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.in_chans, self.img_size, self.img_size)

    @property
    def image_hw(self) -> tuple[int, int]:
        return (self.img_size, self.img_size)

    @property
    def size_text(self) -> str:
        return str(self.img_size)

    @property
    def embed_dim(self) -> int:
        return self.dims[0]

    @property
    def depth(self) -> int:
        return sum(len(b) for b in self.stages)

    def flat(self) -> list[tuple[int, int, SwinBlock]]:
        """(stage, block in stage, block) for every block, in order; a flat index i is a position here."""
        return [(s, i, b) for s, blocks in enumerate(self.stages) for i, b in enumerate(blocks)]

    @property
    def merges(self) -> dict[str, str]:
        """{"stage.block": kind} (e.g. {"2.4": "h", "2.5": "v"} for Tab. XIV)."""
        return {f"{s}.{i}": b.merge for s, i, b in self.flat() if b.merge}

    def unpruned(self) -> SwinConfig:
        """The dense architecture this model came from: the source widths, no merges."""
        if self.source:
            return swin_config_from_format({**self.source, "merges": {}})
        return replace(self, stages=tuple(tuple(replace(b, merge=None) for b in blk) for blk in self.stages))

    def at_size(self, img_size) -> SwinConfig:
        from caitdeploy.families.vit.config import image_size

        if image_size(img_size) != self.img_size:
            raise ConfigError(
                f"img_size {img_size}: a Swin model runs at its trained size {self.img_size} "
                "(its windows and relative position tables are sized for it)"
            )
        return self

    def feature_blocks(self, blocks) -> tuple[int, ...]:
        """Validated flat block indices for feature outputs (text '1,3,9,11' or ints; negative from the end):
        each gives that block's output on its stage's grid (`CaitSwin.forward_features`). Sorted, no duplicates."""
        from caitdeploy.families.vit.config import parse_feature_blocks

        return parse_feature_blocks(blocks, self.depth)

    def stage_grids(self) -> list[tuple[int, int]]:
        """The (H, W) grid each stage starts on (after its PatchMerging, before any ATME merge in it): where its
        feature maps live. Without merges these are Swin's strides 4, 8, 16, 32 grids; after a merged stage the
        next one starts on the merged grid halved (Tab. XIV: stage 4 on 4x4 instead of 7x7)."""
        h = w = self.img_size // self.patch_size
        out = []
        for s, row in enumerate(self.grids()):
            if s > 0:
                h, w = (h + 1) // 2, (w + 1) // 2
            out.append((h, w))
            h, w = row[-1]
        return out

    def to_dict(self) -> dict:
        return {
            "family": "swin",
            "img_size": self.img_size,
            "patch_size": self.patch_size,
            "in_chans": self.in_chans,
            "num_classes": self.num_classes,
            "dims": list(self.dims),
            "window": self.window,
            "qkv_bias": self.qkv_bias,
            "ln_eps": self.ln_eps,
            "source": self.source,
            "stages": [
                [
                    {
                        "num_heads": b.num_heads,
                        "qk_dim": b.qk_dim,
                        "v_dim": b.v_dim,
                        "mlp_hidden": b.mlp_hidden,
                        "scale": b.scale,
                        "merge": b.merge,
                        "kind": b.kind,
                    }
                    for b in blocks
                ]
                for blocks in self.stages
            ],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> SwinConfig:
        """A validated config from untrusted JSON (a fused file's metadata): ConfigError naming the key."""
        if not isinstance(d, dict):
            raise ConfigError(f"config must be a JSON object, got {type(d).__name__}")
        want = {
            "family",
            "img_size",
            "patch_size",
            "in_chans",
            "num_classes",
            "dims",
            "window",
            "qkv_bias",
            "ln_eps",
            "source",
            "stages",
        }
        unknown, missing = sorted(set(d) - want), sorted(want - set(d) - {"source"})
        if unknown or missing:
            raise ConfigError(
                f"swin config: {'unknown' if unknown else 'missing'} key {(unknown or missing)[0][:40]!r}"
            )
        stages_in, dims = d["stages"], d["dims"]
        if not isinstance(stages_in, list) or not isinstance(dims, list) or not 1 <= len(stages_in) <= MAX_STAGES:
            raise ConfigError(f"swin config: 'stages' and 'dims' must be lists of 1..{MAX_STAGES} stages")
        stages = []
        for s, blocks in enumerate(stages_in):
            if not isinstance(blocks, list) or not 1 <= len(blocks) <= 256:
                raise ConfigError(f"swin config: stages[{s}] must be a list of 1..256 blocks")
            row = []
            for i, b in enumerate(blocks):
                if not isinstance(b, dict) or set(b) - {"kind"} != {
                    "num_heads",
                    "qk_dim",
                    "v_dim",
                    "mlp_hidden",
                    "scale",
                    "merge",
                }:
                    raise ConfigError(
                        f"swin config: stages[{s}][{i}] must have num_heads, qk_dim, v_dim, "
                        "mlp_hidden, scale, merge (and kind)"
                    )
                row.append(SwinBlock(**b))
            stages.append(tuple(row))
        try:
            return cls(
                img_size=d["img_size"],
                patch_size=d["patch_size"],
                in_chans=d["in_chans"],
                num_classes=d["num_classes"],
                dims=tuple(dims),
                stages=tuple(stages),
                window=d["window"],
                qkv_bias=d["qkv_bias"],
                ln_eps=d["ln_eps"],
                source=d.get("source", {}),
            )
        except TypeError as e:
            raise ConfigError(f"swin config: {render(e)}") from None

    def grids(self) -> list[list[tuple[int, int]]]:
        """The (H, W) token grid each block runs on."""
        h = w = self.img_size // self.patch_size
        out = []
        for s, blocks in enumerate(self.stages):
            if s > 0:
                h, w = (h + 1) // 2, (w + 1) // 2  # PatchMerging pads an odd side
            row = []
            for i, b in enumerate(blocks):
                if b.merge == "h":
                    if w % 2:
                        raise ConfigError(
                            f"stage {s} block {i}: horizontal merge on an odd grid width {w} (grid {h}x{w})"
                        )
                    w //= 2
                elif b.merge == "v":
                    if h % 2:
                        raise ConfigError(
                            f"stage {s} block {i}: vertical merge on an odd grid height {h} (grid {h}x{w})"
                        )
                    h //= 2
                row.append((h, w))
            out.append(row)
        return out

    def window_shift(self, stage: int, block: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """timm's rule on the block's grid: per axis, window = min(window, side); shift (odd blocks) = window // 2
        only where the side exceeds the window."""
        h, w = self.grids()[stage][block]
        win = (min(self.window, h), min(self.window, w))
        sh, sw = (0 if (block % 2 == 0 or side <= self.window) else self.window // 2 for side in (h, w))
        return win, (sh, sw)


def window_mask(grid: tuple[int, int], win: tuple[int, int], shift: tuple[int, int]) -> torch.Tensor | None:
    """Swin's shifted-window attention mask [nW, N, N] (0 / -100) on the padded grid, or None without a shift."""
    if not any(shift):
        return None
    hp, wp = (math.ceil(g / w) * w for g, w in zip(grid, win))
    img = torch.zeros(hp, wp)
    cnt = 0
    for hs in ((0, -win[0]), (-win[0], -shift[0]), (-shift[0], None)):
        for ws in ((0, -win[1]), (-win[1], -shift[1]), (-shift[1], None)):
            img[hs[0] : hs[1], ws[0] : ws[1]] = cnt
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
    relative_position_index: torch.Tensor  # a buffer (registered in __init__)

    def __init__(self, dim: int, b: SwinBlock, win: tuple[int, int], qkv_bias: bool, compactors: bool = False):
        super().__init__()
        self.heads, self.qk, self.v, self.scale = b.num_heads, b.qk_dim, b.v_dim, b.scale
        self.win = win
        self.qkv = nn.Linear(dim, b.num_heads * (2 * b.qk_dim + b.v_dim), bias=qkv_bias)
        self.proj = nn.Linear(b.num_heads * b.v_dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * win[0] - 1) * (2 * win[1] - 1), b.num_heads))
        self.register_buffer("relative_position_index", relative_position_index(win), persistent=False)
        self.compacts = compactors
        if compactors:  # q/k/v [B, H, N, d] @ C_h^T per head
            self.q_compactor = Compactor(b.num_heads, b.qk_dim)
            self.k_compactor = Compactor(b.num_heads, b.qk_dim)
            self.v_compactor = Compactor(b.num_heads, b.v_dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        n = x.shape[1]
        hq, hv = self.heads * self.qk, self.heads * self.v
        q, k, v = self.qkv(x).split([hq, hq, hv], dim=-1)
        q = q.reshape(-1, n, self.heads, self.qk).transpose(1, 2)
        k = k.reshape(-1, n, self.heads, self.qk).transpose(1, 2)
        v = v.reshape(-1, n, self.heads, self.v).transpose(1, 2)
        if self.compacts:
            q, k, v = self.q_compactor(q), self.k_compactor(k), self.v_compactor(v)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        attn = attn + bias.view(n, n, self.heads).permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            nw = mask.shape[0]
            attn = (attn.view(-1, nw, self.heads, n, n) + mask.unsqueeze(1).unsqueeze(0)).view(-1, self.heads, n, n)
        out = attn.softmax(-1) @ v
        return self.proj(out.transpose(1, 2).reshape(-1, n, hv))


class SwinConvMixer(nn.Module):
    """SPViT-Swin's convolutional mixer, deploy form: the whole map [B, H, W, C] -> Conv2d (C -> inner, k x k,
    padding k // 2; BatchNorm folded) -> ReLU -> Linear (inner -> C). No windows, no shift (upstream runs its
    3x3 blocks on the full map; a 1x1 is per token, so windows do not change it)."""

    def __init__(self, dim: int, inner: int, kernel: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, inner, kernel, padding=kernel // 2)
        self.proj = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv.kernel_size == (1, 1):  # per token: a MatMul on the channels-last map, no transposes
            return self.proj(F.relu(F.linear(x, self.conv.weight.flatten(1), self.conv.bias)))
        return self.proj(F.relu(self.conv(x.permute(0, 3, 1, 2))).permute(0, 2, 3, 1))


class SwinBlockModule(nn.Module):
    def __init__(
        self,
        dim: int,
        b: SwinBlock,
        grid: tuple[int, int],
        win,
        shift,
        qkv_bias: bool,
        eps: float,
        compactors: bool = False,
    ):
        super().__init__()
        self.grid, self.win, self.shift = grid, win, shift
        self.merge = nn.Linear(2 * dim, dim) if b.merge else None
        self.merge_kind = b.merge
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.kind = b.kind
        self.attn: SwinAttention | SwinConvMixer | None
        if b.kind == "attn":
            self.attn = SwinAttention(dim, b, win, qkv_bias, compactors)
        elif b.kind in CONV_KERNEL:
            self.attn = SwinConvMixer(dim, b.v_dim, CONV_KERNEL[b.kind])
        else:
            self.attn = None
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.fc1 = nn.Linear(dim, b.mlp_hidden)
        self.fc1_compactor = Compactor(None, b.mlp_hidden) if compactors else None
        self.fc2 = nn.Linear(b.mlp_hidden, dim)
        mask = window_mask(grid, win, shift) if b.kind == "attn" else None
        self.register_buffer("attn_mask", mask, persistent=False)
        self.drop_prob = (
            0.0  # stochastic depth, in training only (Family.compactor_model copies timm's per-block rates)
        )

    def _drop_path(self, y: torch.Tensor) -> torch.Tensor:
        """Each sample's residual branch dropped with probability drop_prob (scaled to keep the mean); the
        identity in eval, so traced and exported graphs never see it."""
        if not self.training or self.drop_prob <= 0.0:
            return y
        keep = 1.0 - self.drop_prob
        return y * y.new_empty((y.shape[0],) + (1,) * (y.ndim - 1)).bernoulli_(keep).div_(keep)

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
        assert self.attn is not None  # _attn runs for attention blocks only
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
            if self.merge_kind == "h":  # (r, 2c) and (r, 2c+1): adjacent in memory
                x = x.reshape(-1, h, w, 2 * c)
            else:  # (2r, c) and (2r+1, c)
                x = x.reshape(-1, h, 2, w, c).permute(0, 1, 3, 2, 4).reshape(-1, h, w, 2 * c)
            x = self.merge(x)
        y = self.norm1(x)
        if self.kind == "attn":
            y = self._attn(y)
        elif self.attn is not None:
            y = self.attn(y)
        x = x + self._drop_path(y)
        h = self.fc1(self.norm2(x))
        if self.fc1_compactor is not None:
            h = self.fc1_compactor(h)
        return x + self._drop_path(self.fc2(F.gelu(h)))


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
    (`layers.{s}.downsample`, `layers.{s}.blocks.{i}.attn.qkv`, ...; fc1/fc2 at `blocks.{i}.fc1/fc2`).
    compactors: the checkpoint's model (CDCP compactors after q, k, v and fc1), not the deploy model."""

    def __init__(self, cfg: SwinConfig, compactors: bool = False):
        super().__init__()
        self.config = cfg
        self.patch_embed = nn.Conv2d(cfg.in_chans, cfg.dims[0], cfg.patch_size, cfg.patch_size)
        self.patch_norm = nn.LayerNorm(cfg.dims[0], eps=cfg.ln_eps)
        grids = cfg.grids()
        g = (cfg.img_size // cfg.patch_size,) * 2
        self.layers = nn.ModuleList()
        for s, blocks in enumerate(cfg.stages):
            stage: Any = nn.Module()  # a bare container: downsample and blocks, under timm's keys
            stage.downsample = PatchMerge(cfg.dims[s - 1], cfg.dims[s], g, cfg.ln_eps) if s else None
            stage.blocks = nn.ModuleList(
                SwinBlockModule(
                    cfg.dims[s], b, grids[s][i], *cfg.window_shift(s, i), cfg.qkv_bias, cfg.ln_eps, compactors
                )
                for i, b in enumerate(blocks)
            )
            self.layers.append(stage)
            g = grids[s][-1]
        self.norm = nn.LayerNorm(cfg.dims[-1], eps=cfg.ln_eps)
        self.head = nn.Linear(cfg.dims[-1], cfg.num_classes)

    def _block_outputs(self, images: torch.Tensor):
        """(stage, tokens [B, H, W, C]) after every block in order; the stem and the patch mergings run between."""
        x = self.patch_norm(self.patch_embed(images).permute(0, 2, 3, 1))
        stage: Any  # the bare containers __init__ builds
        for s, stage in enumerate(self.layers):
            if stage.downsample is not None:
                x = stage.downsample(x)
            for blk in stage.blocks:
                x = blk(x)
                yield s, x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        for _, y in self._block_outputs(x):  # the last stage's output
            pass
        return self.head(self.norm(y).mean(dim=(1, 2)))

    def forward_features(self, images: torch.Tensor, blocks, restore: str = "repeat") -> list[torch.Tensor]:
        """Feature maps [B, C_s, H_s, W_s], one per listed flat block (its output, before any norm), each on its
        stage's grid (`SwinConfig.stage_grids`): a grid merged inside the stage is restored by `restore` ("repeat":
        each merged token copied back to the tokens it came from, the exact inverse of the grouping; "bilinear":
        bilinear upsampling). A Swin backbone's pyramid is the stage ends: blocks 1,3,9,11 of Swin-T. Blocks
        after the last listed one do not run."""
        from caitdeploy.families.layers import restore_grid
        from caitdeploy.families.vit.config import RESTORE_MODES

        c = self.config
        wanted = c.feature_blocks(blocks)
        if restore not in RESTORE_MODES:
            raise ValueError(f"restore must be one of {', '.join(RESTORE_MODES)}, got {restore!r}")
        stage_grids, out = c.stage_grids(), []
        for j, (s, x) in enumerate(self._block_outputs(images)):
            if j in wanted:
                h, w = x.shape[1], x.shape[2]
                out.append(restore_grid(x.reshape(-1, h * w, x.shape[-1]), (h, w), stage_grids[s], restore))
            if j == wanted[-1]:
                break
        return out


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
            blocks.append(SwinBlock(a.num_heads, hd, hd, blk.mlp.fc1.out_features, float(a.scale), merges.get((s, i))))
        stages.append(tuple(blocks))
    pe = model.patch_embed
    return SwinConfig(
        img_size=int(pe.img_size[0]),
        patch_size=int(pe.patch_size[0]),
        in_chans=int(pe.proj.in_channels),
        num_classes=int(model.num_classes),
        dims=tuple(dims),
        stages=tuple(stages),
        window=int(model.layers[0].blocks[0].attn.window_size[0]),
        qkv_bias=model.layers[0].blocks[0].attn.qkv.bias is not None,
        ln_eps=float(model.norm.eps),
    )


# ---- FLOPs ----------------------------------------------------------------------------------------------
def _block_flops(cfg: SwinConfig, s: int, i: int, b: SwinBlock) -> int:
    gh, gw = cfg.grids()[s][i]
    c = cfg.dims[s]
    f = 2 * gh * gw * 2 * c * c if b.merge else 0
    f += 2 * 2 * gh * gw * c * b.mlp_hidden  # fc1, fc2 (unpadded tokens)
    if b.kind != "attn":
        k = CONV_KERNEL.get(b.kind, 0)
        return f + (2 * gh * gw * c * b.v_dim * k * k + 2 * gh * gw * b.v_dim * c if k else 0)
    (wh, ww), _ = cfg.window_shift(s, i)
    t = math.ceil(gh / wh) * wh * math.ceil(gw / ww) * ww  # tokens computed (the windows' padding included)
    n = wh * ww  # tokens per window
    hq, hv = b.num_heads * b.qk_dim, b.num_heads * b.v_dim
    f += 2 * t * c * (2 * hq + hv)  # qkv
    f += 2 * t * n * hq + 2 * t * n * hv  # q @ k^T, attn @ v (per window)
    f += 2 * t * hv * c  # proj
    return f


def swin_flops(cfg: SwinConfig) -> dict:
    """Analytic FLOPs per image (2 x multiply-accumulates of matmuls and convolutions, as flops.py counts), with
    the windows' zero padding counted (those tokens are computed). Keys: total, stem (patch_embed), head,
    stages (per stage, its patch merging included), blocks (per block, flat order)."""
    g = cfg.img_size // cfg.patch_size
    stem = 2 * g * g * cfg.in_chans * cfg.patch_size**2 * cfg.dims[0]
    head = 2 * cfg.dims[-1] * cfg.num_classes
    per_stage, per_block = [], []
    grids = cfg.grids()
    h = w = g
    for s, blocks in enumerate(cfg.stages):
        f = 2 * ((h + 1) // 2) * ((w + 1) // 2) * 4 * cfg.dims[s - 1] * cfg.dims[s] if s else 0
        for i, b in enumerate(blocks):
            per_block.append(_block_flops(cfg, s, i, b))
            f += per_block[-1]
        h, w = grids[s][-1]
        per_stage.append(f)
    return {
        "total": stem + sum(per_stage) + head,
        "stem": stem,
        "patch_embed": stem,
        "head": head,
        "stages": per_stage,
        "blocks": per_block,
    }


def swin_channel_savings(cfg: SwinConfig, j: int) -> dict[str, int]:
    """FLOPs saved in flat block j by one channel less in every head ("qk": q and k together, "v") or one fc1
    channel less ("mlp"): differences of the block's own count, so CDCP's units count what swin_flops counts."""
    s, i, b = cfg.flat()[j]
    full = _block_flops(cfg, s, i, b)
    return {
        "qk": full - _block_flops(cfg, s, i, replace(b, qk_dim=b.qk_dim - 1)),
        "v": full - _block_flops(cfg, s, i, replace(b, v_dim=b.v_dim - 1)),
        "mlp": full - _block_flops(cfg, s, i, replace(b, mlp_hidden=b.mlp_hidden - 1)),
    }


# ---- the checkpoint format (cait-compactor/1 with family "swin"; docs/CHECKPOINT_FORMAT.md) ----------------
FORMAT_KEYS = (
    "img_size",
    "patch_size",
    "in_chans",
    "num_classes",
    "embed_dim",
    "depths",
    "num_heads",
    "window_size",
    "mlp_ratio",
    "qkv_bias",
)
FORMAT_OPTIONAL: dict[str, Any] = {"family": "swin", "arch": None, "ln_eps": 1e-5, "merges": {}}
_MERGE_NAME = {"h": "htm", "v": "vtm"}


def parse_stage_merges(merges: dict) -> dict[tuple[int, int], str]:
    """{"2.4": "h"} (format and CLI text) -> {(2, 4): "h"}; ConfigError naming the entry."""
    out: dict[tuple[int, int], str] = {}
    if not isinstance(merges, dict):
        raise ConfigError(f'merges must be an object {{"stage.block": "h"|"v"}}, got {type(merges).__name__}')
    for k, v in merges.items():
        parts = str(k).split(".")
        if len(parts) != 2 or not all(p.isdigit() and len(p) <= 3 for p in parts):
            raise ConfigError(f"merge key {render(k)}: a Swin merge is named STAGE.BLOCK, e.g. 2.4")
        key = (int(parts[0]), int(parts[1]))
        if v not in ("h", "v"):
            raise ConfigError(f"merge {k}: kind must be 'h' or 'v', got {render(v)}")
        if key in out:
            raise ConfigError(f"merge {k}: block {key[0]}.{key[1]} is named twice")
        out[key] = v
    return out


def check_format(fmt: dict) -> dict:
    """A Swin `config` of a cait-compactor/1 checkpoint with its defaults filled in; ConfigError naming the key."""
    from caitdeploy.families.vit.config import check_bound

    if not isinstance(fmt, dict):
        raise ConfigError("config must be an object")
    missing = [k for k in FORMAT_KEYS if k not in fmt]
    if missing:
        raise ConfigError(f"config is missing key {missing[0]!r} (family 'swin')")
    unknown = [k for k in fmt if k not in (*FORMAT_KEYS, *FORMAT_OPTIONAL)]
    if unknown:
        raise ConfigError(f"config has unknown key {render(unknown[0])} (family 'swin')")
    out = {**FORMAT_OPTIONAL, **fmt}
    if out["family"] != "swin":
        raise ConfigError(f"config family {render(out['family'])} is not 'swin'")
    for key in ("img_size", "patch_size", "in_chans", "num_classes", "embed_dim"):
        check_bound(out[key], key)
    for key in ("depths", "num_heads"):
        v = out[key]
        if not isinstance(v, (list, tuple)) or not 1 <= len(v) <= MAX_STAGES:
            raise ConfigError(f"config key {key!r} must be a list of 1..{MAX_STAGES} integers, one per stage")
    if len(out["depths"]) != len(out["num_heads"]):
        raise ConfigError("config keys 'depths' and 'num_heads' must have one entry per stage")
    for s, (n, h) in enumerate(zip(out["depths"], out["num_heads"])):
        check_bound(n, f"depths[{s}]", bound="depth")
        check_bound(h, f"num_heads[{s}]", bound="num_heads")
        check_bound(out["embed_dim"] * 2**s, f"stage {s} width (embed_dim * 2**{s})", bound="embed_dim")
        if (out["embed_dim"] * 2**s) % h:
            raise ConfigError(f"stage {s}: width {out['embed_dim'] * 2**s} is not divisible by num_heads {h}")
    r = out["mlp_ratio"]
    if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r <= 16:
        raise ConfigError(f"config key 'mlp_ratio' must be a number in (0, 16], got {render(r)}")
    if not isinstance(out["qkv_bias"], bool):
        raise ConfigError("config key 'qkv_bias' must be true or false")
    if out["arch"] is not None and not isinstance(out["arch"], str):
        raise ConfigError("config key 'arch' must be a string")
    merges = parse_stage_merges(out["merges"])
    for s, i in merges:
        if not (s < len(out["depths"]) and i < out["depths"][s]):
            raise ConfigError(f"merge {s}.{i}: no such block (depths {list(out['depths'])})")
    out["merges"] = {f"{s}.{i}": v for (s, i), v in sorted(merges.items())}
    swin_config_from_format(out)  # window, eps, grids (a merge over an odd side)
    return out


def swin_config_from_format(fmt: dict) -> SwinConfig:
    """The unpruned SwinConfig (merges included) of a format config."""
    merges = parse_stage_merges(fmt.get("merges", {}))
    dims = tuple(int(fmt["embed_dim"]) * 2**s for s in range(len(fmt["depths"])))
    stages = []
    for s, (n, h) in enumerate(zip(fmt["depths"], fmt["num_heads"])):
        d = dims[s] // h
        hidden = int(dims[s] * float(fmt["mlp_ratio"]))
        stages.append(tuple(SwinBlock(h, d, d, hidden, d**-0.5, merges.get((s, i))) for i in range(n)))
    return SwinConfig(
        img_size=fmt["img_size"],
        patch_size=fmt["patch_size"],
        in_chans=fmt["in_chans"],
        num_classes=fmt["num_classes"],
        dims=dims,
        stages=tuple(stages),
        window=fmt["window_size"],
        qkv_bias=fmt["qkv_bias"],
        ln_eps=fmt.get("ln_eps", 1e-5),
    )


def format_config_of(model, merges: dict[tuple[int, int], str] | None = None, arch: str | None = None) -> dict:
    """The cait-compactor/1 config of a timm SwinTransformer (+ merges {(stage, block): kind})."""
    c = swin_config_of(model)
    blocks = [blk[0] for blk in c.stages]
    return {
        "family": "swin",
        "arch": arch,
        "img_size": c.img_size,
        "patch_size": c.patch_size,
        "in_chans": c.in_chans,
        "num_classes": c.num_classes,
        "embed_dim": c.dims[0],
        "depths": [len(b) for b in c.stages],
        "num_heads": [b.num_heads for b in blocks],
        "window_size": c.window,
        "mlp_ratio": blocks[0].mlp_hidden / c.dims[0],
        "qkv_bias": c.qkv_bias,
        "ln_eps": c.ln_eps,
        "merges": {f"{s}.{i}": k for (s, i), k in sorted((merges or {}).items())},
    }


def checkpoint_key(cfg: SwinConfig, key: str) -> str:
    """A CaitSwin state-dict key -> the checkpoint's (timm's layout: `patch_embed.proj`, `patch_embed.norm`,
    `...mlp.fc1`, `head.fc`; a merge at `layers.{s}.blocks.{i}.htm.fc` / `vtm.fc`)."""
    m = re.fullmatch(r"layers\.(\d+)\.blocks\.(\d+)\.(merge|fc1|fc2|fc1_compactor)\.(\w+)", key)
    if m:
        s, i, mod, leaf = m.groups()
        if mod == "merge":
            kind = cfg.stages[int(s)][int(i)].merge
            assert kind is not None  # a merge module exists only in a block that merges
            return f"layers.{s}.blocks.{i}.{_MERGE_NAME[kind]}.fc.{leaf}"
        return f"layers.{s}.blocks.{i}.mlp.{mod}.{leaf}"
    if key.startswith("patch_embed."):
        return "patch_embed.proj." + key.removeprefix("patch_embed.")
    if key.startswith("patch_norm."):
        return "patch_embed.norm." + key.removeprefix("patch_norm.")
    if key.startswith("head."):
        return "head.fc." + key.removeprefix("head.")
    return key


def from_checkpoint(
    cfg: SwinConfig, sd: dict[str, torch.Tensor], defaults: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """`CaitSwin(cfg)`'s state dict from tensors under the checkpoint's (timm's) keys. With `defaults` (a
    CaitSwin state dict, e.g. a compactor model's identity init) its keys are filled, from `sd` where present."""
    if defaults is None:
        with torch.device("meta"):
            keys = list(CaitSwin(cfg).state_dict())
        return {k: sd[checkpoint_key(cfg, k)] for k in keys}
    return {k: sd.get(checkpoint_key(cfg, k), v) for k, v in defaults.items()}


def checkpoint_shapes(cfg: SwinConfig) -> tuple[dict[str, tuple], dict[str, tuple]]:
    """(required, optional) checkpoint key -> shape: the weights, and the compactors (each optional; a missing
    one is the identity). Built on the meta device: nothing is allocated."""
    with torch.device("meta"):
        model = CaitSwin(cfg, compactors=True)
    req: dict[str, tuple] = {}
    opt: dict[str, tuple] = {}
    for k, v in model.state_dict().items():
        (opt if "_compactor." in k else req)[checkpoint_key(cfg, k)] = tuple(v.shape)
    return req, opt


def check_config(config) -> None:
    """The registry's check: a fused Swin file holds a SwinConfig (validated on construction)."""
    if not isinstance(config, SwinConfig):
        raise ConfigError("family 'swin' needs a Swin config (stages, dims, window)")


# ---- counts the shared reports use ----------------------------------------------------------------------
def swin_block_params(cfg: SwinConfig, s: int, i: int, b: SwinBlock) -> int:
    """Parameters of block i of stage s, counted from the config (the same layers `CaitSwin` builds)."""
    c = cfg.dims[s]
    n = (2 * c * c + c) if b.merge else 0  # the merge's Linear(2C -> C)
    n += 4 * c  # norm1, norm2
    if b.kind == "attn":
        (wh, ww), _ = cfg.window_shift(s, i)
        qkv = b.num_heads * (2 * b.qk_dim + b.v_dim)
        n += c * qkv + (qkv if cfg.qkv_bias else 0)  # qkv
        n += b.num_heads * b.v_dim * c + c  # proj
        n += (2 * wh - 1) * (2 * ww - 1) * b.num_heads  # relative position bias table
    elif b.kind in CONV_KERNEL:
        k = CONV_KERNEL[b.kind]
        n += c * b.v_dim * k * k + b.v_dim + b.v_dim * c + c  # conv (BN folded), Linear back
    return n + c * b.mlp_hidden + b.mlp_hidden + b.mlp_hidden * c + c  # fc1, fc2


def swin_params(cfg: SwinConfig) -> int:
    """Parameters of `CaitSwin(cfg)`, counted from the config (tests check it against the model)."""
    c0, p = cfg.dims[0], cfg.patch_size
    n = cfg.in_chans * c0 * p * p + c0 + 2 * c0  # patch embedding, its norm
    for s in range(1, len(cfg.stages)):
        n += 2 * 4 * cfg.dims[s - 1] + 4 * cfg.dims[s - 1] * cfg.dims[s]  # PatchMerging: norm, reduction (no bias)
    n += sum(swin_block_params(cfg, s, i, b) for s, i, b in cfg.flat())
    return n + 2 * cfg.dims[-1] + cfg.dims[-1] * cfg.num_classes + cfg.num_classes  # final norm, head


def swin_block_rows(cfg: SwinConfig) -> list[dict]:
    """One row per block, in the shape of flops.block_rows (stage and window added)."""
    f = swin_flops(cfg)
    grids = cfg.grids()
    rows = []
    for j, (s, i, b) in enumerate(cfg.flat()):
        (win, shift) = cfg.window_shift(s, i)
        gh, gw = grids[s][i]
        params = swin_block_params(cfg, s, i, b)
        rows.append(
            {
                "block": j,
                "stage": s,
                "merge": b.merge,
                "kind": "window-attn" if b.kind == "attn" else b.kind,
                "slim": None,
                "tokens": gh * gw,
                "grid": [gh, gw],
                "window": list(win),
                "shift": list(shift),
                "heads": b.num_heads,
                "qk_per_head": b.qk_dim,
                "v_per_head": b.v_dim,
                "mlp": b.mlp_hidden,
                "attn_scale": b.scale,
                "flops": f["blocks"][j],
                "flops_parts": {"total": f["blocks"][j]},
                "params": params,
            }
        )
    return rows


def swin_activation_bytes(cfg: SwinConfig, batch: int, elem_bytes: int = 4) -> int:
    """Peak activation estimate (not an overestimate): the largest block's residual, qkv, window scores and
    mlp hidden, or the stem's input and output."""
    g = cfg.img_size // cfg.patch_size
    peak = cfg.in_chans * cfg.img_size**2 + g * g * cfg.dims[0]
    grids = cfg.grids()
    for s, i, b in cfg.flat():
        (wh, ww), _ = cfg.window_shift(s, i)
        gh, gw = grids[s][i]
        t = math.ceil(gh / wh) * wh * math.ceil(gw / ww) * ww
        qkv = t * b.num_heads * (2 * b.qk_dim + b.v_dim)
        attn = 2 * b.num_heads * t * wh * ww
        peak = max(peak, 2 * gh * gw * cfg.dims[s] + qkv + max(attn, gh * gw * b.mlp_hidden))
    return int(batch * peak * elem_bytes)
