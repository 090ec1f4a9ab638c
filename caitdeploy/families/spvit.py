"""Family "spvit": SPViT-DeiT (Pruning Self-attentions into Convolutional Layers in Single Path, TPAMI 2024):
a DeiT whose blocks are full attention, a 1x1 or 3x3 convolution, or skipped, with a physically pruned FFN of
any width per block. Format: docs/formats/spvit.md.

Deploy form (what `convert --from spvit` writes): attention blocks as plain `qkv` (upstream `qk` + `v`), conv
blocks as `attn.conv` (Conv2d D -> d, k x k, padding k // 2: the head mixture softmax(head_probs / alpha) and
the BatchNorm folded in), ReLU, `attn.proj` (Linear d -> D, head mixture folded in); the class token passes the
conv branch unchanged (the block adds norm1(x) to it); skipped blocks add norm1(x) to every token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from caitdeploy.families.vit.config import CaitConfig
from caitdeploy.families.vit.model import (  # noqa: F401
    PatchEmbed,
    fuse_stem,
    make_slim,
    reference_stem,
    slim_flops,
    slim_params,
    stem_flops,
    stem_params,
    stem_shapes,
)

NAME = "spvit"
DESCRIPTION = "SPViT-DeiT: attention, 1x1/3x3 convolution or skipped blocks, pruned FFN widths"
KERNEL = {"conv1": 1, "conv3": 3}


class ConvMixer(nn.Module):
    """SPViT's convolutional token mixer, deploy form: patch tokens on their grid -> conv (BN folded) -> ReLU ->
    Linear back to D; prefix tokens pass through (their branch output is their own input)."""

    def __init__(self, dim: int, inner: int, kernel: int, grid_hw: tuple[int, int], prefix: int = 1):
        super().__init__()
        self.grid_hw, self.prefix = grid_hw, prefix
        self.conv = nn.Conv2d(dim, inner, kernel, padding=kernel // 2)
        self.proj = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.prefix
        gh, gw = self.grid_hw
        d = x.shape[-1]
        grid = x[:, p:].reshape(-1, gh, gw, d).permute(0, 3, 1, 2)
        y = self.proj(F.relu(self.conv(grid)).flatten(2).transpose(1, 2))
        return torch.cat([x[:, :p], y], dim=1) if p else y


def check_config(c: CaitConfig) -> None:
    from caitdeploy.families.vit.config import ConfigError

    for i, b in enumerate(c.blocks):
        if b.slim is not None:
            raise ConfigError(f"block {i}: family 'spvit' has no token slimming")
        if b.kind in KERNEL and b.merge:
            raise ConfigError(f"block {i}: a convolution block with an ATME merge is not part of the format")


def make_stem(c: CaitConfig) -> nn.Module:
    return PatchEmbed(c.in_chans, c.embed_dim, c.patch_size)


def make_mixer(c: CaitConfig, i: int) -> nn.Module | None:
    b = c.blocks[i]
    if b.kind == "skip":
        return None
    return ConvMixer(c.embed_dim, b.v_dim, KERNEL[b.kind], c.grids()[i], c.num_prefix_tokens)


def mixer_flops(c: CaitConfig, i: int) -> int:
    b = c.blocks[i]
    gh, gw = c.grids()[i]
    k = KERNEL[b.kind]
    return 2 * gh * gw * c.embed_dim * b.v_dim * k * k + 2 * gh * gw * b.v_dim * c.embed_dim


def mixer_params(c: CaitConfig, i: int) -> int:
    b = c.blocks[i]
    k = KERNEL[b.kind]
    return c.embed_dim * b.v_dim * k * k + b.v_dim + b.v_dim * c.embed_dim + c.embed_dim
