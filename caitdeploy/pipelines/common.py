"""What the pipelines share: the JSON report writer, the dense-prediction option check and the notation rules of
numeric option text (`parse_int` / `parse_float`).

They live here, below the CLI, because a pipeline writes its own report (inside its all-or-nothing staging)
and checks its own options before any work; `cli/common.py` re-exports the first two for the commands that have
not become pipelines yet, and `cli/options.py` the parsers for its click types."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from caitdeploy.core.errors import OptionError, Staging, atomic_output, safe_text

_INT = re.compile(r"[+-]?[0-9]+")
_FLOAT = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_NONFINITE = ("nan", "inf", "infinity")
MAX_CHARS = 64  # longer text is no number an option takes (and int() of huge text is slow)


def parse_int(text: Any) -> int | None:
    """`text` as an int when it is plain ASCII decimal notation (`-12`, `+3`), else None."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    s = str(text).strip()
    return int(s) if len(s) <= MAX_CHARS and _INT.fullmatch(s) else None


def parse_float(text: Any, finite: bool = True) -> float | None:
    """`text` as a float when it is plain ASCII decimal notation (`0.5`, `1e-3`), else None; with
    finite=False the spelled-out `nan`, `inf`, `infinity` pass too (for a check that names them itself)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        v = float(text)
    else:
        s = str(text).strip()
        if len(s) > MAX_CHARS:
            return None
        if _FLOAT.fullmatch(s):
            v = float(s)
        elif not finite and s.lower().lstrip("+-") in _NONFINITE:
            v = float(s.lower())
        else:
            return None
    return v if (math.isfinite(v) or not finite) else None


def features_text(features: str | int | Sequence[int] | None) -> str | None:
    """Block indices as the CLI gives them ("3,5,7"): a library caller may pass an int or a sequence of ints."""
    if features is None or isinstance(features, str):
        return features
    return ",".join(str(b) for b in ([features] if isinstance(features, int) else features))


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, Path):
        return str(x)
    return x


def json_text(data: Any) -> str:
    """`data` as the reports' JSON: two-space indent, keys in insertion order, paths as text, NaN/Inf as null."""
    return json.dumps(_jsonable(data), indent=2, sort_keys=False) + "\n"


def write_json(path: str | Path, data: Any, staging: Staging | None = None) -> None:
    """Write `data` as JSON atomically (no half-written report on failure); staged when `staging` is given."""
    if staging is not None:
        staging.write_text(path, json_text(data))
        return
    with atomic_output(path) as tmp:
        tmp.write_text(json_text(data))


def check_dense_options(img_size: Any, features: str | None, restore: str):
    """img_size / features / restore of export and bench, checked before any work.
    Returns (the size as the config stores it or None, the feature block texts or None)."""
    from caitdeploy.families.vit.config import size_and_restore

    size = size_and_restore(img_size, restore)
    if restore != "repeat" and features is None:
        raise OptionError("restore", "applies to feature outputs: add --features")
    parts = None
    if features is not None:
        parts = [p.strip() for p in features.split(",") if p.strip()]
        if not parts or not all(re.fullmatch(r"[+-]?[0-9]{1,6}", p) for p in parts):
            raise OptionError("features", f"{safe_text(features, 60)!r}: give block indices, e.g. 3,5,7,11")
        if any(int(p) < 0 for p in parts):
            raise OptionError(
                "features",
                f"block {next(p for p in parts if int(p) < 0)}: block indices count from "
                "0 (the first block); negative indices are not taken",
            )
        parts = [str(int(p)) for p in parts]
    return size, parts
