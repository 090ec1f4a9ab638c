"""Small @triton.jit helpers shared by the kernels (imported lazily, after
``kernels._runtime.load_impl`` has settled TRITON_INTERPRET)."""

import torch
import triton
import triton.language as tl

# How a tile product is issued (a tl.constexpr argument of the kernels).
DOT_NATIVE = 0  # fp16 / bf16 operands on the tensor cores, fp32 accumulation
DOT_IEEE = 1  # fp32 operands, full fp32 products
DOT_TF32 = 2  # fp32 operands on tf32 tensor cores
DOT_UPCAST = 3  # bf16 operands widened to fp32 first (interpreter only, see README)


def _is_interpreted(fn) -> bool:
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - very old triton
        return False
    return isinstance(fn, InterpretedFunction)


@triton.jit
def mma(a, b, acc, DOT_MODE: tl.constexpr):
    """acc += a @ b with fp32 accumulation."""
    if DOT_MODE == 3:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif DOT_MODE == 1:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    elif DOT_MODE == 2:
        acc = tl.dot(a, b, acc, input_precision="tf32")
    else:
        acc = tl.dot(a, b, acc)
    return acc


# Whether @triton.jit produced interpreted functions in this process (decided
# once, when this module is imported; triton reads TRITON_INTERPRET then).
INTERPRETED = _is_interpreted(mma)


def dot_mode(dtype: torch.dtype) -> int:
    """Pick the DOT_MODE for operands of `dtype` in this process."""
    if dtype == torch.float32:
        if INTERPRETED:
            return DOT_IEEE
        return DOT_TF32 if torch.backends.cuda.matmul.allow_tf32 else DOT_IEEE
    if dtype == torch.bfloat16 and INTERPRETED:
        # triton's interpreter multiplies bf16 tiles as raw uint16 bit patterns
        # (numpy has no bf16), which gives garbage; widen them instead.  A bf16 x
        # bf16 product is exact in fp32, so this matches the tensor-core math.
        return DOT_UPCAST
    return DOT_NATIVE


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())
