#!/usr/bin/env python
"""Rebuild the paper's CAIT settings and benchmark them against dense DeiT and FLOPs-matched ToMe.

Settings: CAIT-DeiT-Tiny/Small/Base at the paper's FLOPs reductions 50.5%, 55% and 58% respectively (vs the dense model, merges
included), built with `make_checkpoint` (one-shot CDCP selection on random weights: speed only, no accuracy)
and fused with `fuse_file(..., FuseOptions(align=8))`. Merges are `4:h,8:v` for every setting: our choice;
the paper's exact merge blocks per setting are not reproduced here.

Writes under --out-dir (default benchmarks/results/), the machine named in every file name and file:
  paper_<machine>_<dtype>_b<batches>.json   {"machine", "command", "date", "settings", "records": [...]}
  paper_<machine>_<dtype>_b<batches>.md     table + environment
  paper_<machine>_<dtype>_b<batches>.png    throughput bars (+ latency vs batch with several batches)

Examples
  CPU (ONNX Runtime fp32):  python benchmarks/paper_settings.py --backends ort --dtype fp32 --batch 16
  GPU (fp16, eager + compile): python benchmarks/paper_settings.py --backends torch,compile --dtype fp16 --batch 256
  smoke:                     python benchmarks/paper_settings.py --quick --models tiny --batch 2 --backends ort
"""

from __future__ import annotations

import argparse
import datetime as _dt
import re
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

ARCHS = {"tiny": "deit_tiny_patch16_224", "small": "deit_small_patch16_224", "base": "deit_base_patch16_224"}
PAPER = {"tiny": 0.505, "small": 0.55, "base": 0.58}  # the paper's FLOPs reduction per model
MERGES = {4: "h", 8: "v"}  # our choice for every setting (see the module docstring)


def machine_name() -> str:
    """A file-name-safe machine label without the hostname, e.g. 'nvidia-h100-80gb-hbm3' or 'cpu-amd-epyc-2c'."""
    import os

    import torch

    from caitdeploy.bench.runners import _cpu_name

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
    else:
        name = f"cpu-{_cpu_name()}-{os.cpu_count()}c"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def write_results(stem: Path, records: list, title: str, command: str, settings: dict, note: str) -> None:
    """<stem>.json ({"machine", "command", "date", "settings", "records"}), <stem>.md (table, environment, the
    machine, the command, `note`) and <stem>.png (when a record is ok)."""
    from caitdeploy.bench.report import write_markdown, write_plot
    from caitdeploy.cli.common import write_json

    machine = machine_name()
    write_json(
        stem.with_name(stem.name + ".json"),
        {
            "machine": machine,
            "command": command,
            "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "settings": settings,
            "records": records,
        },
    )
    write_markdown(records, stem.with_name(stem.name + ".md"), title=title)
    with open(stem.with_name(stem.name + ".md"), "a") as f:
        f.write(f"- machine: {machine}\n- command: `{command}`\n- {note}\n")
    if any(r["status"] == "ok" for r in records):
        write_plot(records, stem.with_name(stem.name + ".png"), title=title)


def build_setting(size: str, reduction: float, work: Path, log) -> Path:
    """Checkpoint + fused model of one setting; reused when the fused file already exists."""
    from caitdeploy.compress.cdcp import make_checkpoint, save_checkpoint_dict
    from caitdeploy.compress.fuse import FuseOptions, fuse_file

    stem = f"cait-deit-{size}-r{100 * reduction:g}"
    fused = work / f"{stem}.fused.safetensors"
    if fused.exists():
        log(f"reusing {fused}")
        return fused
    t0 = time.perf_counter()
    # align=8 in selection too, so fusing with align=8 keeps the selected widths (and the FLOPs reduction)
    ckpt, _summary = make_checkpoint(ARCHS[size], reduction, MERGES, align=8)
    ck_path = work / f"{stem}.pth"
    save_checkpoint_dict(ckpt, ck_path)
    report = fuse_file(ck_path, fused, FuseOptions(align=8), verify_batch=0)
    ck_path.unlink()
    log(
        f"built {fused.name}: FLOPs reduction {100 * report['flops_reduction']:.2f}% "
        f"(target {100 * reduction:g}%) in {time.perf_counter() - t0:.1f} s"
    )
    return fused


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="tiny,small,base", help="comma list of tiny, small, base")
    ap.add_argument(
        "--reductions",
        default="paper",
        help="'paper' (default: tiny 50.5%%, small 55%%, base 58%%, as in the paper), or a comma list "
        "of FLOPs reductions applied to every model",
    )
    ap.add_argument("--batch", action="append", default=None, help="batch size; repeat for several (default 256)")
    ap.add_argument("--backends", default=None, help="default: torch,compile on GPU, ort on CPU")
    ap.add_argument("--dtype", default=None, choices=("fp32", "fp16"), help="default: fp16 on GPU, fp32 on CPU")
    ap.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument(
        "--work-dir",
        default=None,
        help="fused models and ONNX files, reused by later runs (default: <tmp>/caitdeploy-paper-settings)",
    )
    ap.add_argument(
        "--compile-mode",
        default=None,
        help="torch.compile mode (default: max-autotune-no-cudagraphs on GPU, default on CPU)",
    )
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--min-iters", type=int, default=None)
    ap.add_argument("--min-seconds", type=float, default=None)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: one reduction (55%%), batch 2 unless given, 1 warm-up, 3 timed calls per repeat",
    )
    return ap


def main(argv=None) -> int:
    ap = parser()
    args = ap.parse_args(argv)

    import torch

    from caitdeploy.bench import run_bench
    from caitdeploy.bench.report import print_table
    from caitdeploy.bench.run import parse_batches
    from caitdeploy.bench.runners import Timing
    from caitdeploy.cli.common import console
    from caitdeploy.core.errors import CaitError

    con = console()
    log = lambda s: con.print(s, markup=False)  # noqa: E731
    gpu = torch.cuda.is_available()
    sizes = [s.strip() for s in args.models.split(",") if s.strip()]
    bad = [s for s in sizes if s not in ARCHS]
    if bad:
        ap.error(f"--models: unknown {bad[0]!r}; choose from tiny, small, base")
    if args.quick:
        pairs = [(s, 0.55) for s in sizes]
    elif args.reductions == "paper":
        pairs = [(s, PAPER[s]) for s in sizes]
    else:
        pairs = [(s, float(r)) for s in sizes for r in args.reductions.split(",")]
    reductions = sorted({r for _, r in pairs})
    try:
        batches = parse_batches(args.batch or (["2"] if args.quick else ["256"]))
    except CaitError as e:
        ap.error(str(e))
    backends = args.backends or ("torch,compile" if gpu else "ort")
    dtype = args.dtype or ("fp16" if gpu else "fp32")
    if args.quick:
        timing = Timing(
            warmup=args.warmup if args.warmup is not None else 1,
            min_iters=args.min_iters or 3,
            min_seconds=args.min_seconds if args.min_seconds is not None else 0.0,
            repeats=args.repeats,
        )
    else:
        timing = Timing(
            warmup=args.warmup if args.warmup is not None else 10,
            min_iters=args.min_iters or 20,
            min_seconds=args.min_seconds if args.min_seconds is not None else 2.0,
            repeats=args.repeats,
        )
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    import tempfile

    work = Path(args.work_dir) if args.work_dir else Path(tempfile.gettempdir()) / "caitdeploy-paper-settings"
    work.mkdir(parents=True, exist_ok=True)

    machine = machine_name()
    paths = [build_setting(s, r, work, log) for s, r in pairs]
    t0 = time.perf_counter()
    records = run_bench(
        paths,
        batches=batches,
        backends=backends.split(","),
        dtype=dtype,
        timing=timing,
        threads=args.threads,
        work_dir=work / "onnx",
        compile_mode=args.compile_mode,
        log=log,
    )
    elapsed = time.perf_counter() - t0
    tag = f"paper_{machine}_{records[0]['dtype'] if records else dtype}_b{'-'.join(map(str, batches))}"
    if sizes != list(ARCHS):
        tag += "_" + "-".join(sizes)
    if args.compile_mode:  # two runs that differ only in the compile mode must not overwrite each other
        tag += "_" + re.sub(r"[^A-Za-z0-9]+", "-", args.compile_mode)
    if args.quick:
        tag += "_quick"
    command = "python benchmarks/paper_settings.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    title = f"CAIT paper settings on {machine} ({dtype}, batch {', '.join(map(str, batches))})"
    write_results(
        out_dir / tag,
        records,
        title,
        command,
        {
            "models": sizes,
            "reductions": reductions,
            "merges": "4:h,8:v (our choice)",
            "fuse_align": 8,
            "weights": "random (speed only)",
            "seconds": round(elapsed, 1),
        },
        "merges 4:h,8:v for every setting (our choice; the paper's exact merge blocks are not "
        "reproduced); random weights (speed only)",
    )
    print_table(records, con, title=title)
    log(f"wrote {out_dir / tag}.json/.md/.png in {elapsed:.0f} s of benchmarking")
    return 0


if __name__ == "__main__":
    sys.exit(main())
