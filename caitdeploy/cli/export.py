"""`caitdeploy export`: fused model -> ONNX [-> TensorRT engine] [-> Triton repository]."""

from __future__ import annotations

import click

from caitdeploy.cli.common import console, handle_errors, human
from caitdeploy.cli.options import BlockList, Float, ImageSize, Int, StrictInt
from caitdeploy.core.errors import CaitError
from caitdeploy.pipelines.export import default_onnx_path  # noqa: F401 (where scripts and tests import it from)

# the ranges of export.quantize.MAX_CALIB_IMAGES and export.tensorrt.MAX_PROFILE_BATCH (tests/security/test_hostile_output.py
# checks they agree), written out so that `caitdeploy --help` imports neither; --opt-level is StrictInt: its
# range (0..5) is checked, with its message, by export.tensorrt.check_build_options
MAX_CALIB_IMAGES = 4096
MAX_PROFILE_BATCH = 65536


def _parse_opset(opset: str | None) -> int | None:
    if opset is None:
        return None
    from caitdeploy.cli.options import parse_int
    from caitdeploy.core.errors import safe_text

    n = parse_int(opset)
    if n is None:
        raise CaitError(f"unsupported opset {safe_text(opset, 40)!r}: give an integer (18..23)")
    return n


def print_export_report(report: dict) -> None:
    from rich.table import Table

    from caitdeploy.cli.common import print_plain, rich_safe

    con = console()

    def say(text: str) -> None:  # file names and graph names: escaped, no markup, one line each
        print_plain(con, text)

    onnx_r = report["onnx"]
    say(
        f"exported {report['model']} -> {onnx_r['output']}  ({onnx_r['dtype']}, opset "
        f"{onnx_r['opset']}, attention {onnx_r['attention']}, {human(onnx_r['bytes'], 'B')}, "
        f"{onnx_r['nodes']} nodes)"
    )
    sig_in = onnx_r["inputs"][0]
    outs = ", ".join(f"{o['name']} {o['shape']}" for o in onnx_r["outputs"])
    what = "encoder FLOPs/img" if onnx_r.get("features") else "FLOPs/img"
    say(
        f"  {sig_in['name']} {sig_in['shape']} {sig_in['dtype']} -> {outs} {onnx_r['outputs'][0]['dtype']}   "
        f"{what} {human(onnx_r.get('flops', 0))}  stored params {human(onnx_r['params'])}"
    )
    if onnx_r.get("features"):
        where = "on each stage's grid" if onnx_r.get("feature_grid") == "stage" else "on the full patch grid"
        say(
            f"  feature maps after blocks {', '.join(map(str, onnx_r['features']))} {where} "
            f"(merged grids restored: {onnx_r['restore']})"
            + (", prefix tokens dropped" if onnx_r.get("feature_grid") != "stage" else "")
        )
    t = Table(title="op census", show_lines=False)
    t.add_column("op")
    t.add_column("count", justify="right")
    for op, n in onnx_r["census"].items():
        t.add_row(rich_safe(op, 80), str(n))
    con.print(t)
    say(f"forbidden ops: none of {', '.join(onnx_r['forbidden_checked'])}")
    q = report.get("int8")
    if q:
        cal = q.get("calibration_data")
        say(
            f"int8 {q['mode']}: {q['quantized_nodes']} nodes quantized (weights {q['weights']}; activations "
            f"{q['activations']}"
            + (f", {q['calibration']} over {cal['images']} images from {cal['source']}" if cal else "")
            + ")"
        )
        say("  left in float: " + ", ".join(f"{op} {n}" for op, n in q["float_ops"].items()))
        c = q["check"]
        say(
            f"  int8 vs fp32 (onnxruntime CPU, {c['images']} images from {c['source']}): cosine min {c['cosine_min']:.4f} mean "
            f"{c['cosine_mean']:.4f}, max |diff| {c['max_abs_diff']:.3g}, mean |diff| {c['mean_abs_diff']:.3g}"
            + (f", top-1 agreement {100 * c['top1_agree']:.1f}%" if "top1_agree" in c else "")
            + f" (>= {q['min_cosine']} required) OK"
        )
    v = onnx_r.get("verify")
    if v and onnx_r.get("features"):
        for name, o in v["outputs"].items():
            sizes = ", ".join(f"batch {b['batch']}: {b['max_abs_diff']:.3g}" for b in o["batches"])
            check = (
                f"tolerance {o['tolerance']:.3g}"
                if v["dtype"] == "fp32"
                else f"min cosine {o['min_cosine']:.6f}, >= 0.999 required"
            )
            say(
                f"verify {name} (onnxruntime CPU vs PyTorch fp32, {v['samples']} random images): max |diff| "
                f"{o['max_abs_diff']:.3g} [{sizes}], scale {o['scale']:.3g}  ({check}) OK"
            )
    elif v:
        sizes = ", ".join(f"batch {b['batch']}: {b['max_abs_diff']:.3g}" for b in v["batches"])
        line = (
            f"verify (onnxruntime CPU vs PyTorch fp32, {v['samples']} random images): max |logit diff| "
            f"{v['max_abs_diff']:.3g} [{sizes}], logit scale {v['logit_scale']:.3g}, top-1 agreement "
            f"{100 * v['top1_agree']:.1f}%"
        )
        if v["dtype"] == "fp32":
            line += f"  (tolerance {v['tolerance']:.3g}) OK"
        else:
            line += "  (>= 99% required) OK"
        say(line)
    else:
        say("verify: skipped (--no-verify)")
    ir = report.get("openvino")
    if ir:
        v = ir.get("verify")
        fq = f", {ir['fake_quantize']} FakeQuantize" if ir.get("fake_quantize") else ""
        say(
            f"openvino IR {ir['output']} + .bin (openvino {ir['openvino']}, {ir['dtype']}, weights {ir['weights']}"
            f"{fq}; {human(ir['bin_bytes'], 'B')})"
        )
        if v:
            say(
                f"  verify (OpenVINO f32 vs onnxruntime on the ONNX graph, {v['images']} random images): cosine min "
                f"{v['cosine_min']:.6f}, top-1 agreement {100 * v['top1_agree']:.1f}%"
                + ("  (reported: OpenVINO reads QDQ as FakeQuantize)" if ir["dtype"].startswith("int8") else "  OK")
            )
        say(f"  sidecar {ir['sidecar']}")
    e = report.get("engine")
    if e:
        prof = e["profile"]
        say(
            f"engine {e['output']} ({e['flavour']} {e['trt_version']}, {e['dtype']}, strongly typed, "
            f"{human(e['engine_bytes'], 'B')}) built in {e['build_seconds']:.2f} s; batch profile "
            f"{prof['min'][0]}/{prof['opt'][0]}/{prof['max'][0]}; target {e['build_target']}"
        )
        tc = e["timing_cache"]
        if tc.get("path"):
            say(f"  timing cache {tc['path']}: " + ("used" if tc.get("used") else f"not used ({tc.get('reason')})"))
        qz = e.get("quantization")
        if qz:
            say(
                f"  explicit quantization: the parsed network has {qz['quantize_layers']} Quantize and "
                f"{qz['dequantize_layers']} Dequantize layers (of {qz['network_layers']}); builder warnings: "
                + ("; ".join(qz["builder_warnings"]) if qz["builder_warnings"] else "none")
            )
        say(f"  sidecar {e['sidecar']}")
    tr = report.get("triton")
    if tr:
        say(
            f"triton {tr['config']} ({tr['backend'] if tr['platform'] == 'python' else tr['platform']}, "
            f"max_batch_size {tr['max_batch_size']}, "
            f"preferred {tr['preferred_batch_sizes']}, {tr['instance_group']['count']}x "
            f"{tr['instance_group']['kind']})"
        )
    s = onnx_r["seconds"]
    say(f"export {s['export']:.2f} s, clean+check {s['clean_check']:.2f} s, verify {s['verify']:.2f} s")


@click.command("export")
@click.argument("model", type=click.Path(dir_okay=False, path_type=str))
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="ONNX file [default: <stem>[.fp16].onnx].")
@click.option("--dtype", default="fp32", show_default=True, help="fp32 | fp16 (fp16 weights and compute, fp32 I/O).")
@click.option("--opset", default=None, help="ONNX opset 18..23 [default: 18; 23 with --attention op].")
@click.option(
    "--attention",
    default="matmul",
    show_default=True,
    help="matmul: Mul/MatMul/Softmax/MatMul; op: the ONNX Attention op (opset >= 23).",
)
@click.option(
    "--img-size",
    type=ImageSize(),
    default=None,
    help="Input size: 512 or HEIGHTxWIDTH (e.g. 512x1024); the position embedding is resampled "
    "(bicubic, as timm) and merges re-checked [default: the model's].",
)
@click.option(
    "--features",
    type=BlockList(),
    default=None,
    help="Block indices, e.g. 3,5,7,11: outputs feat3, feat5, ... [B, D, H/patch, W/patch] on the full "
    "patch grid instead of logits (dense prediction).",
)
@click.option(
    "--restore",
    default="repeat",
    show_default=True,
    help="How --features restores a merged grid: repeat (exact inverse of the merges) or bilinear.",
)
@click.option(
    "--int8",
    "int8",
    default=None,
    help="static: QDQ int8 (calibrated; what TensorRT's explicit quantization takes) | dynamic: ONNX "
    "Runtime's dynamic quantization (int8 weights, activations quantized at run time).",
)
@click.option(
    "--calib",
    "calib_dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Calibration images for --int8 static: a folder of PNG/JPEG files (searched recursively).",
)
@click.option(
    "--calib-synthetic", type=Int(1, MAX_CALIB_IMAGES), default=None, help="Calibrate on N synthetic images instead."
)
@click.option(
    "--calib-samples",
    type=Int(1, MAX_CALIB_IMAGES),
    default=64,
    show_default=True,
    help="At most this many images from --calib.",
)
@click.option("--calib-method", default="minmax", show_default=True, help="minmax | percentile | entropy")
@click.option(
    "--int8-attention", is_flag=True, help="--int8 static: also quantize the attention MatMuls (q @ k^T, softmax @ v)."
)
@click.option(
    "--int8-symmetric",
    is_flag=True,
    help="--int8 static: int8 activations with zero point 0 (TensorRT's format; on with --trt). The default, "
    "uint8 asymmetric, is ONNX Runtime's fast CPU path.",
)
@click.option(
    "--int8-weight-bits",
    type=click.Choice(["7", "8"]),
    default=None,
    help="Range of the int8 weights [default: 7]. 7 ([-64, 64]) is exact on every x86 CPU; 8 uses the full range, which "
    "ONNX Runtime saturates on CPUs without VNNI (AVX2, AVX-512 without VNNI): cosine 0.97 there.",
)
@click.option(
    "--int8-check",
    "int8_check",
    type=click.Path(file_okay=False),
    default=None,
    help="Compare int8 with fp32 on the PNG/JPEG images of this folder (a held-out set) instead of the "
    "calibration images.",
)
@click.option(
    "--int8-min-cosine",
    type=Float(-1.0, 1.0),
    default=0.99,
    show_default=True,
    help="Fail unless every check image's int8 outputs (logits, or all feature maps) have this cosine "
    "similarity with fp32.",
)
@click.option(
    "--int8-min-top1",
    type=Float(0.0, 1.0),
    default=0.0,
    show_default=True,
    help="Fail unless int8 and fp32 top-1 agree on this fraction of the check images.",
)
@click.option("--no-verify", is_flag=True, help="Skip the ONNX Runtime vs PyTorch check.")
@click.option(
    "--fp16-samples",
    type=Int(0, 65536),
    default=256,
    show_default=True,
    help="Random images for the fp16 top-1 agreement check.",
)
@click.option(
    "--openvino",
    is_flag=True,
    help="Also write OpenVINO IR beside the ONNX (<stem>.xml/.bin, fp16 weights with --dtype fp16), verified, "
    "with a <stem>.xml.json sidecar naming the OpenVINO version.",
)
@click.option("--trt", is_flag=True, help="Also build a TensorRT / TensorRT-RTX engine.")
@click.option("--trt-module", default="auto", show_default=True, help="auto | tensorrt | tensorrt_rtx")
@click.option("--engine", type=click.Path(dir_okay=False), help="Engine file [default: <onnx stem>.plan].")
@click.option("--min-batch", type=Int(1, MAX_PROFILE_BATCH), default=1, show_default=True)
@click.option("--opt-batch", type=Int(1, MAX_PROFILE_BATCH), default=256, show_default=True)
@click.option("--max-batch", type=Int(1, MAX_PROFILE_BATCH), default=256, show_default=True)
@click.option("--workspace-mb", type=Int(1, 1 << 20), default=None, help="Builder workspace limit in MiB.")
@click.option(
    "--timing-cache", type=click.Path(dir_okay=False), help="Timing cache file, reused across builds (full TensorRT)."
)
@click.option("--opt-level", type=StrictInt(), default=None, help="Builder optimization level 0..5.")
@click.option(
    "--compute-capability",
    "compute_capabilities",
    multiple=True,
    help="TensorRT-RTX target, repeatable: SM75 SM80 SM86 SM89 SM120 [default: library default].",
)
@click.option("--triton-repo", type=click.Path(file_okay=False), help="Write a Triton model repository entry here.")
@click.option("--name", default=None, help="Triton model name [default: ONNX file stem].")
@click.option(
    "--triton-backend",
    default=None,
    help="onnxruntime | tensorrt | python (model.py running the ONNX with ONNX Runtime, for servers "
    "without the onnxruntime backend) | python-openvino (the same model.py running OpenVINO on the CPU: the IR "
    "with --openvino, else the ONNX) [default: tensorrt with --trt, else onnxruntime].",
)
@click.option(
    "--max-queue-delay-us",
    type=Int(0, 10**8),
    default=100,
    show_default=True,
    help="Triton dynamic batching: how long a request may wait for others to batch with.",
)
@click.option(
    "--triton-warmup",
    is_flag=True,
    help="Add a model_warmup (random images at the preferred batch sizes) run before the model is READY.",
)
@click.option("--instances", type=Int(1, 256), default=1, show_default=True, help="Triton instance count.")
@click.option("--instance-kind", default="gpu", show_default=True, help="Triton instance kind: gpu | cpu | auto.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), help="Write the report as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No tables.")
@handle_errors
def export_cmd(opset, int8_weight_bits, no_verify, compute_capabilities, quiet, **flags):
    """Export a fused CAIT model to ONNX; optionally build an engine and a Triton repository.

    Every option and output path is checked before any work, and the outputs (ONNX, engine, sidecar, timing
    cache, Triton entry, report) are written together at the end, or none of them."""
    from caitdeploy.pipelines.export import ExportOptions, export

    # the other flags are ExportOptions' fields by name; these four arrive as text, negated or as a list
    options = ExportOptions(
        **flags,
        opset=_parse_opset(opset),
        verify=not no_verify,
        int8_weight_bits=None if int8_weight_bits is None else int(int8_weight_bits),
        compute_capabilities=tuple(compute_capabilities),
    )
    result = export(options)
    if not quiet:
        print_export_report(result.report)
