"""TensorRT / TensorRT-RTX engine builds from an exported small CAIT model.

TensorRT-RTX builds ahead of time on the CPU, so the build runs here. Deserializing or running an engine needs
a CUDA driver in both flavours: those tests run on a GPU machine and are skipped (with the reason) elsewhere.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json

import onnx
import pytest
import torch
from onnx import TensorProto, helper

from caitdeploy.core.errors import CaitError
from caitdeploy.export.onnx import export_onnx
from caitdeploy.export.tensorrt import build_engine
from caitdeploy.families.vit.config import BlockConfig, CaitConfig
from caitdeploy.families.vit.model import CaitViT
from caitdeploy.formats.sidecar import sidecar_path
from caitdeploy.runtime.tensorrt import TrtEngine, _make_logger, engine_header_check, import_trt

trt = pytest.importorskip("tensorrt_rtx") if importlib.util.find_spec("tensorrt") is None else None
CUDA = torch.cuda.is_available()


def small_cait() -> CaitViT:
    s = 16**-0.5
    blocks = (BlockConfig(2, 8, 16, 64, s, "h"), BlockConfig(2, 16, 8, 64, s, "v"), BlockConfig(2, 16, 16, 64, s))
    torch.manual_seed(0)
    m = CaitViT(CaitConfig(64, 16, 3, 10, 32, True, blocks)).eval()
    with torch.no_grad():
        m.head.weight.normal_(0, 1.0)
    return m


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    d = tmp_path_factory.mktemp("trt")
    model = small_cait()
    onnx_path = d / "m16.onnx"
    export_onnx(model, onnx_path, dtype="fp16", verify=False)
    report = build_engine(
        onnx_path,
        d / "m16.plan",
        min_batch=1,
        opt_batch=4,
        max_batch=8,
        workspace_mb=256,
        timing_cache=d / "tc.bin",
        opt_level=2,
        compute_capabilities=["SM86", "SM89"],
    )
    return model, onnx_path, d / "m16.plan", report


def test_build_writes_engine_and_sidecar(built):
    model, onnx_path, engine, report = built
    mod = import_trt()
    assert engine.is_file() and engine.stat().st_size == report["engine_bytes"] > 0
    side = json.loads(sidecar_path(engine).read_text())
    assert side["flavour"] == mod.__name__ and side["trt_version"] == mod.__version__
    assert side["strongly_typed"] is True and side["dtype"] == "fp16" and side["io_dtype"] == "float32"
    assert side["profile"] == {"min": [1, 3, 64, 64], "opt": [4, 3, 64, 64], "max": [8, 3, 64, 64]}
    assert side["onnx"]["sha256"] == hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    assert side["opt_level"] == 2 and side["workspace_mb"] == 256 and side["build_seconds"] > 0
    assert CaitConfig.from_dict(side["config"]) == model.config
    print(
        f"{side['flavour']} {side['trt_version']}: built {side['engine_bytes']} bytes in {side['build_seconds']:.2f} s"
    )
    if side["flavour"] == "tensorrt_rtx":
        assert side["build_target"]["compute_capabilities"] == ["SM86", "SM89"]
        # TensorRT-RTX ignores timing caches: nothing is written and the report says why
        assert side["timing_cache"]["used"] is False and not (engine.parent / "tc.bin").exists()
    # no temporary files left next to the outputs
    assert not [p for p in engine.parent.iterdir() if p.name.endswith(".tmp")]


def test_engine_header_without_gpu(built):
    engine = built[2]
    data = engine.read_bytes()
    good = engine_header_check(data)
    if not good.get("supported"):
        pytest.skip("this TensorRT module has no Runtime.get_engine_validity")
    assert not good["malformed"] and not good["version_mismatch"]
    bad = bytearray(data)
    bad[:32] = b"\0" * 32
    broken = engine_header_check(bytes(bad))
    assert broken["malformed"] or broken["version_mismatch"], broken


@pytest.mark.gpu  # deserializing and running the engine needs a CUDA driver: skips without one
def test_deserialize_same_module(built):
    model, _onnx_path, engine, _ = built
    mod = import_trt()
    runtime = mod.Runtime(_make_logger(mod))  # collects the CUDA-driver error instead of printing it
    eng = runtime.deserialize_cuda_engine(engine.read_bytes())
    if not CUDA:
        assert eng is None
        pytest.skip(
            f"{mod.__name__} needs a CUDA driver to deserialize an engine and this machine has no GPU "
            "(the build and the header check above ran on the CPU)"
        )
    names = [eng.get_tensor_name(i) for i in range(eng.num_io_tensors)]
    assert names == ["images", "logits"]
    runner = TrtEngine(engine)
    x = torch.randn(5, 3, 64, 64)
    got = runner(x).float().cpu()
    with torch.no_grad():
        ref = model(x)
    assert got.shape == (5, 10)
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.8
    assert (got - ref).abs().max() <= 0.05 * ref.abs().max()


def test_runner_says_no_gpu(built):
    if CUDA:
        pytest.skip("a GPU is present: the no-GPU message cannot be checked here")
    with pytest.raises(CaitError, match="needs a CUDA GPU"):
        TrtEngine(built[2])


def _attention_onnx(path, qk=8, v=16):
    """A minimal opset-23 graph with one Attention node whose K and V widths differ (valid ONNX)."""
    q = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 2, 5, qk])
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 2, 5, v])
    vals = helper.make_tensor("vv", TensorProto.FLOAT, [1, 2, 5, v], [0.1] * (2 * 5 * v))
    expand_shape = helper.make_tensor("vshape", TensorProto.INT64, [4], [1, 2, 5, v])
    nodes = [
        helper.make_node("Expand", ["vv", "vshape"], ["vb"], name="expand_v"),
        helper.make_node("Attention", ["images", "images", "vb"], ["logits"], name="my_attention", scale=0.25),
    ]
    g = helper.make_graph(nodes, "attn", [q], [out], initializer=[vals, expand_shape])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 23)])
    onnx.save(m, str(path))


def test_parser_error_names_the_node_and_leaves_no_engine(tmp_path):
    src = tmp_path / "attn.onnx"
    _attention_onnx(src)
    engine = tmp_path / "attn.plan"
    mod = import_trt()
    if mod.__name__ != "tensorrt_rtx":
        pytest.skip("the K/V-width limit is a TensorRT-RTX parser limit")
    with pytest.raises(CaitError) as e:
        build_engine(src, engine, opt_batch=1, max_batch=1)
    msg = str(e.value)
    assert "node 'my_attention' (Attention)" in msg and "Key and Value must have the same shape" in msg
    assert "\n" not in msg and "cudaError" not in msg
    assert not engine.exists() and not sidecar_path(engine).exists()


def test_parser_error_from_exported_attention_op(tmp_path):
    """A real export with --attention op and q/k width != v width: TensorRT-RTX's parser rejects it."""
    model = small_cait()
    src = tmp_path / "op.onnx"
    export_onnx(model, src, attention="op", verify=False)
    engine = tmp_path / "op.plan"
    mod = import_trt()
    try:
        build_engine(src, engine, opt_batch=2, max_batch=2)
    except CaitError as e:
        msg = str(e)
        print(msg)
        assert "ONNX parser" in msg and "node '" in msg and "Attention" in msg and "\n" not in msg
        assert not engine.exists() and not sidecar_path(engine).exists()
        assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    else:
        assert mod.__name__ == "tensorrt", "TensorRT-RTX 1.7 rejects unequal K/V widths in Attention"


def test_bad_profile_and_missing_file(tmp_path, built):
    with pytest.raises(CaitError, match="min <= opt <= max"):
        build_engine(built[1], tmp_path / "x.plan", min_batch=4, opt_batch=2, max_batch=8)
    with pytest.raises(CaitError, match="no such file"):
        build_engine(tmp_path / "nope.onnx", tmp_path / "x.plan")
    with pytest.raises(CaitError, match="compute_capability .SM999.: choose from"):
        build_engine(built[1], tmp_path / "x.plan", opt_batch=2, max_batch=2, compute_capabilities=["SM999"])
    assert not (tmp_path / "x.plan").exists()


def test_import_trt_names_the_packages():
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("full TensorRT is installed: cannot check the missing-module message")
    with pytest.raises(CaitError) as e:
        import_trt("tensorrt")
    assert "pip install tensorrt-rtx-cu13" in str(e.value) and "pip install tensorrt" in str(e.value)
    assert import_trt().__name__ == "tensorrt_rtx"
    with pytest.raises(CaitError, match="unknown TensorRT module"):
        import_trt("onnxruntime")


def test_swin_onnx_builds_and_inspects(tmp_path):
    """A Swin export (feature maps here) carries a Swin config in its metadata: the engine build, its sidecar and
    `inspect` of both files read it (they once parsed every config as a ViT's and refused it)."""
    from caitdeploy.families.swin.family import timm_model as swin_timm_model
    from caitdeploy.families.swin.model import CaitSwin, SwinConfig, swin_config_of
    from caitdeploy.formats.describe import inspect_engine, inspect_onnx

    timm_swin = swin_timm_model(
        "swin_tiny_patch4_window7_224", 3, 32, dict(embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=4)
    )
    torch.manual_seed(0)
    model = CaitSwin(swin_config_of(timm_swin, {(1, 0): "h"})).eval()
    onnx_path = tmp_path / "swin.onnx"
    export_onnx(model, onnx_path, features=[1, 3], verify=False)
    report = build_engine(
        onnx_path, tmp_path / "swin.plan", min_batch=1, opt_batch=2, max_batch=4, workspace_mb=256, opt_level=0
    )
    side = json.loads(sidecar_path(tmp_path / "swin.plan").read_text())
    assert report["engine_bytes"] > 0 and SwinConfig.from_dict(side["config"]) == model.config
    assert side["outputs"] == ["feat1", "feat3"]
    info = inspect_onnx(onnx_path)
    assert info["depth"] == 4 and info["merges"] == {"1.0": "h"} and info["features"] == "1,3"
    assert inspect_engine(tmp_path / "swin.plan")["depth"] == 4
