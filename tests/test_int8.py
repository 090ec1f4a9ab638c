"""INT8 export: the QDQ graph's structure, int8-vs-fp32 agreement on a seeded model, calibration folders."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from caitdeploy.cli import main
from caitdeploy.fuse import FuseOptions, fuse_file

from conftest import random_checkpoint

FORBIDDEN = {"TopK", "ArgMax", "ArgMin", "GatherElements", "GatherND", "ScatterElements", "ScatterND", "NonZero",
             "Loop", "If", "Where"}


@pytest.fixture(scope="module")
def fused(tmp_path_factory):
    d = tmp_path_factory.mktemp("int8")
    torch.save(random_checkpoint(img_size=64, patch_size=16, merges={1: "h"}, depth=3, embed_dim=48), d / "c.pth")
    fuse_file(d / "c.pth", d / "c.fused.safetensors", FuseOptions())
    return d / "c.fused.safetensors"


def _images(folder, n, size=(70, 90), mode="RGB", ext="png"):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        shape = (size[0], size[1], 3) if mode == "RGB" else size
        Image.fromarray((rng.random(shape) * 255).astype("uint8"), mode).save(folder / f"{i}.{ext}")


def _export(fused, tmp_path, *args):
    out, rep = tmp_path / "q.onnx", tmp_path / "q.json"
    r = CliRunner().invoke(main, ["export", str(fused), "-o", str(out), "--report", str(rep), "-q", *args])
    return r, out, rep


def test_static_qdq_graph_and_agreement(fused, tmp_path):
    _images(tmp_path / "cal" / "a", 6)
    _images(tmp_path / "cal" / "b", 3, ext="jpg")
    r, out, rep = _export(fused, tmp_path, "--int8", "static", "--calib", str(tmp_path / "cal"))
    assert r.exit_code == 0, r.output
    q = json.loads(rep.read_text())["int8"]
    assert q["calibration_data"]["images"] == 9 and q["calibration_data"]["preprocess"]["crop"] == [64, 64]
    m = onnx.load(out)
    ops = [n.op_type for n in m.graph.node]
    assert not set(ops) & FORBIDDEN
    # weight MatMuls (qkv, proj, fc1, fc2 per block; the merge; the head) and the stem Conv, each behind DQ nodes
    dq_out = {o for n in m.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    quantized = [n for n in m.graph.node if n.op_type in ("MatMul", "Gemm", "Conv") and all(i in dq_out for i in n.input[:2])]
    assert len(quantized) == 3 * 4 + 1 + 1 + 1 == q["quantized_nodes"]
    assert ops.count("QuantizeLinear") > 0 and ops.count("DequantizeLinear") >= ops.count("QuantizeLinear")
    # attention MatMuls, LayerNorm, Softmax, GELU stay float and are reported
    assert q["float_ops"] == {"Erf": 3, "LayerNormalization": 7, "MatMul": 6, "Softmax": 3}
    c = q["check"]
    assert c["cosine_min"] >= 0.99 and c["top1_agree"] >= 0.8
    meta = {p.key: p.value for p in m.metadata_props}
    assert meta["caitdeploy.int8"] == "static" and meta["caitdeploy.int8.calibration"] == "minmax"
    assert json.loads(meta["caitdeploy.preprocess"])["crop"] == [64, 64]
    assert json.loads(meta["caitdeploy.int8.calibration_data"])["images"] == 9
    assert [o.domain for o in m.opset_import] == [""]   # no unused domains declared by the quantizer
    r = CliRunner().invoke(main, ["inspect", str(out)])
    # (rich wraps long lines at the terminal width: compare with the whitespace collapsed)
    assert r.exit_code == 0 and "dtype int8 static (uint8 asymmetric activations)" in " ".join(r.output.split())
    # no Q/DQ on MatMul outputs: ONNX Runtime fuses DQ -> MatMul into MatMulIntegerToFloat (int8 GEMM, float out)
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(out), so, providers=["CPUExecutionProvider"])
    opt = [n.op_type for n in onnx.load(tmp_path / "opt.onnx").graph.node]
    assert opt.count("MatMulIntegerToFloat") >= 3 * 4 + 1 and "QLinearMatMul" not in opt


def test_static_attention_and_held_out_check(fused, tmp_path):
    _images(tmp_path / "cal", 4)
    _images(tmp_path / "held", 5, size=(64, 64), ext="jpg")
    r, out, rep = _export(fused, tmp_path, "--int8", "static", "--calib", str(tmp_path / "cal"), "--int8-attention",
                          "--int8-check", str(tmp_path / "held"))
    assert r.exit_code == 0, r.output
    q = json.loads(rep.read_text())["int8"]
    assert q["quantized_nodes"] == 3 * 4 + 1 + 1 + 1 + 3 * 2 and "MatMul" not in q["float_ops"]
    assert q["attention_matmuls"] == "int8"
    assert q["check"]["images"] == 5 and q["check"]["source"] == str(tmp_path / "held")
    assert q["check"]["cosine_min"] >= 0.98


@pytest.mark.parametrize("method", ["percentile", "entropy"])
def test_static_synthetic_calibration_methods(fused, tmp_path, method):
    r, out, rep = _export(fused, tmp_path, "--int8", "static", "--calib-synthetic", "8", "--calib-method", method)
    assert r.exit_code == 0, r.output
    assert json.loads(rep.read_text())["int8"]["check"]["cosine_min"] >= 0.99


def test_dynamic_int8(fused, tmp_path):
    r, out, rep = _export(fused, tmp_path, "--int8", "dynamic")
    assert r.exit_code == 0, r.output
    ops = [n.op_type for n in onnx.load(out).graph.node]
    assert ops.count("MatMulInteger") >= 3 * 4 + 1 and "QuantizeLinear" not in ops
    assert json.loads(rep.read_text())["int8"]["check"]["cosine_min"] >= 0.99


def test_bad_calibration_folders_one_line_nothing_written(fused, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "x.png").write_text("not an image")
    _images(tmp_path / "grey", 2, mode="L")
    (tmp_path / "file.txt").write_text("x")
    cases = [(["--calib", str(tmp_path / "empty")], "no PNG or JPEG images (the folder is empty)"),
             (["--calib", str(tmp_path / "text")], "not a readable PNG/JPEG image"),
             (["--calib", str(tmp_path / "grey")], "has 1 channel (L), the model takes 3"),
             (["--calib", str(tmp_path / "nope")], "no such folder"),
             ([], "static needs calibration data"),
             (["--calib-synthetic", "8", "--dtype", "fp16"], "leave --dtype at fp32")]
    for args, msg in cases:
        r, out, rep = _export(fused, tmp_path, "--int8", "static", *args)
        assert r.exit_code == 2, (args, r.output)
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and msg in lines[0], (args, r.stderr)
        assert not out.exists() and not rep.exists()
    r, out, _ = _export(fused, tmp_path, "--int8", "static", "--calib-synthetic", "4", "--int8-check",
                        str(tmp_path / "grey"))
    assert r.exit_code == 2 and "--int8-check" in r.stderr and "has 1 channel" in r.stderr and not out.exists()
    r, out, _ = _export(fused, tmp_path, "--int8", "dynamic", "--int8-attention")
    assert r.exit_code == 2 and "--int8-attention" in r.stderr and not out.exists()
    r, out, _ = _export(fused, tmp_path, "--int8", "dynamic", "--calib", str(tmp_path / "grey"))
    assert r.exit_code == 2 and "dynamic quantization needs no calibration data" in r.stderr
    r, out, _ = _export(fused, tmp_path, "--int8", "dynamic", "--int8-min-cosine", "1.0")
    assert r.exit_code == 2 and "--int8-min-cosine" in r.stderr and not out.exists()


def test_int8_feature_export(fused, tmp_path):
    r, out, rep = _export(fused, tmp_path, "--features", "0,2", "--int8", "static", "--calib-synthetic", "6")
    assert r.exit_code == 0, r.output
    m = onnx.load(out)
    assert [o.name for o in m.graph.output] == ["feat0", "feat2"]
    c = json.loads(rep.read_text())["int8"]["check"]
    assert c["outputs"] == 2 and c["cosine_min"] >= 0.99 and "top1_agree" not in c


def test_static_int8_tensorrt_rtx_engine(fused, tmp_path):
    """The QDQ graph is what TensorRT's explicit quantization takes: --trt switches to symmetric int8 activations
    (zero point 0) and float biases, and TensorRT-RTX builds it on this CPU; the sidecar counts the Q/DQ layers."""
    import importlib.util

    if importlib.util.find_spec("tensorrt") is None:
        pytest.importorskip("tensorrt_rtx")
    engine = tmp_path / "q.plan"
    r, out, rep = _export(fused, tmp_path, "--int8", "static", "--calib-synthetic", "6", "--trt", "--opt-batch", "2",
                          "--max-batch", "4", "--engine", str(engine))
    assert r.exit_code == 0, r.output
    q = onnx.load(out)
    zps = [i for i in q.graph.initializer if i.name.endswith("_zero_point")]
    assert zps and all(onnx.numpy_helper.to_array(z).dtype == np.int8 and not onnx.numpy_helper.to_array(z).any()
                       for z in zps)
    side = json.loads((tmp_path / "q.plan.json").read_text())
    assert side["dtype"] == "int8-static"
    assert side["quantization"]["quantize_layers"] >= 3 * 4 + 1 and side["quantization"]["dequantize_layers"] > 0
    out.unlink()
    r, out, _ = _export(fused, tmp_path, "--int8", "dynamic", "--trt")
    assert r.exit_code == 2 and "TensorRT does not take" in r.stderr and not out.exists()
