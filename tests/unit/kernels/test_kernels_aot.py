"""Ahead-of-time compilation of the Triton kernels on a CPU-only machine (the full matrix: `make aot-check`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from caitdeploy.kernels.aot import Result, check


def test_aot_smoke_compiles_cubin_with_wgmma_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    p = subprocess.run(
        [sys.executable, "-m", "caitdeploy.kernels.aot", "--smoke", "--json", "-"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    doc = json.loads(p.stdout)
    (r,) = doc["results"]
    assert r["ok"] and r["target"] == "sm_90" and r["wgmma"] and r["cubin_bytes"] > 1000
    assert 0 < r["shared_bytes"] <= r["smem_limit"] and r["fits"]


def _r(target="sm_86", fits=True, ok=True, wgmma=False, dtype="fp32", shared=1000):
    return Result(
        "atme_merge",
        target,
        dtype,
        "bias",
        "cfg",
        ok,
        shared if ok else None,
        101376,
        fits if ok else None,
        wgmma if ok else None,
        1 if ok else None,
        0.1,
        None if ok else "boom",
    )


def test_check_flags_what_a_gpu_would_reject():
    assert check([_r(fits=False), _r(fits=True)]) == []  # the autotuner skips the config that does not fit
    assert "no autotune config fits (200000 > 101376" in check([_r(fits=False, shared=200000)])[0]
    assert "boom" in check([_r(ok=False)])[0]
    assert "no wgmma" in check([_r(target="sm_90", dtype="fp16")])[0]
    assert check([_r(target="sm_90", dtype="fp16", wgmma=True)]) == []


def test_aot_refuses_the_interpreter(monkeypatch, capsys):
    from caitdeploy.kernels import aot

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert aot.main(["--smoke"]) == 2
    assert "unset TRITON_INTERPRET" in capsys.readouterr().err
