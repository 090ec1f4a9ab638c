"""PyTorch eager and torch.compile as a Polygraphy runner."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from polygraphy.backend.base import BaseRunner
from polygraphy.common import TensorMetadata
from polygraphy.datatype import DataType

from caitdeploy.runtime.base import RuntimeSpec, cuda_graphs_ok


class TorchRunner(BaseRunner):
    """Run an `nn.Module` (images -> logits) eagerly or through torch.compile.

    Input metadata: name `input_name`, the parameters' dtype, shape [batch, C, H, W] from the model's config
    (a CaitViT) or `input_shape`. Feeds may be numpy arrays (outputs come back as numpy, as Polygraphy's
    Comparator expects) or torch tensors (outputs stay torch tensors on the runner's device). `autocast`
    (e.g. torch.bfloat16) runs the model under torch.autocast; numpy outputs come back as float32.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        spec: RuntimeSpec = RuntimeSpec(),
        *,
        dtype: torch.dtype | None = None,
        compile: bool = False,
        input_shape: tuple[int, ...] | None = None,
        input_name: str = "images",
        output_name: str = "logits",
        name: str | None = None,
        output_names: list[str] | None = None,
        autocast: torch.dtype | None = None,
    ):
        super().__init__(name=name, prefix="torch-runner")
        self._model, self.spec, self._dtype, self._compile = model, spec, dtype, compile
        self.autocast = autocast  # e.g. torch.bfloat16: run under torch.autocast (weights stay in `dtype`)
        cfg = getattr(model, "config", None)
        if input_shape is None and cfg is not None:
            input_shape = cfg.input_shape
        if input_shape is None:
            raise ValueError("TorchRunner needs input_shape=(C, H, W) for a model without a config")
        self.input_shape, self.input_name, self.output_name = tuple(input_shape), input_name, output_name
        # a model returning a tuple (feature maps) names its outputs in order
        self.output_names = list(output_names or [output_name])
        self.cuda_graphs = cuda_graphs_ok(spec.device, "compile" if compile else "torch", spec.compile_mode)

    def activate_impl(self):
        p = next(iter(self._model.parameters()), None)  # a module may hold no parameters (a checkpoint's forward)
        dtype = self._dtype or (p.dtype if p is not None else torch.float32)
        model = self._model
        if p is not None and (p.dtype != dtype or p.device.type != self.spec.device):
            import copy

            model = copy.deepcopy(model)  # never convert the caller's model in place
        self.model: Callable[..., Any] = model.to(device=self.spec.device, dtype=dtype).eval()  # or compiled
        self.dtype = dtype
        if self._compile:
            mode = self.spec.compile_mode or ("max-autotune-no-cudagraphs" if self.spec.device == "cuda" else None)
            self.model = torch.compile(self.model, mode=mode, dynamic=False)

    def get_input_metadata_impl(self):
        meta = TensorMetadata()
        meta.add(self.input_name, DataType.from_dtype(self.dtype, "torch"), ("batch", *self.input_shape))
        return meta

    def infer_impl(self, feed_dict):
        x = feed_dict[self.input_name]
        numpy_in = not isinstance(x, torch.Tensor)
        xt = torch.as_tensor(x).to(device=self.spec.device, dtype=self.dtype)
        start = time.perf_counter()
        with (
            torch.inference_mode(),
            torch.autocast(self.spec.device, dtype=self.autocast or torch.float32, enabled=self.autocast is not None),
        ):
            y = self.model(xt)
        if self.spec.device == "cuda":
            torch.cuda.synchronize()
        self.inference_time = time.perf_counter() - start
        ys = list(y) if isinstance(y, (tuple, list)) else [y]
        if len(ys) != len(self.output_names):
            raise ValueError(f"the model returned {len(ys)} outputs for names {self.output_names}")
        return OrderedDict(
            (n, t.float().cpu().contiguous().numpy() if numpy_in else t) for n, t in zip(self.output_names, ys)
        )

    def deactivate_impl(self):
        del self.model, self.dtype
