"""What `eval` can score, each opened into a runner of the runtime layer (the runners `bench` uses):

    checkpoint   a `cait-compactor/1` file: the family's own forward with the compactors applied at run time
                 (float32): the accuracy the training produced (TorchRunner)
    fused        a fused model file: PyTorch fp32, and bf16 autocast when asked (TorchRunner)
    onnx         an ONNX file of `export` (fp32, fp16, int8 static / dynamic): ONNX Runtime (OrtRunner), and
                 OpenVINO (OpenVinoRunner, f32 inference precision) where it is installed
    engine       a TensorRT engine (.engine/.plan): TrtRunner where a CUDA GPU is present, otherwise a row that
                 says why it was not run
    triton       a model on a live Triton server (`--url`): the load-test client (TritonRunner)

Every artifact says which eval transform it expects (`spec`, `core.preprocess`): a checkpoint's and a fused file's
recorded `data_config`, an ONNX file's `caitdeploy.preprocess`, timm's default otherwise."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from caitdeploy.core.errors import CaitError, OptionError

KINDS = ("checkpoint", "fused", "onnx", "engine", "triton")


@dataclass
class Artifact:
    path: str  # the file (or URL/model for Triton)
    kind: str
    precision: str  # fp32, bf16, fp16, int8 static, int8 dynamic
    runtime: str  # torch, onnxruntime, tensorrt, triton
    spec: dict[str, Any] | None  # the eval transform it expects (None: whatever the others say)
    input_shape: tuple[int, int, int] | None
    outputs: list[str]  # "logits", or feat{B} names of a feature export
    make_runner: Callable[[], Any] | None = None
    na: str | None = None  # why it cannot run here (a row that says so)
    notes: list[str] = field(default_factory=list)
    input_name: str = "images"
    static_batch: int | None = None  # an ONNX graph with a fixed batch dim: feeds are padded to it
    threads: int | None = None
    num_classes: int | None = None  # the logits' width, where the artifact says it before running

    @property
    def name(self) -> str:
        rt = {"onnxruntime": "ort", "tensorrt": "trt"}.get(self.runtime, self.runtime)
        return f"{Path(self.path).name if self.kind != 'triton' else self.path} [{rt} {self.precision}]"

    @property
    def logits(self) -> bool:
        return self.outputs == ["logits"] or (self.kind == "triton" and len(self.outputs) == 1)


def detect_kind(path: Path) -> str:
    """The artifact kind of a file, from its name and, for .safetensors, its header's `format`."""
    from caitdeploy.core.names import FORMAT, FUSED_FORMAT

    suffix = path.suffix.lower()
    if not path.exists():
        raise OptionError("artifact", f"{path}: no such file")
    if not path.is_file():
        raise OptionError("artifact", f"{path}: not a regular file")
    if suffix == ".onnx":
        return "onnx"
    if suffix in (".engine", ".plan"):
        return "engine"
    if suffix in (".pth", ".pt"):
        return "checkpoint"
    if suffix == ".safetensors":
        from caitdeploy.core.tensorfile import read_safetensors_header

        fmt = read_safetensors_header(path)[1].get("format")
        if fmt == FUSED_FORMAT:
            return "fused"
        if fmt == FORMAT:
            return "checkpoint"
        raise CaitError(f"{path}: safetensors format {str(fmt)[:40]!r}: eval takes {FORMAT} or {FUSED_FORMAT} files")
    raise OptionError(
        "artifact",
        f"{path}: eval takes checkpoints (.pth, .safetensors), fused files (.safetensors), ONNX (.onnx) "
        "or engines (.engine, .plan)",
    )


def _threads_spec(threads: int | None):
    from caitdeploy.runtime import RuntimeSpec

    return RuntimeSpec(device="cpu", threads=threads)


def open_checkpoint(path: Path, threads: int | None, features: tuple[int, ...] | None) -> Artifact:
    import torch

    from caitdeploy.core.preprocess import preprocess_spec
    from caitdeploy.families import family_of
    from caitdeploy.formats.checkpoint import load_checkpoint

    ck = load_checkpoint(path)
    shape = tuple(ck.config.input_shape)
    art = Artifact(str(path), "checkpoint", "fp32", "torch", preprocess_spec(shape, ck.data_config), shape, ["logits"])
    art.num_classes = ck.config.num_classes
    if features:
        art.na = "feature maps of a checkpoint: fuse it and give the fused file"
        return art
    forward = family_of(ck.config).reference(ck, dtype=torch.float32)

    class CheckpointForward(torch.nn.Module):  # the training's forward, compactors applied at run time
        config = ck.config

        def forward(self, x):
            return forward(x.float())

    from caitdeploy.runtime import TorchRunner

    art.make_runner = lambda: TorchRunner(CheckpointForward(), _threads_spec(threads), input_shape=shape)
    return art


def open_fused(path: Path, threads: int | None, dtype: str, features: tuple[int, ...] | None, restore: str) -> Artifact:
    import torch

    from caitdeploy.core.preprocess import preprocess_spec
    from caitdeploy.export.onnx import feature_names
    from caitdeploy.formats.fused import load_model
    from caitdeploy.runtime import TorchRunner

    model = load_model(path)
    shape = tuple(model.config.input_shape)
    outputs = ["logits"]
    net: Any = model
    if features:
        from caitdeploy.families.vit.config import ConfigError
        from caitdeploy.families.vit.model import FeatureModel

        try:
            net = FeatureModel(model, features, restore)
        except ConfigError as e:
            raise CaitError(f"{path}: {e}") from None
        outputs = feature_names(net.blocks)
    art = Artifact(str(path), "fused", dtype, "torch", preprocess_spec(shape, model.data_config), shape, outputs)
    art.num_classes = None if features else model.config.num_classes
    autocast = torch.bfloat16 if dtype == "bf16" else None
    art.make_runner = lambda: TorchRunner(
        net, _threads_spec(threads), input_shape=shape, output_names=outputs, autocast=autocast
    )
    return art


def open_onnx(path: Path, threads: int | None) -> Artifact:
    from caitdeploy.core.preprocess import preprocess_spec, spec_from_json
    from caitdeploy.formats.onnx_meta import parse_onnx, read_onnx_bytes, read_onnx_metadata

    data = read_onnx_bytes(path)  # bounded, memory counted first
    m = parse_onnx(data, path)  # one line for a hostile file
    if len(m.graph.input) != 1 or not m.graph.output:
        raise CaitError(f"{path}: eval takes a model with one image input, this one has {len(m.graph.input)} inputs")
    meta = read_onnx_metadata(m)
    dims = [d.dim_value if d.HasField("dim_value") else None for d in m.graph.input[0].type.tensor_type.shape.dim]
    if len(dims) != 4 or any(d is None or d < 1 for d in dims[1:]):
        raise CaitError(f"{path}: input {m.graph.input[0].name!r} is not [batch, C, H, W] with fixed C, H, W")
    shape = (int(dims[1] or 0), int(dims[2] or 0), int(dims[3] or 0))
    static_batch = dims[0]
    if "caitdeploy.int8" in meta:
        precision = f"int8 {meta['caitdeploy.int8'][:20]}"
    else:
        precision = meta.get("caitdeploy.dtype", "fp32")[:20]
    spec = (
        spec_from_json(meta["caitdeploy.preprocess"], str(path))
        if "caitdeploy.preprocess" in meta
        else preprocess_spec(shape)
    )
    outputs = [o.name for o in m.graph.output]
    art = Artifact(str(path), "onnx", precision, "onnxruntime", spec, shape, outputs)
    art.input_name, art.static_batch = m.graph.input[0].name, static_batch
    if outputs == ["logits"]:
        odims = m.graph.output[0].type.tensor_type.shape.dim
        if len(odims) == 2 and odims[1].HasField("dim_value"):
            art.num_classes = int(odims[1].dim_value)
    del m
    from caitdeploy.runtime import OrtRunner

    art.make_runner = lambda: OrtRunner(data, _threads_spec(threads))
    art.threads = threads
    return art


def on_openvino(art: Artifact) -> Artifact:
    """The same ONNX artifact run by OpenVINO on the CPU (f32 inference precision: the file's own precision)."""
    import dataclasses

    from caitdeploy.runtime.openvino_runner import OpenVinoRunner

    path, threads = Path(art.path), art.threads
    ov = dataclasses.replace(art, runtime="openvino", notes=list(art.notes))
    ov.make_runner = lambda: OpenVinoRunner(path, _threads_spec(threads), precision="f32")
    return ov


def open_engine(path: Path) -> Artifact:
    from caitdeploy.core.preprocess import preprocess_spec
    from caitdeploy.formats.sidecar import read_sidecar

    side = read_sidecar(path) or {}
    shape = None
    cfg = side.get("config")
    if isinstance(cfg, dict):
        try:
            from caitdeploy.families import config_from_dict

            shape = tuple(config_from_dict(cfg).input_shape)
        except (ValueError, TypeError):
            shape = None
    art = Artifact(str(path), "engine", "engine", "tensorrt", preprocess_spec(shape) if shape else None, shape, [])
    import torch

    if not torch.cuda.is_available():
        art.na = "TensorRT engines run on an NVIDIA GPU; this machine has none"
        return art
    from caitdeploy.runtime import TrtRunner

    art.make_runner = lambda: TrtRunner(path)
    art.outputs = ["logits"]
    return art


def open_triton(url: str, model: str, protocol: str) -> Artifact:
    from caitdeploy.runtime.triton_runner import TritonRunner
    from caitdeploy.serve.loadtest import check_url, model_input

    url = check_url(url, "--url")
    name, dims, datatype, out = model_input(url, model, protocol)
    if len(dims) != 3:
        raise CaitError(f"{url}: model {model!r} input {name!r} is {dims}, not [C, H, W] per image")
    shape = (int(dims[0]), int(dims[1]), int(dims[2]))
    art = Artifact(f"{url}/{model}", "triton", datatype.lower(), "triton", None, shape, [out])
    art.make_runner = lambda: TritonRunner(url, model, protocol)
    art.input_name = name
    return art


def spec_json(spec: dict[str, Any] | None) -> str:
    return json.dumps(spec, sort_keys=True) if spec else "null"
