"""The deploy model (kept as the short import path): `CaitViT` and its layers live in `caitdeploy.models`."""
from __future__ import annotations

from .models.layers import ATTN_IMPLS, Attention, AttnImpl, Block, Mlp, TokenMerge, merge_tokens  # noqa: F401
from .models.vit import CaitViT, PatchEmbed  # noqa: F401
