"""Export: PyTorch -> ONNX (`onnx`), ONNX -> TensorRT / TensorRT-RTX engines (`tensorrt`), Triton model
repositories (`triton_repo`). Heavy imports (onnx, onnxruntime, tensorrt) happen inside the functions."""

from __future__ import annotations

from caitdeploy.export.onnx import DEFAULT_OPSET, FORBIDDEN_OPS, SUPPORTED_OPSETS, export_onnx
from caitdeploy.export.tensorrt import build_engine
from caitdeploy.export.triton_repo import write_triton_repo

__all__ = [
    "DEFAULT_OPSET",
    "FORBIDDEN_OPS",
    "SUPPORTED_OPSETS",
    "build_engine",
    "export_onnx",
    "write_triton_repo",
]
