"""ONNX Runtime with IO binding, in the dtypes the session declares, as a Polygraphy runner."""

from __future__ import annotations

import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from polygraphy.backend.base import BaseRunner
from polygraphy.common import TensorMetadata
from polygraphy.datatype import DataType

from caitdeploy.core.errors import CaitError
from caitdeploy.runtime.base import RuntimeSpec, choose_providers, torch_dtype_of_ort


class OrtRunner(BaseRunner):
    """Run an ONNX model (path or serialized bytes) with ONNX Runtime.

    The providers come from `choose_providers` (TensorRT EP > CUDA EP > CPU EP on CUDA). Inputs and outputs
    are bound as torch buffers on the session's device, each in the dtype the SESSION declares for it (an
    fp16-I/O graph gets fp16 buffers, an fp32-I/O graph fp32 ones, whatever the caller feeds): a feed is
    converted once into its bound buffer, outputs are allocated from the shapes ONNX Runtime reports.
    `bind(feed)` binds once for repeated `run_bound()` calls (benchmarks); `infer` binds every call.
    """

    def __init__(
        self,
        model: str | Path | bytes,
        spec: RuntimeSpec = RuntimeSpec(),
        *,
        fp16_hint: bool = False,
        batch_hint: int = 1,
        trt_cache_dir: str | None = None,
        name: str | None = None,
    ):
        super().__init__(name=name, prefix="ort-runner")
        self._model, self.spec = model, spec
        self._fp16_hint, self._batch_hint, self._trt_cache_dir = fp16_hint, batch_hint, trt_cache_dir

    def activate_impl(self):
        import onnxruntime as ort

        ort.set_default_logger_severity(3)
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        if self.spec.threads:
            so.intra_op_num_threads = self.spec.threads
        providers = choose_providers(
            ort.get_available_providers(),
            self.spec.device,
            fp16=self._fp16_hint,
            batch=self._batch_hint,
            trt_cache_dir=self._trt_cache_dir,
        )
        src = self._model if isinstance(self._model, bytes) else str(self._model)
        last = None
        while providers:
            try:
                self.sess = ort.InferenceSession(src, so, providers=providers)
                break
            except Exception as e:  # noqa: BLE001 - e.g. the TensorRT EP's libraries missing: try the next EP
                last, providers = e, providers[1:]
        else:
            raise CaitError(f"onnxruntime cannot load the model: {str(last).splitlines()[0] if last else '?'}")
        self.provider = self.sess.get_providers()[0]
        if self.spec.device == "cuda" and self.provider == "CPUExecutionProvider":
            raise CaitError("onnxruntime fell back to the CPU execution provider on a GPU machine")
        self.inputs = {i.name: torch_dtype_of_ort(i.type, f"input {i.name!r}") for i in self.sess.get_inputs()}
        self.outputs = {o.name: torch_dtype_of_ort(o.type, f"output {o.name!r}") for o in self.sess.get_outputs()}
        self._bound: tuple[Any, dict[str, torch.Tensor]] | None = None  # (IOBinding, tensors it holds)

    def get_input_metadata_impl(self):
        meta = TensorMetadata()
        for i in self.sess.get_inputs():
            meta.add(i.name, DataType.from_dtype(i.type, "onnxruntime"), i.shape)
        return meta

    @property
    def _device(self) -> tuple[str, int]:
        return ("cuda", 0) if self.spec.device == "cuda" else ("cpu", 0)

    def bind(self, feed_dict) -> dict[str, torch.Tensor]:
        """Bind inputs (converted to the declared dtypes, on the session's device) and outputs; returns the
        bound input buffers by name."""
        dev, idx = self._device
        binding = self.sess.io_binding()
        keep: dict[str, torch.Tensor] = {}
        dims: dict[str, int] = {}  # symbolic dim name -> size, from the inputs
        for i in self.sess.get_inputs():
            want = self.inputs[i.name]
            t = torch.as_tensor(feed_dict[i.name]).to(device=dev, dtype=want).contiguous()
            keep[i.name] = t
            binding.bind_input(i.name, dev, idx, _np(want), tuple(t.shape), t.data_ptr())
            dims.update({d: n for d, n in zip(i.shape, t.shape) if isinstance(d, str)})
        for o in self.sess.get_outputs():
            shape = [d if isinstance(d, int) else dims.get(d) for d in o.shape]
            sizes = [d for d in shape if isinstance(d, int) and d >= 0]
            if len(sizes) == len(shape):  # every size known: preallocate in the declared dtype
                y = torch.empty(sizes, dtype=self.outputs[o.name], device=dev)
                keep[o.name] = y
                binding.bind_output(o.name, dev, idx, _np(y.dtype), tuple(y.shape), y.data_ptr())
            else:
                binding.bind_output(o.name, dev, idx)  # a data-dependent shape: ONNX Runtime allocates
        self._bound = (binding, keep)
        return keep

    def run_bound(self):
        assert self._bound is not None, "bind() first"
        binding, _ = self._bound
        self.sess.run_with_iobinding(binding)
        return binding

    def infer_impl(self, feed_dict):
        numpy_in = not any(isinstance(v, torch.Tensor) for v in feed_dict.values())
        self.bind(feed_dict)
        start = time.perf_counter()
        binding = self.run_bound()
        self.inference_time = time.perf_counter() - start
        assert self._bound is not None  # bound just above
        _, keep = self._bound
        out = OrderedDict()
        for name, val in zip(self.outputs, binding.get_outputs()):
            t = keep[name] if name in keep else torch.from_numpy(val.numpy())
            out[name] = t.cpu().numpy() if numpy_in else t
        return out

    def deactivate_impl(self):
        del self.sess, self.provider, self.inputs, self.outputs, self._bound


def _np(dtype: torch.dtype):
    import numpy as np

    table = {
        torch.float32: np.float32,
        torch.float16: np.float16,
        torch.float64: np.float64,
        torch.int64: np.int64,
        torch.int32: np.int32,
        torch.int8: np.int8,
        torch.uint8: np.uint8,
        torch.bool: np.bool_,
    }
    if dtype not in table:
        raise CaitError(f"no numpy type for {dtype}")
    return table[dtype]
