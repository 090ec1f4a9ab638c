"""Attention with independent query/key and value head widths.

q, k: [B, H, N, Dqk]; v: [B, H, N, Dv] (Dqk != Dv allowed, e.g. after CAIT
pruning of the qk and v projections).  Returns softmax(q k^T * scale) v as
[B, H, N, Dv] in q's dtype.
"""

from __future__ import annotations

import math

import torch

from caitdeploy.kernels._runtime import check_device_for_triton, load_impl

__all__ = ["MAX_HEAD_DIM", "attention", "attention_ref"]

MAX_HEAD_DIM = 256  # widest Dqk / Dv the Triton kernel tiles (padded to a power of two)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _validate(q, k, v, scale, name: str, allowed_dtypes=_DTYPES, max_dim=None) -> None:
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v)):
        raise ValueError(f"{name}: q, k and v must be torch.Tensor")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"{name}: q, k, v must be 4-D [B, H, N, D], got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape != q.shape:
        raise ValueError(f"{name}: k must have q's shape [B, H, N, Dqk] = {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"{name}: v must be [B, H, N, Dv] with q's B, H, N = {tuple(q.shape[:3])}, got {tuple(v.shape)}"
        )
    if q.shape[-1] < 1 or v.shape[-1] < 1:
        raise ValueError(f"{name}: head widths must be >= 1, got Dqk={q.shape[-1]}, Dv={v.shape[-1]}")
    if max_dim is not None and (q.shape[-1] > max_dim or v.shape[-1] > max_dim):
        raise ValueError(
            f"{name}: head widths above {max_dim} are not supported, got Dqk={q.shape[-1]}, Dv={v.shape[-1]}"
        )
    if q.dtype not in allowed_dtypes:
        raise ValueError(
            f"{name}: dtype {q.dtype} not supported (use one of {', '.join(str(d) for d in allowed_dtypes)})"
        )
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"{name}: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"{name}: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if isinstance(scale, (torch.Tensor, bool)) or not isinstance(scale, (int, float)):
        raise ValueError(f"{name}: scale must be a Python float, got {type(scale).__name__}")  # noqa: TRY004 - ValueError for every bad argument
    if not math.isfinite(float(scale)):
        raise ValueError(f"{name}: scale must be finite, got {scale}")


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Math-path reference: fp32 softmax(q k^T * scale) v, cast back to q's dtype."""
    _validate(q, k, v, scale, "attention_ref", allowed_dtypes=_DTYPES + (torch.float64,))
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = torch.matmul(q.to(work), k.to(work).transpose(-2, -1)) * float(scale)
    p = torch.softmax(s, dim=-1)
    return torch.matmul(p, v.to(work)).to(q.dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Triton flash-style attention (online softmax, fp32 accumulation).

    Any N (tails masked), any Dqk / Dv up to MAX_HEAD_DIM (masked power-of-two
    tiles, inputs never padded), any strides, fp16 / bf16 / fp32.  Output is a
    new contiguous [B, H, N, Dv] tensor in q's dtype.  CUDA tensors run
    compiled; CPU tensors run in the Triton interpreter (TRITON_INTERPRET=1,
    set automatically at the first call when no CUDA device exists).
    """
    _validate(q, k, v, scale, "attention", max_dim=MAX_HEAD_DIM)
    impl = load_impl("attention", "attention")
    check_device_for_triton(q.device, impl.INTERPRETED, "attention")
    return impl.launch(q, k, v, float(scale))
