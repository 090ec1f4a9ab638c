"""Triton flash-style attention forward (imported lazily).

Program (pid_m, pid_bh) owns BLOCK_M query rows of one (batch, head).  It
keeps a running row max m, running denominator l and an fp32 accumulator
[BLOCK_M, BLOCK_DV], and streams K/V in BLOCK_N-row tiles:

    s     = (q @ k^T) * scale * log2(e)        (masked to -inf past N)
    m'    = max(m, rowmax(s));  alpha = 2^(m - m');  p = 2^(s - m')
    l     = l * alpha + rowsum(p);  acc = acc * alpha + p @ v

and finally writes acc / l.  Head widths Dqk and Dv are independent; the
tiles use power-of-two tl.constexpr widths BLOCK_DQK >= Dqk, BLOCK_DV >= Dv
and masked loads/stores, so the tensors are never padded in memory.  Token
tails (N not a multiple of the block) are masked the same way.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from caitdeploy.kernels._triton_common import INTERPRETED, dot_mode, mma, next_pow2

_LOG2E = 1.4426950408889634


@triton.jit
def _attention_fwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    o_ptr,
    N,
    H,
    DQK,
    DV,
    qk_scale,  # scale * log2(e)
    sqb,
    sqh,
    sqn,
    sqd,
    skb,
    skh,
    skn,
    skd,
    svb,
    svh,
    svn,
    svd,
    DOT_MODE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_DQK: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    # 1-D grid (no 65535 limit on B*H): the m-blocks of one head are adjacent.
    pid = tl.program_id(0)
    num_m = tl.cdiv(N, BLOCK_M)
    pid_bh = pid // num_m
    pid_m = pid % num_m
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    q_base = q_ptr + b * sqb + h * sqh
    k_base = k_ptr + b * skb + h * skh
    v_base = v_ptr + b * svb + h * svh
    o_base = o_ptr + pid_bh.to(tl.int64) * N * DV  # output is contiguous [B, H, N, DV]

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dq = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_ok = offs_m < N
    dq_ok = offs_dq < DQK
    dv_ok = offs_dv < DV

    q = tl.load(q_base + offs_m[:, None] * sqn + offs_dq[None, :] * sqd, mask=m_ok[:, None] & dq_ok[None, :], other=0.0)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)

    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        k_t = tl.load(
            k_base + offs_n[None, :] * skn + offs_dq[:, None] * skd, mask=dq_ok[:, None] & n_ok[None, :], other=0.0
        )
        s = mma(q, k_t, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), DOT_MODE) * qk_scale
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: every tile has >= 1 valid key
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(
            v_base + offs_n[:, None] * svn + offs_dv[None, :] * svd, mask=n_ok[:, None] & dv_ok[None, :], other=0.0
        )
        acc = acc * alpha[:, None]
        acc = mma(p.to(v.dtype), v, acc, DOT_MODE)
        m_i = m_new

    out = acc / l_i[:, None]
    o_ptrs = o_base + offs_m[:, None] * DV + offs_dv[None, :]
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=m_ok[:, None] & dv_ok[None, :])


if INTERPRETED:
    _kernel = _attention_fwd_kernel
else:
    _kernel = triton.autotune(
        configs=[
            triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=2),
            triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3),
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=2),
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 32}, num_warps=4, num_stages=3),
            triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=3),
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=2),
        ],
        key=["N", "DQK", "DV", "DOT_MODE"],
    )(_attention_fwd_kernel)


def launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Run the kernel; arguments are already validated by kernels.attention."""
    B, H, N, dqk = q.shape
    dv = v.shape[-1]
    out = torch.empty((B, H, N, dv), device=q.device, dtype=q.dtype)
    if B * H * N == 0 or dv == 0:
        return out
    bdq = max(16, next_pow2(dqk))
    bdv = max(16, next_pow2(dv))
    args = (
        q,
        k,
        v,
        out,
        N,
        H,
        dqk,
        dv,
        float(scale) * _LOG2E,
        *q.stride(),
        *k.stride(),
        *v.stride(),
    )
    mode = dot_mode(q.dtype)
    if INTERPRETED:
        blk = max(16, min(64, next_pow2(N)))
        grid = (triton.cdiv(N, blk) * B * H,)
        _kernel[grid](*args, DOT_MODE=mode, BLOCK_M=blk, BLOCK_N=blk, BLOCK_DQK=bdq, BLOCK_DV=bdv)
    else:
        grid_of = lambda meta: (triton.cdiv(N, meta["BLOCK_M"]) * B * H,)  # noqa: E731
        _kernel[grid_of](*args, DOT_MODE=mode, BLOCK_DQK=bdq, BLOCK_DV=bdv)
    return out
