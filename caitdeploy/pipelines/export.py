"""The export pipeline as a library: fused model -> ONNX [-> int8] [-> TensorRT engine] [-> Triton repository].

`caitdeploy export` is this module behind click. `ExportOptions` holds what the command's options hold (same
names, same defaults); `export()` checks every option and output path before any work (`check`), then exports,
quantizes, builds and plans in memory, and writes every output together at the end, or none of them (a failed
engine build leaves no ONNX either). Errors are the CLI's: `CaitError`, or `OptionError` naming the parameter
(`int8_check: ...`), which the CLI shows as its flag (`--int8-check: ...`).

    from caitdeploy.pipelines.export import ExportOptions, export

    result = export(ExportOptions("deit_s.fused.safetensors", dtype="fp16", report_path="deit_s.json"))
    result.report["onnx"]["verify"]["top1_agree"]

Heavy imports (torch, onnx, onnxruntime, tensorrt) happen inside the functions, so `caitdeploy --help` stays fast.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from caitdeploy.core.errors import CaitError, OptionError

if TYPE_CHECKING:
    from caitdeploy.export.tensorrt import BuiltEngine
    from caitdeploy.export.triton_repo import TritonEntry

Progress = Callable[[str], None]  # called with each step's name as it starts (see `STEPS`)
STEPS = ("load", "onnx", "int8", "openvino", "engine", "write")


@dataclass(frozen=True)
class ExportOptions:
    """Every option of `caitdeploy export`, named as its flag (`--int8-min-cosine` -> `int8_min_cosine`), with the
    CLI's defaults. Only `model` is required."""

    model: str | Path  # the fused model file (`caitdeploy fuse` output)
    output: str | Path | None = None  # the ONNX file [default: `default_onnx_path`, next to the model]
    dtype: str = "fp32"  # fp32 | fp16 (fp16 weights and compute, fp32 I/O)
    opset: int | None = None  # 18..23 [default: 18; 23 with attention="op"]
    attention: str = "matmul"  # matmul: Mul/MatMul/Softmax/MatMul; op: the ONNX Attention op (opset 23)
    img_size: int | tuple[int, int] | str | None = None  # another input size: 512, (512, 1024) or "512x1024"
    features: str | int | Sequence[int] | None = None  # block indices ("3,5,7,11"): feature maps instead of logits
    restore: str = "repeat"  # how features restore a merged grid: repeat | bilinear
    int8: str | None = None  # static (QDQ, calibrated) | dynamic (ONNX Runtime's) | None
    calib_dir: str | Path | None = None  # int8 static: a folder of PNG/JPEG calibration images (recursive)
    calib_synthetic: int | None = None  # int8 static: calibrate on N synthetic images instead (1..4096)
    calib_samples: int = 64  # at most this many images from calib_dir (1..4096)
    calib_method: str = "minmax"  # minmax | percentile | entropy
    int8_attention: bool = False  # int8 static: also quantize the attention MatMuls
    int8_symmetric: bool = False  # int8 static: zero-point-0 activations (TensorRT's; on with trt)
    int8_weight_bits: int | None = None  # 7 (exact on every x86 CPU) or 8 [default: 7]
    int8_check: str | Path | None = None  # compare int8 with fp32 on this folder's images, not the calibration set
    int8_min_cosine: float = 0.99  # fail unless every check image's int8 outputs have this cosine with fp32
    int8_min_top1: float = 0.0  # fail unless int8 and fp32 top-1 agree on this fraction of the images
    verify: bool = True  # ONNX Runtime vs PyTorch check (`--no-verify` sets False)
    fp16_samples: int = 256  # random images for the fp16 top-1 agreement check (0..65536)
    openvino: bool = False  # also write OpenVINO IR (<onnx stem>.xml/.bin + .xml.json sidecar), verified
    trt: bool = False  # also build a TensorRT / TensorRT-RTX engine
    trt_module: str = "auto"  # auto | tensorrt | tensorrt_rtx
    engine: str | Path | None = None  # the engine file [default: <onnx stem>.plan]
    min_batch: int = 1  # the engine's batch profile, min <= opt <= max (1..65536); max and
    opt_batch: int = 256  # opt are also the Triton entry's max_batch_size and preferred sizes
    max_batch: int = 256
    workspace_mb: int | None = None  # builder workspace limit in MiB
    timing_cache: str | Path | None = None  # timing cache file, reused across builds (full TensorRT)
    opt_level: int | None = None  # builder optimization level 0..5
    compute_capabilities: tuple[str, ...] = ()  # TensorRT-RTX targets: SM75 SM80 SM86 SM89 SM120
    triton_repo: str | Path | None = None  # write a Triton model repository entry into this folder
    name: str | None = None  # the Triton model name [default: the ONNX file's stem]
    triton_backend: str | None = None  # onnxruntime | tensorrt | python | python-openvino [default: tensorrt with trt]
    max_queue_delay_us: int = 100  # Triton dynamic batching: how long a request may wait (0..1e8)
    triton_warmup: bool = False  # a model_warmup at the preferred batch sizes before READY
    instances: int = 1  # Triton instance count (1..256)
    instance_kind: str = "gpu"  # gpu | cpu | auto
    report_path: str | Path | None = None  # also write the report as JSON


@dataclass(frozen=True)
class ExportPlan:
    """What the options resolve to, once checked: nothing here has been read or written yet."""

    opset: int
    size: int | tuple[int, int] | None  # the input size as the config stores it, None for the model's
    features: str | None  # normalised block list ("3,5"), None for logits
    int8_weight_bits: int
    onnx: Path
    engine: Path | None
    triton: TritonEntry | None  # planned with placeholder dims: the model fills them in
    served_suffix: str  # what the Triton entry serves: ".onnx", the engine's suffix, or ".xml" (the IR)


@dataclass(frozen=True)
class ExportResult:
    """What `export` wrote. `report` is the dict `caitdeploy export` prints and `--report` writes."""

    report: dict[str, Any]
    onnx: Path
    engine: Path | None = None
    sidecar: Path | None = None  # the engine's `<engine>.json`
    triton_config: Path | None = None  # the Triton entry's config.pbtxt
    report_path: Path | None = None
    openvino_ir: Path | None = None  # the IR's .xml (its .bin and .xml.json beside it)

    @property
    def outputs(self) -> list[Path]:
        """Every file written (a Triton entry by its config; its model file is beside it)."""
        ir = []
        if self.openvino_ir is not None:
            from caitdeploy.export.openvino_ir import ir_paths

            ir = list(ir_paths(self.onnx))
        return [p for p in (self.onnx, *ir, self.engine, self.sidecar, self.triton_config, self.report_path) if p]


@dataclass
class _Calibration:
    """int8 images, read (and refused, one line) before any export work."""

    images: Any
    info: dict[str, Any] | None  # the calibration data's report (int8 static), None for dynamic
    check_images: Any
    check_source: str


def default_onnx_path(
    model_path: str | Path, dtype: str, size: str | None = None, features: str | None = None, int8: str | None = None
) -> Path:
    """<stem>[.SIZE][.featA-B-C][.fp16|.int8-static|.int8-dynamic].onnx next to the model."""
    p = Path(model_path)
    stem = p.name.removesuffix(".safetensors").removesuffix(".fused")
    extra = (f".{size}" if size else "") + (f".feat{features.replace(',', '-')}" if features else "")
    kind = f".int8-{int8}" if int8 else (".fp16" if dtype == "fp16" else "")
    return p.with_name(stem + extra + kind + ".onnx")


# ---- 1. options and paths, before any work -------------------------------------------------------------
def check(options: ExportOptions) -> ExportPlan:
    """Check every option and output path before any work, in the order `caitdeploy export` always has (the
    first error wins): CaitError, or OptionError naming the parameter. The model is not loaded; nothing is written."""
    from caitdeploy.export.onnx import check_options
    from caitdeploy.pipelines.common import check_dense_options

    o = options
    opset = check_options(o.dtype, o.opset, o.attention)
    size, parts = check_dense_options(o.img_size, _features_text(o.features), o.restore)
    weight_bits = _check_int8(o)
    _check_outputs_and_engine(o)
    size_text = None if size is None else (str(size) if isinstance(size, int) else f"{size[0]}x{size[1]}")
    features = ",".join(parts) if parts else None
    onnx = Path(o.output or default_onnx_path(o.model, o.dtype, size_text, features, o.int8))
    engine = Path(o.engine or onnx.with_suffix(".plan")) if o.trt else None
    served = engine.suffix if engine is not None and o.triton_backend in (None, "tensorrt") else ".onnx"
    if o.triton_backend == "python-openvino" and o.openvino:
        served = ".xml"  # the IR export writes, with its model.bin
    triton = _check_triton(o, onnx, served)
    plan = ExportPlan(opset, size, features, weight_bits, onnx, engine, triton, served)
    _check_paths(o, plan)
    return plan


def _features_text(features: str | int | Sequence[int] | None) -> str | None:
    """Block indices as the CLI gives them ("3,5,7"): a library caller may pass an int or a sequence of ints."""
    if features is None or isinstance(features, str):
        return features
    return ",".join(str(b) for b in ([features] if isinstance(features, int) else features))


def _check_int8(o: ExportOptions) -> int:
    """The int8 options, and no int8 option without int8; returns the weight bits (7 unless given)."""
    if o.int8 is None:
        if o.calib_dir is not None or o.calib_synthetic is not None:
            raise OptionError(
                "calib" if o.calib_dir is not None else "calib_synthetic",
                "is an --int8 static option: add --int8 static",
            )
        given = [
            n
            for n, v in (
                ("int8_attention", o.int8_attention),
                ("int8_symmetric", o.int8_symmetric),
                ("int8_check", o.int8_check is not None),
                ("int8_weight_bits", o.int8_weight_bits is not None),
            )
            if v
        ]
        if given:
            raise OptionError(given[0], "is an --int8 option: add --int8")
        return 7
    from caitdeploy.core.budgets import check_float
    from caitdeploy.export.quantize import check_int8_options

    weight_bits = int(o.int8_weight_bits or 7)
    check_int8_options(o.int8, o.calib_method, o.calib_dir, o.calib_synthetic, o.calib_samples, weight_bits)
    check_float(o.int8_min_cosine, "int8_min_cosine", -1.0, 1.0)
    check_float(o.int8_min_top1, "int8_min_top1", 0.0, 1.0)
    if o.dtype != "fp32":
        raise OptionError("int8", "quantizes the fp32 graph: leave --dtype at fp32")
    if o.int8_attention and o.int8 != "static":
        raise OptionError("int8_attention", "is for --int8 static (dynamic quantization leaves attention float)")
    if o.int8_symmetric and o.int8 != "static":
        raise OptionError("int8_symmetric", "is for --int8 static (dynamic quantization picks its own ranges)")
    if o.int8 == "dynamic" and o.trt:
        raise OptionError(
            "int8",
            "dynamic makes ONNX Runtime ops (DynamicQuantizeLinear, MatMulInteger) that "
            "TensorRT does not take: use --int8 static with --trt",
        )
    if o.int8_check is not None and not Path(o.int8_check).is_dir():
        raise OptionError("int8_check", f"{o.int8_check}: no such folder")
    return weight_bits


def _check_outputs_and_engine(o: ExportOptions) -> None:
    """Feature maps vs Triton, the fp16 sample count, and the engine options (only with trt, all checked then)."""
    if o.features is not None and o.triton_repo:
        raise OptionError(
            "triton_repo", "serves classifiers (one logits output); export feature maps without --triton-repo"
        )
    if isinstance(o.fp16_samples, bool) or not isinstance(o.fp16_samples, int) or not 0 <= o.fp16_samples <= 65536:
        raise OptionError("fp16_samples", f"must be in 0..65536, got {o.fp16_samples}")
    if not o.trt:
        given = [
            name
            for name, v in (
                ("engine", o.engine),
                ("timing_cache", o.timing_cache),
                ("workspace_mb", o.workspace_mb),
                ("opt_level", o.opt_level),
                ("compute_capability", o.compute_capabilities),
            )
            if v
        ]
        if given:
            raise OptionError(given[0], "is an engine option: add --trt")
        return
    from caitdeploy.export.tensorrt import check_build_options

    check_build_options(
        o.min_batch,
        o.opt_batch,
        o.max_batch,
        o.workspace_mb,
        o.opt_level,
        list(o.compute_capabilities) or None,
        o.trt_module,
    )


def _check_triton(o: ExportOptions, onnx: Path, served_suffix: str) -> TritonEntry | None:
    """The Triton entry's options, planned with placeholder dims (the model's are known once it is loaded)."""
    if (o.triton_backend is not None or o.triton_warmup) and not o.triton_repo:
        raise CaitError("--triton-backend and --triton-warmup are Triton repository options: add --triton-repo DIR")
    if not o.triton_repo:
        return None
    if o.triton_backend == "tensorrt" and not o.trt:
        raise OptionError("triton_backend", "tensorrt serves an engine: add --trt")
    return _triton_entry(o, o.name or onnx.name.removesuffix(".onnx"), served_suffix, (1, 1, 1), 1)


def _triton_entry(
    o: ExportOptions, name: str, served_suffix: str, input_dims: Sequence[int], classes: int
) -> TritonEntry:
    from caitdeploy.export.triton_repo import plan_triton_repo

    batches = sorted({o.opt_batch, o.max_batch})
    assert o.triton_repo is not None
    return plan_triton_repo(
        o.triton_repo,
        name,
        served_suffix,
        max_batch_size=o.max_batch,
        backend=o.triton_backend,
        input_dims=input_dims,
        output_dims=(classes,),
        dtype="fp32",
        preferred_batch_sizes=batches,
        instance_count=o.instances,
        instance_kind=o.instance_kind,
        warmup_batches=batches if o.triton_warmup else (),
        max_queue_delay_us=o.max_queue_delay_us,
    )


def _check_paths(o: ExportOptions, plan: ExportPlan) -> None:
    """No output is an input or another output, extensions match, folders are writable."""
    from caitdeploy.core.paths import ENGINE_SUFFIXES, JSON_SUFFIXES, ONNX_SUFFIXES, Out, check_paths
    from caitdeploy.formats.sidecar import sidecar_path

    entry = plan.triton
    check_paths(
        {"MODEL": o.model},
        [
            Out(plan.onnx, "--output", ONNX_SUFFIXES),
            *_ir_outs(o, plan),
            Out(plan.engine, "--engine", ENGINE_SUFFIXES),
            Out(sidecar_path(plan.engine) if plan.engine else None, "--engine (its sidecar)", JSON_SUFFIXES),
            Out(o.timing_cache if o.trt else None, "--timing-cache", None),
            Out(o.report_path, "--report", JSON_SUFFIXES),
            Out(entry.model_target if entry else None, "--triton-repo", (".onnx", ".plan", ".xml"), create_dirs=True),
            Out(entry.weights_target if entry else None, "--triton-repo", (".bin",), create_dirs=True),
            Out(entry.config_path if entry else None, "--triton-repo", (".pbtxt",), create_dirs=True),
            Out(entry.python_model if entry else None, "--triton-repo", (".py",), create_dirs=True),
        ],
    )


def _ir_outs(o: ExportOptions, plan: ExportPlan) -> list:
    """The IR's three files (beside the ONNX), checked like every output; openvino must be installed."""
    from caitdeploy.core.paths import JSON_SUFFIXES, Out

    if not o.openvino:
        return []
    from caitdeploy.export.openvino_ir import ir_paths
    from caitdeploy.runtime.openvino_runner import openvino_version

    if openvino_version() is None:
        raise OptionError("openvino", "openvino is not installed (pip install 'caitdeploy[openvino]')")
    xml, bin_, side = ir_paths(plan.onnx)
    return [
        Out(xml, "--openvino (IR)", (".xml",)),
        Out(bin_, "--openvino (IR weights)", (".bin",)),
        Out(side, "--openvino (its sidecar)", JSON_SUFFIXES),
    ]


def _openvino_ir(o: ExportOptions, data: bytes, input_shape, report: dict[str, Any]) -> tuple[bytes, bytes, dict]:
    """The IR of the final ONNX graph, verified against ONNX Runtime on 8 random images; fp32/fp16 graphs must
    agree (cosine >= 0.9999 / 0.999), an int8 graph's agreement is reported (OpenVINO reads QDQ its own way)."""
    import numpy as np

    from caitdeploy.export.openvino_ir import ir_bytes, verify_ir

    xml, bin_, info = ir_bytes(data, fp16_weights=o.dtype == "fp16")
    images = np.random.default_rng(0).standard_normal((8, *input_shape)).astype(np.float32)
    info["verify"] = verify_ir(xml, bin_, data, images) if o.verify else None
    if info["verify"] is not None and o.int8 is None:
        need = 0.999 if o.dtype == "fp16" else 0.9999
        if info["verify"]["cosine_min"] < need:
            raise CaitError(
                f"OpenVINO IR disagrees with the ONNX graph: cosine {info['verify']['cosine_min']:.6f} < {need} "
                "on random images; nothing was written"
            )
    info["dtype"] = f"int8 {o.int8}" if o.int8 else o.dtype
    report["openvino"] = info
    return xml, bin_, info


# ---- 2. the model and the images it is checked on, still before any work ----------------------------------
def _load(o: ExportOptions, plan: ExportPlan) -> tuple[Any, _Calibration | None]:
    """The model (header-first validation; a non-fused file is one line saying what it is), the feature blocks
    against its depth, the int8 images, and the memory rule."""
    from caitdeploy.core.budgets import check_memory
    from caitdeploy.families.flops import activation_bytes, param_bytes
    from caitdeploy.families.vit.config import ConfigError
    from caitdeploy.formats.fused import load_model

    net = load_model(o.model, attn_impl="math", img_size=plan.size)
    c = net.config
    if plan.features is not None:
        try:
            c.feature_blocks(plan.features)
        except ConfigError as e:
            raise OptionError("features", f"{str(e).removeprefix('features: ')} ({o.model})") from None
    calibration = _calibration(o, c.input_shape, net.data_config) if o.int8 is not None else None
    check_memory(
        4 * param_bytes(c) + activation_bytes(c, 32 if o.dtype == "fp16" and o.verify else 7),
        f"{o.model}: export and verification",
    )
    return net, calibration


def _calibration(o: ExportOptions, input_shape: tuple[int, int, int], data_config=None) -> _Calibration:
    """Calibration (and --int8-check) images, transformed as the model's recorded data config says."""
    from caitdeploy.export.quantize import calibration_images, synthetic_images

    if o.calib_dir is not None:
        images, cal = calibration_images(o.calib_dir, input_shape, o.calib_samples, data_config=data_config)
    else:
        images, cal = synthetic_images(o.calib_synthetic or 16, input_shape, seed=0, data_config=data_config)
    check_images, check_source = images[:64], cal["source"]
    if o.int8_check is not None:
        check_images, held = calibration_images(
            o.int8_check, input_shape, 64, flag="--int8-check", data_config=data_config
        )
        check_source = held["source"]
    return _Calibration(images, cal if o.int8 == "static" else None, check_images, check_source)


# ---- 3. the work, in memory ---------------------------------------------------------------------------
def _quantize(o: ExportOptions, plan: ExportPlan, fp32_data: bytes, cal: _Calibration, report: dict[str, Any]) -> bytes:
    """int8 graph from the fp32 one, checked against it; the report's onnx entry then describes the int8 graph."""
    from caitdeploy.export.quantize import check_int8, compare_int8, quantize_onnx_bytes

    assert o.int8 is not None
    data, qinfo = quantize_onnx_bytes(
        fp32_data,
        o.int8,
        cal.images if o.int8 == "static" else None,
        o.calib_method,
        attention=o.int8_attention,
        calib_info=cal.info,
        symmetric=o.int8_symmetric or bool(o.trt),
        weight_bits=plan.int8_weight_bits,
    )
    check = dict(compare_int8(fp32_data, data, cal.check_images), source=cal.check_source)
    check_int8(check, o.int8_min_cosine, o.int8_min_top1, str(o.model))
    report["int8"] = {
        **qinfo,
        "check": check,
        "min_cosine": o.int8_min_cosine,
        "min_top1": o.int8_min_top1,
        "calibration_data": cal.info,
        "bytes": len(data),
        "cpu": _cpu_facts(),
    }
    report["onnx"].update(census=qinfo["census"], nodes=sum(qinfo["census"].values()), bytes=len(data))
    return data


def _cpu_facts() -> dict[str, Any]:
    """The machine the int8 check ran on: what decides int8 speed (VNNI) is named with the model."""
    from caitdeploy.core.cpu import cpu_info, has_vnni, int8_note, isa_text

    info = cpu_info()
    return {"model": info["model"], "isa": isa_text(info), "vnni": has_vnni(info), "note": int8_note(info)}


def _build_engine(o: ExportOptions, plan: ExportPlan, data: bytes) -> BuiltEngine:
    """The engine, in memory; a failure says the ONNX export had succeeded (nothing is written either way)."""
    from caitdeploy.export.tensorrt import build_engine_bytes

    assert plan.engine is not None  # planned whenever --trt is given
    try:
        return build_engine_bytes(
            data,
            plan.onnx,
            plan.engine,
            min_batch=o.min_batch,
            opt_batch=o.opt_batch,
            max_batch=o.max_batch,
            workspace_mb=o.workspace_mb,
            timing_cache=o.timing_cache,
            opt_level=o.opt_level,
            compute_capabilities=list(o.compute_capabilities) or None,
            flavour=o.trt_module,
        )
    except CaitError as e:
        raise CaitError(
            f"{e} [nothing written: the ONNX export succeeded"
            f"{' and verified' if o.verify else ''}; use `caitdeploy export` without --trt to "
            "keep it]"
        ) from None


# ---- 4. every output at once ----------------------------------------------------------------------------
def _write(
    o: ExportOptions,
    plan: ExportPlan,
    data: bytes,
    built: BuiltEngine | None,
    entry: TritonEntry | None,
    report: dict[str, Any],
    ir: tuple[bytes, bytes, dict] | None = None,
) -> ExportResult:
    from caitdeploy.core.errors import Staging
    from caitdeploy.export.tensorrt import write_engine
    from caitdeploy.export.triton_repo import stage_triton_repo
    from caitdeploy.formats.sidecar import sidecar_path
    from caitdeploy.pipelines.common import write_json

    sidecar = sidecar_path(plan.engine) if built is not None and plan.engine is not None else None
    with Staging() as st:
        st.write_bytes(plan.onnx, data)
        if ir is not None:
            from caitdeploy.export.openvino_ir import ir_paths

            xml_path, bin_path, side_path = ir_paths(plan.onnx)
            report["openvino"].update(output=str(xml_path), sidecar=str(side_path))
            st.write_bytes(xml_path, ir[0])
            st.write_bytes(bin_path, ir[1])
            write_json(side_path, {k: v for k, v in ir[2].items() if k != "ops"}, staging=st)
        if built is not None and plan.engine is not None:
            write_engine(st, built, plan.engine, Path(o.timing_cache) if o.timing_cache else None)
            report["engine"] = dict(built.sidecar, output=str(plan.engine), sidecar=str(sidecar))
        if entry is not None:
            if plan.served_suffix == ".onnx":
                stage_triton_repo(st, entry, data)
            elif plan.served_suffix == ".xml":
                assert ir is not None  # planned only with --openvino
                stage_triton_repo(st, entry, ir[0], ir[1])
            else:
                assert built is not None  # the entry serves the engine: --trt built one
                stage_triton_repo(st, entry, built.engine)
            report["triton"] = entry.info
        if o.report_path:
            write_json(o.report_path, report, staging=st)
    return ExportResult(
        report,
        plan.onnx,
        plan.engine if built is not None else None,
        sidecar,
        entry.config_path if entry is not None else None,
        Path(o.report_path) if o.report_path else None,
        ir_paths_xml(plan.onnx) if ir is not None else None,
    )


def ir_paths_xml(onnx: Path) -> Path:
    from caitdeploy.export.openvino_ir import ir_paths

    return ir_paths(onnx)[0]


def export(options: ExportOptions, progress: Progress | None = None) -> ExportResult:
    """Export `options.model` as `caitdeploy export` does: check everything, export (and verify) the ONNX,
    quantize it (int8), build an engine (trt), plan the Triton entry (triton_repo), then write every output
    together, or none of them. `progress`, if given, is called with each step's name (`STEPS`) as it starts."""
    step = progress or (lambda name: None)
    plan = check(options)
    step("load")
    net, calibration = _load(options, plan)
    step("onnx")
    from caitdeploy.export.onnx import export_onnx_bytes

    report: dict[str, Any] = {"model": options.model}
    data, report["onnx"] = export_onnx_bytes(
        net,
        plan.onnx,
        dtype=options.dtype,
        opset=plan.opset,
        attention=options.attention,
        verify=options.verify,
        fp16_samples=options.fp16_samples,
        features=plan.features,
        restore=options.restore,
    )
    if calibration is not None:
        step("int8")
        data = _quantize(options, plan, data, calibration, report)
    ir = None
    if options.openvino:
        step("openvino")
        ir = _openvino_ir(options, data, net.config.input_shape, report)
    built = None
    if options.trt:
        step("engine")
        built = _build_engine(options, plan, data)
    entry = None
    if plan.triton is not None:  # planned again, now with the model's input and output dims
        entry = _triton_entry(
            options, plan.triton.info["name"], plan.served_suffix, net.config.input_shape, net.config.num_classes
        )
    step("write")
    return _write(options, plan, data, built, entry, report, ir)
