"""`CaitViT`: the deploy model of every family. Its config says the widths, the prefix tokens, the pooling,
the merges and the family (models/__init__.py), whose module builds the stem and any block kind other than
attention. Pure PyTorch, no compactors, no layer scale (fuse and convert fold it into the weights).

State-dict keys follow timm's VisionTransformer: `patch_embed.*`, `cls_token`, `dist_token`, `reg_token`,
`pos_embed`, `blocks.{i}.*` (+ `merge.fc.*`, `slim.*`), `norm.*` or `fc_norm.*`, `head.*`, `head_dist.*`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, cast

import torch
from torch import nn

from caitdeploy.families.layers import ATTN_IMPLS, AttnImpl, Block, restore_grid
from caitdeploy.families.vit.config import CaitConfig

NAME = "vit"
DESCRIPTION = "timm VisionTransformer: DeiT, DeiT III (layer scale), distilled DeiT, registers, average pooling"


class PatchEmbed(nn.Module):
    """The plain ViT stem: one patch-sized, patch-strided convolution. images -> [B, Gh*Gw, D]."""

    def __init__(self, in_chans: int, dim: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, patch, stride=patch)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(images).flatten(2).transpose(1, 2)


# ---- the family interface (models/__init__.py) ----
def check_config(c: CaitConfig) -> None:
    """Block kinds and slimming this family has: attention only."""
    from caitdeploy.families.vit.config import ConfigError

    for i, b in enumerate(c.blocks):
        if b.kind != "attn" or b.slim is not None:
            raise ConfigError(
                f"block {i}: family {c.family!r} has attention blocks only "
                f"(kind {b.kind!r}{', token slimming' if b.slim is not None else ''})"
            )


def make_stem(c: CaitConfig) -> nn.Module:
    return PatchEmbed(c.in_chans, c.embed_dim, c.patch_size)


def stem_shapes(c: CaitConfig) -> dict[str, tuple[int, ...]]:
    """key -> shape of the stem in a checkpoint (cait-compactor/1) of this family."""
    d, p = c.embed_dim, c.patch_size
    return {"patch_embed.proj.weight": (d, c.in_chans, p, p), "patch_embed.proj.bias": (d,)}


def fuse_stem(c: CaitConfig, get) -> dict:
    """Deploy stem tensors from a checkpoint's (`get(key)` -> tensor): the same keys here."""
    return {k: get(k) for k in stem_shapes(c)}


def reference_stem(c: CaitConfig, get, images):
    """The checkpoint's stem, written from the format: images -> [B, Gh*Gw, D]."""
    import torch.nn.functional as F

    x = F.conv2d(images, get("patch_embed.proj.weight"), get("patch_embed.proj.bias"), stride=c.patch_size)
    return x.flatten(2).transpose(1, 2)


def stem_flops(c: CaitConfig) -> int:
    gh, gw = c.grid
    return 2 * gh * gw * c.embed_dim * c.in_chans * c.patch_size**2


def stem_params(c: CaitConfig) -> int:
    return c.embed_dim * c.in_chans * c.patch_size**2 + c.embed_dim


def make_mixer(c: CaitConfig, i: int) -> nn.Module | None:
    raise ValueError(f"block {i}: family {c.family!r} has no {c.blocks[i].kind!r} blocks")


def make_slim(c: CaitConfig, i: int) -> nn.Module:
    raise ValueError(f"block {i}: family {c.family!r} has no token slimming")


def mixer_flops(c: CaitConfig, i: int) -> int:
    return 0


def mixer_params(c: CaitConfig, i: int) -> int:
    return 0


def slim_flops(c: CaitConfig, i: int) -> int:
    return 0


def slim_params(c: CaitConfig, i: int) -> int:
    return 0


def add_position(
    tokens: torch.Tensor, prefix: list[torch.Tensor], pos_embed: torch.Tensor, no_embed_class: bool
) -> torch.Tensor:
    """Patch tokens [B, Gh*Gw, D] + prefix tokens + position embedding in timm's order: [B, prefix + Gh*Gw, D]
    (with no_embed_class the prefix tokens get no position). CaitViT and the training wrapper both use it."""
    if no_embed_class:
        return torch.cat([*prefix, tokens + pos_embed], dim=1) if prefix else tokens + pos_embed
    return torch.cat([*prefix, tokens], dim=1) + pos_embed


def pool_logits(
    x: torch.Tensor,
    c: CaitConfig,
    head: nn.Module,
    head_dist: nn.Module | None,
    fc_norm: nn.Module,
    drop: nn.Module | None = None,
) -> torch.Tensor:
    """Pooling and classifier on the final tokens, timm's eval output: the class token; the mean of the patch
    tokens with global_pool 'avg' (then fc_norm); with a distillation token, the mean of both heads. `drop`: the
    training wrapper's head dropout."""
    d = drop if drop is not None else nn.Identity()
    if c.global_pool == "avg":
        return head(d(fc_norm(x[:, c.num_prefix_tokens :].mean(dim=1))))
    if c.dist_token and head_dist is not None:
        return (head(d(x[:, 0])) + head_dist(d(x[:, 1]))) / 2
    return head(d(fc_norm(x[:, 0])))


class CaitViT(nn.Module):
    """A fused CAIT ViT (or any dense ViT of a registered family) described by a `CaitConfig`.

    images: [B, in_chans, img_size, img_size] -> logits [B, num_classes].
    attn_impl: "sdpa" (default, fastest eager), "math" (explicit MatMul/Softmax/MatMul, used for export),
    or "triton" (kernels/ on CUDA, or on CPU under TRITON_INTERPRET=1; math elsewhere). kernels="triton" also
    routes ATME merges through the fused Triton merge-GEMM (one class token, no other prefix token).
    """

    def __init__(self, config: CaitConfig, attn_impl: AttnImpl = "sdpa", kernels: str | None = None):
        from caitdeploy.families.registry import family

        super().__init__()
        self.config = c = config
        fam: Any = family(c.family)  # a VitFamily: its variant's hooks answer make_stem, make_mixer, make_slim
        fam.check_config(c)
        d = c.embed_dim
        p = c.num_prefix_tokens
        self.num_prefix_tokens = p
        self.patch_embed = fam.make_stem(c)
        if c.class_token:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        if c.dist_token:
            self.dist_token = nn.Parameter(torch.zeros(1, 1, d))
        if c.reg_tokens:
            self.reg_token = nn.Parameter(torch.zeros(1, c.reg_tokens, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, c.pos_embed_len, d))
        self.blocks = nn.ModuleList(
            Block(
                d,
                b,
                c.input_grid(i),
                c.qkv_bias,
                c.ln_eps,
                p,
                mixer=None if b.kind == "attn" else fam.make_mixer(c, i),
                slim=None if b.slim is None else fam.make_slim(c, i),
            )
            for i, b in enumerate(c.blocks)
        )
        self.norm = nn.Identity() if c.fc_norm else nn.LayerNorm(d, eps=c.ln_eps)
        self.fc_norm = nn.LayerNorm(d, eps=c.ln_eps) if c.fc_norm else nn.Identity()
        self.head = nn.Linear(d, c.num_classes)
        if c.dist_token:
            self.head_dist = nn.Linear(d, c.num_classes)
        self.set_impl(attn_impl, kernels)

    def set_impl(self, attn_impl: AttnImpl = "sdpa", kernels: str | None = None) -> CaitViT:
        """Choose the attention implementation and whether Triton kernels are used (on CUDA)."""
        if kernels not in (None, "triton"):
            raise ValueError(f"kernels must be None or 'triton', got {kernels!r}")
        if attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {attn_impl!r}")
        if kernels == "triton":
            attn_impl = "triton"
        for blk in cast("Iterable[Block]", self.blocks):
            attn: Any = blk.attn  # Attention, a family's mixer, or None: any with an `impl` takes it
            if hasattr(attn, "impl"):
                attn.impl = attn_impl
            if blk.merge is not None:
                blk.merge.use_triton = kernels == "triton"
        return self

    def prefix_tokens(self, batch: int) -> list[torch.Tensor]:
        """[class token] [distillation token] [registers], each expanded to the batch."""
        out = []
        for name in ("cls_token", "dist_token", "reg_token"):
            t = getattr(self, name, None)
            if t is not None:
                out.append(t.expand(batch, -1, -1))
        return out

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Stem, prefix tokens and position embedding: images -> [B, prefix + Gh*Gw, D] (timm's order)."""
        x = self.patch_embed(images)
        return add_position(x, self.prefix_tokens(x.shape[0]), self.pos_embed, self.config.no_embed_class)

    def forward_features(self, images: torch.Tensor, blocks=None, restore: str = "repeat"):
        """Without `blocks`: every token after the last block and the final norm, [B, N, D] (the head's input).

        With `blocks` (indices, or text '3,5,7,11'): a list of feature maps [B, D, Gh, Gw], one per listed block
        (its output, before any norm), on the FULL patch grid of the input: prefix tokens dropped, a merged grid
        restored by `restore` ("repeat": each merged token copied back to the patches it came from, the exact
        inverse of the grouping; "bilinear": bilinear upsampling). Blocks after the last listed one do not run.
        """
        if blocks is None:
            x = self.embed(images)
            for blk in self.blocks:
                x = blk(x)
            return self.norm(x)
        from caitdeploy.families.vit.config import RESTORE_MODES

        c = self.config
        wanted = c.feature_blocks(blocks)
        if restore not in RESTORE_MODES:
            raise ValueError(f"restore must be one of {', '.join(RESTORE_MODES)}, got {restore!r}")
        grids, p = c.grids(), self.num_prefix_tokens
        x = self.embed(images)
        out = []
        for i, blk in enumerate(self.blocks[: wanted[-1] + 1]):
            x = blk(x)
            if i in wanted:
                out.append(restore_grid(x[:, p:], grids[i], c.grid, restore))
        return out

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """Pooling and classifier: timm's eval output (class token; mean of the patch tokens with
        global_pool 'avg'; with a distillation token, the mean of both heads)."""
        return pool_logits(x, self.config, self.head, getattr(self, "head_dist", None), self.fc_norm)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(images))


class FeatureModel(nn.Module):
    """images -> a tuple of full-grid feature maps [B, D, Gh, Gw]: `model.forward_features(x, blocks, restore)`
    of a CaitViT (or of any model with that method, e.g. the ToMe baseline) as a module with plain outputs,
    for export and benchmarks."""

    def __init__(self, model: Any, blocks, restore: str = "repeat"):  # duck-typed: any module with the two
        super().__init__()
        self.model, self.restore = model, restore
        self.blocks = model.config.feature_blocks(blocks)

    @property
    def config(self) -> CaitConfig:
        return self.model.config

    def forward(self, images: torch.Tensor):
        return tuple(self.model.forward_features(images, self.blocks, self.restore))
