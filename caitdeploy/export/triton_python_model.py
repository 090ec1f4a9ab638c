"""Triton Python-backend model that runs an exported model on the CPU (the source of `model.py`).

`caitdeploy export --triton-repo DIR --triton-backend python` copies this file as DIR/<name>/1/model.py next to
model.onnx, for Triton servers without the onnxruntime backend (e.g. the one bundled in nvidia-pytriton), and
config.pbtxt says `runtime` onnxruntime; `--triton-backend python-openvino` says `runtime` openvino and puts the
OpenVINO IR (model.xml + model.bin, with `--openvino`) or model.onnx beside it: OpenVINO's CPU plugin then runs it,
at f32 inference precision (`inference_precision` bf16 in config.pbtxt asks for bf16). `intra_op_threads` sets
either runtime's thread count. Every `execute` call concatenates the batches of all its requests (Triton's dynamic
batcher hands several requests to one call) into ONE run and splits the logits back per request.

Each request is checked on its own first, against config.pbtxt (rank, dims, 1..max_batch_size rows, dtype,
byte count): Triton's core checks these too, but not every lie (a gRPC or HTTP request declaring 2^40 rows
passes as a batch of 0 and reaches the model without its batch dimension). A bad request gets its own error
response; the good requests batched with it are answered as usual. Should the batched run itself fail, each
request is run alone, so one poisoned request still fails alone. The input arrives as [n, 1, *dims] when
config.pbtxt reshapes it so (triton_repo does, for the reason given there); the 1 is dropped here.

It imports nothing of caitdeploy: the server's Python stub runs it with only numpy, onnxruntime (or openvino)
and Triton's `triton_python_backend_utils`.
"""

import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils  # provided by the Triton Python backend

NUMPY_DTYPES = {"TYPE_FP32": np.float32, "TYPE_FP16": np.float16}
RUNTIMES = ("onnxruntime", "openvino")


class BadRequest(ValueError):
    """A request that does not match the model's config: answered with an error, alone."""


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        inp = config["input"][0]
        self.input_name = inp["name"]
        self.output_name = config["output"][0]["name"]
        self.dims = tuple(int(d) for d in inp["dims"])
        # what the backend hands us: triton_repo writes reshape [1, *dims] (see there why)
        self.seen_dims = tuple(int(d) for d in (inp.get("reshape") or {}).get("shape") or self.dims)
        if int(np.prod(self.seen_dims)) != int(np.prod(self.dims)):
            raise ValueError(
                f"input {self.input_name!r}: reshape {list(self.seen_dims)} does not hold dims {list(self.dims)}"
            )
        self.max_batch = int(config.get("max_batch_size", 0) or 0)
        self.wire_dtype = np.dtype(NUMPY_DTYPES.get(inp.get("data_type"), np.float32))
        params = {k: v.get("string_value") for k, v in config.get("parameters", {}).items()}
        here = os.path.dirname(os.path.abspath(__file__))
        threads = int(params.get("intra_op_threads") or 0)
        runtime = params.get("runtime") or "onnxruntime"
        if runtime not in RUNTIMES:
            raise ValueError(f"config.pbtxt parameter runtime {runtime!r}: choose {' or '.join(RUNTIMES)}")
        if runtime == "openvino":
            self._open_openvino(here, threads, params.get("inference_precision") or "f32")
        else:
            self._open_onnxruntime(here, threads)
        self.executions = 0

    def _open_onnxruntime(self, here, threads):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.log_severity_level = 3
        if threads > 0:
            so.intra_op_num_threads = threads
        self.session = ort.InferenceSession(os.path.join(here, "model.onnx"), so, providers=["CPUExecutionProvider"])
        declared = {i.name: i.type for i in self.session.get_inputs()}
        # feed the dtype the ONNX graph declares (fp32 for every caitdeploy export, fp16 graphs included)
        self.input_dtype = np.float16 if declared.get(self.input_name) == "tensor(float16)" else np.float32
        self._infer = lambda batch: self.session.run([self.output_name], {self.input_name: batch})[0]

    def _open_openvino(self, here, threads, precision):
        try:
            import openvino as ov
        except ImportError as e:
            raise RuntimeError(f"runtime openvino: the server's Python cannot import openvino ({e})") from None
        if precision not in ("f32", "bf16"):
            raise ValueError(f"config.pbtxt parameter inference_precision {precision!r}: choose f32 or bf16")
        path = os.path.join(here, "model.xml")
        if not os.path.isfile(path):
            path = os.path.join(here, "model.onnx")
        core = ov.Core()
        config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"}
        if threads > 0:
            config["INFERENCE_NUM_THREADS"] = threads
        compiled = core.compile_model(core.read_model(path), "CPU", config)
        inputs = [p for p in compiled.inputs if self.input_name in p.get_names()]
        outputs = [p for p in compiled.outputs if self.output_name in p.get_names()]
        if len(compiled.inputs) != 1 or not inputs or not outputs:
            raise ValueError(
                f"{os.path.basename(path)}: expected one input {self.input_name!r} and an output "
                f"{self.output_name!r} (config.pbtxt)"
            )
        self.session = compiled
        self.request = compiled.create_infer_request()
        self.input_dtype = np.float32  # OpenVINO takes what the graph declares: fp32 for every caitdeploy export
        out = outputs[0]

        def infer(batch):
            # one request per model instance: Triton calls execute() of an instance one call at a time
            return np.array(self.request.infer({0: batch})[out], copy=True)

        self._infer = infer

    def _checked(self, request):
        """The request's input as an array of shape (n, *dims), n in 1..max_batch_size, or BadRequest."""
        tensor = pb_utils.get_input_tensor_by_name(request, self.input_name)
        if tensor is None:
            raise BadRequest(f"input {self.input_name!r} is missing")
        try:
            a = tensor.as_numpy()
        except Exception as e:  # noqa: BLE001 - a buffer that does not match its declared shape
            raise BadRequest(f"input {self.input_name!r}: unreadable tensor ({type(e).__name__})") from None
        if self.max_batch == 0:  # no batch dimension: dims are the whole shape
            if tuple(a.shape) != self.seen_dims:
                raise BadRequest(
                    f"input {self.input_name!r} has shape {self._shown(a.shape)}, expected {list(self.dims)}"
                )
        else:
            want = f"expected [n, {', '.join(map(str, self.dims))}] with n in 1..{self.max_batch}"
            if tuple(a.shape) == self.seen_dims:
                raise BadRequest(
                    f"input {self.input_name!r} reached the model without its batch dimension (Triton "
                    f"reads a batch of a multiple of 2^32 rows as 0): {want}"
                )
            if (
                a.ndim != len(self.seen_dims) + 1
                or tuple(a.shape[1:]) != self.seen_dims
                or not 1 <= a.shape[0] <= self.max_batch
            ):
                raise BadRequest(f"input {self.input_name!r} has shape {self._shown(a.shape)}, {want}")
        if a.dtype != self.wire_dtype:
            raise BadRequest(f"input {self.input_name!r} has dtype {a.dtype}, expected {self.wire_dtype}")
        expected_bytes = int(np.prod(a.shape, dtype=np.int64)) * self.wire_dtype.itemsize
        if a.nbytes != expected_bytes:
            raise BadRequest(f"input {self.input_name!r} has {a.nbytes} bytes, expected {expected_bytes}")
        return a.reshape(self.dims if self.max_batch == 0 else (a.shape[0],) + self.dims)

    def _shown(self, shape):
        """A shape as the client sent it (without the reshape's 1), for messages."""
        shape = list(shape)
        if self.seen_dims != self.dims and len(shape) == len(self.seen_dims) + 1 and shape[1] == 1:
            del shape[1]
        return shape

    def _respond(self, logits):
        out = pb_utils.Tensor(self.output_name, np.ascontiguousarray(logits, dtype=np.float32))
        return pb_utils.InferenceResponse(output_tensors=[out])

    @staticmethod
    def _error(message, invalid=True):
        code = getattr(pb_utils.TritonError, "INVALID_ARG" if invalid else "INTERNAL", None)
        err = pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)
        return pb_utils.InferenceResponse(output_tensors=[], error=err)

    def _run(self, arrays):
        batch = np.concatenate(arrays, axis=0).astype(self.input_dtype, copy=False)
        self.executions += 1
        return self._infer(batch)

    def execute(self, requests):
        responses = [None] * len(requests)
        good, arrays = [], []
        for i, r in enumerate(requests):
            try:
                arrays.append(self._checked(r))
                good.append(i)
            except BadRequest as e:
                responses[i] = self._error(str(e))
        logits = self._batched(arrays) if arrays and self.max_batch > 0 else None
        if logits is not None:
            start = 0
            for i, a in zip(good, arrays):
                responses[i] = self._respond(logits[start : start + a.shape[0]])
                start += a.shape[0]
            return responses
        for i, a in zip(good, arrays):  # one by one: a failed batch, or a model without a batch dimension
            try:
                responses[i] = self._respond(self._run([a]))
            except Exception as e:  # noqa: BLE001 - this request's own failure, its own response
                responses[i] = self._error(f"{type(e).__name__}: {str(e)[:300]}", invalid=False)
        return responses

    def _batched(self, arrays):
        """All good requests in one run; None if that fails (one poisoned request must not fail the rest)."""
        try:
            return self._run(arrays)
        except Exception:  # noqa: BLE001 - the caller runs each request alone
            return None

    def finalize(self):
        self.session = self.request = None
