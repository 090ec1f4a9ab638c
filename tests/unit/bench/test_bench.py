"""`caitdeploy bench`: record schema, n/a records, speed-ups, reports and a CLI smoke run on a tiny model."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from click.testing import CliRunner

from caitdeploy.bench import (
    MEASURED_KEYS,
    RECORD_KEYS,
    RECORD_SCHEMA,
    RunOptions,
    Timing,
    add_speedups,
    build_models,
    run_one,
    to_markdown,
    write_plot,
)
from caitdeploy.cli.main import main
from caitdeploy.core.errors import CaitError
from caitdeploy.families.flops import model_flops
from caitdeploy.families.vit.config import CaitConfig
from caitdeploy.testing.checkpoints import write_tiny_fused

FAST = Timing(warmup=1, min_iters=2, min_seconds=0.0, repeats=2)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_fused(tmp_path_factory.mktemp("bench") / "tiny.fused.safetensors")


def check_schema(rec):
    assert tuple(rec) == RECORD_KEYS
    for k, types in RECORD_SCHEMA.items():
        assert isinstance(rec[k], types) and not isinstance(rec[k], bool), (k, rec[k])


def test_models_and_flops_matching(tiny):
    models = build_models([tiny], log=lambda s: None)
    kinds = [m.kind for m in models]
    assert kinds == ["cait", "dense", "tome"]
    cait, dense, tome = models
    assert (
        dense.flops
        == model_flops(
            CaitConfig.dense(
                img_size=64, patch_size=8, embed_dim=48, depth=4, num_heads=3, mlp_ratio=2.0, num_classes=10
            )
        )["total"]
    )
    assert cait.flops < 0.8 * dense.flops
    assert abs(tome.flops - cait.flops) <= 0.02 * cait.flops
    assert tome.params == dense.params and cait.params < dense.params


def test_ok_record_schema(tiny):
    cait = build_models([tiny], baselines=(), log=lambda s: None)[0]
    rec = run_one(cait, "torch", 2, RunOptions(device="cpu", timing=FAST))
    assert rec["status"] == "ok", rec["status"]
    check_schema(rec)
    assert rec["iters"] == 4 and rec["warmup"] == 1 and rec["repeats"] == 2  # min_seconds 0: exactly min_iters
    assert 0 < rec["latency_ms_p50"] <= rec["latency_ms_p90"] <= rec["latency_ms_p99"]
    assert rec["throughput_img_s"] == pytest.approx(2 / rec["latency_ms_p50"] * 1e3)
    assert rec["repeat_spread_pct"] is not None  # two repeats: a spread
    assert rec["peak_mem_kind"] in ("rss_peak_delta", "ru_maxrss")
    assert rec["batch"] == 2 and rec["model"] == "cait" and rec["device"] == "cpu"
    assert "hostname" not in json.dumps(rec).lower()


def test_fp16_on_cpu_runs_fp32_with_note(tiny):
    cait = build_models([tiny], baselines=(), log=lambda s: None)[0]
    rec = run_one(cait, "torch", 1, RunOptions(device="cpu", dtype="fp16", timing=replace(FAST, repeats=1)))
    check_schema(rec)
    assert rec["dtype"] == "fp32" and "fp16 requested" in rec["note"]
    assert rec["repeat_spread_pct"] is None  # one repeat: no spread


@pytest.mark.slow
def test_int8_and_bf16_rows(tiny, tmp_path):
    """int8 / int8-dynamic run on ONNX Runtime (the fp32 export quantized), bf16 on torch (autocast); the other
    pairs are n/a with the reason; speed-ups compare rows of one precision."""
    from caitdeploy.bench import run_bench

    recs = run_bench(
        [tiny],
        batches=[2],
        backends=["torch", "ort"],
        dtype="fp32,bf16,int8,int8-dynamic",
        baselines=("dense",),
        timing=replace(FAST, repeats=1),
        threads=1,
        progress=False,
        work_dir=tmp_path,
        log=lambda s: None,
    )
    by = {(r["model"], r["backend"], r["dtype"]): r for r in recs}
    assert len(recs) == 2 * 2 * 4 and len(by) == len(recs)
    for model in ("cait", "dense"):
        for dt in ("int8", "int8-dynamic"):
            assert by[(model, "ort", dt)]["status"] == "ok", by[(model, "ort", dt)]["status"]
            assert "runs on ONNX Runtime" in by[(model, "torch", dt)]["status"]
        assert by[(model, "torch", "bf16")]["status"] == "ok" and "autocast" in by[(model, "torch", "bf16")]["note"]
        assert "no bfloat16 CPU kernels" in by[(model, "ort", "bf16")]["status"]
    assert "static QDQ" in by[("cait", "ort", "int8")]["note"]
    assert by[("dense", "ort", "int8")]["speedup_vs_dense"] == 1.0
    ops = __import__("onnx").load(next(tmp_path.glob("*cait-int8.onnx")))
    assert any(n.op_type == "DequantizeLinear" for n in ops.graph.node)
    # the TensorRT rows quantize with zero points 0 (its parser refuses others)
    import numpy as np
    import onnx

    from caitdeploy.bench.runners import _onnx_file, close_context, new_context

    opts = RunOptions(device="cpu", timing=FAST, work_dir=tmp_path / "trt")
    ctx = new_context(opts)
    try:
        cait = build_models([tiny], baselines=(), log=lambda s: None)[0]
        q = onnx.load(_onnx_file(cait, opts, "int8", ctx, symmetric=True))
    finally:
        close_context(ctx)
    zps = [onnx.numpy_helper.to_array(i) for i in q.graph.initializer if i.name.endswith("_zero_point")]
    assert zps and all(z.dtype == np.int8 and not z.any() for z in zps)


@pytest.mark.parametrize("backend,kind,reason", [("trt", "cait", "CUDA"), ("torch-triton", "dense", "CUDA")])
def test_na_record(tiny, backend, kind, reason):
    m = next(m for m in build_models([tiny], log=lambda s: None) if m.kind == kind)
    rec = run_one(m, backend, 4, RunOptions(device="cpu", timing=FAST))
    assert tuple(rec) == RECORD_KEYS
    assert rec["status"].startswith("n/a: ") and reason in rec["status"]
    for k in MEASURED_KEYS:
        assert rec[k] is None, k
    for k in set(RECORD_KEYS) - set(MEASURED_KEYS):
        assert isinstance(rec[k], RECORD_SCHEMA[k]), k
    with pytest.raises(CaitError):
        run_one(m, "tensorflow", 4, RunOptions(device="cpu", timing=FAST))


def _rec(model, backend, p50, setting="s", arch="a", batch=8, status="ok"):
    r = {k: None for k in RECORD_KEYS}
    r.update(
        model=model,
        backend=backend,
        latency_ms_p50=p50,
        setting=setting if model != "dense" else arch,
        arch=arch,
        batch=batch,
        dtype="fp32",
        device="cpu",
        status=status,
    )
    return r


def test_add_speedups():
    recs = add_speedups(
        [
            _rec("dense", "torch", 10.0),
            _rec("cait", "torch", 4.0),
            _rec("tome", "torch", 5.0),
            _rec("cait", "ort", 2.0),
            _rec("dense", "torch", 1.0, batch=1),
        ]
    )
    dense, cait, tome, cait_ort, _ = recs
    assert cait["speedup_vs_dense"] == pytest.approx(2.5) and cait["speedup_vs_tome"] == pytest.approx(1.25)
    assert tome["speedup_vs_dense"] == pytest.approx(2.0) and tome["speedup_vs_tome"] == pytest.approx(1.0)
    assert dense["speedup_vs_tome"] == pytest.approx(0.5) and dense["speedup_vs_dense"] == pytest.approx(1.0)
    assert cait_ort["speedup_vs_dense"] is None and cait_ort["speedup_vs_tome"] is None  # no ort baselines


def test_plot_png(tmp_path, tiny):
    recs = []
    for b, scale in ((1, 1.0), (8, 5.0)):
        for m, p in (("dense", 10.0), ("cait", 4.0), ("tome", 5.0)):
            for be in ("torch", "ort"):
                r = _rec(m, be, p * scale, batch=b)
                r.update(
                    model_detail=m, throughput_img_s=b / (p * scale) * 1e3, dtype="fp32", env_gpu=None, env_cpu="cpu"
                )
                recs.append(r)
    recs.append(_rec("cait", "trt", None, status="n/a: TensorRT needs a CUDA GPU"))
    out = tmp_path / "bench.png"
    write_plot(recs, out)
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    with pytest.raises(CaitError):
        write_plot([recs[-1]], tmp_path / "none.png")


def test_markdown_lists_na_reason():
    r = _rec("cait", "trt", None, status="n/a: TensorRT needs a CUDA GPU")
    r.update(
        model_detail="CAIT -50%",
        flops_per_img=10**9,
        params=10**6,
        env_cpu="x",
        env_cpu_count=2,
        env_threads=2,
        env_torch="t",
        env_python="p",
        env_os="o",
    )
    text = to_markdown([r])
    assert "n/a [1]" in text and "[1] TensorRT needs a CUDA GPU" in text


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--backends", "torch,tensorflow"], "unknown backend 'tensorflow'"),
        (["--batch", "0"], "--batch 0"),
        (["--batch", "two"], "--batch 'two'"),
        (["--dtype", "int4"], "--dtype 'int4'"),
        (["--dtype", ","], "--dtype is empty"),
        (["--tome-r", "-3"], "--tome-r"),
    ],
)
def test_cli_bad_input(tiny, args, needle):
    res = CliRunner().invoke(main, ["bench", str(tiny), *args])
    assert res.exit_code == 2
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], res.output


def test_cli_not_a_fused_model(tmp_path):
    from safetensors.torch import save_file

    ck = tmp_path / "ckpt.safetensors"  # a CAIT training checkpoint's header, not a fused model
    save_file({"w": torch.zeros(2)}, str(ck), metadata={"format": "cait-compactor/1"})
    junk = tmp_path / "junk.safetensors"
    junk.write_text("not a model")
    for path, says in (
        (ck, "caitdeploy fuse"),
        (junk, "caitdeploy fuse"),
        (tmp_path / "missing.safetensors", "no such file"),
    ):
        res = CliRunner().invoke(main, ["bench", str(path), "--batch", "1"])
        assert res.exit_code == 2
        lines = [ln for ln in res.output.splitlines() if ln.strip()]
        assert len(lines) == 1 and says in lines[0], res.output
