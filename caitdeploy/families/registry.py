"""Family name -> module (see models/__init__.py for what a family module provides)."""
from __future__ import annotations

import importlib
from types import ModuleType

FAMILY_MODULES = {"vit": "caitdeploy.families.vit.model", "lvvit": "caitdeploy.families.lvvit",
                  "spvit": "caitdeploy.families.spvit", "swin": "caitdeploy.families.swin.model"}


class UnknownFamily(ValueError):
    """A config names a family this version does not know."""


def family(name: str) -> ModuleType:
    """The module of a registered family."""
    if name not in FAMILY_MODULES:
        raise UnknownFamily(f"unknown model family {str(name)[:40]!r}; known: {', '.join(FAMILY_MODULES)}")
    return importlib.import_module(FAMILY_MODULES[name])


def families() -> dict[str, ModuleType]:
    return {n: family(n) for n in FAMILY_MODULES}
