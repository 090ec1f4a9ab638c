"""ATME token merge: Linear(concat of two neighbouring patch tokens).

Layout: x is [B, 1 + Gh*Gw, D]; token 0 is the class token, tokens 1.. are the
patches in row-major order on a (Gh, Gw) grid.

* kind "h" (horizontal): (Gh, Gw) -> (Gh, Gw/2);
  new (r, c) = Linear([x(r, 2c), x(r, 2c+1)])        (left, right)
* kind "v" (vertical):   (Gh, Gw) -> (Gh/2, Gw);
  new (r, c) = Linear([x(2r, c), x(2r+1, c)])        (top, bottom)

Output is [B, 1 + merged tokens, D]: the class token copied through, then the
merged tokens in row-major order.  weight is [D, 2D] (nn.Linear layout, the
first D input columns act on the left/top token), bias is [D] or None.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from caitdeploy.kernels._runtime import check_device_for_triton, load_impl

__all__ = ["atme_merge_linear", "atme_merge_linear_ref", "merged_grid"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def merged_grid(grid_hw: Sequence[int], kind: str) -> tuple:
    """Grid (Gh, Gw) after an ATME merge of `kind` ("h" or "v")."""
    gh, gw = int(grid_hw[0]), int(grid_hw[1])
    return (gh, gw // 2) if kind == "h" else (gh // 2, gw)


def _validate(x, weight, bias, grid_hw, kind, name: str, allowed_dtypes=_DTYPES) -> tuple:
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise ValueError(f"{name}: x and weight must be torch.Tensor")  # noqa: TRY004 - ValueError for every bad argument
    if kind not in ("h", "v"):
        raise ValueError(f"{name}: kind must be 'h' or 'v', got {kind!r}")
    try:
        gh, gw = (int(v) for v in grid_hw)
    except Exception:  # noqa: BLE001 - whatever grid_hw is, the error is a ValueError
        raise ValueError(f"{name}: grid_hw must be a pair of ints (Gh, Gw), got {grid_hw!r}") from None
    if gh <= 0 or gw <= 0:
        raise ValueError(f"{name}: grid sides must be positive, got {(gh, gw)}")
    if x.dim() != 3:
        raise ValueError(f"{name}: x must be [B, 1 + Gh*Gw, D], got shape {tuple(x.shape)}")
    _B, N, D = x.shape
    if N != 1 + gh * gw:
        raise ValueError(f"{name}: x has {N} tokens but grid {gh}x{gw} needs 1 + {gh * gw} = {1 + gh * gw}")
    if kind == "h" and gw % 2:
        raise ValueError(f"{name}: horizontal merge needs an even grid width, got grid {gh}x{gw}")
    if kind == "v" and gh % 2:
        raise ValueError(f"{name}: vertical merge needs an even grid height, got grid {gh}x{gw}")
    if tuple(weight.shape) != (D, 2 * D):
        raise ValueError(f"{name}: weight must be [D, 2D] = [{D}, {2 * D}], got {tuple(weight.shape)}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise ValueError(f"{name}: bias must be a torch.Tensor or None")
        if tuple(bias.shape) != (D,):
            raise ValueError(f"{name}: bias must be [D] = [{D}], got {tuple(bias.shape)}")
    tensors = [x, weight] + ([bias] if bias is not None else [])
    if x.dtype not in allowed_dtypes:
        raise ValueError(
            f"{name}: dtype {x.dtype} not supported (use one of {', '.join(str(d) for d in allowed_dtypes)})"
        )
    if any(t.dtype != x.dtype for t in tensors):
        raise ValueError(f"{name}: x, weight and bias must share one dtype, got {[str(t.dtype) for t in tensors]}")
    if any(t.device != x.device for t in tensors):
        raise ValueError(f"{name}: x, weight and bias must be on one device, got {[str(t.device) for t in tensors]}")
    return gh, gw


def atme_merge_linear_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    grid_hw: Sequence[int],
    kind: str,
) -> torch.Tensor:
    """Plain PyTorch reference: reshape (and transpose for "v") + F.linear.

    Runs in the dtype of its inputs; upcast them first for an fp32 reference.
    """
    gh, gw = _validate(
        x,
        weight,
        bias,
        grid_hw,
        kind,
        "atme_merge_linear_ref",
        allowed_dtypes=(torch.float32, torch.float16, torch.bfloat16, torch.float64),
    )
    B, _, D = x.shape
    patches = x[:, 1:]
    if kind == "h":
        # (r, 2c) and (r, 2c+1) are neighbours in memory: a reshape pairs them.
        pairs = patches.reshape(B, gh * (gw // 2), 2 * D)
    else:
        pairs = patches.reshape(B, gh // 2, 2, gw, D).transpose(2, 3).reshape(B, (gh // 2) * gw, 2 * D)
    merged = F.linear(pairs, weight, bias)
    return torch.cat([x[:, :1], merged], dim=1)


def atme_merge_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    grid_hw: Sequence[int],
    kind: str,
) -> torch.Tensor:
    """Triton kernel: fused gather + GEMM + bias + class-token copy.

    Reads the two source tokens of each merged token straight from their
    strided places in x (any strides), fp32 accumulation, output contiguous in
    x's dtype (fp32, fp16 or bf16).  CUDA tensors run compiled; CPU tensors
    run in the Triton interpreter (TRITON_INTERPRET=1, set automatically at
    the first call when no CUDA device exists).
    """
    gh, gw = _validate(x, weight, bias, grid_hw, kind, "atme_merge_linear")
    impl = load_impl("atme_merge", "atme_merge_linear")
    check_device_for_triton(x.device, impl.INTERPRETED, "atme_merge_linear")
    return impl.launch(x, weight, bias, gh, gw, kind)
