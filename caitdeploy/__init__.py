"""caitdeploy: turn CAIT-compressed Vision Transformers into fast deployable models."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from caitdeploy.families.layers import AttnImpl

__version__ = "0.1.0"


def load_model(path, attn_impl: AttnImpl = "sdpa", kernels: str | None = None):
    """A `CaitViT` (eval mode) from a fused safetensors file written by `caitdeploy fuse`."""
    from caitdeploy.formats.fused import load_model as _load

    return _load(path, attn_impl=attn_impl, kernels=kernels)


__all__ = ["__version__", "load_model"]
