"""TensorRT / TensorRT-RTX engines as a Polygraphy runner, and when a built engine may be reused."""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from polygraphy.backend.base import BaseRunner
from polygraphy.common import TensorMetadata
from polygraphy.datatype import DataType

from caitdeploy.core.errors import CaitError
from caitdeploy.formats.sidecar import BUILD_KEYS, normalize_build_options


def engine_build_key(onnx_bytes: bytes, options: dict[str, Any]) -> dict[str, Any]:
    """What an engine depends on: the ONNX file's SHA-256 and every build option (unknown options refused)."""
    unknown = set(options) - set(BUILD_KEYS)
    if unknown:
        raise CaitError(f"unknown engine build option(s): {', '.join(sorted(unknown))}")
    return {"onnx_sha256": hashlib.sha256(onnx_bytes).hexdigest(), "options": normalize_build_options(options)}


def reusable_engine(engine_path: str | Path, key: dict[str, Any]) -> tuple[bool, str]:
    """(reuse?, why): an engine is reused only when it exists with a sidecar whose ONNX SHA-256 and build
    options equal `key` (a changed ONNX, other options or a missing/invalid sidecar mean: build again)."""
    from caitdeploy.formats.sidecar import read_sidecar

    engine_path = Path(engine_path)
    if not engine_path.is_file():
        return False, "no engine yet"
    try:
        side = read_sidecar(engine_path)
    except CaitError as e:
        return False, f"sidecar unreadable ({e})"
    if side is None:
        return False, "no sidecar: cannot tell what the engine was built from"
    if (side.get("onnx") or {}).get("sha256") != key["onnx_sha256"]:
        return False, "the ONNX changed since the engine was built"
    if side.get("build_key") != key["options"]:
        return False, "built with other options"
    return True, "same ONNX and build options"


class TrtRunner(BaseRunner):
    """Run a serialized engine (`caitdeploy.runtime.tensorrt.TrtEngine` underneath: CUDA, named tensors,
    `execute_async_v3`). Input metadata is read from the engine."""

    def __init__(self, engine_path: str | Path, flavour: str | None = None, name: str | None = None):
        super().__init__(name=name, prefix="trt-runner")
        self.engine_path, self._flavour = Path(engine_path), flavour

    def activate_impl(self):
        from caitdeploy.runtime.tensorrt import TrtEngine

        self.engine = TrtEngine(self.engine_path, flavour=self._flavour)

    def get_input_metadata_impl(self):
        meta = TensorMetadata()
        e = self.engine
        for n in e.inputs:
            meta.add(n, DataType.from_dtype(e._torch_dtype(n), "torch"), tuple(e.engine.get_tensor_shape(n)))
        return meta

    def infer_impl(self, feed_dict):
        x = feed_dict[self.engine.inputs[0]]
        numpy_in = not isinstance(x, torch.Tensor)
        start = time.perf_counter()
        y = self.engine(torch.as_tensor(x))
        self.inference_time = time.perf_counter() - start
        outs = y if isinstance(y, dict) else {self.engine.outputs[0]: y}
        return OrderedDict((k, v.float().cpu().numpy() if numpy_in else v) for k, v in outs.items())

    def deactivate_impl(self):
        del self.engine
