"""Triton model repository: config.pbtxt parsed with Triton's own model_config protobuf, checked field by field."""

from __future__ import annotations

import importlib.util

import onnx
import pytest
import torch

from caitdeploy.core.errors import CaitError
from caitdeploy.export.onnx import export_onnx
from caitdeploy.export.triton_repo import write_triton_repo
from caitdeploy.families.vit.config import BlockConfig, CaitConfig
from caitdeploy.families.vit.model import CaitViT

mc = pytest.importorskip("tritonclient.grpc.model_config_pb2")
text_format = pytest.importorskip("google.protobuf.text_format")


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory):
    s = 8**-0.5
    cfg = CaitConfig(32, 8, 3, 7, 16, True, (BlockConfig(2, 8, 4, 32, s, "h"), BlockConfig(2, 4, 8, 32, s, "v")))
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tr") / "tiny.onnx"
    export_onnx(CaitViT(cfg).eval(), path, verify=False)
    return path


def _parse(path):
    return text_format.Parse(path.read_text(), mc.ModelConfig())


def _dims(vi):
    return [d.dim_value for d in vi.type.tensor_type.shape.dim[1:]]


def test_onnx_repo_matches_the_model(onnx_model, tmp_path):
    m = onnx.load(str(onnx_model))
    inp, out = m.graph.input[0], m.graph.output[0]
    r = write_triton_repo(
        tmp_path,
        "tiny_cait",
        onnx_model,
        max_batch_size=64,
        input_dims=_dims(inp),
        output_dims=_dims(out),
        dtype="fp32",
        preferred_batch_sizes=[32, 8, 64],
        instance_count=2,
        instance_kind="cpu",
        max_queue_delay_us=250,
    )
    model_file = tmp_path / "tiny_cait" / "1" / "model.onnx"
    assert model_file.read_bytes() == onnx_model.read_bytes()
    cfg = _parse(tmp_path / "tiny_cait" / "config.pbtxt")
    assert cfg.name == "tiny_cait" and cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 64
    assert [i.name for i in cfg.input] == [inp.name] and [o.name for o in cfg.output] == [out.name]
    assert list(cfg.input[0].dims) == [3, 32, 32] == _dims(inp)
    assert list(cfg.output[0].dims) == [7] == _dims(out)
    assert cfg.input[0].data_type == cfg.output[0].data_type == mc.TYPE_FP32
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert list(cfg.dynamic_batching.preferred_batch_size) == [8, 32, 64]
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 250
    assert len(cfg.instance_group) == 1
    assert cfg.instance_group[0].count == 2 and cfg.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
    assert r["platform"] == "onnxruntime_onnx" and r["model"] == str(model_file)


@pytest.mark.skipif(
    importlib.util.find_spec("tensorrt_rtx") is None and importlib.util.find_spec("tensorrt") is None,
    reason="no TensorRT module to build a plan",
)
def test_plan_repo(onnx_model, tmp_path):
    from caitdeploy.export.tensorrt import build_engine

    plan = tmp_path / "tiny.plan"
    build_engine(onnx_model, plan, opt_batch=4, max_batch=16)
    write_triton_repo(
        tmp_path / "repo",
        "tiny_trt",
        plan,
        max_batch_size=16,
        input_dims=(3, 32, 32),
        output_dims=(7,),
        preferred_batch_sizes=[4, 16],
    )
    cfg = _parse(tmp_path / "repo" / "tiny_trt" / "config.pbtxt")
    assert cfg.platform == "tensorrt_plan" and cfg.max_batch_size == 16
    assert list(cfg.dynamic_batching.preferred_batch_size) == [4, 16]
    assert cfg.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU and cfg.instance_group[0].count == 1
    assert (tmp_path / "repo" / "tiny_trt" / "1" / "model.plan").read_bytes() == plan.read_bytes()


@pytest.mark.parametrize(
    "kw, needle",
    [
        ({"max_batch_size": 8, "preferred_batch_sizes": [16]}, "outside 1..max_batch_size"),
        ({"max_batch_size": 0}, "max_batch_size must be an integer in 1..65536, got 0"),
        ({"name": "../evil"}, "model name"),
        ({"instance_kind": "tpu"}, "instance kind"),
        ({"dtype": "int8"}, "unknown dtype"),
        ({"input_dims": (0, 32, 32)}, "dims must be positive"),
    ],
)
def test_bad_arguments(onnx_model, tmp_path, kw, needle):
    args = {"name": "m", "max_batch_size": 8, "input_dims": (3, 32, 32), "output_dims": (7,)}
    args.update(kw)
    name = args.pop("name")
    with pytest.raises(CaitError, match=needle):
        write_triton_repo(tmp_path, name, onnx_model, **args)
    assert not list(tmp_path.iterdir())


def test_plan_on_cpu_instances_is_refused(tmp_path):
    plan = tmp_path / "x.plan"
    plan.write_bytes(b"not checked here")
    with pytest.raises(CaitError, match="GPU instances only"):
        write_triton_repo(
            tmp_path / "r", "m", plan, max_batch_size=4, input_dims=(3, 8, 8), output_dims=(2,), instance_kind="cpu"
        )


def test_python_openvino_entries(onnx_model, tmp_path):
    """backend python-openvino: our model.py beside the IR (model.xml + model.bin) or the ONNX, runtime openvino."""
    ov = pytest.importorskip("openvino", reason="openvino is not installed (pip install 'caitdeploy[openvino]')")
    ir = tmp_path / "ir" / "tiny.xml"
    ov.save_model(ov.convert_model(str(onnx_model)), str(ir))
    kw = dict(max_batch_size=8, input_dims=(3, 32, 32), output_dims=(7,))
    r = write_triton_repo(tmp_path / "repo", "tiny_ir", ir, **kw)  # an IR: python-openvino is the only choice
    d = tmp_path / "repo" / "tiny_ir"
    assert (d / "1" / "model.xml").read_bytes() == ir.read_bytes()
    assert (d / "1" / "model.bin").read_bytes() == ir.with_suffix(".bin").read_bytes()
    assert (d / "1" / "model.py").is_file() and not (d / "1" / "model.onnx").exists()
    cfg = _parse(d / "config.pbtxt")
    assert cfg.backend == "python" and not cfg.platform
    assert cfg.parameters["runtime"].string_value == "openvino"
    assert cfg.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
    assert (
        r["backend"] == "python-openvino" and r["runtime"] == "openvino" and r["weights"] == str(d / "1" / "model.bin")
    )

    write_triton_repo(tmp_path / "repo", "tiny_onnx", onnx_model, backend="python-openvino", **kw)
    cfg = _parse(tmp_path / "repo" / "tiny_onnx" / "config.pbtxt")
    assert cfg.parameters["runtime"].string_value == "openvino"
    assert (tmp_path / "repo" / "tiny_onnx" / "1" / "model.onnx").read_bytes() == onnx_model.read_bytes()
    write_triton_repo(tmp_path / "repo", "tiny_ort", onnx_model, backend="python", **kw)
    assert _parse(tmp_path / "repo" / "tiny_ort" / "config.pbtxt").parameters["runtime"].string_value == "onnxruntime"

    with pytest.raises(CaitError, match=r"backend python serves \.onnx models, got \.xml"):
        write_triton_repo(tmp_path / "bad", "m", ir, backend="python", **kw)
    with pytest.raises(CaitError, match=r"backend onnxruntime serves \.onnx models, got \.xml"):
        write_triton_repo(tmp_path / "bad", "m", ir, backend="onnxruntime", **kw)
    ir.with_suffix(".bin").unlink()
    with pytest.raises(CaitError, match=r"tiny\.xml: an OpenVINO IR needs its weights tiny\.bin beside it"):
        write_triton_repo(tmp_path / "bad", "m", ir, **kw)
    assert not (tmp_path / "bad").exists()
