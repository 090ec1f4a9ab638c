#!/usr/bin/env python
"""`make gpu-check`: everything a lent CUDA GPU machine should prove, in one command, in under 9 minutes.

    GPU_CHECK_OUT=out/gpu-check python benchmarks/gpu_check.py [--skip-benchmarks] [--dry-run]

For a machine with a CUDA GPU and no network: needs torch, triton, timm, onnx, onnxruntime, safetensors, click,
rich, matplotlib (what the lent machines carry) plus this repository; polygraphy / onnx-graphsurgeon / onnxscript
/ hypothesis come as wheels when missing (`make gpu-wheels` downloads them here, < 64 MiB). Steps, each with a
time limit, each writing its log into $GPU_CHECK_OUT (default out/gpu-check):

  1. tests    pytest on the GPU: compiled Triton kernels vs their references, CaitViT(kernels="triton") vs the
              math path, the runtime runners (tests/test_kernels.py tests/test_runtime.py)
  2. smoke    `caitdeploy bench` on a small CAIT model over every CUDA backend (torch, compile, ort, trt,
              torch-triton), batch 8: every row must be ok or say why it is n/a
  3. paper    paper settings Tiny/Small/Base at batch 256 fp16 over torch, compile, torch-triton, then compile
              with CUDA graphs (mode reduce-overhead): JSON, markdown, PNG
  4. kernels  benchmarks/bench_kernels.py --check: the kernels vs transpose+Linear, SDPA on padded heads, math
  5. aot      python -m caitdeploy.kernels.aot --quick --targets 90 on this machine's triton

A summary (gpu_check.json, gpu_check.md) lists each step's status, seconds and outputs. Exit 0 when every step
passed, 1 otherwise, 2 when there is no CUDA GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def steps(out: Path, skip_benchmarks: bool) -> list[tuple[str, list[str], int]]:
    """(name, command, time limit in seconds); the limits add up to under 9 minutes."""
    work = out / "work"
    smoke = work / "smoke"
    plan = [
        ("tests", [PY, "-m", "pytest", "-q", "-x", "-o", "addopts=-ra", "tests/test_kernels.py",
                   "tests/test_runtime.py"], 90),  # addopts: no xdist on the GPU machine
        ("smoke", [PY, str(ROOT / "benchmarks" / "gpu_smoke.py"), "--out", str(smoke)], 90),
    ]
    if not skip_benchmarks:
        common = ["--models", "tiny,small,base", "--batch", "256", "--dtype", "fp16", "--out-dir", str(out),
                  "--warmup", "3", "--min-iters", "10", "--min-seconds", "0.5", "--repeats", "2",
                  "--work-dir", str(work / "paper")]
        plan += [
            ("paper", [PY, "benchmarks/paper_settings.py", "--backends", "torch,compile,torch-triton", *common], 150),
            ("paper-cudagraphs", [PY, "benchmarks/paper_settings.py", "--backends", "compile",
                                  "--compile-mode", "reduce-overhead", *common], 80),
            ("kernels", [PY, "benchmarks/bench_kernels.py", "--check", "--json", str(out / "kernels.json"),
                         "--markdown", str(out / "kernels.md")], 60),
        ]
    plan.append(("aot", [PY, "-m", "caitdeploy.kernels.aot", "--quick", "--targets", "90", "--json",
                         str(out / "aot.json")], 40))
    return plan


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-benchmarks", action="store_true", help="tests, smoke and aot only")
    ap.add_argument("--dry-run", action="store_true", help="print the steps and exit")
    args = ap.parse_args(argv)
    out = Path(os.environ.get("GPU_CHECK_OUT", ROOT / "out" / "gpu-check"))
    plan = steps(out, args.skip_benchmarks)
    if args.dry_run:
        for name, cmd, limit in plan:
            print(f"{name:18} <= {limit:3d} s  {shlex.join(cmd)}")
        print(f"total limit {sum(limit for _, _, limit in plan)} s; outputs in {out}")
        return 0
    import torch

    if not torch.cuda.is_available():
        print("error: gpu-check needs a CUDA GPU and torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    summary = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "steps": []}
    try:
        import triton

        summary["triton"] = triton.__version__
    except ImportError:
        summary["triton"] = None
    for name, cmd, limit in plan:
        t0 = time.perf_counter()
        log = out / f"{name}.log"
        try:
            p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit)
            status = "ok" if p.returncode == 0 else f"failed (exit {p.returncode})"
            text = p.stdout + p.stderr
        except subprocess.TimeoutExpired as e:
            status = f"timed out after {limit} s"
            text = (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace")
        log.write_text(text)
        secs = time.perf_counter() - t0
        summary["steps"].append({"step": name, "status": status, "seconds": round(secs, 1), "log": str(log),
                                 "command": shlex.join(cmd)})
        print(f"{name:18} {status:24} {secs:6.1f} s  ({log})", flush=True)
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = [f"# gpu-check on {summary['gpu']} (torch {summary['torch']}, triton {summary['triton']})", "",
             "| step | status | seconds |", "|---|---|---|"]
    lines += [f"| {s['step']} | {s['status']} | {s['seconds']} |" for s in summary["steps"]]
    (out / "gpu_check.md").write_text("\n".join(lines) + "\n")
    return 0 if all(s["status"] == "ok" for s in summary["steps"]) else 1


if __name__ == "__main__":
    sys.exit(main())
