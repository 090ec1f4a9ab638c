#!/usr/bin/env python
"""Time the kernels/ Triton kernels against their PyTorch alternatives.

Shapes are CAIT-compressed DeiT-Small at batch 256 (fp16 by default):
D = 384, 6 heads, grid 14x14 (197 tokens) -> h-merge -> 14x7 (99 tokens)
-> v-merge -> 7x7 (50 tokens).

* HTM (horizontal merge, 14x14 -> 14x7): Triton kernel vs reshape + F.linear
  (+ class-token cat, i.e. kernels.atme_merge_linear_ref) and vs F.linear alone
  on an already paired, contiguous input (the bare GEMM).
* VTM (vertical merge, 14x7 -> 7x7): Triton kernel vs transpose + contiguous +
  F.linear (+ cat) and vs the bare F.linear.
* attention at N = 197 / 99 / 50 with unequal head widths (Dqk, Dv): Triton
  kernel vs SDPA on inputs zero-padded to round8(max(Dqk, Dv)) (the padding is
  timed; SDPA on pre-padded inputs is listed too) and vs math attention
  (matmul, softmax, matmul in the input dtype).

Timing: CUDA events around `--inner` back-to-back calls, after `--warmup`
calls (which also run Triton's autotuning), median over `--repeats`.  For each
row: time, the kernel's speed-up over that method (t_method / t_kernel),
effective bandwidth (the op's minimal bytes: read inputs + weights once, write
the output once, divided by the time) as a fraction of the GPU's peak, and
FLOP rate as a fraction of its dense fp16/bf16 tensor peak.

Usage:
    python benchmarks/bench_kernels.py [--check] [--json [PATH]] [--markdown [PATH]]
Without a CUDA GPU it prints "needs a CUDA GPU" and exits with code 2.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"

# Spec-sheet peaks: (HBM bandwidth in TB/s, dense fp16/bf16 tensor TFLOP/s).
# Matched against torch.cuda.get_device_name() in order; first match wins.
PEAKS = [
    (r"H200", "H200 SXM", 4.8, 989.4),
    (r"H100.*(NVL)", "H100 NVL", 3.9, 835.0),
    (r"H100.*PCIe", "H100 PCIe", 2.0, 756.0),
    (r"H100", "H100 SXM", 3.35, 989.4),
    (r"A100.*80GB", "A100 80GB", 2.039, 312.0),
    (r"A100", "A100 40GB", 1.555, 312.0),
]

DEVICE = "cuda"  # the benchmark only makes sense on a GPU; a hook for dry runs of the script logic
D_MODEL = 384
HEADS = 6
DEFAULT_PAIRS = "40:56,32:48,56:24,64:64"


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--batch", type=int, default=256, help="batch size (default 256)")
    p.add_argument("--dtype", choices=["fp16", "bf16"], default="fp16", help="dtype (default fp16)")
    p.add_argument(
        "--pairs", default=DEFAULT_PAIRS, help=f"attention head widths as Dqk:Dv,... (default {DEFAULT_PAIRS})"
    )
    p.add_argument("--tokens", default="197,99,50", help="attention token counts (default 197,99,50)")
    p.add_argument("--warmup", type=int, default=10, help="untimed calls before timing (default 10)")
    p.add_argument("--repeats", type=int, default=30, help="timed repeats, median reported (default 30)")
    p.add_argument("--inner", type=int, default=10, help="calls per timed repeat (default 10)")
    p.add_argument("--peak-bw", type=float, default=None, help="peak memory bandwidth in TB/s (default: by GPU name)")
    p.add_argument(
        "--peak-tflops", type=float, default=None, help="peak dense fp16/bf16 tensor TFLOP/s (default: by GPU name)"
    )
    p.add_argument("--check", action="store_true", help="compare every method against the references first")
    p.add_argument(
        "--json",
        nargs="?",
        const="",
        default=None,
        metavar="PATH",
        help="write results as JSON (default path benchmarks/results/bench_kernels_<gpu>.json)",
    )
    p.add_argument(
        "--markdown",
        nargs="?",
        const="",
        default=None,
        metavar="PATH",
        help="write results as a Markdown table (default path benchmarks/results/bench_kernels_<gpu>.md)",
    )
    return p.parse_args(argv)


def gpu_slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower() or "gpu"


def lookup_peaks(name: str, bw_arg, tflops_arg):
    label, bw, tf = None, None, None
    for pattern, lab, pbw, ptf in PEAKS:
        if re.search(pattern, name, flags=re.IGNORECASE):
            label, bw, tf = lab, pbw, ptf
            break
    sources = []
    if bw_arg is not None:
        bw = bw_arg
        sources.append("bandwidth from --peak-bw")
    if tflops_arg is not None:
        tf = tflops_arg
        sources.append("FLOP rate from --peak-tflops")
    if label and (bw_arg is None or tflops_arg is None):
        sources.append(f"spec sheet for {label}")
    if bw is None or tf is None:
        sources.append("GPU not in the peak table")
    return {"bw_tbs": bw, "tflops": tf, "source": "; ".join(sources)}


# ------------------------------------------------------------------ timing


def cuda_time_ms(fn, warmup: int, repeats: int, inner: int) -> float:
    for _ in range(max(1, warmup)):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / inner)
    return statistics.median(times)


# ------------------------------------------------------------------- cases


def round8(n: int) -> int:
    return (n + 7) // 8 * 8


def merge_cases(batch, dtype, dev):
    """(name, shape text, kernel fn, {alt name: fn}, bytes, flops, check data)."""
    from caitdeploy import kernels

    gen = torch.Generator(device=dev).manual_seed(0)
    D = D_MODEL
    out = []
    for label, grid, kind in (("HTM h-merge", (14, 14), "h"), ("VTM v-merge", (14, 7), "v")):
        gh, gw = grid
        ho, wo = kernels.merged_grid(grid, kind)
        x = torch.randn(batch, 1 + gh * gw, D, device=dev, dtype=dtype, generator=gen)
        w = torch.randn(D, 2 * D, device=dev, dtype=dtype, generator=gen) * (2 * D) ** -0.5
        b = torch.randn(D, device=dev, dtype=dtype, generator=gen) * 0.1
        t = ho * wo
        pairs = torch.randn(batch, t, 2 * D, device=dev, dtype=dtype, generator=gen)
        esize = x.element_size()
        nbytes = esize * (x.numel() + w.numel() + b.numel() + batch * (1 + t) * D)
        flops = 2 * batch * t * (2 * D) * D
        kern = lambda x=x, w=w, b=b, grid=grid, kind=kind: kernels.atme_merge_linear(x, w, b, grid, kind)  # noqa: E731
        if kind == "h":
            alt_name = "reshape+F.linear(+cat)"
        else:
            alt_name = "transpose+contiguous+F.linear(+cat)"
        alts = {
            alt_name: lambda x=x, w=w, b=b, grid=grid, kind=kind: kernels.atme_merge_linear_ref(x, w, b, grid, kind),
            "F.linear only (pre-paired input)": lambda pairs=pairs, w=w, b=b: F.linear(pairs, w, b),
        }
        check = {"kind": "merge", "x": x, "w": w, "b": b, "grid": grid, "mkind": kind, "alt_exact": {alt_name}}
        shape = f"x[{batch},{1 + gh * gw},{D}] {gh}x{gw}->{ho}x{wo}"
        out.append((label, shape, kern, alts, nbytes, flops, check))
    return out


def attention_cases(batch, dtype, dev, pairs, tokens):
    from caitdeploy import kernels

    gen = torch.Generator(device=dev).manual_seed(1)
    out = []
    for n in tokens:
        for dqk, dv in pairs:
            q = torch.randn(batch, HEADS, n, dqk, device=dev, dtype=dtype, generator=gen)
            k = torch.randn(batch, HEADS, n, dqk, device=dev, dtype=dtype, generator=gen)
            v = torch.randn(batch, HEADS, n, dv, device=dev, dtype=dtype, generator=gen)
            scale = dqk**-0.5
            P = round8(max(dqk, dv))
            qp, kp, vp = (F.pad(t, (0, P - t.shape[-1])) for t in (q, k, v))

            def sdpa_padded(q=q, k=k, v=v, P=P, dv=dv, scale=scale):
                qp_, kp_, vp_ = (F.pad(t, (0, P - t.shape[-1])) for t in (q, k, v))
                return F.scaled_dot_product_attention(qp_, kp_, vp_, scale=scale)[..., :dv]

            def sdpa_prepadded(qp=qp, kp=kp, vp=vp, dv=dv, scale=scale):
                return F.scaled_dot_product_attention(qp, kp, vp, scale=scale)[..., :dv]

            def math_attn(q=q, k=k, v=v, scale=scale):
                return torch.softmax(torch.matmul(q, k.transpose(-2, -1)) * scale, dim=-1) @ v

            esize = q.element_size()
            nbytes = esize * (q.numel() + k.numel() + v.numel() + batch * HEADS * n * dv)
            flops = 2 * batch * HEADS * n * n * (dqk + dv)
            kern = lambda q=q, k=k, v=v, scale=scale: kernels.attention(q, k, v, scale)  # noqa: E731
            alts = {
                f"SDPA zero-padded to {P} (pad timed)": sdpa_padded,
                f"SDPA pre-padded to {P}": sdpa_prepadded,
                "math attention": math_attn,
            }
            check = {"kind": "attn", "q": q, "k": k, "v": v, "scale": scale}
            shape = f"[{batch},{HEADS},{n}] Dqk={dqk} Dv={dv}"
            out.append(("attention", shape, kern, alts, nbytes, flops, check))
    return out


# ------------------------------------------------------------------- check


def run_checks(cases, dtype):
    from caitdeploy import kernels

    tol = {torch.float16: 1e-2, torch.bfloat16: 6e-2}[dtype]
    rows, ok_all = [], True
    for label, shape, _kern, alts, _, _, chk in cases:
        # small batch slice keeps the fp32 references cheap
        if chk["kind"] == "merge":
            x, w, b = chk["x"][:8], chk["w"], chk["b"]
            ref = kernels.atme_merge_linear_ref(x.float(), w.float(), b.float(), chk["grid"], chk["mkind"])
            got = {"triton kernel": kernels.atme_merge_linear(x, w, b, chk["grid"], chk["mkind"])}
            for name in chk["alt_exact"]:
                got[name] = alts[name]()[:8]
        else:
            q, k, v = (chk[n][:8] for n in ("q", "k", "v"))
            ref = kernels.attention_ref(q.float(), k.float(), v.float(), chk["scale"])
            got = {"triton kernel": kernels.attention(q, k, v, chk["scale"])}
            for name, fn in alts.items():
                got[name] = fn()[:8]
        for name, val in got.items():
            err = (val.float() - ref).abs().max().item()
            scale = ref.abs().max().item() or 1.0
            ok = bool(err <= tol * max(1.0, scale)) and val.shape == ref.shape
            ok_all &= ok
            rows.append({"op": label, "shape": shape, "method": name, "max_abs_err": err, "ok": ok})
    return rows, ok_all


# ------------------------------------------------------------------- output


def fmt_frac(x):
    return "n/a" if x is None else f"{100 * x:.1f}%"


def print_table(title, columns, rows):
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title)
        for c in columns:
            table.add_column(c, justify="left" if c in ("op", "shape", "method", "ok") else "right")
        for r in rows:
            table.add_row(*[str(v) for v in r])
        Console(width=max(160, Console().width)).print(table)
    except ImportError:
        widths = [max(len(c), *(len(str(r[i])) for r in rows)) if rows else len(c) for i, c in enumerate(columns)]
        print(title)
        print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
        print("  ".join("-" * w for w in widths))
        for r in rows:
            print("  ".join(str(v).ljust(w) for v, w in zip(r, widths)))


RESULT_COLUMNS = [
    "op",
    "shape",
    "method",
    "time (us)",
    "kernel speed-up",
    "GB/s",
    "% peak BW",
    "TFLOP/s",
    "% peak FLOP",
]


def result_rows(results):
    return [
        [
            r["op"],
            r["shape"],
            r["method"],
            f"{r['time_us']:.1f}",
            f"{r['kernel_speedup']:.2f}x",
            f"{r['gbps']:.0f}",
            fmt_frac(r["bw_frac"]),
            f"{r['tflops']:.1f}",
            fmt_frac(r["flop_frac"]),
        ]
        for r in results
    ]


def write_markdown(path, meta, results, checks):
    lines = [
        f"# kernels/ benchmark on {meta['gpu']}",
        "",
        (
            f"- GPU: **{meta['gpu']}** (peaks: {meta['peak']['bw_tbs']} TB/s, {meta['peak']['tflops']} TFLOP/s dense "
            f"fp16/bf16; source: {meta['peak']['source']})"
        ),
        (
            f"- torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}, dtype {meta['dtype']}, "
            f"batch {meta['batch']}"
        ),
        (
            f"- timing: CUDA events, {meta['warmup']} warm-up calls, median of {meta['repeats']} repeats of "
            f"{meta['inner']} calls; {meta['date']}"
        ),
        (
            "- kernel speed-up = t(method) / t(Triton kernel); bandwidth and FLOP rates use the op's minimal bytes "
            "and FLOPs, the same for every method"
        ),
        "",
        "| " + " | ".join(RESULT_COLUMNS) + " |",
        "|" + "---|" * len(RESULT_COLUMNS),
    ]
    lines += ["| " + " | ".join(r) + " |" for r in result_rows(results)]
    if checks:
        lines += [
            "",
            "## --check (max abs error vs fp32 reference, batch 8)",
            "",
            "| op | shape | method | max abs err | ok |",
            "|---|---|---|---|---|",
        ]
        lines += [f"| {c['op']} | {c['shape']} | {c['method']} | {c['max_abs_err']:.3g} | {c['ok']} |" for c in checks]
    Path(path).write_text("\n".join(lines) + "\n")


def resolve_out(arg, slug, ext):
    if arg is None:
        return None
    path = Path(arg) if arg else RESULTS_DIR / f"bench_kernels_{slug}.{ext}"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


# --------------------------------------------------------------------- main


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kernels: needs a CUDA GPU (torch.cuda.is_available() is False); nothing was timed")
        return 2
    if os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes"):
        print("bench_kernels: TRITON_INTERPRET is set; unset it to time the compiled kernels")
        return 2
    try:
        import triton
    except ImportError as exc:
        print(f"bench_kernels: needs triton ({exc})")
        return 2

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    dev = torch.device(DEVICE)
    name = torch.cuda.get_device_name(dev)
    peak = lookup_peaks(name, args.peak_bw, args.peak_tflops)
    pairs = [tuple(int(v) for v in p.split(":")) for p in args.pairs.split(",") if p]
    tokens = [int(t) for t in args.tokens.split(",") if t]

    cases = merge_cases(args.batch, dtype, dev) + attention_cases(args.batch, dtype, dev, pairs, tokens)

    checks = []
    if args.check:
        checks, ok = run_checks(cases, dtype)
        print_table(
            f"--check on {name} (max abs error vs fp32 reference, batch 8)",
            ["op", "shape", "method", "max abs err", "ok"],
            [[c["op"], c["shape"], c["method"], f"{c['max_abs_err']:.3g}", str(c["ok"])] for c in checks],
        )
        if not ok:
            print("bench_kernels: --check failed; not timing")
            return 1

    results = []
    for label, shape, kern, alts, nbytes, flops, _ in cases:
        t_k = cuda_time_ms(kern, args.warmup, args.repeats, args.inner)
        timings = [("triton kernel", t_k)] + [
            (n, cuda_time_ms(fn, args.warmup, args.repeats, args.inner)) for n, fn in alts.items()
        ]
        for method, t_ms in timings:
            sec = t_ms * 1e-3
            gbps = nbytes / sec / 1e9
            tflops = flops / sec / 1e12
            results.append(
                {
                    "op": label,
                    "shape": shape,
                    "method": method,
                    "time_us": t_ms * 1e3,
                    "kernel_speedup": t_ms / t_k,
                    "bytes": nbytes,
                    "flops": flops,
                    "gbps": gbps,
                    "bw_frac": gbps / (peak["bw_tbs"] * 1e3) if peak["bw_tbs"] else None,
                    "tflops": tflops,
                    "flop_frac": tflops / peak["tflops"] if peak["tflops"] else None,
                }
            )

    bw_txt = f"{peak['bw_tbs']} TB/s" if peak["bw_tbs"] else "unknown (use --peak-bw)"
    tf_txt = f"{peak['tflops']} TFLOP/s" if peak["tflops"] else "unknown (use --peak-tflops)"
    print_table(
        f"kernels/ on {name}, {args.dtype}, batch {args.batch} (peak {bw_txt}, {tf_txt}; {peak['source']})",
        RESULT_COLUMNS,
        result_rows(results),
    )

    meta = {
        "gpu": name,
        "peak": peak,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "dtype": args.dtype,
        "batch": args.batch,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "inner": args.inner,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    slug = gpu_slug(name)
    jpath = resolve_out(args.json, slug, "json")
    if jpath:
        jpath.write_text(json.dumps({**meta, "results": results, "checks": checks}, indent=2) + "\n")
        print(f"wrote {jpath}")
    mpath = resolve_out(args.markdown, slug, "md")
    if mpath:
        write_markdown(mpath, meta, results, checks)
        print(f"wrote {mpath}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
