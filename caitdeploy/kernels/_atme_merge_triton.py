"""Triton implementation of the ATME token-merge linear (imported lazily).

One launch computes the whole output [B, 1 + T, D]:

* row m of the flattened output is (b, t) with b = m // (1 + T), t = m % (1 + T);
* t == 0 is the class token, copied through from x[b, 0];
* t >= 1 is merged token j = t - 1 at (r, c) = (j // Wo, j % Wo) on the output
  grid; its two source tokens sit at patch indices
      s0 = r * ROW_STEP + c * COL_STEP,   s1 = s0 + PAIR_STEP
  (h-merge: ROW_STEP = Gw, COL_STEP = 2, PAIR_STEP = 1;
   v-merge: ROW_STEP = 2 Gw, COL_STEP = 1, PAIR_STEP = Gw)
  and are read straight from x with its strides: no gather/transpose copy.

The GEMM is out = [x(s0) | x(s1)] @ W^T + bias, run as two K loops of length D
(first half of W's columns against x(s0), second half against x(s1)), fp32
accumulation, bias added in the epilogue.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from caitdeploy.kernels._triton_common import INTERPRETED, dot_mode, mma, next_pow2


@triton.jit
def _atme_merge_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    out_ptr,
    M,  # B * (1 + T) output rows
    T1,  # 1 + T tokens per image in the output
    D,  # feature width (in and out)
    WO,  # output grid width
    ROW_STEP,
    COL_STEP,
    PAIR_STEP,
    stride_xb,
    stride_xn,
    stride_xd,
    stride_wo,
    stride_wi,
    stride_bias,
    HAS_BIAS: tl.constexpr,
    DOT_MODE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    num_n = tl.cdiv(D, BLOCK_N)
    # n varies fastest: neighbouring programs share the same x rows (L2 reuse).
    pid_m = pid // num_n
    pid_n = pid % num_n

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    row_ok = offs_m < M
    col_ok = offs_n < D

    img = offs_m // T1
    tok = offs_m % T1
    merged = row_ok & (tok > 0)
    j = tl.maximum(tok - 1, 0)
    r = j // WO
    c = j % WO
    src0 = 1 + r * ROW_STEP + c * COL_STEP  # token index in x (class token is 0)
    img_off = img.to(tl.int64) * stride_xb
    base0 = img_off + src0.to(tl.int64) * stride_xn
    base1 = base0 + PAIR_STEP * stride_xn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < D
        a_mask = merged[:, None] & k_ok[None, :]
        w_mask = k_ok[:, None] & col_ok[None, :]
        a0 = tl.load(x_ptr + base0[:, None] + kk[None, :] * stride_xd, mask=a_mask, other=0.0)
        w0 = tl.load(w_ptr + offs_n[None, :] * stride_wo + kk[:, None] * stride_wi, mask=w_mask, other=0.0)
        acc = mma(a0, w0, acc, DOT_MODE)
        a1 = tl.load(x_ptr + base1[:, None] + kk[None, :] * stride_xd, mask=a_mask, other=0.0)
        w1 = tl.load(w_ptr + offs_n[None, :] * stride_wo + (kk + D)[:, None] * stride_wi, mask=w_mask, other=0.0)
        acc = mma(a1, w1, acc, DOT_MODE)

    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n * stride_bias, mask=col_ok, other=0.0)
        acc += bias.to(tl.float32)[None, :]

    # Class-token rows: copy x[b, 0, :] through unchanged.
    is_cls = row_ok & (tok == 0)
    cls = tl.load(
        x_ptr + img_off[:, None] + offs_n[None, :] * stride_xd, mask=is_cls[:, None] & col_ok[None, :], other=0.0
    )
    res = tl.where(is_cls[:, None], cls.to(tl.float32), acc)

    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * D + offs_n[None, :]
    tl.store(out_ptrs, res.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


if INTERPRETED:
    _kernel = _atme_merge_kernel
else:
    _kernel = triton.autotune(
        configs=[
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
            triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=4, num_stages=4),
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=4, num_stages=4),
            triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 32}, num_warps=8, num_stages=3),
            # fits every target in fp32 too (32 KB of shared memory; the ones above need 131-295 KB in fp32 on
            # sm_80/86/89, which the autotuner skips as OutOfResources): found by `python -m caitdeploy.kernels.aot`
            triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=2),
        ],
        key=["M", "D", "HAS_BIAS", "DOT_MODE"],
    )(_atme_merge_kernel)


def launch(x: torch.Tensor, weight: torch.Tensor, bias, gh: int, gw: int, kind: str) -> torch.Tensor:
    """Run the kernel; arguments are already validated by kernels.atme_merge."""
    B, _, D = x.shape
    if kind == "h":
        ho, wo = gh, gw // 2
        row_step, col_step, pair_step = gw, 2, 1
    else:
        ho, wo = gh // 2, gw
        row_step, col_step, pair_step = 2 * gw, 1, gw
    t1 = 1 + ho * wo
    out = torch.empty((B, t1, D), device=x.device, dtype=x.dtype)
    M = B * t1
    if M == 0 or D == 0:
        return out
    has_bias = bias is not None
    b_arg = bias if has_bias else weight  # dummy pointer, never read
    args = (
        x,
        weight,
        b_arg,
        out,
        M,
        t1,
        D,
        wo,
        row_step,
        col_step,
        pair_step,
        x.stride(0),
        x.stride(1),
        x.stride(2),
        weight.stride(0),
        weight.stride(1),
        bias.stride(0) if has_bias else 0,
    )
    mode = dot_mode(x.dtype)
    if INTERPRETED:
        # Few, large programs keep the interpreter fast.
        bm = 64
        bn = max(16, min(64, next_pow2(D)))
        bk = max(16, min(64, next_pow2(D)))
        grid = (triton.cdiv(M, bm) * triton.cdiv(D, bn),)
        _kernel[grid](*args, HAS_BIAS=has_bias, DOT_MODE=mode, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
    else:
        grid_of = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(D, meta["BLOCK_N"]),)  # noqa: E731
        _kernel[grid_of](*args, HAS_BIAS=has_bias, DOT_MODE=mode)
    return out
