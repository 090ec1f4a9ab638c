"""Export: PyTorch -> ONNX (`onnx`), ONNX -> TensorRT / TensorRT-RTX engines (`tensorrt`), Triton model
repositories (`triton_repo`). Heavy imports (onnx, onnxruntime, tensorrt) happen inside the functions."""
from __future__ import annotations

from caitdeploy.export.onnx import DEFAULT_OPSET, FORBIDDEN_OPS, SUPPORTED_OPSETS, export_onnx, op_census
from caitdeploy.export.tensorrt import TrtRunner, build_engine, import_trt
from caitdeploy.export.triton_repo import write_triton_repo

__all__ = [
    "DEFAULT_OPSET",
    "FORBIDDEN_OPS",
    "SUPPORTED_OPSETS",
    "TrtRunner",
    "build_engine",
    "export_onnx",
    "import_trt",
    "op_census",
    "write_triton_repo",
]
