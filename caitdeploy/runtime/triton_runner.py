"""A model on a live Triton Inference Server as a Polygraphy runner, through the load-test client.

The input name, its dims, its Triton datatype and the first output come from the server's model metadata
(`serve.loadtest.model_input`); a feed larger than the model's `max_batch_size` is sent in slices of that size.
Connection and inference errors are one-line CaitErrors naming the URL and the model."""

from __future__ import annotations

import time
from collections import OrderedDict

import numpy as np
from polygraphy.backend.base import BaseRunner
from polygraphy.common import TensorMetadata
from polygraphy.datatype import DataType

from caitdeploy.core.errors import CaitError

_NP = {"FP32": np.float32, "FP16": np.float16, "FP64": np.float64, "BF16": None}


class TritonRunner(BaseRunner):
    def __init__(self, url: str, model: str, protocol: str = "http", timeout_s: float = 120.0, name: str | None = None):
        super().__init__(name=name, prefix="triton-runner")
        self.url, self.model, self.protocol, self.timeout_s = url, model, protocol, timeout_s

    def activate_impl(self):
        from caitdeploy.serve.loadtest import _client_module, check_url, model_input

        self.url = check_url(self.url, "--url")
        self.input_name, self.dims, self.datatype, self.output_name = model_input(self.url, self.model, self.protocol)
        if _NP.get(self.datatype) is None:
            raise CaitError(f"{self.url}: model {self.model!r} takes {self.datatype}; eval sends FP32 or FP16")
        self._mod = _client_module(self.protocol)
        kw = (
            {"network_timeout": self.timeout_s, "connection_timeout": self.timeout_s} if self.protocol == "http" else {}
        )
        self.client = self._mod.InferenceServerClient(self.url, **kw)
        try:
            cfg = self.client.get_model_config(self.model)
            if self.protocol == "grpc":
                from google.protobuf.json_format import MessageToDict

                cfg = MessageToDict(cfg, preserving_proto_field_name=True).get("config", {})
            self.max_batch = int(cfg.get("max_batch_size", 0) or 0)
        except Exception as e:  # noqa: BLE001 - one line
            raise CaitError(f"{self.url}: cannot read model {self.model!r}'s config ({type(e).__name__})") from None

    def get_input_metadata_impl(self):
        meta = TensorMetadata()
        shape = ("batch", *self.dims) if self.max_batch > 0 else tuple(self.dims)
        meta.add(self.input_name, DataType.from_dtype(np.dtype(_NP[self.datatype]), "numpy"), shape)
        return meta

    def infer_impl(self, feed_dict):
        x = np.asarray(feed_dict[self.input_name], dtype=_NP[self.datatype])
        if list(x.shape[1:]) != list(self.dims):
            raise CaitError(
                f"{self.url}: model {self.model!r} takes [{', '.join(map(str, self.dims))}] per image, "
                f"the images are [{', '.join(map(str, x.shape[1:]))}]"
            )
        step = self.max_batch if self.max_batch > 0 else 1
        outs = []
        start = time.perf_counter()
        for i in range(0, len(x), step):
            chunk = np.ascontiguousarray(x[i : i + step] if self.max_batch > 0 else x[i])
            inp = self._mod.InferInput(self.input_name, list(chunk.shape), self.datatype)
            inp.set_data_from_numpy(chunk)
            try:
                res = self.client.infer(self.model, [inp], outputs=[self._mod.InferRequestedOutput(self.output_name)])
            except Exception as e:  # noqa: BLE001 - tritonclient raises its own types: one line
                first = (str(e).splitlines() or [""])[0][:200]
                raise CaitError(
                    f"{self.url}: model {self.model!r}: inference failed ({type(e).__name__}: {first})"
                ) from None
            y = np.asarray(res.as_numpy(self.output_name), dtype=np.float32)
            outs.append(y if self.max_batch > 0 else y[None])
        self.inference_time = time.perf_counter() - start
        return OrderedDict([(self.output_name, np.concatenate(outs))])

    def deactivate_impl(self):
        from caitdeploy.serve.loadtest import _close

        _close(self.client)
        del self.client, self._mod
