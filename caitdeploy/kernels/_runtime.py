"""Lazy Triton loading shared by the kernel wrappers.

Nothing in here imports triton at module import time, so ``import kernels``
works on machines without triton.  The @triton.jit kernels live in the private
modules ``kernels._atme_merge_triton`` and ``kernels._attention_triton`` and
are imported the first time a Triton kernel is called.

Triton decides between compiling and interpreting a kernel when the
``@triton.jit`` decorator runs (it reads ``TRITON_INTERPRET`` then), and
triton.language decorates its own helpers (tl.sum, tl.cdiv, ...) when triton
is first imported.  When no CUDA device is present we therefore set
``TRITON_INTERPRET=1`` right before importing triton and the kernel modules,
so that CPU tensors run through the interpreter.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from types import ModuleType

import torch

__all__ = [
    "TritonUnavailableError",
    "ensure_interpret_env",
    "interpret_requested",
    "load_impl",
    "triton_available",
]


class TritonUnavailableError(ImportError):
    """Raised when a Triton kernel is called but triton cannot be imported."""


_TRITON_ERR: str | None = None  # why triton could not be imported (None: not tried / ok)
_IMPLS: dict[str, ModuleType] = {}


def triton_available() -> bool:
    """True if triton is installed (checked without importing it).

    Importing triton is deferred to the first kernel call because triton's
    interpreter mode must be chosen before `import triton`.
    """
    if _TRITON_ERR is not None:
        return False
    if sys.modules.get("triton") is not None:
        return True
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


def interpret_requested() -> bool:
    """True if TRITON_INTERPRET is set to a true value in the environment."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")


def ensure_interpret_env() -> bool:
    """Set TRITON_INTERPRET=1 when no CUDA device exists and it is unset.

    Must run before triton is first imported (triton builds its own
    @triton.jit helpers, e.g. tl.sum, at import time).  Returns
    interpret_requested().
    """
    if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
    return interpret_requested()


def _version(text: str) -> tuple[int, ...]:
    import re

    return tuple(int(m.group()) if (m := re.match(r"\d+", p)) else 0 for p in text.split("+")[0].split(".")[:3])


def interpreter_defect() -> str | None:
    """Why this triton's interpreter cannot run our kernels with this numpy, or None.

    triton < 3.8's interpreter turns a tensor into a Python int with ``int(array_of_one_element)``, which numpy
    >= 2.5 refuses ("only 0-dimensional arrays can be converted to Python scalars"), so every kernel with a loop
    over a run-time bound (``range(0, D, BLOCK_K)``) fails. Measured: triton 3.6.0 + numpy 2.5.2 (the lent GPU
    machine's stack) fails, triton 3.8.0 works. Compiled kernels (CUDA) are not affected."""
    try:
        from importlib.metadata import version

        tri, npv = version("triton"), version("numpy")
    except Exception:  # noqa: BLE001 - no triton: triton_available() says so
        return None
    if _version(tri) < (3, 8) and _version(npv) >= (2, 5):
        return (
            f"the Triton interpreter of triton {tri} cannot run with numpy {npv} (int() of a one-element "
            "array, refused since numpy 2.5; fixed in triton 3.8); compiled kernels on CUDA are not affected"
        )
    return None


def load_impl(name: str, caller: str) -> ModuleType:
    """Import ``kernels._<name>_triton`` (defining its @triton.jit kernels)."""
    global _TRITON_ERR
    mod = _IMPLS.get(name)
    if mod is not None:
        return mod
    triton_was_imported = "triton" in sys.modules
    want_interp = ensure_interpret_env()
    if _TRITON_ERR is None:
        try:
            import triton
            import triton.language  # noqa: F401
        except Exception as exc:  # noqa: BLE001 - ImportError, or a broken install
            _TRITON_ERR = f"{type(exc).__name__}: {exc}"
    if _TRITON_ERR is not None:
        raise TritonUnavailableError(
            f"kernels.{caller} needs the 'triton' package, which could not be imported "
            f"({_TRITON_ERR}); install triton or use kernels.{caller}_ref (plain PyTorch)"
        )
    if want_interp and interpreter_defect():
        raise TritonUnavailableError(
            f"kernels.{caller}: {interpreter_defect()}; use kernels.{caller}_ref (plain PyTorch) on this CPU"
        )
    mod = importlib.import_module(f"{__package__}._{name}_triton")
    if want_interp and (not mod.INTERPRETED or (triton_was_imported and not _lang_interpreted())):
        raise RuntimeError(
            f"kernels.{caller}: TRITON_INTERPRET=1 was set after triton had been imported, so the Triton "
            "interpreter cannot run; set TRITON_INTERPRET=1 before anything imports triton"
        )
    _IMPLS[name] = mod
    return mod


def _lang_interpreted() -> bool:
    """True if triton.language's own jit helpers were built for the interpreter."""
    import triton.language as tl

    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover
        return False
    return isinstance(tl.sum, InterpretedFunction)


def check_device_for_triton(device: torch.device, interpreted: bool, caller: str) -> None:
    """Raise ValueError if `device` cannot run the (compiled or interpreted) kernel."""
    if device.type == "cuda":
        return
    if device.type == "cpu":
        if interpreted:
            return
        raise ValueError(
            f"{caller}: CPU tensors need the Triton interpreter, but the kernels were compiled for CUDA "
            "(set TRITON_INTERPRET=1 before the first kernel call, or pass CUDA tensors)"
        )
    raise ValueError(
        f"{caller}: unsupported device type {device.type!r} (expected cuda, or cpu with TRITON_INTERPRET=1)"
    )
