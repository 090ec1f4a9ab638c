"""The runtime layer: runners read their I/O metadata from the model/session/engine; GPU decisions on a CPU."""

from __future__ import annotations

import importlib.util

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from caitdeploy.core.errors import CaitError
from caitdeploy.runtime import (
    OrtRunner,
    RuntimeSpec,
    TorchRunner,
    choose_providers,
    cuda_graphs_ok,
    engine_build_key,
    reusable_engine,
)


def _graph(in_type, out_type) -> bytes:
    """x [batch, 3] -> (x * 2) cast to out_type: a graph whose declared I/O dtypes we choose."""
    x = helper.make_tensor_value_info("x", in_type, ["batch", 3])
    y = helper.make_tensor_value_info("y", out_type, ["batch", 3])
    two = helper.make_tensor("two", in_type, [], [2.0])
    nodes = [helper.make_node("Mul", ["x", "two"], ["m"]), helper.make_node("Cast", ["m"], ["y"], to=out_type)]
    g = helper.make_graph(nodes, "g", [x], [y], initializer=[two])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 9
    onnx.checker.check_model(m)
    return m.SerializeToString()


@pytest.mark.parametrize(
    "in_type, out_type, want_in, want_out",
    [
        (TensorProto.FLOAT, TensorProto.FLOAT, torch.float32, torch.float32),
        (TensorProto.FLOAT16, TensorProto.FLOAT16, torch.float16, torch.float16),
        (TensorProto.FLOAT, TensorProto.FLOAT16, torch.float32, torch.float16),
    ],
)
def test_ort_runner_binds_the_dtypes_its_session_declares(in_type, out_type, want_in, want_out):
    feed = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])  # always fp32 from the caller
    with OrtRunner(_graph(in_type, out_type), RuntimeSpec("cpu")) as r:
        assert r.inputs == {"x": want_in} and r.outputs == {"y": want_out}
        bound = r.bind({"x": feed})
        assert bound["x"].dtype == want_in and bound["y"].dtype == want_out  # buffers in the declared dtypes
        assert tuple(bound["y"].shape) == (2, 3)  # batch resolved from the input
        out = r.infer({"x": feed.to(want_in)})["y"]  # Polygraphy's input check passes
        assert out.dtype == want_out and torch.equal(out.float(), feed * 2)
        assert r.infer({"x": feed}, check_inputs=False)["y"].dtype == want_out  # fp32 fed: converted on binding
        np_out = r.infer({"x": feed.numpy()}, check_inputs=False)["y"]  # numpy in, numpy out
        assert isinstance(np_out, np.ndarray) and np_out.dtype == np.dtype(str(want_out).removeprefix("torch."))
        meta = r.get_input_metadata(use_numpy_dtypes=False)
        assert list(meta.keys()) == ["x"] and list(meta["x"].shape) == ["batch", 3]


def test_torch_runner_reads_metadata_from_the_model_and_never_converts_it_in_place():
    from caitdeploy.families.vit.config import CaitConfig
    from caitdeploy.families.vit.model import CaitViT

    model = CaitViT(CaitConfig.dense(img_size=16, patch_size=8, embed_dim=24, depth=1, num_heads=2, num_classes=5))
    with TorchRunner(model, RuntimeSpec("cpu"), dtype=torch.float64) as r:
        meta = r.get_input_metadata(use_numpy_dtypes=False)
        assert list(meta["images"].shape) == ["batch", 3, 16, 16]
        y = r.infer({"images": torch.randn(2, 3, 16, 16, dtype=torch.float64)})["logits"]
        assert y.dtype == torch.float64 and y.shape == (2, 5)
    assert next(model.parameters()).dtype == torch.float32


def test_provider_choice():
    cpu_only = ["CPUExecutionProvider"]
    assert choose_providers(cpu_only, "cpu") == ["CPUExecutionProvider"]
    assert choose_providers(["CUDAExecutionProvider", "CPUExecutionProvider"], "cpu") == ["CPUExecutionProvider"]
    with pytest.raises(CaitError, match="no GPU execution provider"):
        choose_providers(cpu_only, "cuda")
    assert choose_providers(["CUDAExecutionProvider", "CPUExecutionProvider"], "cuda") == [
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]
    full = choose_providers(
        ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
        "cuda",
        fp16=True,
        batch=64,
        chw=(3, 224, 224),
        trt_cache_dir="/c",
    )
    name, opts = full[0]
    assert name == "TensorrtExecutionProvider" and full[1:] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert opts["trt_fp16_enable"] is True and opts["trt_profile_opt_shapes"] == "images:64x3x224x224"
    assert opts["trt_profile_min_shapes"] == "images:1x3x224x224" and opts["trt_engine_cache_path"] == "/c"


@pytest.mark.parametrize(
    "device, backend, mode, dynamic, want",
    [
        ("cuda", "compile", "reduce-overhead", False, True),
        ("cuda", "compile", "max-autotune", False, True),
        ("cuda", "compile", "max-autotune-no-cudagraphs", False, False),
        ("cuda", "compile", None, False, False),
        ("cuda", "torch", "reduce-overhead", False, False),
        ("cuda", "compile", "reduce-overhead", True, False),
        ("cpu", "compile", "reduce-overhead", False, False),
    ],
)
def test_cuda_graph_conditions(device, backend, mode, dynamic, want):
    ok, why = cuda_graphs_ok(device, backend, mode, dynamic)
    assert ok is want and why


def test_engine_build_key_rejects_unknown_options():
    with pytest.raises(CaitError, match="unknown engine build option"):
        engine_build_key(b"x", {"fp16": True})


@pytest.mark.skipif(
    importlib.util.find_spec("tensorrt_rtx") is None, reason="needs tensorrt_rtx (pip install tensorrt-rtx-cu13)"
)
def test_engine_is_reused_only_for_the_same_onnx_and_options(tmp_path):
    """A real TensorRT-RTX build (ahead of time, on the CPU); the cache decision reads its sidecar."""
    from caitdeploy.compress.fuse import fuse_file
    from caitdeploy.export.onnx import export_onnx
    from caitdeploy.export.tensorrt import build_engine
    from caitdeploy.formats.fused import load_model
    from caitdeploy.testing.checkpoints import random_checkpoint

    ck = tmp_path / "c.pth"
    torch.save(random_checkpoint(embed_dim=24, depth=1, num_heads=2, img_size=16, patch_size=8), ck)
    fuse_file(ck, tmp_path / "c.fused.safetensors", verify_batch=0)
    onnx_path = tmp_path / "c.onnx"
    export_onnx(load_model(tmp_path / "c.fused.safetensors"), onnx_path, verify=False)
    engine = tmp_path / "c.plan"
    options = dict(min_batch=1, opt_batch=2, max_batch=2)
    key = engine_build_key(onnx_path.read_bytes(), options)
    assert reusable_engine(engine, key) == (False, "no engine yet")
    build_engine(onnx_path, engine, **options)
    assert reusable_engine(engine, key) == (True, "same ONNX and build options")
    assert (
        reusable_engine(engine, engine_build_key(onnx_path.read_bytes(), dict(options, max_batch=4)))[1]
        == "built with other options"
    )
    changed = onnx_path.read_bytes() + b"\0"
    assert (
        reusable_engine(engine, engine_build_key(changed, options))[1] == "the ONNX changed since the engine was built"
    )
    (tmp_path / "c.plan.json").unlink()
    assert reusable_engine(engine, key)[0] is False
