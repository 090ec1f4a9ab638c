"""Model families: one protocol (`base.Family`), one registry (`registry.py`), one package or module per family
(vit/, lvvit, spvit, swin/). Fuse, export, bench and the rest ask `family_of(config)`; `build_model` and
`config_from_dict` build any family's model or config.

A ViT variant (vit, lvvit, spvit) shares `CaitConfig` and `CaitViT` and provides hooks (vit/family.py):
  NAME, DESCRIPTION        the registry key and one line for tables
  check_config(config)     ConfigError unless the blocks' kinds and slimming are ones the family has
  make_stem(config)        images [B, C, H, W] -> tokens [B, Gh*Gw, D]
  make_mixer(config, i)    the token mixer of a block whose kind is not "attn" (None for "skip")
  make_slim(config, i)     the token-slimming module before block i (SiT), where the family has one
  stem_flops / stem_params, mixer_flops / mixer_params, slim_flops / slim_params (config, i): analytic counts
"""

from __future__ import annotations

from typing import Any

from caitdeploy.families.layers import ATTN_IMPLS, Attention, AttnImpl, Block, Mlp, TokenMerge, merge_tokens  # noqa: F401
from caitdeploy.families.registry import (  # noqa: F401
    FAMILY_MODULES,
    UnknownFamily,
    families,
    family,
    family_for_arch,
    family_of,
)
from caitdeploy.families.vit.config import CaitConfig


def build_model(config: Any, attn_impl: AttnImpl = "sdpa", kernels: str | None = None):
    """The deploy model of `config`, whatever its family; ValueError for what the family cannot do (e.g. the
    Triton kernels on a Swin)."""
    return family_of(config).build(config, attn_impl=attn_impl, kernels=kernels)


def config_from_dict(raw) -> Any:
    """A deploy config from its dict (a fused file's or an ONNX file's metadata), whatever its family (default
    "vit"); ConfigError naming what is wrong, an unknown family included."""
    from caitdeploy.families.vit.config import ConfigError

    if not isinstance(raw, dict):
        raise ConfigError(f"config must be a JSON object, got {type(raw).__name__}")
    try:
        fam = family(raw.get("family", "vit"))
    except UnknownFamily as e:
        raise ConfigError(str(e)) from None
    return fam.config_from_dict(raw)


def config_from_json(text: str) -> CaitConfig:
    """`config_from_dict` of JSON text (strict: no duplicate keys, no NaN)."""
    from caitdeploy.families.vit.config import strict_json

    return config_from_dict(strict_json(text, "config"))


def __getattr__(name: str):  # CaitViT imports this package: resolve it lazily
    if name == "CaitViT":
        from caitdeploy.families.vit.model import CaitViT

        return CaitViT
    raise AttributeError(name)
