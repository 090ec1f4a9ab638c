"""Fused-model files: safetensors with the config as JSON metadata (never a pickled module)."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from caitdeploy.core.errors import CaitError, Staging, atomic_output
from caitdeploy.core.names import FUSED_FORMAT
from caitdeploy.core.tensorfile import read_safetensors, read_safetensors_header  # re-exported
from caitdeploy.families.vit.config import CaitConfig, ConfigError

if TYPE_CHECKING:
    from caitdeploy.families.layers import AttnImpl


def save_fused(
    path: str | os.PathLike,
    config: CaitConfig,
    state_dict: dict[str, torch.Tensor],
    meta: dict[str, Any] | None = None,
    staging: Staging | None = None,
) -> Path:
    """Write a fused model atomically. `meta` (JSON-able) lands under the `caitdeploy` metadata key.
    With `staging` the file is staged there and appears only when the caller commits."""
    from safetensors.torch import save_file

    metadata = {"format": FUSED_FORMAT, "config": config.to_json(), "caitdeploy": json.dumps(meta or {})}
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}

    def write(tmp: Path) -> None:  # streamed to disk (no second copy in memory); a failed write is one line
        try:
            save_file(tensors, str(tmp), metadata=metadata)
        except Exception as e:  # noqa: BLE001 - SafetensorError("I/O error: No space left on device (os error 28)")
            why = re.sub(r"^.*?I/O error: ", "", str(e).splitlines()[0] if str(e) else type(e).__name__)
            raise CaitError(f"{path}: cannot write ({why}); nothing was written") from None

    if staging is not None:
        write(staging.stage(path, ".safetensors"))
        return Path(path)
    with atomic_output(path, ".safetensors") as tmp:
        write(tmp)
    return Path(path)


def _not_fused(path: Path) -> CaitError:
    """The one-line error for a file that is not a fused model, saying what it is where that is known."""
    from caitdeploy.core.names import FORMAT
    from caitdeploy.formats.checkpoint import read_container

    raw: Any = None
    try:
        if path.suffix == ".safetensors":
            raw = {"format": read_safetensors_header(path)[1].get("format")}
        else:
            raw = read_container(path)
    except CaitError as e:
        if ": refused: " in str(e):  # a pickle that needs code: say that, not "not a fused model"
            return e
    fmt = raw.get("format") if isinstance(raw, dict) else None
    if isinstance(raw, dict) and (fmt == FORMAT or (fmt is None and ("model" in raw or "state_dict" in raw))):
        what = fmt if isinstance(fmt, str) else "DeiT-style state dict"
        return CaitError(
            f"{path}: is a CAIT training checkpoint ({what}), not a fused model: run `caitdeploy fuse` on it first"
        )
    return CaitError(
        f"{path}: not a fused model: expected a {FUSED_FORMAT} .safetensors file written by `caitdeploy fuse`"
    )


ST_FLOAT_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def expected_fused_shapes(config: CaitConfig) -> dict[str, tuple[int, ...]]:
    """key -> shape of a fused model's tensors, from its config (a meta-device model: nothing allocated)."""
    from caitdeploy.families import build_model

    with torch.device("meta"):
        model = build_model(config, attn_impl="math")
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def load_fused(path: str | os.PathLike) -> tuple[CaitConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """(config, state_dict, meta) of a fused model file; a one-line CaitError for anything else.

    Order: header only (format, config JSON, every key's shape and dtype checked against the config), the memory
    rule, then the tensor data (finite values). Nothing the config claims is allocated before it agrees with the
    file."""
    from caitdeploy.core.budgets import check_memory
    from caitdeploy.families.vit.config import strict_json

    path = Path(path)
    if not path.is_file():
        raise CaitError(f"{path}: no such file")
    if path.suffix != ".safetensors":
        raise _not_fused(path)
    try:
        info, meta = read_safetensors_header(path)
    except CaitError as e:
        raise CaitError(f"{e} (expected a {FUSED_FORMAT} file written by `caitdeploy fuse`)") from None
    if meta.get("format") != FUSED_FORMAT:
        raise _not_fused(path)
    if "config" not in meta:
        raise CaitError(f"{path}: metadata has no 'config'")
    try:
        from caitdeploy.families import config_from_dict, family

        config = config_from_dict(strict_json(meta["config"], "metadata 'config'"))
        family(config.family).check_config(config)
    except (ConfigError, ValueError) as e:  # UnknownFamily is a ValueError
        raise CaitError(f"{path}: bad 'config' metadata: {e}") from None
    try:
        extra = strict_json(meta.get("caitdeploy", "{}"), "metadata 'caitdeploy'")
    except ConfigError as e:
        raise CaitError(f"{path}: {e}") from None
    if not isinstance(extra, dict):
        raise CaitError(f"{path}: metadata 'caitdeploy' must be a JSON object, got {type(extra).__name__}")
    if extra.get("data_config") is not None:
        from caitdeploy.core.preprocess import check_data_config

        extra["data_config"] = check_data_config(
            extra["data_config"], config.input_shape[0], f"{path}: metadata 'caitdeploy' data_config"
        )
    expected = expected_fused_shapes(config)
    missing = sorted(set(expected) - set(info))
    unexpected = sorted(set(info) - set(expected))
    if missing or unexpected:
        what = f"missing key {missing[0]!r}" if missing else f"unexpected key {unexpected[0]!r}"
        raise CaitError(f"{path}: fused weights do not match their config: {what}")
    for k, want in expected.items():
        shape, dtype = info[k]
        if shape != want:
            raise CaitError(f"{path}: key {k!r} has shape {shape}, config says {want}")
        if dtype not in ST_FLOAT_DTYPES:
            raise CaitError(
                f"{path}: key {k!r} has dtype {dtype}; a fused model holds float32 (or float16, "
                "bfloat16, float64) weights"
            )
    n = sum(math.prod(s) for s, _ in info.values())
    check_memory(3 * 4 * n, f"{path}: loading {n} parameters")
    tensors, _ = read_safetensors(path)
    for k, t in tensors.items():
        if t.numel() and not bool(torch.isfinite(t).all()):
            raise CaitError(f"{path}: key {k!r} contains NaN or Inf")
        if t.dtype != torch.float32:
            tensors[k] = t.float()
    return config, tensors, extra


def load_model(path: str | os.PathLike, attn_impl: AttnImpl = "sdpa", kernels: str | None = None, img_size=None):
    """The deploy model of its family in eval mode from a fused safetensors file; `img_size` (int, (H, W) or
    'HxW') runs it at another input size where the family can (a ViT's position embedding resampled, merges
    re-checked: `Family.resized`)."""
    from caitdeploy.families import build_model

    config, state_dict, extra = load_fused(path)  # keys and shapes already agree with the config
    if img_size is not None:
        from caitdeploy.families import family_of

        try:
            config, state_dict = family_of(config).resized(config, state_dict, img_size)
        except ConfigError as e:
            raise CaitError(f"{path}: {e}") from None
    try:
        model = build_model(config, attn_impl=attn_impl, kernels=kernels)
    except ValueError as e:
        raise CaitError(f"{path}: {e}") from None
    model.load_state_dict(state_dict)
    model.data_config = extra.get("data_config")  # validated by load_fused; None: timm's default transform
    return model.eval()
