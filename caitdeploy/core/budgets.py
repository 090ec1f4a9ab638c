"""Limits on untrusted input: option ranges, tensor storage, and the memory rule every command checks before
it allocates. The structural bounds on a config (depth, width, heads, ...) live in `config.BOUNDS`.

The memory rule (README, "Errors and untrusted input"):

    weights: a command holds at most WEIGHT_FACTOR x the float32 size of the tensors the input file really
             stores. This follows from three checks made before any model is built: every tensor's storage holds
             all its elements (no stride-0 / expanded views, no two tensors sharing elements), every shape agrees
             with the config, key by key, and the config is within the structural bounds;
    work:    commands that run a model (fuse's check, export's check, bench) estimate the activation memory of
             the batch asked for from the config, and refuse when weights + activations exceed the budget:
             the smallest of the machine's memory, RLIMIT_AS / RLIMIT_DATA, the cgroup limit and
             CAITDEPLOY_MAX_MEMORY_MB.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import torch

from caitdeploy.core.errors import CaitError, OptionError

WEIGHT_FACTOR = 4  # fuse: checkpoint + folded + fused + float64 reference, each a layer at a time
MAX_ALIGN = 256
MAX_VERIFY_BATCH = 256
MAX_SECONDS = 3600.0  # any per-repeat timing option
MAX_ITERS = 1_000_000
GIB = 1 << 30


def check_float(value: Any, key: str, lo: float, hi: float, lo_open: bool = False) -> float:
    """A finite float in [lo, hi] (or (lo, hi] with lo_open); NaN, Inf, strings refused, naming parameter `key`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise OptionError(key, f"must be a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise OptionError(key, f"must be a finite number, got {value!r}")
    if v < lo or (lo_open and v == lo) or v > hi:
        left = "(" if lo_open else "["
        raise OptionError(key, f"= {value!r} is outside {left}{lo:g}, {hi:g}]")
    return v


# ---- memory --------------------------------------------------------------------------------------
def _cgroup_limit() -> int | None:
    for p in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(p) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < (1 << 60):
            return int(text)
    return None


def memory_budget() -> tuple[int, str]:
    """(bytes, what set it): the most memory a command may plan to use on this machine."""
    import resource

    cands: list[tuple[int, str]] = []
    try:
        cands.append((os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "physical memory"))
    except (ValueError, OSError):
        pass
    for name in ("RLIMIT_AS", "RLIMIT_DATA"):
        soft, _ = resource.getrlimit(getattr(resource, name))
        if soft != resource.RLIM_INFINITY and soft > 0:
            cands.append((soft, name))
    if (cg := _cgroup_limit()) is not None:
        cands.append((cg, "cgroup memory limit"))
    env = os.environ.get("CAITDEPLOY_MAX_MEMORY_MB")
    if env:
        try:
            cands.append((int(float(env) * (1 << 20)), "CAITDEPLOY_MAX_MEMORY_MB"))
        except ValueError:
            raise CaitError(f"CAITDEPLOY_MAX_MEMORY_MB={env!r}: not a number") from None
    if not cands:
        return (1 << 62, "unknown")
    return min(cands)


def check_memory(need: int, what: str, hint: str = "") -> None:
    """Refuse work whose planned memory `need` (bytes) exceeds the budget, before allocating any of it."""
    budget, source = memory_budget()
    if need > budget:
        raise CaitError(
            f"{what} needs about {need / GIB:.2f} GiB, more than the {budget / GIB:.2f} GiB budget "
            f"({source}){'; ' + hint if hint else ''}"
        )


def tensor_problem(key: str, t: Any) -> str | None:
    """Why `t` cannot be a weight tensor from a file, or None: not a tensor, complex or integer weights,
    a view whose storage holds fewer elements than its shape (stride 0, expanded), a meta or sparse tensor."""
    if not isinstance(t, torch.Tensor):
        return f"key {key!r} is a {type(t).__name__}, expected a tensor"
    if t.layout != torch.strided:
        return f"key {key!r} is a {t.layout} tensor, expected a dense one"
    if t.is_meta or t.device.type != "cpu":
        return f"key {key!r} is on device {t.device}, expected data stored in the file"
    if t.is_complex():
        return f"key {key!r} has complex dtype {t.dtype}: CAIT weights are real"
    if t.numel() > 1 and any(st == 0 and n > 1 for st, n in zip(t.stride(), t.shape)):
        n = t.untyped_storage().nbytes() // max(t.element_size(), 1)
        return (
            f"key {key!r} is an expanded (stride-0) view: its storage holds only {n} element{'s' * (n != 1)} "
            f"for shape {tuple(t.shape)}"
        )
    return None


def stored_elements_check(tensors: Mapping[str, torch.Tensor]) -> tuple[int, int]:
    """(elements the tensors claim, elements their storages really hold); raises CaitError when the claim is
    larger, i.e. tensors share or overlap storage (a file that is much smaller than the model it describes)."""
    claimed = 0
    stored: dict[int, int] = {}
    for t in tensors.values():
        claimed += t.numel() * t.element_size()
        s = t.untyped_storage()
        stored[s.data_ptr() if s.nbytes() else id(t)] = s.nbytes()
    real = sum(stored.values())
    if claimed > real:
        raise CaitError(
            f"its tensors claim {claimed} bytes but their storages hold only {real}: tensors share or "
            "overlap storage (views of one buffer), which a checkpoint never needs"
        )
    return claimed, real


# ---- images (imagefile.py) -----------------------------------------------------------------------
MAX_IMAGE_BYTES = 256 << 20  # an image file larger than this is refused before a byte of it is read
MAX_IMAGE_SIDE = 16384  # pixels on either side (a 60,000,000 x 1 PNG is 175 KB and passes any area bound)
MAX_IMAGE_PIXELS = 64 * 1024 * 1024  # width x height, and what a resize to the model's input would make
