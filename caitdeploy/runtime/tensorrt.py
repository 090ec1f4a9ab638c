"""Loading and running TensorRT / TensorRT-RTX engines: every `tensorrt` / `tensorrt_rtx` import goes through
`import_trt` here (one line naming both packages when neither is installed); `export.tensorrt` builds with it.

`TrtEngine` deserializes an engine (checked against its sidecar first, `formats.sidecar`) and runs it on CUDA;
`engine_header_check` is the GPU-free plausibility check of an engine's header that `caitdeploy inspect` runs.
`runtime.trt_runner.TrtRunner` wraps `TrtEngine` as a Polygraphy runner.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from caitdeploy.core.errors import CaitError
from caitdeploy.core.paths import MAX_ENGINE_BYTES, read_bounded, regular_file_size
from caitdeploy.formats.sidecar import FLAVOURS, check_engine_file, read_sidecar

INSTALL_HINT = "pip install tensorrt-rtx-cu13 (TensorRT-RTX) or pip install tensorrt (TensorRT >= 10)"
_CUDA_NOISE = ("cudaError 35", "CUDA driver version is insufficient", "catchCudaError", "Error reading CUDA GPU")


def import_trt(flavour: str | None = None):
    """The TensorRT Python module: `tensorrt` (>= 10) if importable, else `tensorrt_rtx`.

    flavour: None/"auto" (that order), "tensorrt" or "tensorrt_rtx" (only that one).
    """
    import importlib

    order: tuple[str, ...]
    if flavour in (None, "auto"):
        order = FLAVOURS
    elif flavour in FLAVOURS:
        order = (flavour,)
    else:
        raise CaitError(f"unknown TensorRT module {flavour!r}: choose auto, {', '.join(FLAVOURS)}")
    problems = []
    for name in order:
        try:
            mod = importlib.import_module(name)
        except ImportError as e:
            problems.append(f"{name}: {str(e).splitlines()[0] if str(e) else 'not installed'}")
            continue
        major = int(str(getattr(mod, "__version__", "0")).split(".")[0] or 0)
        if name == "tensorrt" and major < 10:
            problems.append(f"tensorrt {mod.__version__} is older than 10")
            continue
        return mod
    raise CaitError(f"no usable TensorRT Python module ({'; '.join(problems)}): {INSTALL_HINT}")


def flavour_of(trt) -> str:
    return "tensorrt_rtx" if trt.__name__.split(".")[0] == "tensorrt_rtx" else "tensorrt"


def _clean(msg: str) -> str:
    lines = [ln.strip() for ln in str(msg).splitlines() if ln.strip() and not any(n in ln for n in _CUDA_NOISE)]
    return "; ".join(lines)


def _make_logger(trt):
    ilogger: Any = trt.ILogger  # the module is imported at run time (tensorrt or tensorrt_rtx)

    class _Log(ilogger):
        """Collects messages instead of printing them; errors end up in CaitError text."""

        def __init__(self):
            trt.ILogger.__init__(self)
            self.messages: list[tuple[Any, str]] = []

        def log(self, severity, msg):
            self.messages.append((severity, msg))

        def errors(self) -> list[str]:
            bad = (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR)
            return [c for s, m in self.messages if s in bad and (c := _clean(m))]

    return _Log()


def engine_header_check(engine_bytes: bytes, flavour: str | None = None) -> dict[str, Any]:
    """GPU-free plausibility check of a TensorRT-RTX engine header (`Runtime.get_engine_validity`).

    Returns {"supported", "validity", "diagnostics": [names], "malformed", "version_mismatch"}. Without a GPU
    the runtime cannot read the device properties and reports INVALID with no diagnostic bit for a good engine;
    a corrupt or foreign file is flagged MALFORMED_ENGINE / VERSION_MISMATCH.
    """
    trt = import_trt(flavour)
    logger = _make_logger(trt)
    runtime = trt.Runtime(logger)
    if not hasattr(runtime, "get_engine_validity"):
        return {"supported": False}
    size = int(getattr(runtime, "engine_header_size", 0) or 0)
    if len(engine_bytes) < max(size, 1):
        return {
            "supported": True,
            "validity": "INVALID",
            "diagnostics": ["TRUNCATED"],
            "malformed": True,
            "version_mismatch": False,
        }
    validity, diag = runtime.get_engine_validity(engine_bytes[:size] if size else engine_bytes)
    names = [n for n, v in trt.EngineInvalidityDiagnostics.__members__.items() if int(diag) & int(v)]
    return {
        "supported": True,
        "validity": validity.name,
        "diagnostics": names,
        "malformed": "MALFORMED_ENGINE" in names,
        "version_mismatch": "VERSION_MISMATCH" in names,
    }


class TrtEngine:
    """Deserialize an engine and run it on CUDA with named tensors and `execute_async_v3`.

    engine = TrtEngine("m.plan"); logits = engine(images)  # images: torch tensor [B, C, H, W]
    Buffers are torch CUDA tensors; the batch must lie inside the engine's optimization profile.
    """

    def __init__(self, engine_path: str | os.PathLike, flavour: str | None = None, device: int = 0):
        import torch

        self.path = Path(engine_path)
        if not self.path.is_file():
            raise CaitError(f"{self.path}: no such file")
        side = read_sidecar(self.path)
        from caitdeploy.core.budgets import check_memory

        size = regular_file_size(self.path, MAX_ENGINE_BYTES, "engine")
        check_memory(2 * size, f"loading the engine {self.path} ({size} bytes, read and deserialized)")
        if flavour is None and side:
            flavour = side.get("flavour")
        self.trt = trt = import_trt(flavour)
        if not torch.cuda.is_available():
            raise CaitError(
                f"{self.path}: running a TensorRT engine needs a CUDA GPU and none is available "
                "(torch.cuda.is_available() is False)"
            )
        self.device = torch.device("cuda", device)
        torch.cuda.set_device(self.device)
        self.logger = _make_logger(trt)
        self.runtime = trt.Runtime(self.logger)
        plan = read_bounded(self.path, MAX_ENGINE_BYTES, "engine")
        check_engine_file(self.path, side, plan)
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        del plan
        if self.engine is None:
            errs = self.logger.errors()
            raise CaitError(
                f"{self.path}: {flavour_of(trt)} {trt.__version__} cannot deserialize the engine: "
                f"{errs[-1] if errs else 'no error message'}"
            )
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.stream = torch.cuda.Stream(self.device)

    def _torch_dtype(self, name: str):
        import torch

        dt = self.engine.get_tensor_dtype(name)
        table = {
            self.trt.DataType.FLOAT: torch.float32,
            self.trt.DataType.HALF: torch.float16,
            self.trt.DataType.INT32: torch.int32,
            self.trt.DataType.INT64: torch.int64,
            self.trt.DataType.BOOL: torch.bool,
        }
        if hasattr(self.trt.DataType, "BF16"):
            table[self.trt.DataType.BF16] = torch.bfloat16
        if dt not in table:
            raise CaitError(f"{self.path}: tensor {name!r} has unsupported dtype {dt}")
        return table[dt]

    def __call__(self, images):
        import torch

        if len(self.inputs) != 1:
            raise CaitError(f"{self.path}: expected one input tensor, engine has {self.inputs}")
        name = self.inputs[0]
        x = images.to(self.device, self._torch_dtype(name)).contiguous()
        if not self.context.set_input_shape(name, tuple(x.shape)):
            raise CaitError(f"{self.path}: input shape {tuple(x.shape)} is outside the engine's profile")
        self.context.set_tensor_address(name, x.data_ptr())
        outs = {}
        for out in self.outputs:
            shape = tuple(self.context.get_tensor_shape(out))
            outs[out] = torch.empty(shape, dtype=self._torch_dtype(out), device=self.device)
            self.context.set_tensor_address(out, outs[out].data_ptr())
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise CaitError(f"{self.path}: execute_async_v3 failed: {'; '.join(self.logger.errors()[-1:])}")
        self.stream.synchronize()
        return outs[self.outputs[0]] if len(outs) == 1 else outs
