"""One runner per runtime, in the manner of (and built on) NVIDIA Polygraphy's runners.

Every runner is a `polygraphy.backend.base.BaseRunner`: a context manager with activate / infer / deactivate,
whose input metadata (names, dtypes, shapes) is read from the model, session or engine, never assumed:

    TorchRunner   PyTorch eager or torch.compile (optionally CUDA graphs); ours (Polygraphy has none)
    OrtRunner     ONNX Runtime with IO binding of torch buffers in the dtypes the session declares, on CPU
                  and CUDA; ours, because Polygraphy's OnnxrtRunner feeds numpy through `session.run`
                  (no device buffers). Export verification uses Polygraphy's own OnnxrtRunner + Comparator.
    TrtRunner     a TensorRT or TensorRT-RTX engine; ours, because Polygraphy's TensorRT runner imports the
                  `tensorrt` module and cannot load `tensorrt_rtx`.
    TritonRunner  a model on a live Triton server, through the load-test client (`runtime.triton_runner`,
                  imported from there: tritonclient is optional)

Export verification (`export.onnx.verify_onnx`), `bench` and `eval` use these runners.
`runtime.tensorrt` holds every TensorRT import (`import_trt`, used by `export.tensorrt` to build), the engine
class underneath `TrtRunner` and the engine header check.
"""

from caitdeploy.runtime.base import (
    ORT_TYPES,
    RuntimeSpec,
    choose_providers,
    cuda_graphs_ok,
    quiet_polygraphy,
    torch_dtype_of_ort,
)
from caitdeploy.runtime.ort_runner import OrtRunner
from caitdeploy.runtime.torch_runner import TorchRunner
from caitdeploy.runtime.trt_runner import TrtRunner, engine_build_key, reusable_engine

__all__ = [
    "ORT_TYPES",
    "OrtRunner",
    "RuntimeSpec",
    "TorchRunner",
    "TrtRunner",
    "choose_providers",
    "cuda_graphs_ok",
    "engine_build_key",
    "quiet_polygraphy",
    "reusable_engine",
    "torch_dtype_of_ort",
]
