"""`make gpu-check` (benchmarks/gpu_check.py; its plan: caitdeploy/testing/gpu_check.py) without a GPU: one line
and exit 2, a plan that fits its budget and parses with each step's own parser, and the smoke step's script working
on the CPU. The whole rehearsal runs in CI's floor leg (`gpu_check.py --rehearse`); these are its fast parts, on
every leg."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from caitdeploy.testing import gpu_check as gc

ROOT = Path(__file__).resolve().parents[3]
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour")


@pytest.mark.slow
def test_make_gpu_check_without_cuda_is_one_line_exit_2(tmp_path):
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    out = tmp_path / "gc"
    p = subprocess.run(
        ["make", "-s", "gpu-check", f"GPU_PYTHON={sys.executable}", f"GPU_SITE={tmp_path / 'site'}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={"GPU_CHECK_OUT": str(out), "PATH": "/usr/bin:/bin"},
        check=False,
    )
    lines = [ln for ln in (p.stdout + p.stderr).splitlines() if ln.strip()]
    assert p.returncode == 2, p.stdout + p.stderr
    assert len(lines) == 1 and "gpu-check needs a CUDA GPU" in lines[0] and "make test-floor" in lines[0], lines
    assert not out.exists() and not (tmp_path / "site").exists()  # nothing installed, nothing run
    p = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py"], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and p.stderr.startswith("error: gpu-check needs a CUDA")


def test_plan_fits_eight_minutes_and_parses(tmp_path):
    plan = gc.steps(tmp_path)
    assert sum(s.limit for s in plan) <= gc.TOTAL_LIMIT <= 480
    assert [s.name for s in plan][:2] == ["tests", "smoke"] and plan[-1].name == "aot"
    status, text = gc._check_args(plan)
    assert status == "ok", text
    assert text.count("parses") == sum(s.parse is not None for s in plan)
    # every step either has a CPU form or says why only CUDA can run it
    assert all(s.cpu_argv is not None or s.skip_reason for s in plan)
    # a bad argument is caught by the same check
    plan[1].argv = [*plan[1].argv, "--device", "tpu"]
    status, text = gc._check_args(plan)
    assert status == "failed (smoke)" and "refused" in text


@pytest.mark.slow
def test_smoke_script_runs_on_cpu(tmp_path):
    """Step 2's script, on the CPU backends: it builds its checkpoint (a merge budget it once broke), fuses it and
    benchmarks CAIT, dense and ToMe; every row ok or n/a with a reason."""
    p = subprocess.run(
        [sys.executable, "benchmarks/gpu_smoke.py", "--out", str(tmp_path), "--device", "cpu", "--backends", "torch"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    assert summary["rows"] == 3 and summary["ok"] == 3 and summary["failed"] == 0
    assert (tmp_path / "smoke.json").exists()
