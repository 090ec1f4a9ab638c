"""Swin checkpoint keys across layouts: timm's (PatchMerging at the START of a stage, `head.fc.*`) and Microsoft's
(PatchMerging at the END of a stage, `head.*`). `convert` (DIMAP, SPViT-Swin), the timm adapter and training read
released Swin weights through `timm_layout`."""

from __future__ import annotations

import re

import torch


def timm_layout(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """A Swin state dict in timm's layout (Microsoft's: PatchMerging at the END of a stage, `head.*`, remapped as
    timm's own checkpoint filter does); buffers dropped. Returns (state dict, "timm" | "microsoft")."""
    from caitdeploy.families.swin.model import BUFFER_SUFFIXES

    sd = {k: v for k, v in sd.items() if not k.endswith(BUFFER_SUFFIXES)}
    if "layers.0.downsample.reduction.weight" not in sd:
        return sd, "timm"
    out = {}
    for k, v in sd.items():
        k = re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) + 1}.downsample", k)
        out[re.sub(r"^head\.", "head.fc.", k)] = v
    return out, "microsoft"
