"""Reading safetensors files safely: header first (shapes, dtypes, metadata) without touching tensor data,
then the data; every failure is one CaitError naming the file. Used by checkpoint loading and fused files."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from caitdeploy.core.errors import CaitError


def _st_error(path: Path, e: BaseException) -> CaitError:
    first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
    return CaitError(f"{path}: not a readable safetensors file ({first})")


def _read(path: str | os.PathLike, take: Callable[[Any], Any]) -> tuple[Any, dict[str, str]]:
    """(take(open file), metadata) of a safetensors file; every failure one CaitError naming the file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CaitError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            out = take(f)
    except Exception as e:  # noqa: BLE001 - safetensors raises SafetensorError, OSError, ValueError, ...: one line for all
        raise _st_error(path, e) from None
    return out, meta


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, tuple[tuple[int, ...], str]], dict[str, str]]:
    """({key: (shape, dtype)}, metadata) from the header alone: no tensor data is read.

    safetensors checks on open that the offsets tile the data section exactly, so the shapes it reports are
    backed by real bytes in the file."""

    def shapes(f):
        out = {}
        for k in f.keys():  # noqa: SIM118 - a safe_open handle is not iterable
            sl = f.get_slice(k)
            out[k] = (tuple(int(n) for n in sl.get_shape()), str(sl.get_dtype()))
        return out

    info, meta = _read(path, shapes)
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CaitError(f"{path}: safetensors metadata must map names to strings")
    return info, meta


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header metadata of a safetensors file, with errors that name the file."""
    return _read(path, lambda f: {k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118 - safe_open: no __iter__
