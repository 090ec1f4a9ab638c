"""A Triton Inference Server model repository entry for an exported model.

DIR/<name>/config.pbtxt and DIR/<name>/1/model.onnx (platform onnxruntime_onnx) or DIR/<name>/1/model.plan
(platform tensorrt_plan), or, for Triton's Python backend, DIR/<name>/1/model.py (ours) beside model.onnx or an
OpenVINO IR (model.xml + model.bin). Dims in config.pbtxt exclude the batch dimension (max_batch_size > 0 adds it).
The text is written by hand (no tritonclient needed at export time); tests parse it with Triton's own
model_config protobuf.

Backend "python" (our model.py) gets `reshape: { shape: [ 1, <dims> ] }` on its input: clients still send
[n, <dims>], the model sees [n, 1, <dims>] and drops the 1. Why: a request whose batch dimension overflows
32 bits (2^40 rows) passes Triton's checks as a batch of 0 and reaches the backend without its batch
dimension; the dynamic batcher counts it as 1 row, but the Python backend counts the first dimension it sees
(3 channels) and, when the sum exceeds max_batch_size, fails every request of the batch before model.py can
answer the bad one alone. With the reshape both count 1, so a batch never exceeds max_batch_size.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from caitdeploy.core.errors import CaitError, Staging

TRITON_DTYPES = {"fp32": "TYPE_FP32", "float32": "TYPE_FP32", "fp16": "TYPE_FP16", "float16": "TYPE_FP16"}
INSTANCE_KINDS = ("KIND_GPU", "KIND_CPU", "KIND_AUTO")
PLATFORMS = {
    ".onnx": ("onnxruntime_onnx", "model.onnx"),
    ".plan": ("tensorrt_plan", "model.plan"),
    ".engine": ("tensorrt_plan", "model.plan"),
    ".xml": ("python", "model.xml"),  # OpenVINO IR: served by our model.py (backend python-openvino) only
}
# --triton-backend -> the model suffixes it serves. "python": our model.py runs the ONNX with ONNX Runtime, for
# servers without the onnxruntime backend (the tritonserver bundled in nvidia-pytriton); "python-openvino": the
# same model.py runs the ONNX file or an OpenVINO IR with OpenVINO on the CPU.
BACKENDS = {
    "onnxruntime": (".onnx",),
    "tensorrt": (".plan",),
    "python": (".onnx",),
    "python-openvino": (".onnx", ".xml"),
}
# the model.py runtime each Python-backend flavour names in config.pbtxt (parameters { key: "runtime" ... })
PYTHON_RUNTIMES = {"python": "onnxruntime", "python-openvino": "openvino"}


def _dims(dims: Sequence[int], what: str) -> list[int]:
    out = [int(d) for d in dims]
    if not out or any(d < 1 for d in out):
        raise CaitError(f"triton repo: {what} dims must be positive sizes without the batch, got {list(dims)}")
    return out


def config_text(
    name: str,
    platform: str,
    max_batch_size: int,
    input_name: str,
    input_dims: list[int],
    output_name: str,
    output_dims: list[int],
    dtype: str,
    preferred_batch_sizes: list[int],
    max_queue_delay_us: int,
    instance_count: int,
    instance_kind: str,
    warmup_batches: Sequence[int] = (),
    parameters: dict[str, str] | None = None,
) -> str:
    t = TRITON_DTYPES[dtype]
    lines = [
        f'name: "{name}"',
        'backend: "python"' if platform == "python" else f'platform: "{platform}"',
        f"max_batch_size: {max_batch_size}",
        "input [",
        "  {",
        f'    name: "{input_name}"',
        f"    data_type: {t}",
        f"    dims: [ {', '.join(map(str, input_dims))} ]",
        *([f"    reshape: {{ shape: [ 1, {', '.join(map(str, input_dims))} ] }}"] if platform == "python" else []),
        "  }",
        "]",
        "output [",
        "  {",
        f'    name: "{output_name}"',
        f"    data_type: {t}",
        f"    dims: [ {', '.join(map(str, output_dims))} ]",
        "  }",
        "]",
        "dynamic_batching {",
    ]
    if preferred_batch_sizes:
        lines.append(f"  preferred_batch_size: [ {', '.join(map(str, preferred_batch_sizes))} ]")
    lines += [
        f"  max_queue_delay_microseconds: {max_queue_delay_us}",
        "}",
        "instance_group [",
        "  {",
        f"    count: {instance_count}",
        f"    kind: {instance_kind}",
        "  }",
        "]",
    ]
    for key, value in (parameters or {}).items():  # read by model.py (Python backend)
        lines.append(f'parameters {{ key: "{key}" value: {{ string_value: "{value}" }} }}')
    if warmup_batches:  # Triton runs these random-data requests before it reports the model READY
        lines.append("model_warmup [")
        for i, b in enumerate(warmup_batches):
            lines += [
                "  {",
                f'    name: "warmup_b{b}"',
                f"    batch_size: {b}",
                (
                    f'    inputs {{ key: "{input_name}" value: {{ data_type: {t} '
                    f"dims: [ {', '.join(map(str, input_dims))} ] random_data: true }} }}"
                ),
                "  }" + ("," if i < len(warmup_batches) - 1 else ""),
            ]
        lines.append("]")
    return "\n".join(lines) + "\n"


@dataclass
class TritonEntry:
    """What a repository entry consists of; `write_triton_repo` or a caller's Staging writes it."""

    model_target: Path  # DIR/<name>/1/model.onnx, model.plan or model.xml
    config_path: Path  # DIR/<name>/config.pbtxt
    config_text: str
    info: dict[str, Any]
    python_model: Path | None = None  # DIR/<name>/1/model.py (backends python, python-openvino)
    weights_target: Path | None = None  # DIR/<name>/1/model.bin beside an OpenVINO IR's model.xml


def plan_triton_repo(
    repo_dir: str | os.PathLike,
    name: str,
    model_suffix: str,
    *,
    max_batch_size: int,
    backend: str | None = None,
    input_dims: Sequence[int],
    output_dims: Sequence[int],
    dtype: str = "fp32",
    preferred_batch_sizes: Sequence[int] = (),
    instance_count: int = 1,
    instance_kind: str = "KIND_GPU",
    max_queue_delay_us: int = 100,
    input_name: str = "images",
    output_name: str = "logits",
    warmup_batches: Sequence[int] = (),
) -> TritonEntry:
    """Validate every option and say what the entry will be, writing nothing.

    model_suffix: ".onnx", ".plan"/".engine", or ".xml" (an OpenVINO IR, backend python-openvino). dtype: the I/O
    tensor type (fp32 for every caitdeploy export, fp16 graphs included). instance_kind: KIND_GPU | KIND_CPU |
    KIND_AUTO (a TensorRT plan cannot run on KIND_CPU)."""
    repo_dir = Path(repo_dir)
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,128}", name) or name in (".", ".."):
        raise CaitError(f"triton repo: model name {name!r} must be 1-128 letters, digits, '_', '-', '.'")
    suffix = model_suffix.lower()
    if suffix not in PLATFORMS:
        raise CaitError(f"triton repo needs an .onnx, .plan/.engine or OpenVINO .xml model, got {model_suffix!r}")
    platform, filename = PLATFORMS[suffix]
    if backend is None and suffix == ".xml":
        backend = "python-openvino"  # the only backend here that serves an IR
    if backend is not None:
        if backend not in BACKENDS:
            raise CaitError(f"triton repo: backend {backend!r}: choose {', '.join(BACKENDS)}")
        served = BACKENDS[backend]
        if (".plan" if suffix in (".plan", ".engine") else suffix) not in served:
            raise CaitError(f"triton repo: backend {backend} serves {' or '.join(served)} models, got {model_suffix}")
        if backend in PYTHON_RUNTIMES:
            platform = "python"
    if dtype not in TRITON_DTYPES:
        raise CaitError(f"triton repo: unknown dtype {dtype!r}: choose one of {', '.join(TRITON_DTYPES)}")
    if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or not 1 <= max_batch_size <= 1 << 16:
        raise CaitError(f"triton repo: max_batch_size must be an integer in 1..65536, got {max_batch_size!r}")
    prefs = sorted({int(b) for b in preferred_batch_sizes})
    bad = [b for b in prefs if not 1 <= b <= max_batch_size]
    if bad:
        raise CaitError(f"triton repo: preferred batch size {bad[0]} is outside 1..max_batch_size {max_batch_size}")
    kind = str(instance_kind).upper()
    if not kind.startswith("KIND_"):
        kind = "KIND_" + kind
    if kind not in INSTANCE_KINDS:
        raise CaitError(f"triton repo: instance kind {instance_kind!r}: choose gpu, cpu or auto")
    if platform == "python" and kind == "KIND_GPU":
        kind = "KIND_CPU"  # our model.py runs on the CPU (ONNX Runtime's CPU provider, or OpenVINO's CPU plugin)
    if platform == "tensorrt_plan" and kind == "KIND_CPU":
        raise CaitError("triton repo: a TensorRT plan runs on GPU instances only (instance kind cpu)")
    if isinstance(instance_count, bool) or not isinstance(instance_count, int) or not 1 <= instance_count <= 256:
        raise CaitError(f"triton repo: instance count must be an integer in 1..256, got {instance_count!r}")
    if (
        isinstance(max_queue_delay_us, bool)
        or not isinstance(max_queue_delay_us, int)
        or not 0 <= max_queue_delay_us <= 10**8
    ):
        raise CaitError(f"triton repo: max queue delay must be 0..1e8 microseconds, got {max_queue_delay_us!r}")
    in_dims, out_dims = _dims(input_dims, "input"), _dims(output_dims, "output")
    model_dir = repo_dir / name
    target = model_dir / "1" / filename
    warm = sorted({int(b) for b in warmup_batches})
    if any(not 1 <= b <= max_batch_size for b in warm):
        raise CaitError(f"triton repo: warm-up batch sizes must be in 1..max_batch_size {max_batch_size}, got {warm}")
    runtime = PYTHON_RUNTIMES[backend or "python"] if platform == "python" else None  # what model.py runs
    text = config_text(
        name,
        platform,
        max_batch_size,
        input_name,
        in_dims,
        output_name,
        out_dims,
        dtype,
        prefs,
        max_queue_delay_us,
        instance_count,
        kind,
        warm,
        {"runtime": runtime} if runtime else None,
    )
    info = {
        "repo": str(repo_dir),
        "name": name,
        "platform": platform,
        "model": str(target),
        "config": str(model_dir / "config.pbtxt"),
        "max_batch_size": max_batch_size,
        "input": {"name": input_name, "dims": in_dims},
        "output": {"name": output_name, "dims": out_dims},
        "dtype": TRITON_DTYPES[dtype],
        "preferred_batch_sizes": prefs,
        "instance_group": {"count": instance_count, "kind": kind},
    }
    info["backend"] = backend or {"python": "python", "tensorrt_plan": "tensorrt"}.get(platform, "onnxruntime")
    if runtime:
        info["runtime"] = runtime
    weights = target.with_suffix(".bin") if suffix == ".xml" else None
    if weights is not None:
        info["weights"] = str(weights)
    return TritonEntry(
        target,
        model_dir / "config.pbtxt",
        text,
        info,
        model_dir / "1" / "model.py" if platform == "python" else None,
        weights,
    )


def stage_triton_repo(
    staging: Staging, entry: TritonEntry, model_bytes: bytes, weights_bytes: bytes | None = None
) -> None:
    """Stage the model copy (an IR: model.xml and `weights_bytes` as model.bin) and config.pbtxt (folders are
    created when `staging` commits)."""
    if (entry.weights_target is None) != (weights_bytes is None):
        raise CaitError("triton repo: an OpenVINO IR entry needs its .xml and .bin, nothing else does")
    staging.write_bytes(entry.model_target, model_bytes, create_dirs=True)
    if entry.weights_target is not None and weights_bytes is not None:
        staging.write_bytes(entry.weights_target, weights_bytes, create_dirs=True)
    staging.write_text(entry.config_path, entry.config_text, create_dirs=True)
    if entry.python_model is not None:
        src = Path(__file__).with_name("triton_python_model.py")
        staging.write_bytes(entry.python_model, src.read_bytes(), create_dirs=True)


def write_triton_repo(repo_dir: str | os.PathLike, name: str, model_file: str | os.PathLike, **kw) -> dict[str, Any]:
    """Copy `model_file` into a Triton repository and write its config.pbtxt (see `plan_triton_repo` for the
    options). Returns what was written."""
    model_file = Path(model_file)
    if not model_file.is_file():
        raise CaitError(f"{model_file}: no such file")
    entry = plan_triton_repo(repo_dir, name, model_file.suffix, **kw)
    weights = model_file.with_suffix(".bin") if entry.weights_target is not None else None
    if weights is not None and not weights.is_file():
        raise CaitError(f"{model_file}: an OpenVINO IR needs its weights {weights.name} beside it")
    with Staging() as st:
        stage_triton_repo(st, entry, model_file.read_bytes(), weights.read_bytes() if weights else None)
    return entry.info
