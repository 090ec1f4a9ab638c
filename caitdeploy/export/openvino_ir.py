"""OpenVINO IR (.xml + .bin) from the ONNX file `export` makes, verified, with a sidecar naming the version.

    xml, bin_, info = ir_bytes(onnx_data, fp16_weights=False)      # in memory: nothing is written here
    check = verify_ir(xml, bin_, onnx_data, images)                 # OpenVINO (f32) vs ONNX Runtime, same images

The IR is converted from the final ONNX graph (fp32, fp16, or the int8 QDQ graph, whose Q/DQ pairs become
FakeQuantize nodes), so it computes what the ONNX file computes; `fp16_weights` stores the weights as fp16
(OpenVINO's `compress_to_fp16`; they are decompressed at load). The sidecar (`<name>.xml.json`) names the
OpenVINO version, the source ONNX's SHA-256 and the IR's dtype, and holds the verification.
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from caitdeploy.core.errors import CaitError

IR_FORMAT = "caitdeploy-openvino-ir/1"


def ir_paths(onnx_path: str | Path) -> tuple[Path, Path, Path]:
    """(xml, bin, sidecar) beside the ONNX file: m.onnx -> m.xml, m.bin, m.xml.json."""
    p = Path(onnx_path)
    xml = p.with_suffix(".xml")
    return xml, p.with_suffix(".bin"), Path(str(xml) + ".json")


def ir_bytes(onnx_data: bytes, fp16_weights: bool = False) -> tuple[bytes, bytes, dict[str, Any]]:
    """The IR of an ONNX graph, as (xml bytes, bin bytes, facts)."""
    from caitdeploy.runtime.openvino_runner import import_openvino, openvino_version, ov_error

    ov = import_openvino()
    with tempfile.TemporaryDirectory(prefix="caitdeploy-ir-") as tmp:
        src = Path(tmp) / "model.onnx"
        src.write_bytes(onnx_data)
        try:
            model = ov.convert_model(str(src))
            ov.save_model(model, str(Path(tmp) / "model.xml"), compress_to_fp16=fp16_weights)
        except Exception as e:  # noqa: BLE001 - the converter raises many types: one line
            raise CaitError(f"OpenVINO cannot convert the ONNX graph: {ov_error(e)}") from None
        xml = (Path(tmp) / "model.xml").read_bytes()
        bin_ = (Path(tmp) / "model.bin").read_bytes()
        ops: dict[str, int] = {}
        for op in model.get_ops():
            ops[op.get_type_name()] = ops.get(op.get_type_name(), 0) + 1
    return (
        xml,
        bin_,
        {
            "format": IR_FORMAT,
            "openvino": openvino_version(),
            "onnx_sha256": hashlib.sha256(onnx_data).hexdigest(),
            "weights": "fp16 (compressed)" if fp16_weights else "as in the ONNX graph",
            "fake_quantize": ops.get("FakeQuantize", 0),
            "ops": dict(sorted(ops.items(), key=lambda kv: -kv[1])),
            "xml_bytes": len(xml),
            "bin_bytes": len(bin_),
        },
    )


def verify_ir(xml: bytes, bin_: bytes, onnx_data: bytes, images: np.ndarray, threads: int | None = None) -> dict:
    """OpenVINO on the IR (f32 inference precision) against ONNX Runtime on the ONNX graph, on the same images:
    max |diff| per output, the smallest per-image cosine, top-1 agreement of the first output."""
    from caitdeploy.runtime import OrtRunner, RuntimeSpec
    from caitdeploy.runtime.openvino_runner import OpenVinoRunner

    spec = RuntimeSpec(threads=threads)
    with tempfile.TemporaryDirectory(prefix="caitdeploy-ir-") as tmp:
        (Path(tmp) / "m.xml").write_bytes(xml)
        (Path(tmp) / "m.bin").write_bytes(bin_)
        with OpenVinoRunner(Path(tmp) / "m.xml", spec) as r:
            got = r.infer({r.input_names[0]: images})
    with OrtRunner(onnx_data, spec) as o:
        ref = o.infer({next(iter(o.inputs)): images})
    out: dict[str, Any] = {"images": len(images), "outputs": {}}
    worst_cos = 1.0
    for name, y_ref in ref.items():
        y = got.get(name, next(iter(got.values())) if len(got) == 1 else None)
        if y is None:
            raise CaitError(f"OpenVINO IR has no output {name!r} (it has {', '.join(got)})")
        a = np.asarray(y, np.float64).reshape(len(images), -1)
        b = np.asarray(y_ref, np.float64).reshape(len(images), -1)
        cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-300)
        worst_cos = min(worst_cos, float(cos.min()))
        out["outputs"][name] = {"max_abs_diff": float(np.abs(a - b).max()), "scale": float(np.abs(b).max())}
    first = next(iter(ref))
    y0, r0 = np.asarray(got.get(first, next(iter(got.values())))), np.asarray(ref[first])
    out["cosine_min"] = worst_cos
    out["top1_agree"] = float((y0.reshape(len(images), -1).argmax(1) == r0.reshape(len(images), -1).argmax(1)).mean())
    return out
