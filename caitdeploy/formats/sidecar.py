"""The engine sidecar `<engine>.json` that `export.tensorrt` writes next to every engine, and what reads it.

Its path (`sidecar_path`), its reader (`read_sidecar`: validated field by field, a sidecar may come from a
stranger), the build options it records (`BUILD_KEYS`, `normalize_build_options`: what decides whether a built
engine may be reused) and the check of an engine file against it (`check_engine_file`: byte count and SHA-256).
No TensorRT here: `runtime.tensorrt` loads and runs engines.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from pathlib import Path
from typing import Any

from caitdeploy.core.errors import CaitError, safe_text
from caitdeploy.core.names import ENGINE_FORMAT
from caitdeploy.core.paths import MAX_ENGINE_BYTES, MAX_SIDECAR_BYTES, read_bounded, regular_file_size

FLAVOURS = ("tensorrt", "tensorrt_rtx")  # the TensorRT Python modules: full TensorRT (>= 10) and TensorRT-RTX
_HEX64 = re.compile(r"[0-9a-f]{64}")
BUILD_KEYS = ("min_batch", "opt_batch", "max_batch", "workspace_mb", "opt_level", "compute_capabilities", "flavour")


def normalize_build_options(options: dict[str, Any]) -> dict[str, Any]:
    """Build options as recorded in an engine's sidecar (`build_key`): every key, flavour "auto" for None,
    compute capabilities upper-cased."""
    out = {k: options.get(k) for k in BUILD_KEYS}
    out["flavour"] = out["flavour"] or "auto"
    out["min_batch"] = out["min_batch"] if out["min_batch"] is not None else 1
    if out["compute_capabilities"]:
        out["compute_capabilities"] = [str(c).upper() for c in out["compute_capabilities"]]
    else:
        out["compute_capabilities"] = None
    return out


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sidecar_path(engine_path: str | os.PathLike) -> Path:
    return Path(str(engine_path) + ".json")


def _sidecar_problem(d: dict[str, Any]) -> str | None:
    """Why a sidecar's fields cannot be used (types, shapes), or None."""

    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    for key in ("flavour", "trt_version", "input", "dtype", "io_dtype", "created", "engine", "host"):
        if key in d and not isinstance(d[key], str):
            return f"{key!r} must be a string"
        if key in d and len(d[key]) > 4096:
            return f"{key!r} is {len(d[key])} characters long; a sidecar field is short"
    if d.get("flavour") not in (None, *FLAVOURS):
        return f"'flavour' must be one of {', '.join(FLAVOURS)}"
    prof = d.get("profile")
    if prof is not None:
        if not isinstance(prof, dict) or set(prof) != {"min", "opt", "max"}:
            return "'profile' must have min, opt and max"
        for k, v in prof.items():
            if not (isinstance(v, list) and len(v) == 4 and all(is_int(x) and 0 < x <= 1 << 20 for x in v)):
                return f"'profile.{k}' must be 4 positive integers"
    onnx = d.get("onnx")
    if onnx is not None:
        if (
            not isinstance(onnx, dict)
            or not isinstance(onnx.get("path"), str)
            or not isinstance(onnx.get("sha256"), str)
            or len(onnx["sha256"]) != 64
        ):
            return "'onnx' must hold a path and a 64-character sha256"
        if not _HEX64.fullmatch(onnx["sha256"]):
            return "'onnx.sha256' must be 64 hexadecimal digits"
        if "bytes" in onnx and not (is_int(onnx["bytes"]) and 0 <= onnx["bytes"] <= 1 << 62):
            return "'onnx.bytes' must be a non-negative integer"
    for key in ("build_seconds",):
        if key in d and (
            isinstance(d[key], bool) or not isinstance(d[key], (int, float)) or not math.isfinite(d[key]) or d[key] < 0
        ):
            return f"{key!r} must be a finite number >= 0"
    for key, lo, hi in (("opt_level", 0, 5), ("engine_bytes", 0, 1 << 62), ("workspace_mb", 0, 1 << 40)):
        if d.get(key) is not None and not (is_int(d[key]) and lo <= d[key] <= hi):
            return f"{key!r} must be an integer in {lo}..{hi}"
    if d.get("engine_sha256") is not None and not (
        isinstance(d["engine_sha256"], str) and _HEX64.fullmatch(d["engine_sha256"])
    ):
        return "'engine_sha256' must be 64 hexadecimal digits"
    if "outputs" in d and not (isinstance(d["outputs"], list) and all(isinstance(x, str) for x in d["outputs"])):
        return "'outputs' must be a list of names"
    if "build_target" in d and not isinstance(d["build_target"], dict):
        return "'build_target' must be an object"
    if "strongly_typed" in d and not isinstance(d["strongly_typed"], bool):
        return "'strongly_typed' must be true or false"
    if d.get("config") is not None:
        from caitdeploy.families import config_from_dict
        from caitdeploy.families.vit.config import ConfigError

        try:
            config_from_dict(d["config"])
        except ConfigError as e:
            return f"'config': {e}"
    return None


def read_sidecar(engine_path: str | os.PathLike) -> dict[str, Any] | None:
    """The engine's sidecar `<engine>.json`, validated field by field; None when there is none."""
    from caitdeploy.families.vit.config import ConfigError, strict_json

    p = sidecar_path(engine_path)
    if not p.is_file():
        return None
    raw = read_bounded(p, MAX_SIDECAR_BYTES, "engine sidecar")  # size checked before reading (symlinks too)
    try:
        data = strict_json(raw.decode("utf-8"), "engine sidecar")
    except (ConfigError, UnicodeDecodeError) as e:
        raise CaitError(f"{p}: {e}") from None
    if not isinstance(data, dict) or data.get("format") != ENGINE_FORMAT:
        fmt = data.get("format") if isinstance(data, dict) else None
        raise CaitError(f"{p}: not a caitdeploy engine sidecar (format {safe_text(fmt, 60)!r})")
    if (why := _sidecar_problem(data)) is not None:
        raise CaitError(f"{p}: bad engine sidecar: {why}")
    return data


def check_engine_file(
    engine_path: str | os.PathLike, side: dict[str, Any] | None, data: bytes | None = None
) -> dict[str, Any]:
    """The engine file against its sidecar: its size must equal `engine_bytes` and its SHA-256 `engine_sha256`
    (a truncated, appended-to or swapped plan is refused in one line naming the file). Sidecars written before
    caitdeploy recorded the hash are checked by size only, and the result says so.

    Returns {"bytes": size, "bytes_match": bool | None, "sha256": hex | None, "sha256_match": bool | None,
    "note": str | None}; None entries mean the sidecar has no such field. `data`: the file's bytes when the
    caller already read them (hashed instead of reading the file again)."""
    path = Path(engine_path)
    size = len(data) if data is not None else regular_file_size(path, MAX_ENGINE_BYTES, "engine")
    out: dict[str, Any] = {"bytes": size, "bytes_match": None, "sha256": None, "sha256_match": None, "note": None}
    if side is None:
        return out
    want = side.get("engine_bytes")
    if want is not None:
        out["bytes_match"] = size == want
        if size != want:
            raise CaitError(
                f"{path}: engine is {size} bytes but its sidecar {sidecar_path(path).name} records "
                f"{want}: the file was truncated, extended or replaced since the build"
            )
    if side.get("engine_sha256") is None:
        out["note"] = (
            "the sidecar records no engine SHA-256 (written by an older caitdeploy): only the byte count was checked"
            if want is not None
            else "the sidecar records neither the engine's size nor its SHA-256: the engine file is unchecked"
        )
        return out
    digest = hashlib.sha256(data).hexdigest() if data is not None else sha256_file(path)
    out["sha256"], out["sha256_match"] = digest, digest == side["engine_sha256"]
    if digest != side["engine_sha256"]:
        raise CaitError(
            f"{path}: engine SHA-256 {digest[:16]}... differs from the {side['engine_sha256'][:16]}... "
            f"its sidecar {sidecar_path(path).name} records: the file changed since the build"
        )
    return out
