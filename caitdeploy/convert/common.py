"""What every converter shares: reading the upstream file, checking its layout, verifying the result."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from caitdeploy.core.errors import CaitError


def check_layout(
    path: Path, sd: dict[str, torch.Tensor], required: dict[str, tuple], ignored: re.Pattern | None, what: str
) -> None:
    """Every required key with its shape; nothing else but the `ignored` (training-only) keys."""
    for k, shape in required.items():
        if k not in sd:
            raise CaitError(f"{path}: missing key {k!r} ({what})")
        if tuple(sd[k].shape) != tuple(shape):
            raise CaitError(f"{path}: key {k!r} has shape {tuple(sd[k].shape)}, expected {tuple(shape)} ({what})")
        if sd[k].numel() and not bool(torch.isfinite(sd[k]).all()):
            raise CaitError(f"{path}: key {k!r} contains NaN or Inf")
    extra = [k for k in sd if k not in required and not (ignored and ignored.fullmatch(k))]
    if extra:
        raise CaitError(f"{path}: unexpected key {extra[0]!r} ({what})")


@torch.no_grad()
def verify(model: torch.nn.Module, reference, config, batch: int, seed: int = 0) -> dict[str, float]:
    """Max |logit diff| of the converted float32 model against the upstream-format forward in float64."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *config.input_shape, generator=g)
    ref = reference(x.double())
    got = model(x).double()
    return {
        "max_abs_diff": float((got - ref).abs().max()),
        "logit_scale": float(ref.abs().max()),
        "top1_agree": float((got.argmax(-1) == ref.argmax(-1)).double().mean()),
        "batch": batch,
    }
