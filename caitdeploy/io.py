"""Fused-model files: safetensors with the config as JSON metadata (never a pickled module)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from .config import CaitConfig, ConfigError
from .errors import CaitError, atomic_output

FUSED_FORMAT = "cait-fused/1"


def save_fused(path: str | os.PathLike, config: CaitConfig, state_dict: dict[str, torch.Tensor],
               meta: dict[str, Any] | None = None) -> Path:
    """Write a fused model atomically. `meta` (JSON-able) lands under the `caitdeploy` metadata key."""
    from safetensors.torch import save_file

    metadata = {"format": FUSED_FORMAT, "config": config.to_json(), "caitdeploy": json.dumps(meta or {})}
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    with atomic_output(path, ".safetensors") as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return Path(path)


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header metadata of a safetensors file, with errors that name the file."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise CaitError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CaitError(f"{path}: not a readable safetensors file ({first})") from None
    return tensors, meta


def _not_fused(path: Path) -> CaitError:
    """The one-line error for a file that is not a fused model, saying what it is where that is known."""
    from .checkpoint import FORMAT, read_container

    try:
        raw = read_container(path)
    except CaitError:
        raw = None
    if isinstance(raw, dict) and (raw.get("format") == FORMAT or "model" in raw or "state_dict" in raw):
        what = raw.get("format") or "DeiT-style state dict"
        return CaitError(f"{path}: is a CAIT training checkpoint ({what}), not a fused model: run "
                         "`caitdeploy fuse` on it first")
    return CaitError(f"{path}: not a fused model: expected a {FUSED_FORMAT} .safetensors file written by "
                     "`caitdeploy fuse`")


def load_fused(path: str | os.PathLike) -> tuple[CaitConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """(config, state_dict, meta) of a fused model file; a one-line CaitError for anything else."""
    path = Path(path)
    if not path.is_file():
        raise CaitError(f"{path}: no such file")
    if path.suffix != ".safetensors":
        raise _not_fused(path)
    try:
        tensors, meta = read_safetensors(path)
    except CaitError as e:
        raise CaitError(f"{e} (expected a {FUSED_FORMAT} file written by `caitdeploy fuse`)") from None
    if meta.get("format") != FUSED_FORMAT:
        raise _not_fused(path)
    try:
        config = CaitConfig.from_json(meta["config"])
    except (KeyError, ConfigError) as e:
        raise CaitError(f"{path}: bad 'config' metadata: {e}") from None
    return config, tensors, json.loads(meta.get("caitdeploy", "{}"))


def load_model(path: str | os.PathLike, attn_impl: str = "sdpa", kernels: str | None = None):
    """A `CaitViT` in eval mode from a fused safetensors file."""
    from .model import CaitViT

    config, state_dict, _ = load_fused(path)
    model = CaitViT(config, attn_impl=attn_impl, kernels=kernels)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    extra = sorted(set(state_dict) - set(expected))
    if missing or extra:
        what = f"missing key {missing[0]!r}" if missing else f"unexpected key {extra[0]!r}"
        raise CaitError(f"{path}: fused weights do not match their config: {what}")
    for k, v in expected.items():
        if tuple(state_dict[k].shape) != tuple(v.shape):
            raise CaitError(f"{path}: key {k!r} has shape {tuple(state_dict[k].shape)}, config says {tuple(v.shape)}")
    model.load_state_dict(state_dict)
    return model.eval()
