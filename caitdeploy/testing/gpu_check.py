"""`make gpu-check`: everything a lent CUDA GPU machine should prove, in one command, in under 8 minutes.

    make gpu-check                      (on the GPU machine: carried wheels installed offline, then this script)
    GPU_CHECK_OUT=DIR python benchmarks/gpu_check.py [--skip-benchmarks] [--dry-run]
    python benchmarks/gpu_check.py --rehearse       (on a CPU: every step that does not need CUDA; CI's floor leg)
    python benchmarks/gpu_check.py --download-wheels  (here, with network: the wheels to carry, into wheels/gpu)
    python benchmarks/gpu_check.py --why-not        (prints why this machine cannot run it, or nothing)

The machine has torch 2.11, triton 3.6, onnx, onnxruntime (CPU), safetensors, click, rich, matplotlib, tqdm,
pytest and no network; polygraphy, onnx-graphsurgeon and timm (at the floor leg's versions) come as wheels.
Steps, each with its own time limit (sizes: benchmarks/README.md), each writing its log into $GPU_CHECK_OUT
(default out/gpu-check), in the order of what matters most if the lease runs short:

  tests             pytest on the GPU: compiled Triton kernels vs their references, CaitViT(kernels="triton") vs
                    the math path, the runtime runners (tests/unit/kernels/test_kernels.py,
                    tests/unit/runtime/test_runtime.py)
  smoke             `caitdeploy bench` on a small CAIT model over every CUDA backend, batch 8: each row ok or n/a
  paper             paper settings Tiny/Small/Base at batch 256 fp16, eager torch and torch-triton
  paper-compile     Small (CAIT, dense, ToMe) under torch.compile (mode default), batch 256 fp16
  paper-cudagraphs  the same with CUDA graphs (mode reduce-overhead; inductor's cache is warm from paper-compile)
  kernels           benchmarks/bench_kernels.py --check: the kernels vs transpose+Linear and padded SDPA
  aot               python -m caitdeploy.kernels.aot --quick --targets 90 with the machine's triton

The plan, its checks and the runner live here (tests/unit/testing/test_gpu_check.py imports them); the command
line is benchmarks/gpu_check.py, which calls main(). It needs a checkout: the steps run the scripts of benchmarks/
and tests/ from the repository root (ROOT).

A summary (gpu_check.json, gpu_check.md) lists each step's status, seconds and outputs. Exit 0 when every step
passed, 1 otherwise, 2 when there is no CUDA GPU (one line, nothing run). --rehearse runs, without CUDA: the
carried wheels installed offline and imported, every module gpu-check loads imported as on the GPU (no
interpreter), every step's arguments parsed by its own parser, then each step in its CPU form (same scripts,
CPU-sized) or "skipped: <reason>" where only CUDA can run it.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import pkgutil
import runpy
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]  # the repository (this file: caitdeploy/testing/gpu_check.py)
PKG = Path(__file__).resolve().parents[1]  # caitdeploy/
PY = sys.executable
WHEEL_DIR = ROOT / "wheels" / "gpu"
# what the GPU machine lacks (polygraphy, onnx-graphsurgeon) or has in an unknown version (timm): carried at the
# versions the floor leg ran
CARRY = {"polygraphy": "polygraphy", "onnx-graphsurgeon": "onnx_graphsurgeon", "timm": "timm"}  # dist: module
TEST_FILES = ("tests/unit/kernels/test_kernels.py", "tests/unit/runtime/test_runtime.py")
TOTAL_LIMIT = 480
# modules the import check leaves out, and why (nothing gpu-check runs loads them)
NOT_IMPORTED = {"caitdeploy.export.triton_python_model": "runs inside a Triton server's Python backend only"}


@dataclass
class Step:
    name: str
    argv: list[str]  # the command on the GPU machine
    limit: int  # seconds there
    cpu_argv: list[str] | None = None  # the same script, CPU-sized, for --rehearse; None: skipped
    cpu_limit: int = 300
    skip_reason: str = ""  # why --rehearse cannot run it
    parse: tuple[str, str] | None = None  # (script, parser function) that parses argv[2:]
    benchmark: bool = False
    outputs: list[str] = field(default_factory=list)


def steps(out: Path, skip_benchmarks: bool = False) -> list[Step]:
    """The GPU plan; limits add up to TOTAL_LIMIT or less (benchmarks/README.md says how each was sized)."""
    work = Path(tempfile.gettempdir()) / "caitdeploy-gpu-check-work"  # models and ONNX files: not results
    paper = [
        PY,
        "benchmarks/paper_settings.py",
        "--batch",
        "256",
        "--dtype",
        "fp16",
        "--out-dir",
        str(out),
        "--warmup",
        "3",
        "--min-iters",
        "10",
        "--min-seconds",
        "0.5",
        "--repeats",
        "2",
        "--work-dir",
        str(work / "paper"),
    ]
    cpu_paper = [
        PY,
        "benchmarks/paper_settings.py",
        "--quick",
        "--models",
        "tiny",
        "--batch",
        "2",
        "--dtype",
        "fp32",
        "--out-dir",
        str(out),
        "--repeats",
        "1",
        "--work-dir",
        str(work / "paper"),
    ]
    plan = [
        Step(
            "tests",
            [PY, "-m", "pytest", "-q", "-o", "addopts=-ra", "-n", "8", *TEST_FILES],
            65,
            cpu_argv=[PY, "-m", "pytest", "-q", "-o", "addopts=-ra", *TEST_FILES],
            cpu_limit=300,
        ),
        Step(
            "smoke",
            [PY, "benchmarks/gpu_smoke.py", "--out", str(work / "smoke")],
            60,
            cpu_argv=[
                PY,
                "benchmarks/gpu_smoke.py",
                "--out",
                str(work / "smoke-cpu"),
                "--device",
                "cpu",
                "--backends",
                "torch,ort,torch-triton",
            ],
            cpu_limit=300,
            parse=("benchmarks/gpu_smoke.py", "parser"),
        ),
        Step(
            "paper",
            [*paper, "--models", "tiny,small,base", "--backends", "torch,torch-triton"],
            70,
            cpu_argv=[*cpu_paper, "--backends", "torch,torch-triton"],
            cpu_limit=300,
            parse=("benchmarks/paper_settings.py", "parser"),
            benchmark=True,
        ),
        Step(
            "paper-compile",
            [*paper, "--models", "small", "--backends", "compile", "--compile-mode", "default"],
            130,
            cpu_argv=[*cpu_paper, "--backends", "compile"],
            cpu_limit=400,
            parse=("benchmarks/paper_settings.py", "parser"),
            benchmark=True,
        ),
        Step(
            "paper-cudagraphs",
            [*paper, "--models", "small", "--backends", "compile", "--compile-mode", "reduce-overhead"],
            90,
            skip_reason="CUDA graphs (torch.compile mode reduce-overhead) need a CUDA device",
            parse=("benchmarks/paper_settings.py", "parser"),
            benchmark=True,
        ),
        Step(
            "kernels",
            [
                PY,
                "benchmarks/bench_kernels.py",
                "--check",
                "--json",
                str(out / "kernels.json"),
                "--markdown",
                str(out / "kernels.md"),
            ],
            35,
            skip_reason="times CUDA kernels with CUDA events (needs a CUDA device)",
            parse=("benchmarks/bench_kernels.py", "parse_args"),
            benchmark=True,
        ),
        Step(
            "aot",
            [PY, "-m", "caitdeploy.kernels.aot", "--quick", "--targets", "90", "--json", str(out / "aot.json")],
            25,
            parse=("caitdeploy/kernels/aot.py", "parser"),
        ),
    ]
    plan[-1].cpu_argv, plan[-1].cpu_limit = plan[-1].argv, 300  # AOT needs no GPU: the very same command
    return [s for s in plan if not (skip_benchmarks and s.benchmark)]


def why_not() -> str | None:
    """One line saying why this machine cannot run gpu-check, or None."""
    try:
        import torch
    except Exception as e:  # noqa: BLE001 - any import failure is the answer
        return f"gpu-check needs PyTorch with CUDA: {sys.executable} cannot import torch ({type(e).__name__})"
    if not torch.cuda.is_available():
        return (
            f"gpu-check needs a CUDA GPU: torch {torch.__version__} sees none here "
            "(on a CPU, `make test-floor` rehearses it)"
        )
    return None


def _load(script: str) -> dict:
    """The globals of a step's script: a package module imported, a benchmark script run as a module (not main)."""
    if script.startswith("caitdeploy/"):
        return vars(importlib.import_module(script.removesuffix(".py").replace("/", ".")))
    return runpy.run_path(str(ROOT / script), run_name=f"_gpu_check_{Path(script).stem}")


def _run(cmd: list[str], limit: int, env: dict[str, str]) -> tuple[str, str]:
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit, check=False)
        return ("ok" if p.returncode == 0 else f"failed (exit {p.returncode})"), p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        text = (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace")
        return f"timed out after {limit} s", text


def _record(summary: dict, out: Path, name: str, status: str, text: str, secs: float, cmd: list[str] | None) -> None:
    log = out / f"{name}.log"
    log.write_text(text)
    summary["steps"].append(
        {
            "step": name,
            "status": status,
            "seconds": round(secs, 1),
            "log": str(log),
            "command": shlex.join(cmd) if cmd else None,
        }
    )
    print(f"{name:18} {status[:60]:60} {secs:6.1f} s", flush=True)


def _write_summary(summary: dict, out: Path, title: str) -> None:
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = [f"# {title}", "", "| step | status | seconds |", "|---|---|---|"]
    lines += [f"| {s['step']} | {s['status']} | {s['seconds']} |" for s in summary["steps"]]
    (out / "gpu_check.md").write_text("\n".join(lines) + "\n")


def _versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    got: dict[str, str | None] = {}
    for name in ("torch", "triton", "numpy", "onnxruntime", "onnx", "timm", "polygraphy", "onnx-graphsurgeon"):
        try:
            got[name] = version(name)
        except PackageNotFoundError:
            got[name] = None
    got["python"] = sys.version.split()[0]
    return got


# ---- --download-wheels: here, with network -------------------------------------------------------------------
def download_wheels(dest: Path = WHEEL_DIR) -> int:
    """The CARRY packages at the versions installed in this environment (the floor leg's), as wheels for the GPU
    machine's Python 3.12 on x86-64, into `dest` (replacing what was there)."""
    from importlib.metadata import version

    pins = [f"{name}=={version(name)}" for name in CARRY]
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("*.whl"):
        old.unlink()
    cmd = [
        PY,
        "-m",
        "pip",
        "download",
        "-q",
        "--no-deps",
        "--only-binary=:all:",
        "--python-version",
        "3.12",
        "--implementation",
        "cp",
        "--platform",
        "manylinux_2_28_x86_64",
        "--platform",
        "manylinux2014_x86_64",
        "-d",
        str(dest),
        *pins,
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if p.returncode:
        print(
            f"error: pip download {' '.join(pins)} failed: {(p.stderr.strip().splitlines() or ['?'])[-1]}",
            file=sys.stderr,
        )
        return 1
    size = sum(f.stat().st_size for f in dest.glob("*.whl"))
    print(f"wheels for the GPU machine: {', '.join(pins)} -> {dest} ({size / 2**20:.1f} MiB)")
    return 0


# ---- --rehearse: on a CPU --------------------------------------------------------------------------------------
def _check_wheels(env: dict[str, str]) -> tuple[str, str]:
    """Install wheels/gpu offline into a fresh folder, as gpu-check does there, and import each from it."""
    wheels = sorted(WHEEL_DIR.glob("*.whl"))
    if not wheels:
        return "failed (no wheels in wheels/gpu: run --download-wheels first)", ""
    with tempfile.TemporaryDirectory(prefix="caitdeploy-gpu-site-") as site:
        status, text = _run(
            [
                PY,
                "-m",
                "pip",
                "install",
                "-q",
                "--no-index",
                "--no-deps",
                "--no-compile",
                "--upgrade",
                "--target",
                site,
                *map(str, wheels),
            ],
            120,
            env,
        )
        if status != "ok":
            return status, text
        probe = (
            "import importlib, sys\n"
            "for mod in sys.argv[2:]:\n"
            "    m = importlib.import_module(mod)\n"
            "    assert m.__file__.startswith(sys.argv[1]), (mod, m.__file__)\n"
            "    print(mod, getattr(m, '__version__', '?'), m.__file__)\n"
        )
        status, more = _run([PY, "-c", probe, site, *CARRY.values()], 120, {**env, "PYTHONPATH": f"{site}:{ROOT}"})
    size = sum(w.stat().st_size for w in wheels)
    return status, text + more + f"{len(wheels)} wheels, {size / 2**20:.1f} MiB\n"


def _check_imports(env: dict[str, str]) -> tuple[str, str]:
    """Every caitdeploy module and every script gpu-check runs, imported in a fresh process as on the GPU machine:
    TRITON_INTERPRET unset, so the @triton.jit kernels are built for compilation, not for the interpreter."""
    mods = sorted(
        m.name
        for m in pkgutil.walk_packages([str(PKG)], "caitdeploy.")
        if not m.name.endswith(".__main__") and m.name not in NOT_IMPORTED
    )
    scripts = ["benchmarks/gpu_smoke.py", "benchmarks/paper_settings.py", "benchmarks/bench_kernels.py"]
    probe = (
        "import importlib, runpy, sys\n"
        "mods, scripts = sys.argv[1].split(','), sys.argv[2].split(',')\n"
        "for m in mods: importlib.import_module(m)\n"
        "for s in scripts: runpy.run_path(s, run_name='_s')\n"
        "import caitdeploy.kernels._atme_merge_triton as a, caitdeploy.kernels._attention_triton as b\n"
        "assert not a.INTERPRETED and not b.INTERPRETED\n"
        "print(f'{len(mods)} modules and {len(scripts)} scripts imported; kernels built for compilation')\n"
    )
    clean = {k: v for k, v in env.items() if k != "TRITON_INTERPRET"}
    return _run([PY, "-c", probe, ",".join(mods), ",".join(scripts)], 180, clean)


def _check_args(plan: list[Step]) -> tuple[str, str]:
    """Each step's GPU arguments through the step's own parser (argparse exits 2 on a bad one)."""
    lines, bad = [], []
    for s in plan:
        if s.parse is None:
            continue
        script, fn = s.parse
        i = next(i for i, a in enumerate(s.argv) if a.endswith(".py") or a == "caitdeploy.kernels.aot")
        args = s.argv[i + 1 :]
        try:
            p = _load(script)[fn]
            ns = p().parse_args(args) if fn == "parser" else p(args)
            lines.append(f"{s.name}: {script} parses {shlex.join(args)} -> {vars(ns)}")
        except SystemExit as e:
            bad.append(s.name)
            lines.append(f"{s.name}: {script} refused {shlex.join(args)} (exit {e.code})")
    if "-n" in plan[0].argv:  # the tests step runs pytest-xdist: it must be there
        ok = importlib.util.find_spec("xdist") is not None
        lines.append(f"tests: pytest-xdist {'installed' if ok else 'MISSING'}")
        bad += [] if ok else ["tests"]
    return ("ok" if not bad else f"failed ({', '.join(bad)})"), "\n".join(lines) + "\n"


def rehearse(out: Path) -> int:
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    plan = steps(out)
    total = sum(s.limit for s in plan)
    summary = {"mode": "rehearsal on a CPU (no CUDA)", "versions": _versions(), "gpu_limit_total_s": total, "steps": []}
    print(f"gpu-check rehearsal on this CPU; the GPU plan's limits add up to {total} s (<= {TOTAL_LIMIT})")
    failed = total > TOTAL_LIMIT
    for name, fn in (
        ("wheels", lambda: _check_wheels(env)),
        ("imports", lambda: _check_imports(env)),
        ("args", lambda: _check_args(plan)),
    ):
        t0 = time.perf_counter()
        status, text = fn()
        _record(summary, out, name, status, text, time.perf_counter() - t0, None)
        failed |= status != "ok"
    for s in plan:
        t0 = time.perf_counter()
        if s.cpu_argv is None:
            _record(summary, out, s.name, f"skipped: {s.skip_reason}", "", 0.0, s.argv)
            continue
        status, text = _run(s.cpu_argv, s.cpu_limit, env)
        _record(summary, out, s.name, status, text, time.perf_counter() - t0, s.cpu_argv)
        failed |= status != "ok"
    _write_summary(summary, out, "gpu-check rehearsal on a CPU")
    print(f"rehearsal {'FAILED' if failed else 'passed'}: {out / 'gpu_check.md'}")
    return 1 if failed else 0


# ---- the real run ----------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-benchmarks", action="store_true", help="tests, smoke and aot only")
    ap.add_argument("--dry-run", action="store_true", help="print the steps and exit")
    ap.add_argument("--steps", default=None, help="comma list: run only these steps (a re-run of those that failed)")
    ap.add_argument("--rehearse", action="store_true", help="on a CPU: everything that does not need CUDA")
    ap.add_argument("--download-wheels", action="store_true", help="the wheels to carry, into wheels/gpu")
    ap.add_argument("--why-not", action="store_true", help="print why this machine cannot run gpu-check, or nothing")
    args = ap.parse_args(argv)
    out = Path(os.environ.get("GPU_CHECK_OUT", ROOT / "out" / "gpu-check"))
    if args.why_not:
        reason = why_not()
        if reason:
            print(reason)
        return 0
    if args.download_wheels:
        return download_wheels()
    if args.rehearse:
        return rehearse(out)
    plan = steps(out, args.skip_benchmarks)
    if args.steps:
        wanted = [w.strip() for w in args.steps.split(",") if w.strip()]
        unknown = [w for w in wanted if w not in {s.name for s in plan}]
        if unknown:
            print(
                f"error: --steps: unknown step {unknown[0]!r}; choose from {', '.join(s.name for s in plan)}",
                file=sys.stderr,
            )
            return 2
        plan = [s for s in plan if s.name in wanted]
    if args.dry_run:
        for s in plan:
            print(f"{s.name:18} <= {s.limit:3d} s  {shlex.join(s.argv)}")
        print(f"total limit {sum(s.limit for s in plan)} s; outputs in {out}")
        return 0
    reason = why_not()
    if reason:
        print(f"error: {reason}", file=sys.stderr)
        return 2
    import torch

    out.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    previous = out / "gpu_check.json"  # a re-run (--steps) keeps the other steps' results
    summary: dict[str, Any] = {"gpu": torch.cuda.get_device_name(), "versions": _versions(), "steps": []}
    if args.steps and previous.exists():
        summary["steps"] = [
            s for s in json.loads(previous.read_text()).get("steps", []) if s["step"] not in {p.name for p in plan}
        ]
    try:
        summary["driver"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        summary["driver"] = None
    summary["cuda"] = torch.version.cuda
    for s in plan:
        t0 = time.perf_counter()
        status, text = _run(s.argv, s.limit, env)
        _record(summary, out, s.name, status, text, time.perf_counter() - t0, s.argv)
        _write_summary(
            summary,
            out,
            f"gpu-check on {summary['gpu']} (driver {summary['driver']}, "
            f"torch {summary['versions']['torch']}, triton {summary['versions']['triton']})",
        )
    return 0 if all(s["status"] == "ok" for s in summary["steps"]) else 1


if __name__ == "__main__":
    sys.exit(main())
