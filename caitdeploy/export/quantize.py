"""INT8 ONNX: static quantization in QDQ form (what TensorRT's explicit quantization consumes) and ONNX Runtime's
dynamic quantization, with calibration images from a folder or synthetic ones, and an int8-vs-fp32 check.

What is quantized: the MatMul/Gemm nodes that multiply by a weight (qkv, proj, fc1, fc2, the ATME merge Linears,
the head) and the Convs after the first (LV-ViT's conv stem; the patch embedding stays float); weights int8,
symmetric, per output channel. Static: activations uint8 (asymmetric, calibrated: MinMax, percentile or
entropy), as QuantizeLinear/DequantizeLinear pairs on the inputs of every quantized node; `attention=True` adds
the two attention MatMuls (q @ k^T, softmax @ v). Dynamic: int8 weights, activations quantized at run time
(DynamicQuantizeMatMul after ONNX Runtime's fusions). Left in float: LayerNormalization, Softmax, GELU (Erf),
residual Adds, the bias Adds. The report lists every op type left in float.

Tuning (measured on a 2-core AVX-512 VNNI CPU, CAIT-DeiT-Small, batch 16; benchmarks/int8_cpu.py): the outputs of
the MatMuls/Gemms/Convs are NOT quantized (`OpTypesToExcludeOutputQuantization`). Their consumers (bias Add,
GELU, softmax, the patch grid's Reshape) are float anyway, and an output Q/DQ pair makes ONNX Runtime pick
QLinearMatMul, whose uint8 result must then be dequantized again. Without it ONNX Runtime fuses DQ -> MatMul into
MatMulIntegerToFloat (int8 GEMM, float result): 2.0x fp32 instead of 1.7x. uint8 activations with int8 weights
is the VNNI (vpdpbusd) fast path; s8s8 and u8u8 measured slower. Per-tensor weights were no faster and less
accurate; rewriting MatMul + Add into Gemm (bias fused in QGemm) was no faster.

The patch embedding (the Conv that reads the image) stays float, and Conv outputs carry no Q/DQ pair. Measured
when OpenVINO (2026.4.1) came in, on examples/train_digits.py's CAIT model (360 test images, minmax calibration
on 256 training images): with the image quantized and the Conv's output Q/DQ pair, ONNX Runtime int8 static
scored 96.11% (fp32: 96.39%) and OpenVINO 94.72%, logit cosine min against fp32 0.996 and 0.488: OpenVINO runs
the Conv -> Q/DQ -> Reshape pattern wrongly (a random 12-block ViT at 64 px with only its Conv quantized: cosine
0.952 on OpenVINO, 0.99994 on ONNX Runtime). Without the output pair: 95.56% and 95.83%. With the patch embedding
in float: 96.39% on both, agreement with fp32 100%, cosine min 0.9975. It is about 1% of a DeiT's FLOPs.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from caitdeploy.core.errors import CaitError, OptionError
from caitdeploy.core.preprocess import image_array, preprocess_spec

QUANT_MODES = ("static", "dynamic")
# int8 weights use 7 bits ([-64, 64]) by default. ONNX Runtime multiplies uint8 activations by int8 weights on x86
# CPUs without VNNI (AVX2, AVX-512F/BW) with vpmaddubsw, which adds two u8 x s8 products into a SATURATING int16:
# 2 x 255 x 127 overflows, 2 x 255 x 64 = 32640 does not. Measured on CAIT-DeiT test models (tests/unit/export/test_int8.py;
# a Haswell CPU emulated by qemu-user, AVX2 + FMA, against this AVX-512 VNNI CPU, onnxruntime 1.32): 8-bit
# weights give int8-vs-fp32 cosine min 0.97 on AVX2 and 0.998 with VNNI; 7-bit weights give 0.994 on both. A
# quantized file runs wherever it is copied, so the default is the one that is right on every x86 CPU; 8 is for
# files that only meet VNNI CPUs, ARM or TensorRT.
WEIGHT_BITS = (7, 8)


def check_weight_bits(weight_bits: int) -> None:
    if weight_bits not in WEIGHT_BITS:
        raise OptionError("int8_weight_bits", f"{weight_bits!r}: choose 7 (no saturation on any x86 CPU) or 8")


CALIB_METHODS = ("minmax", "percentile", "entropy")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
MAX_CALIB_IMAGES = 4096


def check_int8_options(
    mode: str, method: str, calib_dir, synthetic: int | None, samples: int, weight_bits: int = 7
) -> None:
    check_weight_bits(weight_bits)
    if mode not in QUANT_MODES:
        raise OptionError("int8", f"{mode!r}: choose static or dynamic")
    if method not in CALIB_METHODS:
        raise OptionError("calib_method", f"{method!r}: choose one of {', '.join(CALIB_METHODS)}")
    if mode == "dynamic" and (calib_dir is not None or synthetic is not None):
        raise OptionError("calib", "is for --int8 static (dynamic quantization needs no calibration data)")
    if mode == "static" and (calib_dir is None) == (synthetic is None):
        raise OptionError("int8", "static needs calibration data: --calib DIR or --calib-synthetic N (one of them)")
    if synthetic is not None and not 1 <= synthetic <= MAX_CALIB_IMAGES:
        raise OptionError("calib_synthetic", f"{synthetic}: must be in 1..{MAX_CALIB_IMAGES}")
    if not 1 <= samples <= MAX_CALIB_IMAGES:
        raise OptionError("calib_samples", f"{samples}: must be in 1..{MAX_CALIB_IMAGES}")
    if calib_dir is not None and not Path(calib_dir).is_dir():
        raise OptionError("calib", f"{calib_dir}: no such folder")


def calibration_images(
    folder: str | os.PathLike,
    input_shape: tuple[int, int, int],
    samples: int = 64,
    flag: str = "--calib",
    data_config: dict[str, Any] | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """[N, C, H, W] float32 images from a folder (PNG/JPEG, searched recursively, sorted by path; the first
    `samples`), preprocessed as `preprocess_spec` says. One-line CaitError for an empty folder, a file that is
    not an image, or the wrong channel count."""
    root = Path(folder)
    if not root.is_dir():
        raise CaitError(f"{flag} {root}: no such folder")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        others = sum(1 for p in root.rglob("*") if p.is_file())
        raise CaitError(
            f"{flag} {root}: no PNG or JPEG images"
            + (f" ({others} other files)" if others else " (the folder is empty)")
        )
    spec = preprocess_spec(input_shape, data_config)
    arrs = [image_array(p, spec, input_shape[0], flag) for p in files[:samples]]
    return np.stack(arrs).astype(np.float32), {
        "source": str(root),
        "images": len(arrs),
        "found": len(files),
        "preprocess": spec,
    }


def synthetic_images(
    n: int, input_shape: tuple[int, int, int], seed: int = 0, data_config: dict[str, Any] | None = None
) -> tuple[np.ndarray, dict]:
    """n images of uniform random pixels in [0, 1], normalised like real ones (`preprocess_spec`)."""
    spec = preprocess_spec(input_shape, data_config)
    rng = np.random.default_rng(seed)
    x = rng.random((n, *input_shape), dtype=np.float32)
    x = (x - np.asarray(spec["mean"], np.float32)[:, None, None]) / np.asarray(spec["std"], np.float32)[:, None, None]
    return x.astype(np.float32), {
        "source": f"synthetic ({n} uniform-noise images, seed {seed})",
        "images": n,
        "preprocess": spec,
    }


def _constants(model) -> set[str]:
    """Names of the graph's constant tensors: initializers and Constant node outputs."""
    return {i.name for i in model.graph.initializer} | {
        o for n in model.graph.node if n.op_type == "Constant" for o in n.output
    }


def _weight_nodes(model) -> list[str]:
    """Names of MatMul/Gemm nodes with a weight (constant) input, and every Conv but those reading the graph's
    input (the patch embedding stays float: see the module docstring)."""
    consts = _constants(model)
    graph_inputs = {i.name for i in model.graph.input}
    return [
        n.name
        for n in model.graph.node
        if (n.op_type == "Conv" and not graph_inputs & set(n.input))
        or (n.op_type in ("MatMul", "Gemm") and any(i in consts for i in n.input))
    ]


@contextlib.contextmanager
def _quiet():
    lg = logging.getLogger()
    level = lg.level
    lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        lg.setLevel(level)


def _attention_nodes(model) -> list[str]:
    """MatMul nodes whose two inputs are both activations (q @ k^T and attn @ v)."""
    consts = _constants(model)
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and not any(i in consts for i in n.input)]


def quantize_onnx_bytes(
    fp32: bytes,
    mode: str,
    calib: np.ndarray | None = None,
    method: str = "minmax",
    calib_batch: int = 8,
    attention: bool = False,
    calib_info: dict[str, Any] | None = None,
    symmetric: bool = False,
    weight_bits: int = 7,
) -> tuple[bytes, dict[str, Any]]:
    """The int8 model (bytes) of an fp32 caitdeploy ONNX and what was done (`info`). `attention` (static only)
    also quantizes the activation x activation MatMuls of attention. `calib_info` (what `calibration_images`
    returns) goes into the metadata: the calibration source and the preprocessing a server must repeat.
    `symmetric` (static): int8 activations with zero point 0, what TensorRT's explicit quantization accepts
    (its parser refuses a non-zero zero point), and float biases (it refuses an int32 DequantizeLinear); the
    default, asymmetric uint8, is ONNX Runtime's fast CPU path. `weight_bits` 7 (the default) keeps int8 weights
    in [-64, 64], which no x86 CPU can saturate (see WEIGHT_BITS); 8 uses the whole int8 range."""
    check_weight_bits(weight_bits)
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from caitdeploy.export.onnx import INPUT_NAME
    from caitdeploy.formats.onnx_meta import op_census

    src_meta = {p.key: p.value for p in onnx.load_from_string(fp32).metadata_props}
    with tempfile.TemporaryDirectory(prefix="caitdeploy-int8-") as tmp:
        t = Path(tmp)
        (t / "fp32.onnx").write_bytes(fp32)
        try:
            with _quiet():
                quant_pre_process(str(t / "fp32.onnx"), str(t / "pre.onnx"), skip_symbolic_shape=True)
            pre = onnx.load(str(t / "pre.onnx"))
            nodes = _weight_nodes(pre) + (_attention_nodes(pre) if attention and mode == "static" else [])
            if mode == "static":
                assert calib is not None, "static quantization needs calibration images (check_int8_options)"
                batches = [calib[i : i + calib_batch] for i in range(0, len(calib), calib_batch)]

                class Reader(CalibrationDataReader):
                    def __init__(self):
                        self.it = iter(batches)

                    def get_next(self):
                        b = next(self.it, None)
                        return None if b is None else {INPUT_NAME: b}

                calib_method = {
                    "minmax": CalibrationMethod.MinMax,
                    "percentile": CalibrationMethod.Percentile,
                    "entropy": CalibrationMethod.Entropy,
                }[method]
                with _quiet():
                    quantize_static(
                        str(t / "pre.onnx"),
                        str(t / "int8.onnx"),
                        Reader(),
                        quant_format=QuantFormat.QDQ,
                        per_channel=True,
                        reduce_range=weight_bits == 7,
                        activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
                        weight_type=QuantType.QInt8,
                        nodes_to_quantize=nodes,
                        calibrate_method=calib_method,
                        extra_options={
                            "WeightSymmetric": True,
                            "ActivationSymmetric": symmetric,
                            "CalibTensorRangeSymmetric": symmetric,
                            # TensorRT's DequantizeLinear takes int8, not an int32 bias
                            "QuantizeBias": not symmetric,
                            # Conv too: OpenVINO 2026.4 runs Conv -> Q/DQ -> Reshape wrongly (module docstring)
                            "OpTypesToExcludeOutputQuantization": ["MatMul", "Gemm", "Conv"],
                        },
                    )
            else:
                with _quiet():
                    quantize_dynamic(
                        str(t / "pre.onnx"),
                        str(t / "int8.onnx"),
                        per_channel=True,
                        reduce_range=weight_bits == 7,
                        weight_type=QuantType.QInt8,
                        op_types_to_quantize=["MatMul", "Gemm"],
                    )
            q = onnx.load(str(t / "int8.onnx"))
        except CaitError:
            raise
        except Exception as e:  # noqa: BLE001 - the quantizer raises many types; one line
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise CaitError(f"int8 {mode} quantization failed: {type(e).__name__}: {first}") from None
    used = {n.domain or "" for n in q.graph.node}  # the quantizer declares domains it does not use
    keep = [o for o in q.opset_import if (o.domain or "") in used or (o.domain or "") in ("", "ai.onnx")]
    del q.opset_import[:]
    q.opset_import.extend(keep)
    del q.metadata_props[:]
    meta = {
        **src_meta,
        "caitdeploy.int8": mode,
        "caitdeploy.int8.activations": "uint8 dynamic",
        "caitdeploy.int8.weight_bits": str(weight_bits),
    }
    if mode == "static":
        meta["caitdeploy.int8.calibration"] = method
        meta["caitdeploy.int8.attention"] = "int8" if attention else "float"
        meta["caitdeploy.int8.activations"] = "int8 symmetric" if symmetric else "uint8 asymmetric"
        if calib_info:
            meta["caitdeploy.int8.calibration_data"] = json.dumps(
                {k: calib_info[k] for k in ("source", "images") if k in calib_info}
            )
            meta["caitdeploy.preprocess"] = json.dumps(calib_info.get("preprocess", {}))
    for k, v in meta.items():
        q.metadata_props.add(key=k, value=str(v))
    q.producer_name = "caitdeploy"
    census = op_census(q)
    dq_out = {o for n in q.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    float_nodes: Counter[str] = Counter()
    for n in q.graph.node:
        # a matmul that kept a float input, or an op that is never quantized
        matmul_in_float = n.op_type in ("MatMul", "Gemm", "Conv") and not all(i in dq_out for i in n.input[:2])
        if matmul_in_float or n.op_type in ("LayerNormalization", "Softmax", "Erf"):
            float_nodes[n.op_type] += 1
    float_ops = dict(sorted(float_nodes.items()))
    info = {
        "mode": mode,
        "census": census,
        "quantized_nodes": len(nodes),
        "qdq_pairs": census.get("DequantizeLinear", 0) if mode == "static" else 0,
        "float_ops": float_ops,
        "weight_bits": weight_bits,
        "weights": "int8 symmetric per output channel" + (", 7-bit range [-64, 64]" if weight_bits == 7 else ""),
        "activations": (
            ("int8 symmetric" if symmetric else "uint8 asymmetric") + ", calibrated"
            if mode == "static"
            else "uint8, quantized at run time"
        ),
    }
    if mode == "static":
        info["calibration"] = method
        info["attention_matmuls"] = "int8" if attention else "float"
    return q.SerializeToString(), info


def compare_int8(
    fp32: bytes, int8: bytes, images: np.ndarray, threads: int | None = None, batch: int = 16
) -> dict[str, Any]:
    """int8 vs fp32 ONNX Runtime CPU on `images`: cosine similarity per image (all outputs of an image
    flattened together: logits, or every feature map), max and mean |diff|, and for one [N, classes] output the
    top-1 agreement."""
    import onnxruntime as ort

    from caitdeploy.export.onnx import INPUT_NAME

    def run(data: bytes) -> list[np.ndarray]:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if threads:
            so.intra_op_num_threads = threads
        sess = ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
        outs = [sess.run(None, {INPUT_NAME: images[i : i + batch]}) for i in range(0, len(images), batch)]
        return [np.concatenate([o[k] for o in outs]).astype(np.float64) for k in range(len(outs[0]))]

    ref, out = run(fp32), run(int8)
    ref2 = np.concatenate([r.reshape(len(images), -1) for r in ref], axis=1)
    out2 = np.concatenate([o.reshape(len(images), -1) for o in out], axis=1)
    cos = (ref2 * out2).sum(1) / np.maximum(np.linalg.norm(ref2, axis=1) * np.linalg.norm(out2, axis=1), 1e-30)
    diff = np.abs(out2 - ref2)
    res = {
        "images": len(images),
        "outputs": len(ref),
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "logit_scale": float(np.abs(ref2).max()),
        "cosine_min": float(cos.min()),
        "cosine_mean": float(cos.mean()),
    }
    if len(ref) == 1 and ref[0].ndim == 2 and ref[0].shape[1] > 1:
        res["top1_agree"] = float((out[0].argmax(1) == ref[0].argmax(1)).mean())
    return res


def check_int8(res: dict[str, Any], min_cosine: float, min_top1: float, what: str) -> None:
    if res["cosine_min"] < min_cosine:
        raise CaitError(
            f"{what}: int8 vs fp32 output cosine similarity {res['cosine_min']:.4f} < {min_cosine} "
            f"(--int8-min-cosine) over {res['images']} images"
        )
    if "top1_agree" in res and res["top1_agree"] < min_top1:
        raise CaitError(
            f"{what}: int8 vs fp32 top-1 agreement {100 * res['top1_agree']:.1f}% < "
            f"{100 * min_top1:g}% (--int8-min-top1) over {res['images']} images"
        )


def op_counts(model_bytes: bytes) -> Counter:
    import onnx

    from caitdeploy.formats.onnx_meta import op_census

    return Counter(op_census(onnx.load_from_string(model_bytes)))
