"""Any input resolution: a model's absolute position embedding resampled for another image size.

The rule is timm's `resample_abs_pos_embed` (written from its description): the patch part of the embedding,
viewed as a [D, Gh, Gw] image, is resized with bicubic interpolation, `align_corners=False` and antialiasing
(which only acts when a side shrinks), in float32 or float64; prefix-token entries (class, distillation,
registers) are copied untouched. Every other weight is resolution-free: the stem is a convolution, an ATME merge
is a Linear on token pairs, attention and MLPs are per-token, SPViT's convolutions run on whatever grid they
get, SiT's token slimming maps any token count to its fixed output count. What can fail is the merge rule: a
merged side must be even on the new grid (checked by `CaitConfig.at_size`, one line naming the block).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from caitdeploy.families.vit.config import CaitConfig


def resample_pos_embed(
    pos: torch.Tensor,
    old_grid: tuple[int, int],
    new_grid: tuple[int, int],
    num_prefix: int = 1,
    mode: str = "bicubic",
    antialias: bool = True,
) -> torch.Tensor:
    """pos [1, num_prefix + Gh*Gw, D] on `old_grid` -> [1, num_prefix + Gh'*Gw', D] on `new_grid`."""
    gh, gw = old_grid
    nh, nw = new_grid
    if pos.dim() != 3 or pos.shape[0] != 1 or pos.shape[1] != num_prefix + gh * gw:
        raise ValueError(f"pos_embed of shape {tuple(pos.shape)} is not [1, {num_prefix} + {gh}*{gw}, D]")
    if (gh, gw) == (nh, nw):
        return pos
    prefix, grid = pos[:, :num_prefix], pos[:, num_prefix:]
    d = pos.shape[-1]
    work = grid.dtype if grid.dtype in (torch.float32, torch.float64) else torch.float32
    img = grid.to(work).reshape(1, gh, gw, d).permute(0, 3, 1, 2)
    img = F.interpolate(img, size=(nh, nw), mode=mode, align_corners=False, antialias=antialias)
    grid = img.permute(0, 2, 3, 1).reshape(1, nh * nw, d).to(pos.dtype)
    return torch.cat([prefix, grid], dim=1)


def resize_state_dict(
    config: CaitConfig, state: dict[str, torch.Tensor], img_size
) -> tuple[CaitConfig, dict[str, torch.Tensor]]:
    """(config at `img_size`, a state dict whose pos_embed is resampled; every other tensor is shared)."""
    new = config.at_size(img_size)
    if new.grid == config.grid:
        return new, state
    prefix = 0 if config.no_embed_class else config.num_prefix_tokens
    out = dict(state)
    out["pos_embed"] = resample_pos_embed(state["pos_embed"], config.grid, new.grid, prefix)
    return new, out


def at_size(model, img_size):
    """A new `CaitViT` running `model` at another input size (same weights, resampled position embedding,
    same attention implementation); `model` is left as it is."""
    from caitdeploy.families.layers import AttnImpl
    from caitdeploy.families.vit.model import CaitViT

    cfg, sd = resize_state_dict(model.config, model.state_dict(), img_size)
    impl: AttnImpl = getattr(next((b.attn for b in model.blocks if hasattr(b.attn, "impl")), None), "impl", "sdpa")
    kernels = "triton" if any(b.merge is not None and b.merge.use_triton for b in model.blocks) else None
    new = CaitViT(cfg, attn_impl=impl, kernels=kernels)
    new.load_state_dict(sd)
    return new.train(model.training)
