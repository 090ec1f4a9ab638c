"""Time and peak memory of `caitdeploy fuse` on a DeiT-Base-size CAIT checkpoint (2-core CPU target: < 10 s, < 3x size).

    .venv/bin/python benchmarks/bench_fuse.py [--arch deit_base_patch16_224] [--flops-reduction 0.58] [--runs 3]

Makes the checkpoint with `caitdeploy make-checkpoint`, then runs `caitdeploy fuse` in a fresh process per run
and reads that process's peak RSS (ru_maxrss of the child). Also runs `python -c "import caitdeploy.cli.main, torch"`
for the baseline RSS of the interpreter + torch, so the checkpoint-attributable memory is reported too.
Writes benchmarks/results/fuse_<arch>_<machine>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "caitdeploy.cli.main"]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def run_child(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in MiB) of a child process."""
    t0 = time.perf_counter()
    pid = subprocess.Popen(cmd, stdout=subprocess.DEVNULL).pid
    _, status, usage = os.wait4(pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return wall, usage.ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="deit_base_patch16_224")
    ap.add_argument("--flops-reduction", type=float, default=0.58)
    ap.add_argument("--merges", default="4:h,8:v")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--verify-batch", type=int, default=2)
    ap.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    machine = f"{cpu_name()}, {os.cpu_count()} cores"
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "ckpt.pth"
        subprocess.run(
            [
                *CLI,
                "make-checkpoint",
                "--arch",
                args.arch,
                "--flops-reduction",
                str(args.flops_reduction),
                "--merges",
                args.merges,
                "-o",
                str(ckpt),
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        size_mb = ckpt.stat().st_size / 2**20
        _, base_rss = run_child([sys.executable, "-c", "import torch, caitdeploy.cli.main, caitdeploy.compress.fuse"])
        runs = []
        for _ in range(args.runs):
            rep = Path(tmp) / "r.json"
            wall, rss = run_child(
                [
                    *CLI,
                    "fuse",
                    str(ckpt),
                    "-o",
                    str(Path(tmp) / "f.safetensors"),
                    "-q",
                    "--verify-batch",
                    str(args.verify_batch),
                    "--report",
                    str(rep),
                ]
            )
            r = json.loads(rep.read_text())
            runs.append(
                {
                    "wall_s": wall,
                    "peak_rss_mb": rss,
                    "fuse_s": r["seconds"]["fuse"],
                    "verify_s": r["seconds"]["verify"],
                    "max_abs_diff": r["verify"]["max_abs_diff"],
                }
            )
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    result = {
        "arch": args.arch,
        "flops_reduction": args.flops_reduction,
        "merges": args.merges,
        "machine": machine,
        "python": platform.python_version(),
        "checkpoint_mb": size_mb,
        "baseline_rss_mb": base_rss,
        "runs": runs,
        "median": med,
        "rss_over_checkpoint": med["peak_rss_mb"] / size_mb,
        "rss_minus_baseline_over_checkpoint": (med["peak_rss_mb"] - base_rss) / size_mb,
        "targets": {"wall_s_lt": 10, "rss_over_checkpoint_lt": 3},
    }
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tag = f"fuse_{args.arch}_{os.cpu_count()}core"
    (out / f"{tag}.json").write_text(json.dumps(result, indent=2) + "\n")
    md = [
        f"# `caitdeploy fuse` on {args.arch} (CAIT {args.flops_reduction:.0%} FLOPs reduction, merges {args.merges})",
        "",
        (
            f"Machine: {machine}. Median of {args.runs} runs, each a fresh process (whole CLI: load, validate, fold, "
            f"slice, float64 verification on {args.verify_batch} images, FLOPs check against torch's counter, write)."
        ),
        "",
        "| checkpoint | wall (s) | fuse (s) | verify (s) | peak RSS | RSS / checkpoint | (RSS - torch baseline) / checkpoint | max abs logit diff |",
        "|---|---|---|---|---|---|---|---|",
        (
            f"| {size_mb:.0f} MiB | {med['wall_s']:.2f} | {med['fuse_s']:.2f} | {med['verify_s']:.2f} | "
            f"{med['peak_rss_mb']:.0f} MiB | {result['rss_over_checkpoint']:.2f}x | "
            f"{result['rss_minus_baseline_over_checkpoint']:.2f}x | {med['max_abs_diff']:.2g} |"
        ),
        "",
        f"Baseline RSS of `import torch, caitdeploy` alone: {base_rss:.0f} MiB. Targets: < 10 s, < 3x checkpoint size.",
    ]
    (out / f"{tag}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
