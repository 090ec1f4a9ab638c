"""Family name -> `Family` object (base.py): the one place that lists the families.

`family(name)` for a config's "family" key, `family_of(config)` for a config, `family_for_arch(arch)` for a timm
architecture name (make-checkpoint, train). The ViT variants share `VitFamily` with their own hooks module."""

from __future__ import annotations

import importlib
from typing import Any

from caitdeploy.families.base import Family

# name -> "module:object", the family's `Family` object (imported when first asked for)
FAMILY_MODULES = {
    "vit": "caitdeploy.families.vit.family:VIT",
    "lvvit": "caitdeploy.families.vit.family:LVVIT",
    "spvit": "caitdeploy.families.vit.family:SPVIT",
    "swin": "caitdeploy.families.swin.family:FAMILY",
}
TIMM_BUILT = ("swin", "vit")  # asked in this order by family_for_arch; the ViT takes every other timm name
_cache: dict[str, Family] = {}


class UnknownFamily(ValueError):
    """A config names a family this version does not know."""


def family(name: str) -> Family:
    """The registered family `name`."""
    if not isinstance(name, str) or name not in FAMILY_MODULES:
        raise UnknownFamily(f"unknown model family {str(name)[:40]!r}; known: {', '.join(FAMILY_MODULES)}")
    if name not in _cache:
        module, obj = FAMILY_MODULES[name].split(":")
        _cache[name] = getattr(importlib.import_module(module), obj)
    return _cache[name]


def family_of(config: Any) -> Family:
    """The family of a config (its "family" field)."""
    return family(getattr(config, "family", None))  # type: ignore[arg-type]


def family_for_arch(arch: str) -> Family:
    """The family that builds timm architecture `arch` (the ViT's refusal names what it does not support)."""
    for name in TIMM_BUILT:
        if family(name).owns_arch(arch):
            return family(name)
    return family("vit")


def family_for_timm_model(model: Any) -> Family:
    """The family of a timm model instance (train's `cait_wrap`)."""
    for name in TIMM_BUILT:
        if family(name).owns_timm_model(model):
            return family(name)
    return family("vit")


def buffer_suffixes() -> tuple[str, ...]:
    """Key suffixes of the buffers any family's model rebuilds (a state dict read from a file drops them)."""
    return tuple(s for f in families().values() for s in f.buffer_suffixes)


def families() -> dict[str, Family]:
    return {n: family(n) for n in FAMILY_MODULES}
