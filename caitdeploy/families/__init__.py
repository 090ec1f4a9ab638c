"""The model registry: one module per family, in the timm manner; the surgery, export and benchmark code is
shared. A fused file's config names its family (`CaitConfig.family`); `build_model` builds any of them.

A family module provides (family "swin" is the exception: its own config, `SwinConfig`, and model, `CaitSwin`,
in models/swin.py; flops.py, limits.py and io.py dispatch on it):
  NAME, DESCRIPTION        the registry key and one line for tables
  check_config(config)     ConfigError unless the blocks' kinds and slimming are ones the family has
  make_stem(config)        images [B, C, H, W] -> tokens [B, Gh*Gw, D]
  make_mixer(config, i)    the token mixer of a block whose kind is not "attn" (None for "skip")
  make_slim(config, i)     the token-slimming module before block i (SiT), where the family has one
  stem_flops / stem_params, mixer_flops / mixer_params, slim_flops / slim_params (config, i): analytic counts
"""
from __future__ import annotations

from caitdeploy.families.layers import ATTN_IMPLS, Attention, AttnImpl, Block, Mlp, TokenMerge, merge_tokens  # noqa: F401
from caitdeploy.families.registry import FAMILY_MODULES, UnknownFamily, families, family  # noqa: F401
from caitdeploy.families.vit.config import CaitConfig


def build_model(config: CaitConfig, attn_impl: AttnImpl = "sdpa", kernels: str | None = None):
    """The deploy model of `config`, whatever its family (a `SwinConfig` builds a `CaitSwin`: window attention
    has one implementation, plain matmuls, and no Triton kernels)."""
    from caitdeploy.families.swin.model import CaitSwin, SwinConfig
    from caitdeploy.families.vit.model import CaitViT

    if isinstance(config, SwinConfig):
        if kernels:
            raise ValueError("the Triton kernels are for the ViT families; a Swin model runs without them")
        return CaitSwin(config)

    return CaitViT(config, attn_impl=attn_impl, kernels=kernels)


def config_from_dict(raw) -> CaitConfig:
    """A deploy config from its dict (a fused file's or an ONNX file's metadata), whatever its family: a
    `SwinConfig` for "family": "swin", else a `CaitConfig`; ConfigError naming what is wrong."""
    from caitdeploy.families.vit.config import ConfigError

    if not isinstance(raw, dict):
        raise ConfigError(f"config must be a JSON object, got {type(raw).__name__}")
    if raw.get("family") == "swin":
        from caitdeploy.families.swin.model import SwinConfig

        return SwinConfig.from_dict(raw)
    config = CaitConfig.from_dict(raw)
    try:
        family(config.family)   # a family this version knows, or the one ConfigError every reader handles
    except UnknownFamily as e:
        raise ConfigError(str(e)) from None
    return config


def config_from_json(text: str) -> CaitConfig:
    """`config_from_dict` of JSON text (strict: no duplicate keys, no NaN)."""
    from caitdeploy.families.vit.config import strict_json

    return config_from_dict(strict_json(text, "config"))


def __getattr__(name: str):  # CaitViT imports this package: resolve it lazily
    if name == "CaitViT":
        from caitdeploy.families.vit.model import CaitViT

        return CaitViT
    raise AttributeError(name)
