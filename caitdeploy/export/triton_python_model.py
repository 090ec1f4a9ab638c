"""Triton Python-backend model that runs an exported ONNX file with ONNX Runtime (the source of `model.py`).

`caitdeploy export --triton-repo DIR --triton-backend python` copies this file as DIR/<name>/1/model.py next to
model.onnx, for Triton servers without the onnxruntime backend (e.g. the one bundled in nvidia-pytriton).
Every `execute` call concatenates the batches of all its requests (Triton's dynamic batcher hands several
requests to one call) into ONE ONNX Runtime run and splits the logits back per request.

It imports nothing of caitdeploy: the server's Python stub runs it with only numpy, onnxruntime and Triton's
`triton_python_backend_utils`.
"""
import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils  # provided by the Triton Python backend


class TritonPythonModel:
    def initialize(self, args):
        import onnxruntime as ort

        config = json.loads(args["model_config"])
        self.input_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]
        params = {k: v.get("string_value") for k, v in config.get("parameters", {}).items()}
        here = os.path.dirname(os.path.abspath(__file__))
        so = ort.SessionOptions()
        so.log_severity_level = 3
        threads = int(params.get("intra_op_threads") or 0)
        if threads > 0:
            so.intra_op_num_threads = threads
        self.session = ort.InferenceSession(os.path.join(here, "model.onnx"), so, providers=["CPUExecutionProvider"])
        declared = {i.name: i.type for i in self.session.get_inputs()}
        # feed the dtype the ONNX graph declares (fp32 for every caitdeploy export, fp16 graphs included)
        self.input_dtype = np.float16 if declared.get(self.input_name) == "tensor(float16)" else np.float32
        self.executions = 0

    def execute(self, requests):
        arrays = [pb_utils.get_input_tensor_by_name(r, self.input_name).as_numpy() for r in requests]
        sizes = [a.shape[0] for a in arrays]
        batch = np.concatenate(arrays, axis=0).astype(self.input_dtype, copy=False)
        logits = self.session.run([self.output_name], {self.input_name: batch})[0].astype(np.float32, copy=False)
        self.executions += 1
        responses, start = [], 0
        for n in sizes:
            out = pb_utils.Tensor(self.output_name, logits[start:start + n])
            responses.append(pb_utils.InferenceResponse(output_tensors=[out]))
            start += n
        return responses

    def finalize(self):
        self.session = None
