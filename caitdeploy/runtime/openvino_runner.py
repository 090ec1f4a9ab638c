"""OpenVINO (CPU) as a Polygraphy runner: an ONNX file (fp32, fp16, or our int8 QDQ graph) or OpenVINO IR (.xml +
.bin), compiled for the CPU with an explicit inference precision, thread count and performance hint.

    with OpenVinoRunner("m.onnx", RuntimeSpec(threads=2), precision="f32") as r:
        y = r.infer({"images": x})["logits"]

- `precision` "f32" sets INFERENCE_PRECISION_HINT f32 (OpenVINO's CPU plugin would otherwise pick bf16 by itself on
  CPUs that have it, changing the numbers); "bf16" asks for bf16 and is refused, with the reason, on a CPU
  without AVX512_BF16 or AMX-BF16 (it would be emulated, slower than f32).
- int8: a QDQ graph (`export --int8 static`) is read as it is: OpenVINO turns each QuantizeLinear/DequantizeLinear
  pair into a FakeQuantize and runs the quantized MatMuls in int8 (VNNI/AMX where the CPU has them).
- `hint`: OpenVINO's PERFORMANCE_HINT, "LATENCY" (one stream) or "THROUGHPUT" (streams for parallel requests).

openvino is optional (`pip install 'caitdeploy[openvino]'`): it is imported here, on activation, and a missing
package is one line saying how to install it.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
from polygraphy.backend.base import BaseRunner
from polygraphy.common import TensorMetadata
from polygraphy.datatype import DataType

from caitdeploy.core.errors import CaitError
from caitdeploy.runtime.base import RuntimeSpec

PRECISIONS = ("f32", "bf16")
HINTS = ("LATENCY", "THROUGHPUT")


def import_openvino():
    try:
        import openvino as ov
    except ImportError as e:
        raise CaitError(f"openvino is not installed ({e}): pip install 'caitdeploy[openvino]'") from None
    return ov


def ov_error(e: BaseException) -> str:
    """The line of an OpenVINO exception that says what failed (its first line is only a source location)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for ln in lines:
        if ln.startswith(("-- Conversion is failed for:", "Conversion is failed for:")):
            return "ONNX reader: " + ln.lstrip("- ")[:300]
    useful = [ln for ln in lines if not ln.startswith("Exception from ") and not ln.startswith("Check 'false'")]
    return (useful or lines or [type(e).__name__])[0][:300]


def openvino_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("openvino")
    except Exception:  # noqa: BLE001 - not installed
        return None


def _name(port, default: str) -> str:
    """The ONNX name of a port: a tensor may carry several names in OpenVINO (`images` and the Cast output after
    it in an fp16 graph); the graph's own I/O names (images, logits, feat{B}) win. A model converted from PyTorch
    may have unnamed ports: `default` then."""
    names = sorted(port.get_names())
    for n in names:
        if n in ("images", "logits") or (n.startswith("feat") and n[4:].isdigit()):
            return n
    return names[0] if names else default


class OpenVinoRunner(BaseRunner):
    def __init__(
        self,
        model: str | Path,
        spec: RuntimeSpec = RuntimeSpec(),
        *,
        precision: str = "f32",
        hint: str = "LATENCY",
        name: str | None = None,
    ):
        super().__init__(name=name, prefix="openvino-runner")
        if precision not in PRECISIONS:
            raise CaitError(f"OpenVINO precision {precision!r}: choose {' or '.join(PRECISIONS)}")
        if hint not in HINTS:
            raise CaitError(f"OpenVINO performance hint {hint!r}: choose {' or '.join(HINTS)}")
        if spec.device != "cpu":
            raise CaitError("the OpenVINO runner runs on the CPU (device cpu)")
        self.model_path, self.spec, self.precision, self.hint = Path(model), spec, precision, hint

    def activate_impl(self):
        from caitdeploy.core.cpu import has_bf16

        if self.precision == "bf16" and not has_bf16():
            raise CaitError(
                "OpenVINO bf16: this CPU has no AVX512_BF16 or AMX-BF16 (bf16 would be emulated, slower than f32)"
            )
        ov = import_openvino()
        core = ov.Core()
        config: dict[str, str | int] = {
            "INFERENCE_PRECISION_HINT": self.precision,
            "PERFORMANCE_HINT": self.hint,
        }
        if self.spec.threads:
            config["INFERENCE_NUM_THREADS"] = int(self.spec.threads)
        try:
            model = core.read_model(str(self.model_path))
            self.compiled = core.compile_model(model, "CPU", config)
        except Exception as e:  # noqa: BLE001 - OpenVINO raises RuntimeError with long texts: one line
            raise CaitError(f"{self.model_path}: OpenVINO cannot compile it ({ov_error(e)})") from None
        self.request = self.compiled.create_infer_request()
        n_out = len(self.compiled.outputs)
        self.input_names = [_name(p, "images" if k == 0 else f"input{k}") for k, p in enumerate(self.compiled.inputs)]
        self.output_names = [
            _name(p, "logits" if n_out == 1 else f"output{k}") for k, p in enumerate(self.compiled.outputs)
        ]
        hint = self.compiled.get_property("INFERENCE_PRECISION_HINT")
        self.inference_precision = hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)

    def get_input_metadata_impl(self):
        meta = TensorMetadata()
        for i in self.compiled.inputs:
            shape = tuple(d.get_length() if d.is_static else "batch" for d in i.get_partial_shape())
            meta.add(_name(i, "images"), DataType.FLOAT32, shape)
        return meta

    def infer_impl(self, feed_dict):
        feed = [np.ascontiguousarray(np.asarray(feed_dict[n], dtype=np.float32)) for n in self.input_names]
        start = time.perf_counter()
        res = self.request.infer(dict(enumerate(feed)))
        self.inference_time = time.perf_counter() - start
        return OrderedDict(
            (n, np.asarray(res[o])) for n, o in zip(self.output_names, self.compiled.outputs, strict=True)
        )

    def run(self, feed: dict[str, np.ndarray]) -> None:
        """One timed call without copying the outputs out (benchmarks)."""
        self.request.infer({k: feed[n] for k, n in enumerate(self.input_names)})

    def deactivate_impl(self):
        del self.request, self.compiled
