#!/usr/bin/env python
"""INT8 and BF16 on CPU: CAIT-DeiT-Small (and its dense architecture and FLOPs-matched ToMe) in fp32, bf16,
static INT8 (QDQ) and dynamic INT8, side by side, with the issue-14 targets checked.

ONNX Runtime runs fp32, int8 (static QDQ: per-channel int8 weights, uint8 activations calibrated on synthetic
images; speed does not depend on the calibration data) and int8-dynamic; PyTorch eager runs fp32 and bf16
(torch.autocast). ONNX Runtime bf16 and torch int8 rows are n/a with the reason. The CAIT model is
paper_settings.py's (deit_small at the paper's 55% FLOPs reduction, merges 4:h,8:v, align 8; random weights:
speed and numeric agreement only; accuracy on real data is examples/train_digits.py's int8 step).

    .venv/bin/python benchmarks/int8_cpu.py [--batch 16] [--threads 2]

Writes benchmarks/results/int8_<machine>_b<batch>_small.{json,md,png}; the JSON's "targets" holds every target,
the measured value and whether it is met.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# issue 14: ONNX Runtime's tools used naively on CAIT-DeiT-Small (batch 16, 2 threads): static QDQ s8s8 1.50x
# fp32 (logit cosine 0.995), dynamic 1.71x (0.998); targets below
TARGETS = {"static_vs_fp32": 1.7, "dynamic_vs_fp32": 1.9, "cosine": 0.99}


def _row(records, model, backend, dtype):
    hit = [
        r
        for r in records
        if r["model"] == model and r["backend"] == backend and r["dtype"] == dtype and r["status"] == "ok"
    ]
    return hit[0] if hit else None


def targets(records, agreement) -> list[dict]:
    """Each target, the measured value and whether it is met (None where a row did not run)."""

    def ratio(a, b):
        return b["latency_ms_p50"] / a["latency_ms_p50"] if a and b else None

    fp32 = _row(records, "cait", "ort", "fp32")
    dense = _row(records, "dense", "ort", "fp32")
    out = []
    for mode, dt in (("static", "int8"), ("dynamic", "int8-dynamic")):
        q = _row(records, "cait", "ort", dt)
        v = ratio(q, fp32)
        out.append(
            {
                "target": f"CAIT {mode} int8 vs CAIT fp32 (ort)",
                "goal": TARGETS[f"{mode}_vs_fp32"],
                "measured": v,
                "met": None if v is None else v >= TARGETS[f"{mode}_vs_fp32"],
            }
        )
        c = agreement.get(mode, {}).get("cosine_min")
        out.append(
            {
                "target": f"CAIT {mode} int8 logit cosine vs fp32 (min over images)",
                "goal": TARGETS["cosine"],
                "measured": c,
                "met": None if c is None else c >= TARGETS["cosine"],
            }
        )
        v = ratio(q, dense)
        out.append(
            {
                "target": f"CAIT {mode} int8 vs dense fp32 (ort; combined, reported)",
                "goal": None,
                "measured": v,
                "met": None,
            }
        )
    bf, t32 = _row(records, "cait", "torch", "bf16"), _row(records, "cait", "torch", "fp32")
    v = ratio(bf, t32)
    out.append(
        {"target": "CAIT bf16 autocast vs CAIT fp32 (torch, reported)", "goal": None, "measured": v, "met": None}
    )
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtypes", default="fp32,bf16,int8,int8-dynamic")
    ap.add_argument("--backends", default="ort,torch")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--min-iters", type=int, default=8)
    ap.add_argument("--min-seconds", type=float, default=3.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--check-images", type=int, default=32, help="synthetic images for int8-vs-fp32 agreement")
    ap.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument(
        "--work-dir", default=None, help="fused model and ONNX files (default: <tmp>/caitdeploy-paper-settings)"
    )
    args = ap.parse_args(argv)

    from caitdeploy.bench import run_bench
    from caitdeploy.bench.report import print_table
    from caitdeploy.bench.runners import Timing
    from caitdeploy.cli.common import console
    from caitdeploy.export.quantize import compare_int8, quantize_onnx_bytes, synthetic_images
    from paper_settings import PAPER, build_setting, machine_name, write_results

    con = console()
    log = lambda s: con.print(s, markup=False)  # noqa: E731
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.gettempdir()) / "caitdeploy-paper-settings"
    work.mkdir(parents=True, exist_ok=True)
    path = build_setting("small", PAPER["small"], work, log)
    onnx_dir = work / "onnx-int8"
    timing = Timing(warmup=args.warmup, min_iters=args.min_iters, min_seconds=args.min_seconds, repeats=args.repeats)
    t0 = time.perf_counter()
    records = run_bench(
        [path],
        batches=[args.batch],
        backends=args.backends.split(","),
        dtype=args.dtypes,
        timing=timing,
        threads=args.threads,
        work_dir=onnx_dir,
        log=log,
    )
    elapsed = time.perf_counter() - t0

    # numeric agreement of the CAIT int8 models with fp32 on held-out synthetic images (another seed than the
    # calibration's), the same check `export --int8` makes
    fp32_file = next(onnx_dir.glob("*-cait-fp32.onnx"))
    fp32 = fp32_file.read_bytes()
    held = synthetic_images(args.check_images, (3, 224, 224), seed=1)[0]
    agreement = {}
    for mode in ("static", "dynamic"):
        calib = synthetic_images(64, (3, 224, 224), seed=0)[0] if mode == "static" else None
        q, info = quantize_onnx_bytes(fp32, mode, calib)
        agreement[mode] = dict(
            compare_int8(fp32, q, held, threads=args.threads),
            float_ops=info["float_ops"],
            quantized_nodes=info["quantized_nodes"],
        )
    tg = targets(records, agreement)

    machine = machine_name()
    tag = f"int8_{machine}_b{args.batch}_small"
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/int8_cpu.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    title = f"INT8 and BF16 on {machine}: CAIT-DeiT-Small, batch {args.batch}, {args.threads} threads"
    lines = []
    for t in tg:
        m = "n/a" if t["measured"] is None else f"{t['measured']:.3f}" + ("x" if "cosine" not in t["target"] else "")
        goal = "" if t["goal"] is None else f" (target >= {t['goal']}: {'met' if t['met'] else 'NOT met'})"
        lines.append(f"{t['target']}: {m}{goal}")
    write_results(
        out_dir / tag,
        records,
        title,
        command,
        {
            "model": "small",
            "reduction_at_224": PAPER["small"],
            "merges": "4:h,8:v",
            "batch": args.batch,
            "threads": args.threads,
            "weights": "random (speed and numeric agreement only)",
            "seconds": round(elapsed, 1),
            "agreement": agreement,
            "targets": tg,
        },
        "issue-14 targets: " + "; ".join(lines),
    )
    print_table(records, con, title=title)
    for ln in lines:
        log(ln)
    log(f"wrote {out_dir / tag}.json/.md/.png in {elapsed:.0f} s of benchmarking")
    return 0


if __name__ == "__main__":
    sys.exit(main())
