"""`caitdeploy bench` end to end through the CLI (its own file: the heaviest bench test, balanced by xdist)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from caitdeploy.bench import RECORD_KEYS
from caitdeploy.cli.main import main
from caitdeploy.testing.checkpoints import write_tiny_fused


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_fused(tmp_path_factory.mktemp("bench") / "tiny.fused.safetensors")


@pytest.mark.slow
def test_cli_smoke(tiny, tmp_path):
    js, md, png = tmp_path / "b.json", tmp_path / "b.md", tmp_path / "b.png"
    res = CliRunner().invoke(
        main,
        [
            "bench",
            str(tiny),
            "--backends",
            "torch,ort",
            "--batch",
            "2",
            "--warmup",
            "1",
            "--min-iters",
            "2",
            "--min-seconds",
            "0",
            "--repeats",
            "2",
            "--threads",
            "1",
            "--json",
            str(js),
            "--markdown",
            str(md),
            "--plot",
            str(png),
        ],
    )
    # (ONNX Runtime on ToMe: exported without the op ban; this one test pays three exports)
    assert res.exit_code == 0, res.output
    recs = json.loads(js.read_text())
    assert len(recs) == 6  # (cait, dense, tome) x (torch, ort)
    assert {(r["model"], r["backend"]) for r in recs} == {
        (m, b) for m in ("cait", "dense", "tome") for b in ("torch", "ort")
    }
    for r in recs:
        assert set(r) == set(RECORD_KEYS)
        assert r["status"] == "ok", r["status"]  # ONNX Runtime runs ToMe too (exported without the op ban)
        assert r["env_threads"] == 1
    by = {(r["model"], r["backend"]): r for r in recs}
    for backend in ("torch", "ort"):
        cait = by["cait", backend]
        assert cait["speedup_vs_dense"] == pytest.approx(
            by["dense", backend]["latency_ms_p50"] / cait["latency_ms_p50"]
        )
        assert cait["speedup_vs_tome"] == pytest.approx(by["tome", backend]["latency_ms_p50"] / cait["latency_ms_p50"])
    text = md.read_text()
    assert text.count("\n| ") == 1 + 6 and "ToMe r=" in text and "CPUExecutionProvider" in text
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert "ToMe" in res.output and "GFLOPs" in res.output
