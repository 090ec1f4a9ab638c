"""Ahead-of-time compilation of the Triton kernels for NVIDIA targets, on a machine without a GPU.

    python -m caitdeploy.kernels.aot [--quick] [--targets 80,86,89,90] [--json out.json]

For every kernel, target (sm_80, sm_86, sm_89, sm_90), dtype (fp16, bf16, fp32) and shape class a fused CAIT model
uses, `triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))` produces cubin; each result records the
shared memory the kernel needs against the target's per-block limit, and whether sm_90 code uses wgmma.
`--quick` compiles, per target and dtype, each kernel's most demanding autotune config (most shared memory)
and its least demanding one; the full run compiles every autotune config. Must run with TRITON_INTERPRET unset
(the interpreter replaces @triton.jit functions and compiles nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

# max dynamic shared memory per thread block (bytes), CUDA programming guide, compute capabilities table
SMEM_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
TARGETS = tuple(SMEM_LIMIT)
DTYPES = ("fp16", "bf16", "fp32")
# (BLOCK_DQK, BLOCK_DV) of fused CAIT-DeiT models (head widths <= 64 after --align 8: tiles of 32 or 64)
ATTENTION_CLASSES = ((32, 32), (32, 64), (64, 32), (64, 64))


@dataclass
class Result:
    kernel: str
    target: str
    dtype: str
    shape_class: str
    config: str
    ok: bool
    shared_bytes: int | None
    smem_limit: int
    fits: bool | None
    wgmma: bool | None
    cubin_bytes: int | None
    seconds: float
    error: str | None = None


def _dot_mode(dtype: str) -> int:
    from caitdeploy.kernels._triton_common import DOT_NATIVE, DOT_TF32

    return DOT_TF32 if dtype == "fp32" else DOT_NATIVE


def _cfg(c) -> tuple[dict[str, Any], int, int]:
    return dict(c.kwargs), c.num_warps, c.num_stages


def _smem_weight(c) -> int:
    kw, _, stages = _cfg(c)
    return stages * (kw.get("BLOCK_M", 1) + kw.get("BLOCK_N", 1)) * max(kw.get("BLOCK_K", 1), 1)


def _jobs(quick: bool) -> Iterator[tuple[str, Any, dict[str, str], dict[str, Any], str, Any]]:
    """(kernel, fn, signature, constexprs, shape class, config) to compile."""
    from caitdeploy.kernels import _atme_merge_triton as M
    from caitdeploy.kernels import _attention_triton as A

    for kernel, mod, fn in (("attention", A, A._attention_fwd_kernel), ("atme_merge", M, M._atme_merge_kernel)):
        configs = list(mod._kernel.configs)
        if quick:
            configs = sorted(configs, key=_smem_weight)
            configs = [configs[-1], configs[0]]
        for dtype in DTYPES:
            ptr = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}[dtype]
            sig = {}
            for p in fn.params:
                if p.is_constexpr:
                    sig[p.name] = "constexpr"
                elif p.name.endswith("_ptr"):
                    sig[p.name] = ptr
                elif p.name == "qk_scale":
                    sig[p.name] = "fp32"
                else:
                    sig[p.name] = "i32"
            classes: tuple[tuple[Any, ...], ...] = ATTENTION_CLASSES if kernel == "attention" else ((True,), (False,))
            if quick and kernel == "attention":
                classes = ((64, 64),)
            if quick and kernel == "atme_merge":
                classes = ((True,),)
            for cls in classes:
                if kernel == "attention":
                    const = {"DOT_MODE": _dot_mode(dtype), "BLOCK_DQK": cls[0], "BLOCK_DV": cls[1]}
                    name = f"dqk{cls[0]}-dv{cls[1]}"
                else:
                    const = {"DOT_MODE": _dot_mode(dtype), "HAS_BIAS": cls[0]}
                    name = "bias" if cls[0] else "no-bias"
                for c in configs:
                    yield kernel, fn, sig, const, name, c


def compile_all(targets=TARGETS, quick: bool = False, log=None, smoke: bool = False) -> list[Result]:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter compiles nothing")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from caitdeploy.kernels._triton_common import INTERPRETED

    if INTERPRETED:
        raise RuntimeError("the kernels were imported under the Triton interpreter")
    out: list[Result] = []
    jobs = list(_jobs(quick))
    if smoke:
        jobs = [j for j in jobs if j[0] == "atme_merge" and j[2]["x_ptr"] == "*fp16"][-1:]
    for kernel, fn, sig, const, shape, c in jobs:
        kw, warps, stages = _cfg(c)
        consts = {**const, **kw}
        cfg_name = ",".join(f"{k}={v}" for k, v in kw.items()) + f",warps={warps},stages={stages}"
        dtype = {"*fp16": "fp16", "*bf16": "bf16", "*fp32": "fp32"}[
            next(v for k, v in sig.items() if k.endswith("_ptr"))
        ]
        for cc in targets:
            t0 = time.perf_counter()
            try:
                src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
                k = triton.compile(
                    src, target=GPUTarget("cuda", cc, 32), options={"num_warps": warps, "num_stages": stages}
                )
                shared = int(k.metadata.shared)
                r = Result(
                    kernel,
                    f"sm_{cc}",
                    dtype,
                    shape,
                    cfg_name,
                    True,
                    shared,
                    SMEM_LIMIT[cc],
                    shared <= SMEM_LIMIT[cc],
                    "wgmma" in k.asm["ptx"],
                    len(k.asm["cubin"]),
                    time.perf_counter() - t0,
                )
            except Exception as e:  # noqa: BLE001 - recorded: a failed compile is a result
                first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
                r = Result(
                    kernel,
                    f"sm_{cc}",
                    dtype,
                    shape,
                    cfg_name,
                    False,
                    None,
                    SMEM_LIMIT[cc],
                    None,
                    None,
                    None,
                    time.perf_counter() - t0,
                    f"{type(e).__name__}: {first}",
                )
            out.append(r)
            if log:
                log(r)
    return out


def check(results: list[Result]) -> list[str]:
    """What must hold on every target: everything compiles; for every (kernel, target, dtype, shape class) at
    least one autotune config fits the target's shared memory (the autotuner skips the others as
    OutOfResources); fp16/bf16 code for sm_90 uses wgmma."""
    problems = [f"{r.kernel} {r.target} {r.dtype} {r.shape_class} [{r.config}]: {r.error}" for r in results if not r.ok]
    groups: dict[tuple, list[Result]] = {}
    for r in results:
        groups.setdefault((r.kernel, r.target, r.dtype, r.shape_class), []).append(r)
    for (kernel, target, dtype, shape), rs in groups.items():
        if not any(r.ok and r.fits for r in rs):
            need = min((r.shared_bytes or 0) for r in rs)
            problems.append(
                f"{kernel} {target} {dtype} {shape}: no autotune config fits "
                f"({need} > {rs[0].smem_limit} bytes of shared memory)"
            )
        if target == "sm_90" and dtype in ("fp16", "bf16") and not any(r.wgmma for r in rs if r.ok):
            problems.append(f"{kernel} sm_90 {dtype} {shape}: no wgmma in the PTX")
    return problems


def summary(results: list[Result]) -> dict[str, Any]:
    import triton

    return {
        "triton": triton.__version__,
        "compiled": sum(r.ok for r in results),
        "failed": sum(not r.ok for r in results),
        "over_smem_limit": sum(1 for r in results if r.ok and not r.fits),
        "seconds": round(sum(r.seconds for r in results), 2),
        "problems": check(results),
    }


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="most and least demanding autotune config only")
    ap.add_argument("--smoke", action="store_true", help="one kernel, sm_90 fp16: the AOT path works (seconds)")
    ap.add_argument("--targets", default=",".join(map(str, TARGETS)), help="compute capabilities, e.g. 80,90")
    ap.add_argument("--json", default=None, help="write every result (and a summary) here; '-' for stdout")
    return ap


def main(argv=None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    targets = tuple(int(t) for t in args.targets.split(","))
    bad = [t for t in targets if t not in SMEM_LIMIT]
    if bad:
        print(f"error: --targets {bad[0]}: choose from {','.join(map(str, TARGETS))}", file=sys.stderr)
        return 2
    try:
        results = compile_all((90,) if args.smoke else targets, args.quick or args.smoke, smoke=args.smoke)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    doc: dict[str, Any] = {"summary": summary(results), "results": [asdict(r) for r in results]}
    if args.json == "-":
        print(json.dumps(doc))
    else:
        if args.json:
            with open(args.json, "w") as f:
                json.dump(doc, f, indent=1)
        print(json.dumps(doc["summary"]))
    for p in doc["summary"]["problems"]:
        print(f"problem: {p}", file=sys.stderr)
    return 0 if not doc["summary"]["problems"] else 1


if __name__ == "__main__":
    sys.exit(main())
