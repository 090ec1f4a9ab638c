"""Benchmark runners: one function per backend, one flat record per (model, backend, batch).

Backends
  torch         eager PyTorch (CaitViT with SDPA attention; ToMe with SDPA + its matching ops)
  compile       torch.compile; on CUDA mode "max-autotune-no-cudagraphs" by default (or any mode passed,
                e.g. "reduce-overhead" for CUDA graphs); on CPU the default mode (compiling may take minutes)
  ort           ONNX Runtime: TensorRT EP > CUDA EP > CPU EP, the first available for the device;
                IO binding of torch CUDA tensors on GPU; the model is exported with export.onnx.export_onnx
  trt           a TensorRT engine built by export.tensorrt.build_engine and run by runtime.TrtRunner (CUDA only)
  torch-triton  CaitViT with kernels="triton" (CUDA only; n/a for ToMe, which is not a CaitViT)

Timing: `warmup` untimed calls, then per repeat at least `min_iters` calls and at least `min_seconds`
seconds (whichever is longer, capped by `max_iters`). Each call is timed alone and synchronised:
CUDA events around the call for the torch backends on GPU; time.perf_counter around a call followed by
torch.cuda.synchronize() for ort/trt on GPU (they run on their own streams) and for everything on CPU.
Latency percentiles are over all timed calls of all repeats, per batch; throughput = batch / p50.
repeat_spread_pct = 100 * (max - min) / median of the per-repeat medians (None with one repeat).

Peak memory (`peak_mem_kind` says which):
  cuda_max_allocated  torch.cuda.max_memory_allocated over setup + warm-up + timing (torch backends on GPU:
                      weights, activations, compile workspaces)
  cuda_used_delta     device memory in use (cudaMemGetInfo) after the run minus before (ort/trt on GPU,
                      whose allocations torch does not see; includes their arenas/workspaces)
  rss_peak_delta      CPU: peak resident set size (VmHWM, reset through /proc/self/clear_refs before the
                      run) minus the resident set size before setup (export/compile memory included)
  ru_maxrss           CPU fallback when VmHWM cannot be reset: the process's lifetime peak RSS

Any failure of one pair (missing runtime, export error, no GPU, unsupported op) gives a record with
status "n/a: <reason>" and None measurements; the benchmark goes on.
"""

from __future__ import annotations

import gc
import os
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from caitdeploy.core.errors import CaitError, OptionError
from caitdeploy.families.layers import AttnImpl

BACKENDS = ("torch", "compile", "ort", "openvino", "trt", "torch-triton")
DTYPES = ("fp32", "fp16", "bf16", "int8", "int8-dynamic")
INT8_DTYPES = ("int8", "int8-dynamic")  # ONNX Runtime only: static QDQ (synthetic calibration) / dynamic
MODEL_KINDS = ("cait", "dense", "tome")

# every record has exactly these keys; the types of an "ok" record (None allowed where listed)
_S, _I, _F, _N = str, int, float, type(None)
RECORD_SCHEMA: dict[str, tuple[type, ...]] = {
    "model": (_S,),
    "setting": (_S,),
    "arch": (_S,),
    "model_detail": (_S,),
    "backend": (_S,),
    "device": (_S,),
    "dtype": (_S,),
    "batch": (_I,),
    "input": (_S,),
    "outputs": (_S,),
    "flops_per_img": (_I,),
    "flops_reduction": (_F,),
    "params": (_I,),
    "latency_ms_p50": (_F,),
    "latency_ms_p90": (_F,),
    "latency_ms_p99": (_F,),
    "latency_ms_mean": (_F,),
    "throughput_img_s": (_F,),
    "peak_mem_mb": (_F, _N),
    "peak_mem_kind": (_S,),
    "speedup_vs_dense": (_F, _N),
    "speedup_vs_tome": (_F, _N),
    "repeat_spread_pct": (_F, _N),
    "iters": (_I,),
    "warmup": (_I,),
    "repeats": (_I,),
    "setup_s": (_F,),
    "status": (_S,),
    "note": (_S,),
    "env_cpu": (_S,),
    "env_cpu_count": (_I,),
    "env_cpu_isa": (_S,),
    "env_threads": (_I,),
    "env_gpu": (_S, _N),
    "env_driver": (_S, _N),
    "env_cuda": (_S, _N),
    "env_torch": (_S,),
    "env_onnxruntime": (_S, _N),
    "env_tensorrt": (_S, _N),
    "env_python": (_S,),
    "env_os": (_S,),
}
RECORD_KEYS = tuple(RECORD_SCHEMA)
# keys that are None in an "n/a" record
MEASURED_KEYS = (
    "latency_ms_p50",
    "latency_ms_p90",
    "latency_ms_p99",
    "latency_ms_mean",
    "throughput_img_s",
    "peak_mem_mb",
    "peak_mem_kind",
    "speedup_vs_dense",
    "speedup_vs_tome",
    "repeat_spread_pct",
    "iters",
    "setup_s",
)


@dataclass
class Timing:
    warmup: int = 10
    min_iters: int = 20
    min_seconds: float = 2.0
    repeats: int = 2
    max_iters: int = 100_000

    def __post_init__(self) -> None:
        from caitdeploy.core.budgets import MAX_ITERS, MAX_SECONDS, check_float

        for name, v, lo in (
            ("warmup", self.warmup, 0),
            ("min_iters", self.min_iters, 1),
            ("repeats", self.repeats, 1),
            ("max_iters", self.max_iters, 1),
        ):
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= MAX_ITERS:
                raise OptionError(name, f"must be an integer in {lo}..{MAX_ITERS}, got {v!r}")
        check_float(self.min_seconds, "min_seconds", 0.0, MAX_SECONDS)  # inf would never stop


@dataclass
class BenchModel:
    """One model to benchmark. `build(attn_impl, kernels)` returns a fresh fp32 CPU module in eval mode."""

    kind: str  # "cait" | "dense" | "tome"
    setting: str  # the CAIT setting this row belongs to (dense: the architecture)
    arch: str  # the dense architecture, e.g. "vit d384 x12 h6 224px"
    detail: str  # e.g. "CAIT -55.0%", "dense", "ToMe r=18"
    build: Callable[[AttnImpl, str | None], nn.Module]
    input_shape: tuple[int, int, int]  # (C, H, W)
    num_classes: int
    flops: int
    flops_dense: int
    params: int
    output_names: list[str] | None = None  # feature maps (feat3, ...) instead of logits


@dataclass
class RunOptions:
    device: str = "cpu"  # "cpu" | "cuda"
    dtype: str = "fp32"
    timing: Timing = field(default_factory=Timing)
    threads: int | None = None
    work_dir: Path | None = None  # ONNX files and engines; a temporary folder if None
    compile_mode: str | None = None  # None: "max-autotune-no-cudagraphs" on CUDA, default mode on CPU
    seed: int = 0


# ---- environment -------------------------------------------------------------------------------------
def _pkg_version(*names: str) -> str | None:
    from importlib import metadata

    for n in names:
        try:
            return metadata.version(n)
        except metadata.PackageNotFoundError:
            continue
    return None


def isa_text() -> str:
    from caitdeploy.core.cpu import isa_text as text

    return text()


def int8_note() -> str:
    from caitdeploy.core.cpu import int8_note as note

    return note()


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _driver() -> str | None:
    import shutil
    import subprocess

    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


_ENV_CACHE: dict[str, Any] | None = None


def environment() -> dict[str, Any]:
    """env_* keys of a record: hardware and software versions, no hostname."""
    global _ENV_CACHE
    if _ENV_CACHE is None:
        cuda = torch.cuda.is_available()
        _ENV_CACHE = {
            "env_cpu": _cpu_name(),
            "env_cpu_count": os.cpu_count() or 1,
            "env_cpu_isa": isa_text(),
            "env_gpu": torch.cuda.get_device_name(0) if cuda else None,
            "env_driver": _driver() if cuda else None,
            "env_cuda": torch.version.cuda if cuda else None,
            "env_torch": torch.__version__,
            "env_onnxruntime": _pkg_version("onnxruntime", "onnxruntime-gpu"),
            "env_tensorrt": _pkg_version("tensorrt", "tensorrt-cu12", "tensorrt-cu13", "tensorrt_rtx"),
            "env_python": platform.python_version(),
            "env_os": platform.platform(terse=True),
        }
    return {**_ENV_CACHE, "env_threads": torch.get_num_threads()}


# ---- memory ------------------------------------------------------------------------------------------
def _proc_kb(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class MemoryProbe:
    def __init__(self, device: str, torch_alloc: bool):
        self.device, self.torch_alloc = device, torch_alloc
        self.kind = ""
        self.before = 0

    def start(self) -> None:
        gc.collect()
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            if self.torch_alloc:
                self.kind = "cuda_max_allocated"
                torch.cuda.reset_peak_memory_stats()
            else:
                self.kind = "cuda_used_delta"
                free, total = torch.cuda.mem_get_info()
                self.before = total - free
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            self.kind = "rss_peak_delta"
            self.before = _proc_kb("VmRSS") or 0
        except OSError:
            self.kind = "ru_maxrss"

    def peak_mb(self) -> float | None:
        if self.kind == "cuda_max_allocated":
            return torch.cuda.max_memory_allocated() / 2**20
        if self.kind == "cuda_used_delta":
            free, total = torch.cuda.mem_get_info()
            return max(0, total - free - self.before) / 2**20
        if self.kind == "rss_peak_delta":
            hwm = _proc_kb("VmHWM")
            return None if hwm is None else max(0, hwm - self.before) / 1024
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ---- timing ------------------------------------------------------------------------------------------
def _percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    if len(s) == 1:
        return s[0]
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def measure(
    step: Callable[[], Any], timing: Timing, cuda_events: bool = False, sync: Callable[[], None] = lambda: None
) -> list[list[float]]:
    """Per-repeat lists of per-call latencies in ms (after `timing.warmup` untimed calls)."""
    for _ in range(timing.warmup):
        step()
    sync()
    repeats = []
    for _ in range(timing.repeats):
        samples: list[float] = []
        t_start = time.perf_counter()
        while len(samples) < timing.max_iters and (
            len(samples) < timing.min_iters or time.perf_counter() - t_start < timing.min_seconds
        ):
            if cuda_events:
                ev0, ev1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                ev0.record()
                step()
                ev1.record()
                ev1.synchronize()
                samples.append(float(ev0.elapsed_time(ev1)))
            else:
                t0 = time.perf_counter()
                step()
                sync()
                samples.append((time.perf_counter() - t0) * 1e3)
        repeats.append(samples)
    return repeats


def summarize(repeats: list[list[float]], batch: int) -> dict[str, Any]:
    allv = [v for r in repeats for v in r]
    p50 = _percentile(allv, 50)
    meds = [statistics.median(r) for r in repeats]
    spread = 100 * (max(meds) - min(meds)) / statistics.median(meds) if len(meds) > 1 else None
    return {
        "latency_ms_p50": p50,
        "latency_ms_p90": _percentile(allv, 90),
        "latency_ms_p99": _percentile(allv, 99),
        "latency_ms_mean": statistics.fmean(allv),
        "throughput_img_s": batch / p50 * 1e3,
        "repeat_spread_pct": spread,
        "iters": len(allv),
    }


# ---- records -----------------------------------------------------------------------------------------
def base_record(m: BenchModel, backend: str, batch: int, opts: RunOptions, dtype: str) -> dict[str, Any]:
    rec: dict[str, Any] = {k: None for k in RECORD_KEYS}
    rec.update(
        model=m.kind,
        setting=m.setting,
        arch=m.arch,
        model_detail=m.detail,
        backend=backend,
        device=opts.device,
        dtype=dtype,
        batch=int(batch),
        input="x".join(map(str, m.input_shape)),
        outputs=",".join(m.output_names or ["logits"]),
        flops_per_img=int(m.flops),
        flops_reduction=float(1 - m.flops / m.flops_dense),
        params=int(m.params),
        warmup=opts.timing.warmup,
        repeats=opts.timing.repeats,
        status="ok",
        note="",
    )
    rec.update(environment())
    return rec


def na_record(
    m: BenchModel, backend: str, batch: int, opts: RunOptions, reason: str, dtype: str | None = None
) -> dict[str, Any]:
    rec = base_record(m, backend, batch, opts, dtype or opts.dtype)
    reason = " ".join(str(reason).split()) or "unknown error"
    rec["status"] = "n/a: " + (reason if len(reason) <= 300 else reason[:297] + "...")
    return rec


class NotApplicable(Exception):
    """Raised by a runner for a pair that cannot run; becomes status 'n/a: <message>'."""


# ---- backends ----------------------------------------------------------------------------------------
_TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.float32}  # bf16: fp32 + autocast


@dataclass
class BenchContext:
    """State shared by the runs of one benchmark: where ONNX files and engines go, exports already made.
    `notes` and `keep` belong to the current run (what it reports; what must stay alive while it is timed)."""

    work_dir: Path
    onnx_cache: dict[tuple, Any] = field(default_factory=dict)
    tmp: Any = None
    notes: list[str] = field(default_factory=list)
    keep: list[Any] = field(default_factory=list)

    def close(self) -> None:
        if self.tmp is not None:
            self.tmp.cleanup()
            self.tmp = None


def _inputs(m: BenchModel, batch: int, dtype: torch.dtype, device: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *m.input_shape, generator=g)
    return x.to(device=device, dtype=dtype)


def _spec(opts: RunOptions):
    from caitdeploy.runtime import RuntimeSpec

    return RuntimeSpec(opts.device, opts.threads, opts.compile_mode)


def _prepare_torch(m: BenchModel, batch: int, opts: RunOptions, dtype: str, backend: str, ctx: BenchContext):
    from caitdeploy.runtime import TorchRunner

    if backend == "torch-triton":
        if opts.device != "cuda":
            raise NotApplicable("torch-triton needs a CUDA GPU (Triton kernels)")
        if m.kind == "tome":
            raise NotApplicable("torch-triton runs CaitViT only; ToMe has no Triton kernels")
        model = m.build("triton", "triton")
    else:
        model = m.build("sdpa", None)
    if dtype in INT8_DTYPES:
        raise NotApplicable(
            f"{dtype} runs on ONNX Runtime or OpenVINO (--backends ort,openvino): the quantized model is an ONNX graph"
        )
    tdt = _TORCH_DTYPES[dtype]
    runner = TorchRunner(
        model,
        _spec(opts),
        dtype=tdt,
        compile=backend == "compile",
        input_shape=m.input_shape,
        output_names=m.output_names,
        autocast=torch.bfloat16 if dtype == "bf16" else None,
    )
    runner.activate()
    ctx.keep.append(runner)
    if backend == "compile":
        mode = opts.compile_mode or ("max-autotune-no-cudagraphs" if opts.device == "cuda" else None)
        ctx.notes.append(f"torch.compile mode={mode or 'default'}; {runner.cuda_graphs[1]}")
    if dtype == "bf16":
        ctx.notes.append("fp32 weights, torch.autocast bfloat16")
    feed = {runner.input_name: _inputs(m, batch, tdt, opts.device, opts.seed)}
    return (lambda: runner.infer(feed, check_inputs=False)), opts.device == "cuda"


def _onnx_file(m: BenchModel, opts: RunOptions, dtype: str, ctx: BenchContext, symmetric: bool = False) -> Path:
    """Export once per (model, dtype) into the work dir; cached across batches. int8: the fp32 export quantized
    (static QDQ calibrated on 16 synthetic images: the speed does not depend on the calibration data;
    `symmetric`: int8 activations with zero point 0 and float biases, the QDQ form TensorRT takes)."""
    if dtype == "bf16":
        raise NotApplicable(
            "ONNX Runtime has no bfloat16 CPU kernels (MatMul(13): NOT_IMPLEMENTED); bf16 runs on torch/compile"
        )
    key = (m.kind, m.setting, dtype + ("-sym" if symmetric else ""))
    if key in ctx.onnx_cache:
        if isinstance(ctx.onnx_cache[key], Exception):
            raise NotApplicable(f"ONNX export failed: {ctx.onnx_cache[key]}")
        return ctx.onnx_cache[key]
    from caitdeploy.export.onnx import FORBIDDEN_OPS, export_onnx

    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{m.setting}-{m.kind}-{key[2]}")
    path = ctx.work_dir / f"{safe}.onnx"
    if dtype in INT8_DTYPES:
        from caitdeploy.export.quantize import quantize_onnx_bytes, synthetic_images

        fp32 = _onnx_file(m, opts, "fp32", ctx)
        mode = "static" if dtype == "int8" else "dynamic"
        try:
            calib = synthetic_images(16, m.input_shape)[0] if mode == "static" else None
            data, _ = quantize_onnx_bytes(fp32.read_bytes(), mode, calib, symmetric=symmetric)
        except CaitError as e:
            ctx.onnx_cache[key] = e
            raise NotApplicable(str(e)) from None
        path.write_bytes(data)
        ctx.onnx_cache[key] = path
        return path
    model = m.build("math", None).eval()
    try:
        export_onnx(
            model,
            path,
            input_shape=m.input_shape,
            dtype=dtype,
            forbid=() if m.kind == "tome" else FORBIDDEN_OPS,
            verify=False,
            output_names=m.output_names,
        )
    except Exception as e:  # noqa: BLE001 -- any exporter failure makes this pair n/a
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        ctx.onnx_cache[key] = CaitError(f"{type(e).__name__}: {first}")
        raise NotApplicable(f"ONNX export failed: {ctx.onnx_cache[key]}") from None
    ctx.onnx_cache[key] = path
    return path


def _int8_notes(dtype: str, ctx: BenchContext) -> None:
    """What an int8 row says about its graph (ONNX Runtime and OpenVINO run the same files), and a CPU without VNNI."""
    if dtype == "int8":
        ctx.notes.append("int8 static QDQ, weights per channel, calibrated on synthetic images (speed only)")
    elif dtype == "int8-dynamic":
        ctx.notes.append("int8 dynamic (activations quantized at run time)")
    if dtype.startswith("int8") and int8_note():
        ctx.notes.append(int8_note())


def _prepare_ort(m: BenchModel, batch: int, opts: RunOptions, dtype: str, ctx: BenchContext):
    from caitdeploy.runtime import OrtRunner

    try:
        import onnxruntime  # noqa: F401
    except ImportError as e:
        raise NotApplicable(f"onnxruntime is not installed ({e})") from None
    path = _onnx_file(m, opts, dtype, ctx)
    cache = ctx.work_dir / "ort-trt-cache"
    runner = OrtRunner(path, _spec(opts), fp16_hint=dtype == "fp16", batch_hint=batch, trt_cache_dir=str(cache))
    _int8_notes(dtype, ctx)
    try:
        cache.mkdir(exist_ok=True)
        runner.activate()
    except CaitError as e:
        raise NotApplicable(str(e)) from None
    ctx.keep.append(runner)
    ctx.notes.append(f"ort {runner.provider}")
    # the feed is converted to the dtypes the session declares (fp32 I/O for every caitdeploy export)
    runner.bind({name: _inputs(m, batch, torch.float32, opts.device, opts.seed) for name in runner.inputs})
    return runner.run_bound, False


def _openvino_ir_from_torch(m: BenchModel, batch: int, opts: RunOptions, ctx: BenchContext) -> Path:
    """OpenVINO IR of the model converted from PyTorch (ov.convert_model), cached per model and batch."""
    key = (m.kind, m.setting, f"ov-ir-{batch}")
    if key in ctx.onnx_cache:
        cached = ctx.onnx_cache[key]
        if isinstance(cached, Exception):
            raise NotApplicable(str(cached))
        return cached
    import openvino as ov

    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{m.setting}-{m.kind}-b{batch}")
    path = ctx.work_dir / f"{safe}.xml"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit tracer warnings: the token counts are constants here
            om = ov.convert_model(
                m.build("math", None).eval(), example_input=_inputs(m, batch, torch.float32, "cpu", 0)
            )
        ov.save_model(om, str(path), compress_to_fp16=False)
    except Exception as e:  # noqa: BLE001 - the converter raises many types: the pair is n/a, one line
        from caitdeploy.runtime.openvino_runner import ov_error

        ctx.onnx_cache[key] = CaitError(f"OpenVINO cannot convert the PyTorch model: {ov_error(e)}")
        raise NotApplicable(str(ctx.onnx_cache[key])) from None
    ctx.onnx_cache[key] = path
    return path


def _prepare_openvino(m: BenchModel, batch: int, opts: RunOptions, dtype: str, ctx: BenchContext):
    """OpenVINO on the CPU, on the same ONNX files ONNX Runtime runs (fp32, or the int8 QDQ / dynamic graph);
    bf16 is the fp32 graph with INFERENCE_PRECISION_HINT bf16 (n/a without AVX512_BF16 / AMX-BF16)."""
    from caitdeploy.runtime.openvino_runner import OpenVinoRunner, openvino_version

    if opts.device != "cpu":
        raise NotApplicable("the OpenVINO backend runs on the CPU (its GPU plugin is for Intel GPUs)")
    if openvino_version() is None:
        raise NotApplicable("openvino is not installed (pip install 'caitdeploy[openvino]')")
    if m.kind == "tome" and dtype in ("fp32", "bf16"):
        # OpenVINO's ONNX reader cannot convert ToMe's exported graph (ScatterND with rank-0 indices, ReduceMax on a
        # dynamic type); its PyTorch frontend converts the same module (token counts fixed by the input size)
        path = _openvino_ir_from_torch(m, batch, opts, ctx)
        ctx.notes.append("ToMe converted from PyTorch by ov.convert_model (OpenVINO cannot read its ONNX graph)")
    else:
        path = _onnx_file(m, opts, "fp32" if dtype == "bf16" else dtype, ctx)
    _int8_notes(dtype, ctx)
    runner = OpenVinoRunner(path, _spec(opts), precision="bf16" if dtype == "bf16" else "f32")
    try:
        runner.activate()
    except CaitError as e:
        raise NotApplicable(str(e)) from None
    ctx.keep.append(runner)
    ctx.notes.append(f"openvino {openvino_version()} CPU, inference precision {runner.precision}")
    x = _inputs(m, batch, torch.float32, "cpu", opts.seed).numpy()
    feed = {name: x for name in runner.input_names}
    return (lambda: runner.run(feed)), False


def _prepare_trt(m: BenchModel, batch: int, opts: RunOptions, dtype: str, ctx: BenchContext):
    from caitdeploy.runtime import TrtRunner, engine_build_key, reusable_engine

    if opts.device != "cuda":
        raise NotApplicable("TensorRT needs a CUDA GPU")
    from caitdeploy.export import tensorrt as trt_mod

    if dtype == "int8-dynamic":
        raise NotApplicable(
            "TensorRT does not take dynamic quantization (DynamicQuantizeLinear, MatMulInteger); use --dtype int8"
        )
    path = _onnx_file(m, opts, dtype, ctx, symmetric=dtype == "int8")
    engine = path.with_name(f"{path.stem}-b{batch}.engine")
    options: dict[str, Any] = dict(min_batch=1, opt_batch=batch, max_batch=batch)
    key = engine_build_key(path.read_bytes(), options)
    try:
        reuse, why = reusable_engine(engine, key)
        if not reuse:
            # precision comes from the ONNX file (fp16 weights and activations when dtype is fp16)
            trt_mod.build_engine(path, engine, **options)
        ctx.notes.append(f"engine {'reused' if reuse else 'built'} ({why})")
        runner = TrtRunner(engine)
        runner.activate()
    except CaitError as e:
        raise NotApplicable(f"TensorRT: {e}") from None
    ctx.keep.append(runner)
    x = _inputs(m, batch, torch.float32, "cuda", opts.seed)
    feed = {runner.engine.inputs[0]: x}
    return (lambda: runner.infer(feed, check_inputs=False)), False


def run_one(
    m: BenchModel, backend: str, batch: int, opts: RunOptions, ctx: BenchContext | None = None
) -> dict[str, Any]:
    """Benchmark one (model, backend, batch). Never raises for a pair that cannot run: returns an n/a record.

    ctx: shared state across calls of one benchmark (ONNX cache, work dir); created if None.
    """
    if backend not in BACKENDS:
        raise CaitError(f"unknown backend {backend!r}: choose from {', '.join(BACKENDS)}")
    own = ctx is None
    if ctx is None:
        ctx = new_context(opts)
    dtype = opts.dtype
    ctx.notes = []
    if dtype == "fp16" and opts.device == "cpu":
        dtype = "fp32"
        ctx.notes.append("fp16 requested: CPU runs fp32")
    probe = MemoryProbe(opts.device, torch_alloc=backend in ("torch", "compile", "torch-triton"))
    try:
        probe.start()
        t0 = time.perf_counter()
        if backend in ("torch", "compile", "torch-triton"):
            step, events = _prepare_torch(m, batch, opts, dtype, backend, ctx)
        elif backend == "ort":
            step, events = _prepare_ort(m, batch, opts, dtype, ctx)
        elif backend == "openvino":
            step, events = _prepare_openvino(m, batch, opts, dtype, ctx)
        else:
            step, events = _prepare_trt(m, batch, opts, dtype, ctx)
        sync = torch.cuda.synchronize if opts.device == "cuda" else (lambda: None)
        step()  # first call: compilation, engine/arena setup
        sync()
        setup_s = time.perf_counter() - t0
        reps = measure(step, opts.timing, cuda_events=events, sync=sync)
        rec = base_record(m, backend, batch, opts, dtype)
        rec.update(summarize(reps, batch))
        rec.update(setup_s=setup_s, peak_mem_mb=probe.peak_mb(), peak_mem_kind=probe.kind)
        rec["note"] = "; ".join(ctx.notes)
        return rec
    except NotApplicable as e:
        return na_record(m, backend, batch, opts, str(e), dtype)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as e:  # noqa: BLE001 -- one failing pair must not stop the benchmark
        first = (str(e).strip().splitlines() or [""])[0]
        return na_record(m, backend, batch, opts, f"{backend} failed: {type(e).__name__}: {first}", dtype)
    finally:
        for r in ctx.keep:
            if getattr(r, "is_active", False):
                r.deactivate()
        ctx.keep = []
        gc.collect()
        if opts.device == "cuda":
            torch.cuda.empty_cache()
        if own:
            ctx.close()


def new_context(opts: RunOptions) -> BenchContext:
    """Shared state of one benchmark run; `close_context` removes a temporary work dir."""
    if opts.work_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="caitdeploy-bench-")
        return BenchContext(Path(tmp.name), tmp=tmp)
    Path(opts.work_dir).mkdir(parents=True, exist_ok=True)
    return BenchContext(Path(opts.work_dir))


def close_context(ctx: BenchContext) -> None:
    ctx.close()
