"""A Triton Inference Server model repository entry for an exported model.

DIR/<name>/config.pbtxt and DIR/<name>/1/model.onnx (platform onnxruntime_onnx) or DIR/<name>/1/model.plan
(platform tensorrt_plan). Dims in config.pbtxt exclude the batch dimension (max_batch_size > 0 adds it).
The text is written by hand (no tritonclient needed at export time); tests parse it with Triton's own
model_config protobuf.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any, Sequence

from ..errors import CaitError, atomic_output

TRITON_DTYPES = {"fp32": "TYPE_FP32", "float32": "TYPE_FP32", "fp16": "TYPE_FP16", "float16": "TYPE_FP16"}
INSTANCE_KINDS = ("KIND_GPU", "KIND_CPU", "KIND_AUTO")
PLATFORMS = {".onnx": ("onnxruntime_onnx", "model.onnx"), ".plan": ("tensorrt_plan", "model.plan"),
             ".engine": ("tensorrt_plan", "model.plan")}


def _dims(dims: Sequence[int], what: str) -> list[int]:
    out = [int(d) for d in dims]
    if not out or any(d < 1 for d in out):
        raise CaitError(f"triton repo: {what} dims must be positive sizes without the batch, got {list(dims)}")
    return out


def config_text(name: str, platform: str, max_batch_size: int, input_name: str, input_dims: list[int],
                output_name: str, output_dims: list[int], dtype: str, preferred_batch_sizes: list[int],
                max_queue_delay_us: int, instance_count: int, instance_kind: str) -> str:
    t = TRITON_DTYPES[dtype]
    lines = [
        f'name: "{name}"',
        f'platform: "{platform}"',
        f"max_batch_size: {max_batch_size}",
        "input [",
        "  {",
        f'    name: "{input_name}"',
        f"    data_type: {t}",
        f"    dims: [ {', '.join(map(str, input_dims))} ]",
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
    return "\n".join(lines) + "\n"


def write_triton_repo(repo_dir: str | os.PathLike, name: str, model_file: str | os.PathLike, *, max_batch_size: int,
                      input_dims: Sequence[int], output_dims: Sequence[int], dtype: str = "fp32",
                      preferred_batch_sizes: Sequence[int] = (), instance_count: int = 1,
                      instance_kind: str = "KIND_GPU", max_queue_delay_us: int = 100,
                      input_name: str = "images", output_name: str = "logits") -> dict[str, Any]:
    """Copy `model_file` into a Triton repository and write its config.pbtxt. Returns what was written.

    dtype: the I/O tensor type (fp32 for every caitdeploy export, fp16 graphs included). instance_kind:
    KIND_GPU | KIND_CPU | KIND_AUTO (a TensorRT plan cannot run on KIND_CPU).
    """
    repo_dir, model_file = Path(repo_dir), Path(model_file)
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name or "") or name in (".", ".."):
        raise CaitError(f"triton repo: model name {name!r} must use only letters, digits, '_', '-', '.'")
    if not model_file.is_file():
        raise CaitError(f"{model_file}: no such file")
    suffix = model_file.suffix.lower()
    if suffix not in PLATFORMS:
        raise CaitError(f"{model_file}: triton repo needs an .onnx or .plan/.engine file")
    platform, filename = PLATFORMS[suffix]
    if dtype not in TRITON_DTYPES:
        raise CaitError(f"triton repo: unknown dtype {dtype!r}: choose one of {', '.join(TRITON_DTYPES)}")
    if isinstance(max_batch_size, bool) or int(max_batch_size) < 1:
        raise CaitError(f"triton repo: max_batch_size must be >= 1, got {max_batch_size}")
    prefs = sorted({int(b) for b in preferred_batch_sizes})
    bad = [b for b in prefs if not 1 <= b <= max_batch_size]
    if bad:
        raise CaitError(f"triton repo: preferred batch size {bad[0]} is outside 1..max_batch_size {max_batch_size}")
    kind = instance_kind.upper()
    if not kind.startswith("KIND_"):
        kind = "KIND_" + kind
    if kind not in INSTANCE_KINDS:
        raise CaitError(f"triton repo: instance kind {instance_kind!r}: choose gpu, cpu or auto")
    if platform == "tensorrt_plan" and kind == "KIND_CPU":
        raise CaitError("triton repo: a TensorRT plan runs on GPU instances only (instance kind cpu)")
    if int(instance_count) < 1:
        raise CaitError(f"triton repo: instance count must be >= 1, got {instance_count}")
    in_dims, out_dims = _dims(input_dims, "input"), _dims(output_dims, "output")

    model_dir = repo_dir / name
    version_dir = model_dir / "1"
    try:
        version_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CaitError(f"{version_dir}: cannot create the repository directory ({e.strerror})") from None
    text = config_text(name, platform, int(max_batch_size), input_name, in_dims, output_name, out_dims, dtype,
                       prefs, int(max_queue_delay_us), int(instance_count), kind)
    target = version_dir / filename
    with atomic_output(target) as tmp:
        shutil.copyfile(model_file, tmp)
    with atomic_output(model_dir / "config.pbtxt") as tmp:
        tmp.write_text(text)
    return {"repo": str(repo_dir), "name": name, "platform": platform, "model": str(target),
            "config": str(model_dir / "config.pbtxt"), "max_batch_size": int(max_batch_size),
            "input": {"name": input_name, "dims": in_dims}, "output": {"name": output_name, "dims": out_dims},
            "dtype": TRITON_DTYPES[dtype], "preferred_batch_sizes": prefs,
            "instance_group": {"count": int(instance_count), "kind": kind}}
