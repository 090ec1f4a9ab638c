"""Tests for kernels/: Triton kernels against their PyTorch references.

Without CUDA the Triton kernels run in the Triton interpreter on CPU tensors
(TRITON_INTERPRET=1 is set below, before anything imports triton); with CUDA
the same tests run compiled on the GPU.  Shapes are kept small so the file
runs in seconds on a 2-core CPU.
"""

import os
import subprocess
import sys
import warnings

import torch

# Must happen before triton is imported anywhere (triton builds tl.sum etc. at import).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

_TRITON_PREIMPORTED = sys.modules.get("triton") is not None

from caitdeploy import kernels  # noqa: E402
from caitdeploy.kernels import _runtime  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
INTERPRET = _runtime.interpret_requested()


def _triton_skip_reason():
    try:
        import triton  # noqa: F401  (TRITON_INTERPRET is already settled above)
    except Exception as exc:  # noqa: BLE001 - a broken install skips too
        return f"triton is not importable ({type(exc).__name__}: {exc}); only the references and argument checks run"
    if not CUDA and not INTERPRET:
        return "no CUDA device and TRITON_INTERPRET is disabled: the Triton kernels cannot run"
    if INTERPRET and _runtime.interpreter_defect():
        return _runtime.interpreter_defect()
    if INTERPRET and _TRITON_PREIMPORTED and not _runtime._lang_interpreted():
        return (
            "triton was imported before TRITON_INTERPRET=1 was set (by another module); "
            "run tests/unit/kernels/test_kernels.py on its own"
        )
    return None


SKIP_REASON = _triton_skip_reason()
if SKIP_REASON:
    warnings.warn(f"tests/unit/kernels/test_kernels.py: skipping Triton kernel tests: {SKIP_REASON}", stacklevel=1)
needs_triton = pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")

# Tolerances of a kernel output against an fp64 reference computed from the
# same (already rounded) inputs: dominated by rounding the output (and, in
# attention, the probabilities) to the working dtype.
TOL = {
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=3e-3, rtol=3e-3),
    torch.bfloat16: dict(atol=3e-2, rtol=2e-2),
}
if CUDA and not INTERPRET and torch.backends.cuda.matmul.allow_tf32:
    TOL[torch.float32] = dict(atol=2e-2, rtol=1e-2)  # kernels follow torch's tf32 setting
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _dtype_id(dt):
    return str(dt).replace("torch.", "")


def _gen(seed):
    return torch.Generator().manual_seed(int(seed))


def _randn(*shape, g, scale=1.0):
    return torch.randn(*shape, generator=g) * scale


def _to(t, dtype):
    return None if t is None else t.to(device=DEVICE, dtype=dtype)


def _f64(t):
    return None if t is None else t.detach().to("cpu", torch.float64)


# ---------------------------------------------------------------- ATME merge


def _merge_loops(x, w, b, gh, gw, kind):
    """Independent, slow definition of the ATME merge (token by token)."""
    _B, _, _D = x.shape
    pt = lambda r, c: x[:, 1 + r * gw + c]  # noqa: E731
    outs = [x[:, 0]]
    if kind == "h":
        cells = [(pt(r, 2 * c), pt(r, 2 * c + 1)) for r in range(gh) for c in range(gw // 2)]
    else:
        cells = [(pt(2 * r, c), pt(2 * r + 1, c)) for r in range(gh // 2) for c in range(gw)]
    for a, bb in cells:
        y = torch.cat([a, bb], dim=-1) @ w.t()
        outs.append(y + b if b is not None else y)
    return torch.stack(outs, dim=1)


@pytest.mark.parametrize("kind,grid", [("h", (4, 6)), ("v", (6, 4)), ("h", (3, 2)), ("v", (2, 5))])
def test_atme_ref_matches_definition(kind, grid):
    g = _gen(1)
    gh, gw = grid
    D = 6
    x = _randn(2, 1 + gh * gw, D, g=g).double()
    w = _randn(D, 2 * D, g=g).double()
    b = _randn(D, g=g).double()
    ref = kernels.atme_merge_linear_ref(x, w, b, grid, kind)
    exp = _merge_loops(x, w, b, gh, gw, kind)
    assert ref.shape == (2, 1 + gh * gw // 2, D)
    torch.testing.assert_close(ref, exp)
    assert kernels.merged_grid(grid, kind) == ((gh, gw // 2) if kind == "h" else (gh // 2, gw))


ATME_CASES = [
    # (batch, grid, kind, D)
    (2, (4, 6), "h", 24),
    (2, (4, 6), "v", 24),
    (2, (6, 4), "h", 40),
    (2, (6, 4), "v", 40),
    (3, (14, 7), "v", 24),  # DeiT second merge: 99 -> 50 tokens, rows cross images in a tile
    (1, (2, 14), "h", 80),  # several K and N tiles
]


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("B,grid,kind,D", ATME_CASES, ids=lambda v: str(v).replace(" ", ""))
def test_atme_merge_kernel(B, grid, kind, D, bias, dtype):
    g = _gen(B * 1000 + grid[0] * 100 + grid[1] * 10 + D + 7 * (kind == "v") + 3 * bias)
    gh, gw = grid
    x = _to(_randn(B, 1 + gh * gw, D, g=g), dtype)
    w = _to(_randn(D, 2 * D, g=g, scale=(2 * D) ** -0.5), dtype)
    b = _to(_randn(D, g=g), dtype) if bias else None
    out = kernels.atme_merge_linear(x, w, b, grid, kind)
    ref = kernels.atme_merge_linear_ref(_f64(x), _f64(w), _f64(b), grid, kind)
    assert out.shape == ref.shape and out.dtype == dtype and out.device == x.device
    assert out.is_contiguous()
    torch.testing.assert_close(out.cpu().double(), ref, **TOL[dtype])
    # class token is copied bit-exactly
    assert torch.equal(out[:, 0], x[:, 0])


@needs_triton
@pytest.mark.parametrize("kind", ["h", "v"])
def test_atme_merge_kernel_strided_inputs(kind):
    """x and weight as non-contiguous views: read in place through their strides."""
    g = _gen(7)
    B, gh, gw, D = 2, 4, 6, 24
    dtype = torch.float16
    big = _to(_randn(1 + gh * gw, B, D + 8, g=g), dtype)
    x = big[:, :, 3 : 3 + D].transpose(0, 1)  # [B, N, D], strides (D+8, B*(D+8), 1)
    assert not x.is_contiguous()
    w = _to(_randn(2 * D, D, g=g, scale=(2 * D) ** -0.5), dtype).t()  # [D, 2D] column-major
    b = _to(_randn(2 * D, g=g), dtype)[::2]  # stride 2
    out = kernels.atme_merge_linear(x, w, b, (gh, gw), kind)
    ref = kernels.atme_merge_linear_ref(_f64(x), _f64(w), _f64(b), (gh, gw), kind)
    torch.testing.assert_close(out.cpu().double(), ref, **TOL[dtype])


def _atme_args(B=1, grid=(4, 6), D=8, dtype=torch.float32):
    gh, gw = grid
    return (
        torch.zeros(B, 1 + gh * gw, D, dtype=dtype),
        torch.zeros(D, 2 * D, dtype=dtype),
        torch.zeros(D, dtype=dtype),
    )


def _assert_one_line_value_error(fn, match):
    with pytest.raises(ValueError, match=match) as info:
        fn()
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("fn", [kernels.atme_merge_linear, kernels.atme_merge_linear_ref], ids=["triton", "ref"])
def test_atme_merge_errors(fn):
    x, w, b = _atme_args(grid=(4, 5))
    _assert_one_line_value_error(lambda: fn(x, w, b, (4, 5), "h"), "even grid width")
    x, w, b = _atme_args(grid=(5, 4))
    _assert_one_line_value_error(lambda: fn(x, w, b, (5, 4), "v"), "even grid height")
    x, w, b = _atme_args(grid=(4, 6))
    _assert_one_line_value_error(lambda: fn(x, w, b, (6, 6), "h"), "tokens")
    _assert_one_line_value_error(lambda: fn(x, w, b, (4, 6), "x"), "kind")
    _assert_one_line_value_error(lambda: fn(x, w, b, (4,), "h"), "grid_hw")
    _assert_one_line_value_error(lambda: fn(x, w[:, :-1], b, (4, 6), "h"), "weight")
    _assert_one_line_value_error(lambda: fn(x, w.t(), b, (4, 6), "h"), "weight")
    _assert_one_line_value_error(lambda: fn(x, w, b[:-1], (4, 6), "h"), "bias")
    _assert_one_line_value_error(lambda: fn(x[0], w, b, (4, 6), "h"), "x must be")
    _assert_one_line_value_error(lambda: fn(x, w.half(), b, (4, 6), "h"), "dtype")
    _assert_one_line_value_error(lambda: fn(x.int(), w.int(), b.int(), (4, 6), "h"), "dtype")
    if CUDA:
        _assert_one_line_value_error(lambda: fn(x, w.cuda(), b, (4, 6), "h"), "device")


def test_atme_merge_odd_side_allowed_on_other_axis():
    """14x7 is fine for a vertical merge (only the merged side must be even)."""
    x, w, b = _atme_args(grid=(14, 7), D=4)
    assert kernels.atme_merge_linear_ref(x, w, b, (14, 7), "v").shape == (1, 50, 4)


# ----------------------------------------------------------------- attention

ATTN_CASES = [
    # (B, H, N, Dqk, Dv)
    (2, 3, 13, 12, 20),
    (1, 2, 25, 24, 8),
    (2, 2, 50, 40, 56),
    (1, 2, 99, 16, 16),  # several query and key tiles, tail tile
    (1, 1, 197, 20, 12),  # DeiT token count
    (1, 1, 1, 5, 3),  # single token, tiny widths
]


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("B,H,N,dqk,dv", ATTN_CASES, ids=lambda v: str(v))
def test_attention_kernel(B, H, N, dqk, dv, dtype):
    g = _gen(N * 131 + dqk * 7 + dv)
    q = _to(_randn(B, H, N, dqk, g=g), dtype)
    k = _to(_randn(B, H, N, dqk, g=g), dtype)
    v = _to(_randn(B, H, N, dv, g=g), dtype)
    scale = dqk**-0.5
    out = kernels.attention(q, k, v, scale)
    ref = kernels.attention_ref(_f64(q), _f64(k), _f64(v), scale)
    assert out.shape == (B, H, N, dv) and out.dtype == dtype and out.device == q.device
    torch.testing.assert_close(out.cpu().double(), ref, **TOL[dtype])


@needs_triton
def test_attention_kernel_large_logits_and_strides():
    """Peaked softmax (online max rescaling across key tiles) on strided views."""
    g = _gen(11)
    B, N, H, dqk, dv = 2, 70, 2, 12, 20
    dtype = torch.float16
    qkv = _to(_randn(B, N, 2 * H * dqk + H * dv, g=g, scale=3.0), dtype)  # fused projection output
    q = qkv[..., : H * dqk].unflatten(-1, (H, dqk)).transpose(1, 2)
    k = qkv[..., H * dqk : 2 * H * dqk].unflatten(-1, (H, dqk)).transpose(1, 2)
    v = qkv[..., 2 * H * dqk :].unflatten(-1, (H, dv)).transpose(1, 2)
    assert not q.is_contiguous()
    out = kernels.attention(q, k, v, 1.0)
    ref = kernels.attention_ref(_f64(q), _f64(k), _f64(v), 1.0)
    torch.testing.assert_close(out.cpu().double(), ref, **TOL[dtype])


def test_attention_ref_matches_sdpa():
    g = _gen(3)
    q, k, v = _randn(1, 2, 9, 8, g=g), _randn(1, 2, 9, 8, g=g), _randn(1, 2, 9, 8, g=g)
    ref = kernels.attention_ref(q, k, v, 0.3)
    exp = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.3)
    torch.testing.assert_close(ref, exp, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fn", [kernels.attention, kernels.attention_ref], ids=["triton", "ref"])
def test_attention_errors(fn):
    q = torch.zeros(1, 2, 5, 4)
    v = torch.zeros(1, 2, 5, 6)
    _assert_one_line_value_error(lambda: fn(q, q[..., :3], v, 1.0), "k must have")
    _assert_one_line_value_error(lambda: fn(q, q, v[:, :, :4], 1.0), "v must be")
    _assert_one_line_value_error(lambda: fn(q[0], q[0], v[0], 1.0), "4-D")
    _assert_one_line_value_error(lambda: fn(q, q.half(), v, 1.0), "dtype")
    _assert_one_line_value_error(lambda: fn(q.int(), q.int(), v.int(), 1.0), "dtype")
    _assert_one_line_value_error(lambda: fn(q, q, v, float("nan")), "scale")
    _assert_one_line_value_error(lambda: fn(q, q, v, torch.tensor(1.0)), "scale")
    _assert_one_line_value_error(lambda: fn(q[..., :0], q[..., :0], v, 1.0), "head widths")
    if CUDA:
        _assert_one_line_value_error(lambda: fn(q, q, v.cuda(), 1.0), "device")


def test_attention_kernel_rejects_wide_heads_and_fp64():
    q = torch.zeros(1, 1, 3, kernels.MAX_HEAD_DIM + 1)
    _assert_one_line_value_error(lambda: kernels.attention(q, q, q, 1.0), "head widths above")
    q = torch.zeros(1, 1, 3, 4, dtype=torch.float64)
    _assert_one_line_value_error(lambda: kernels.attention(q, q, q, 1.0), "dtype")


# ------------------------------------------------------------ import hygiene


def test_import_kernels_does_not_import_triton():
    code = "import sys, caitdeploy.kernels; assert 'triton' not in sys.modules, 'triton imported'; print('ok')"
    repo = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=repo, timeout=120, check=False
    )
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


def test_missing_triton_gives_clear_error(monkeypatch):
    monkeypatch.setattr(_runtime, "_TRITON_ERR", "ImportError: No module named 'triton' (simulated)")
    monkeypatch.setattr(_runtime, "_IMPLS", {})
    assert not kernels.triton_available()
    q = torch.zeros(1, 1, 3, 4)
    with pytest.raises(kernels.TritonUnavailableError, match="needs the 'triton' package"):
        kernels.attention(q, q, q, 1.0)
    x, w, b = _atme_args()
    with pytest.raises(ImportError, match="atme_merge_linear_ref"):
        kernels.atme_merge_linear(x, w, b, (4, 6), "h")
    # the references keep working
    assert kernels.attention_ref(q, q, q, 1.0).shape == (1, 1, 3, 4)


@needs_triton
def test_caitvit_uses_the_kernels_and_matches_math_path():
    """CaitViT(kernels="triton") runs both kernels (interpreter on CPU, compiled on CUDA) and equals the math path."""
    from caitdeploy import kernels
    from caitdeploy.families.vit.config import BlockConfig, CaitConfig
    from caitdeploy.families.vit.model import CaitViT

    blocks = (
        BlockConfig(2, 12, 20, 40, 16**-0.5, None),
        BlockConfig(2, 12, 20, 40, 16**-0.5, "h"),
        BlockConfig(2, 8, 12, 24, 16**-0.5, "v"),
    )
    cfg = CaitConfig(img_size=32, patch_size=8, in_chans=3, num_classes=5, embed_dim=32, qkv_bias=True, blocks=blocks)
    torch.manual_seed(0)
    model = CaitViT(cfg, attn_impl="math").eval()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device)
    x = torch.randn(2, 3, 32, 32, device=device)
    calls = {"merge": 0, "attn": 0}
    orig_merge, orig_attn = kernels.atme_merge_linear, kernels.attention

    def count(name, fn):
        def wrapped(*a, **k):
            calls[name] += 1
            return fn(*a, **k)

        return wrapped

    kernels.atme_merge_linear, kernels.attention = count("merge", orig_merge), count("attn", orig_attn)
    try:
        with torch.no_grad():
            ref = model(x)
            got = model.set_impl(kernels="triton")(x)
    finally:
        kernels.atme_merge_linear, kernels.attention = orig_merge, orig_attn
    assert calls == {"merge": 2, "attn": 3}
    assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4), (got - ref).abs().max()


@pytest.mark.skipif(
    not (INTERPRET and _runtime.interpreter_defect()),
    reason="only where this triton's interpreter is known not to run with this numpy",
)
def test_known_broken_interpreter_is_refused_with_the_reason():
    """triton < 3.8 with numpy >= 2.5 (the lent GPU machine's stack, on a CPU): one clear error, not 58 crashes."""
    x, w = torch.randn(1, 1 + 4 * 4, 8), torch.randn(8, 16)
    with pytest.raises(kernels.TritonUnavailableError, match=r"cannot run with numpy .*fixed in triton 3\.8"):
        kernels.atme_merge_linear(x, w, None, (4, 4), "h")


def test_version_parsing():
    assert _runtime._version("3.6.0") == (3, 6, 0) < (3, 8)
    assert _runtime._version("2.5.2") >= (2, 5) and _runtime._version("2.11.0+cu130") == (2, 11, 0)
    assert _runtime._version("3.8.0rc1") == (3, 8, 0) and _runtime._version("1.26.4") < (2, 5)
