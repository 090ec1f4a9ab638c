"""ONNX -> TensorRT engine, one code path for TensorRT >= 10 (`tensorrt`) and TensorRT-RTX (`tensorrt_rtx`).

Networks are always created STRONGLY_TYPED (no FP16 builder flag): the precision of every layer is the one
in the ONNX file, so an fp16 engine comes from an fp16 ONNX (`caitdeploy export --dtype fp16`).

TensorRT-RTX builds ahead of time on the CPU (no GPU needed); by default its engines run on compute
capability 8.0, 8.6, 8.9, 12.0 and later (pass `compute_capabilities` to choose). Its timing-cache API is a
no-op (deprecated in TensorRT-RTX 1.2), so a timing-cache path is only used with full TensorRT.
Running an engine needs a CUDA GPU in both flavours (`TrtRunner`).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from caitdeploy.core.errors import CaitError, OptionError, Staging, check_output_dir, safe_text
from caitdeploy.core.paths import (
    MAX_ENGINE_BYTES,
    MAX_ONNX_BYTES,
    MAX_SIDECAR_BYTES,
    MAX_TIMING_CACHE_BYTES,
    read_bounded,
    regular_file_size,
)

FLAVOURS = ("tensorrt", "tensorrt_rtx")
_HEX64 = re.compile(r"[0-9a-f]{64}")
from caitdeploy.formats.names import ENGINE_FORMAT  # noqa: E402

MAX_PROFILE_BATCH = 65536
BUILD_KEYS = ("min_batch", "opt_batch", "max_batch", "workspace_mb", "opt_level", "compute_capabilities", "flavour")


def normalize_build_options(options: dict[str, Any]) -> dict[str, Any]:
    """Build options as recorded in an engine's sidecar (`build_key`): every key, flavour "auto" for None,
    compute capabilities upper-cased."""
    out = {k: options.get(k) for k in BUILD_KEYS}
    out["flavour"] = out["flavour"] or "auto"
    out["min_batch"] = out["min_batch"] if out["min_batch"] is not None else 1
    if out["compute_capabilities"]:
        out["compute_capabilities"] = [str(c).upper() for c in out["compute_capabilities"]]
    else:
        out["compute_capabilities"] = None
    return out



INSTALL_HINT = "pip install tensorrt-rtx-cu13 (TensorRT-RTX) or pip install tensorrt (TensorRT >= 10)"
_CUDA_NOISE = ("cudaError 35", "CUDA driver version is insufficient", "catchCudaError", "Error reading CUDA GPU")


def import_trt(flavour: str | None = None):
    """The TensorRT Python module: `tensorrt` (>= 10) if importable, else `tensorrt_rtx`.

    flavour: None/"auto" (that order), "tensorrt" or "tensorrt_rtx" (only that one).
    """
    import importlib

    if flavour in (None, "auto"):
        order = FLAVOURS
    elif flavour in FLAVOURS:
        order = (flavour,)
    else:
        raise CaitError(f"unknown TensorRT module {flavour!r}: choose auto, {', '.join(FLAVOURS)}")
    problems = []
    for name in order:
        try:
            mod = importlib.import_module(name)
        except ImportError as e:
            problems.append(f"{name}: {str(e).splitlines()[0] if str(e) else 'not installed'}")
            continue
        major = int(str(getattr(mod, "__version__", "0")).split(".")[0] or 0)
        if name == "tensorrt" and major < 10:
            problems.append(f"tensorrt {mod.__version__} is older than 10")
            continue
        return mod
    raise CaitError(f"no usable TensorRT Python module ({'; '.join(problems)}): {INSTALL_HINT}")


def flavour_of(trt) -> str:
    return "tensorrt_rtx" if trt.__name__.split(".")[0] == "tensorrt_rtx" else "tensorrt"


def _clean(msg: str) -> str:
    lines = [ln.strip() for ln in str(msg).splitlines() if ln.strip() and not any(n in ln for n in _CUDA_NOISE)]
    return "; ".join(lines)


def _make_logger(trt):
    class _Log(trt.ILogger):
        """Collects messages instead of printing them; errors end up in CaitError text."""

        def __init__(self):
            trt.ILogger.__init__(self)
            self.messages: list[tuple[Any, str]] = []

        def log(self, severity, msg):
            self.messages.append((severity, msg))

        def errors(self) -> list[str]:
            bad = (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR)
            return [c for s, m in self.messages if s in bad and (c := _clean(m))]

    return _Log()


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sidecar_path(engine_path: str | os.PathLike) -> Path:
    return Path(str(engine_path) + ".json")


def _onnx_facts(onnx_path: Path, data: bytes) -> dict[str, Any]:
    import onnx

    try:
        m = onnx.load_from_string(data)
    except Exception as e:  # noqa: BLE001 - onnx raises many types for a hostile file: one line for all
        raise CaitError(f"{onnx_path}: not a readable ONNX file ({str(e).splitlines()[0] if str(e) else e})") from None
    inits = {i.name for i in m.graph.initializer}
    inputs = [i for i in m.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise CaitError(f"{onnx_path}: expected one image input, found {[i.name for i in inputs]}")
    dims = [d.dim_param or d.dim_value for d in inputs[0].type.tensor_type.shape.dim]
    if len(dims) != 4 or not all(isinstance(d, int) and d > 0 for d in dims[1:]):
        raise CaitError(f"{onnx_path}: input {inputs[0].name!r} must be [batch, C, H, W] with fixed C, H, W, got {dims}")
    meta = {p.key: p.value for p in m.metadata_props}
    if "caitdeploy.config" in meta:
        from caitdeploy.families import config_from_json
        from caitdeploy.families.vit.config import ConfigError

        try:
            config_from_json(meta["caitdeploy.config"])
        except ConfigError as e:
            raise CaitError(f"{onnx_path}: bad 'caitdeploy.config' metadata: {e}") from None
    wtypes = {onnx.helper.tensor_dtype_to_np_dtype(i.data_type).name for i in m.graph.initializer
              if i.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)}
    dtype = meta.get("caitdeploy.dtype") or ("fp16" if wtypes == {"float16"} else "fp32")
    if "caitdeploy.int8" in meta:
        dtype = f"int8-{meta['caitdeploy.int8']}"
    return {"input": inputs[0].name, "chw": dims[1:], "dtype": dtype, "meta": meta,
            "outputs": [o.name for o in m.graph.output]}


def check_build_options(min_batch: int = 1, opt_batch: int = 256, max_batch: int = 256, workspace_mb: int | None = None,
                        opt_level: int | None = None, compute_capabilities: list[str] | None = None,
                        flavour: str | None = None):
    """Validate every engine-build option before any work; returns the TensorRT module to build with."""
    for name, v in (("min_batch", min_batch), ("opt_batch", opt_batch), ("max_batch", max_batch)):
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_PROFILE_BATCH:
            raise OptionError(name, f"must be an integer in 1..{MAX_PROFILE_BATCH}, got {v!r}")
    if not (1 <= min_batch <= opt_batch <= max_batch):
        raise CaitError(f"batch profile must satisfy 1 <= min <= opt <= max, got {min_batch}/{opt_batch}/{max_batch}")
    if opt_level is not None and (isinstance(opt_level, bool) or not isinstance(opt_level, int)
                                  or not 0 <= opt_level <= 5):
        raise OptionError("opt_level", f"must be 0..5, got {opt_level!r}")
    if workspace_mb is not None and (isinstance(workspace_mb, bool) or not isinstance(workspace_mb, int)
                                     or not 1 <= workspace_mb <= 1 << 20):
        raise OptionError("workspace_mb", f"must be an integer in 1..{1 << 20}, got {workspace_mb!r}")
    trt = import_trt(flavour)
    if compute_capabilities:
        if flavour_of(trt) != "tensorrt_rtx":
            raise OptionError("compute_capability", "is a TensorRT-RTX option; full TensorRT builds for the GPU present")
        names = [n for n in trt.ComputeCapability.__members__ if n not in ("NONE",)]
        for name in compute_capabilities:
            if str(name).upper() not in names:
                raise OptionError("compute_capability", f"{name!r}: choose from {', '.join(names)}")
    return trt


def build_engine(onnx_path: str | os.PathLike, engine_path: str | os.PathLike | None = None, *, min_batch: int = 1,
                 opt_batch: int = 256, max_batch: int = 256, workspace_mb: int | None = None,
                 timing_cache: str | os.PathLike | None = None, opt_level: int | None = None,
                 compute_capabilities: list[str] | None = None, flavour: str | None = None) -> dict[str, Any]:
    """Build a serialized engine from an exported ONNX file; write it and `<engine>.json` atomically (see
    `build_engine_bytes`). Returns the sidecar dict plus `output`, `sidecar`, `seconds_total`."""
    t0 = time.perf_counter()
    from caitdeploy.core.budgets import check_memory

    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise CaitError(f"{onnx_path}: no such file")
    size = regular_file_size(onnx_path, MAX_ONNX_BYTES, "ONNX file")
    check_memory(3 * size, f"building an engine from {onnx_path} ({size} bytes: the file, its parsed graph and "
                 "the engine)")
    engine_path = Path(engine_path) if engine_path else onnx_path.with_suffix(".plan")
    check_output_dir(engine_path, "engine")
    tc_path = Path(timing_cache) if timing_cache else None
    if tc_path is not None:
        check_output_dir(tc_path, "timing cache")
    with Staging() as st:
        onnx_data = read_bounded(onnx_path, MAX_ONNX_BYTES, "ONNX file")
        built = build_engine_bytes(onnx_data, onnx_path, engine_path, min_batch=min_batch,
                                   opt_batch=opt_batch, max_batch=max_batch, workspace_mb=workspace_mb,
                                   timing_cache=tc_path, opt_level=opt_level,
                                   compute_capabilities=compute_capabilities, flavour=flavour)
        write_engine(st, built, engine_path, tc_path)
    sidecar = built.sidecar
    sidecar.update(output=str(engine_path), sidecar=str(sidecar_path(engine_path)),
                   seconds_total=time.perf_counter() - t0)
    return sidecar


@dataclass
class BuiltEngine:
    engine: bytes
    sidecar: dict[str, Any]
    timing_cache: bytes | None = None   # to save (full TensorRT with a timing-cache path)


def write_engine(staging: Staging, built: BuiltEngine, engine_path: Path, timing_cache: Path | None = None) -> None:
    """Stage the engine, its sidecar and the timing cache (they appear when `staging` commits)."""
    staging.write_bytes(engine_path, built.engine)
    staging.write_text(sidecar_path(engine_path), json.dumps(built.sidecar, indent=2) + "\n")
    if built.timing_cache is not None and timing_cache is not None:
        staging.write_bytes(timing_cache, built.timing_cache)
        built.sidecar["timing_cache"]["saved_bytes"] = len(built.timing_cache)


def build_engine_bytes(onnx_data: bytes, onnx_path: str | os.PathLike, engine_path: str | os.PathLike, *,
                       min_batch: int = 1, opt_batch: int = 256, max_batch: int = 256,
                       workspace_mb: int | None = None, timing_cache: str | os.PathLike | None = None,
                       opt_level: int | None = None, compute_capabilities: list[str] | None = None,
                       flavour: str | None = None) -> BuiltEngine:
    """Build a serialized engine from ONNX bytes in memory; nothing is written (see `write_engine`).

    One optimization profile for the image input: batch min/opt/max. workspace_mb: workspace pool limit.
    timing_cache: file loaded if present and saved after the build (full TensorRT only). opt_level: builder
    optimization level 0..5. compute_capabilities (TensorRT-RTX): e.g. ["SM86", "SM89"]; None = library
    default. Parser and builder failures raise CaitError naming the node; no engine file is left behind.
    """
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    trt = check_build_options(min_batch, opt_batch, max_batch, workspace_mb, opt_level, compute_capabilities, flavour)
    flav = flavour_of(trt)
    tc_path = Path(timing_cache) if timing_cache else None
    facts = _onnx_facts(onnx_path, onnx_data)

    logger = _make_logger(trt)
    builder = trt.Builder(logger)
    flags = 0
    strongly_typed = hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
    if strongly_typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    ok = parser.parse(onnx_data)
    if not ok or parser.num_errors:
        errs = []
        for i in range(parser.num_errors):
            e = parser.get_error(i)
            node = e.node_name() or (f"#{e.node()}" if e.node() >= 0 else "?")
            errs.append(f"node {node!r} ({e.node_operator() or '?'}): {_clean(e.desc())}")
        hint = ""
        if any("Key and Value must have the same shape" in x for x in errs):
            hint = (" -- this parser's Attention import needs equal q/k and v head widths: export with "
                    "--attention matmul, or fuse with --equal-head-dims")
        raise CaitError(f"{onnx_path}: {flav} {trt.__version__} ONNX parser: {errs[0] if errs else 'failed'}"
                        + (f" (+{len(errs) - 1} more)" if len(errs) > 1 else "") + hint)

    quant = None
    if "caitdeploy.int8" in facts["meta"]:   # explicit quantization: count the Q/DQ layers the parser made
        kinds = [network.get_layer(i).type for i in range(network.num_layers)]
        quant = {"int8": facts["meta"]["caitdeploy.int8"],
                 "quantize_layers": sum(k == trt.LayerType.QUANTIZE for k in kinds),
                 "dequantize_layers": sum(k == trt.LayerType.DEQUANTIZE for k in kinds),
                 "network_layers": len(kinds)}
    config = builder.create_builder_config()
    if workspace_mb is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    if opt_level is not None:
        config.builder_optimization_level = int(opt_level)
    c, h, w = facts["chw"]
    profile = builder.create_optimization_profile()
    profile.set_shape(facts["input"], (min_batch, c, h, w), (opt_batch, c, h, w), (max_batch, c, h, w))
    config.add_optimization_profile(profile)

    target: dict[str, Any]
    if flav == "tensorrt_rtx":
        if compute_capabilities:
            config.num_compute_capabilities = len(compute_capabilities)
            for i, name in enumerate(compute_capabilities):
                cc = getattr(trt.ComputeCapability, str(name).upper(), None)
                if cc is None:
                    names = [n for n in trt.ComputeCapability.__members__ if n not in ("NONE",)]
                    raise CaitError(f"unknown compute capability {name!r}: choose from {', '.join(names)}")
                config.set_compute_capability(cc, i)
            target = {"compute_capabilities": [str(n).upper() for n in compute_capabilities]}
        else:
            target = {"compute_capabilities": "default (TensorRT-RTX: SM 8.0, 8.6, 8.9, 12.0 and later)"}
        target["built_on"] = "CPU (ahead-of-time)"
    else:
        import torch

        if compute_capabilities:
            raise CaitError("compute_capabilities is a TensorRT-RTX option; full TensorRT builds for the GPU present")
        if not torch.cuda.is_available():
            raise CaitError("full TensorRT builds engines on a CUDA GPU and none is available "
                            "(TensorRT-RTX builds on the CPU: pip install tensorrt-rtx-cu13)")
        major, minor = torch.cuda.get_device_capability()
        target = {"compute_capability": f"{major}.{minor}", "gpu": torch.cuda.get_device_name()}

    tc_info: dict[str, Any] = {"path": str(tc_path) if tc_path else None}
    cache = None
    if tc_path is not None:
        if flav == "tensorrt_rtx":
            tc_info.update(used=False, reason="TensorRT-RTX timing-cache operations are no-ops (deprecated in 1.2)")
        else:
            blob = read_bounded(tc_path, MAX_TIMING_CACHE_BYTES, "timing cache") if tc_path.is_file() else b""
            cache = config.create_timing_cache(blob)
            config.set_timing_cache(cache, ignore_mismatch=False)
            tc_info.update(used=True, loaded_bytes=len(blob), reused=bool(blob))

    t_build = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    build_s = time.perf_counter() - t_build
    if serialized is None:
        errs = logger.errors()
        raise CaitError(f"{onnx_path}: {flav} {trt.__version__} engine build failed: "
                        f"{errs[-1] if errs else 'no error message'}")
    engine_bytes = bytes(serialized)

    sidecar = {
        "format": ENGINE_FORMAT, "engine": engine_path.name, "flavour": flav, "trt_version": trt.__version__,
        "build_target": target, "strongly_typed": strongly_typed, "dtype": facts["dtype"],
        "io_dtype": facts["meta"].get("caitdeploy.io_dtype", "float32"),
        "input": facts["input"], "outputs": facts["outputs"],
        "profile": {"min": [min_batch, c, h, w], "opt": [opt_batch, c, h, w], "max": [max_batch, c, h, w]},
        "onnx": {"path": str(onnx_path), "sha256": hashlib.sha256(onnx_data).hexdigest(), "bytes": len(onnx_data)},
        "opt_level": config.builder_optimization_level, "workspace_mb": workspace_mb, "timing_cache": tc_info,
        "build_key": normalize_build_options(dict(
            min_batch=min_batch, opt_batch=opt_batch, max_batch=max_batch, workspace_mb=workspace_mb,
            opt_level=opt_level, compute_capabilities=compute_capabilities, flavour=flavour)),
        "build_seconds": build_s, "engine_bytes": len(engine_bytes),
        "engine_sha256": hashlib.sha256(engine_bytes).hexdigest(), "host": platform.node(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if "caitdeploy.config" in facts["meta"]:
        sidecar["config"] = json.loads(facts["meta"]["caitdeploy.config"])
    if quant is not None:
        warn = trt.ILogger.Severity.WARNING
        quant["builder_warnings"] = sorted({c for sv, m in logger.messages if sv == warn and (c := _clean(m))})[:20]
        sidecar["quantization"] = quant
    saved = bytes(config.get_timing_cache().serialize()) if cache is not None else None
    return BuiltEngine(engine_bytes, sidecar, saved)


def _sidecar_problem(d: dict[str, Any]) -> str | None:
    """Why a sidecar's fields cannot be used (types, shapes), or None."""
    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    for key in ("flavour", "trt_version", "input", "dtype", "io_dtype", "created", "engine", "host"):
        if key in d and not isinstance(d[key], str):
            return f"{key!r} must be a string"
        if key in d and len(d[key]) > 4096:
            return f"{key!r} is {len(d[key])} characters long; a sidecar field is short"
    if d.get("flavour") not in (None, *FLAVOURS):
        return f"'flavour' must be one of {', '.join(FLAVOURS)}"
    prof = d.get("profile")
    if prof is not None:
        if not isinstance(prof, dict) or set(prof) != {"min", "opt", "max"}:
            return "'profile' must have min, opt and max"
        for k, v in prof.items():
            if not (isinstance(v, list) and len(v) == 4 and all(is_int(x) and 0 < x <= 1 << 20 for x in v)):
                return f"'profile.{k}' must be 4 positive integers"
    onnx = d.get("onnx")
    if onnx is not None:
        if not isinstance(onnx, dict) or not isinstance(onnx.get("path"), str) \
                or not isinstance(onnx.get("sha256"), str) or len(onnx["sha256"]) != 64:
            return "'onnx' must hold a path and a 64-character sha256"
        if not _HEX64.fullmatch(onnx["sha256"]):
            return "'onnx.sha256' must be 64 hexadecimal digits"
        if "bytes" in onnx and not (is_int(onnx["bytes"]) and 0 <= onnx["bytes"] <= 1 << 62):
            return "'onnx.bytes' must be a non-negative integer"
    for key in ("build_seconds",):
        if key in d and (isinstance(d[key], bool) or not isinstance(d[key], (int, float))
                         or not math.isfinite(d[key]) or d[key] < 0):
            return f"{key!r} must be a finite number >= 0"
    for key, lo, hi in (("opt_level", 0, 5), ("engine_bytes", 0, 1 << 62), ("workspace_mb", 0, 1 << 40)):
        if d.get(key) is not None and not (is_int(d[key]) and lo <= d[key] <= hi):
            return f"{key!r} must be an integer in {lo}..{hi}"
    if d.get("engine_sha256") is not None and not (isinstance(d["engine_sha256"], str)
                                                    and _HEX64.fullmatch(d["engine_sha256"])):
        return "'engine_sha256' must be 64 hexadecimal digits"
    if "outputs" in d and not (isinstance(d["outputs"], list) and all(isinstance(x, str) for x in d["outputs"])):
        return "'outputs' must be a list of names"
    if "build_target" in d and not isinstance(d["build_target"], dict):
        return "'build_target' must be an object"
    if "strongly_typed" in d and not isinstance(d["strongly_typed"], bool):
        return "'strongly_typed' must be true or false"
    if d.get("config") is not None:
        from caitdeploy.families import config_from_dict
        from caitdeploy.families.vit.config import ConfigError

        try:
            config_from_dict(d["config"])
        except ConfigError as e:
            return f"'config': {e}"
    return None


def read_sidecar(engine_path: str | os.PathLike) -> dict[str, Any] | None:
    """The engine's sidecar `<engine>.json`, validated field by field; None when there is none."""
    from caitdeploy.families.vit.config import ConfigError, strict_json

    p = sidecar_path(engine_path)
    if not p.is_file():
        return None
    raw = read_bounded(p, MAX_SIDECAR_BYTES, "engine sidecar")  # size checked before reading (symlinks too)
    try:
        data = strict_json(raw.decode("utf-8"), "engine sidecar")
    except (ConfigError, UnicodeDecodeError) as e:
        raise CaitError(f"{p}: {e}") from None
    if not isinstance(data, dict) or data.get("format") != ENGINE_FORMAT:
        fmt = data.get("format") if isinstance(data, dict) else None
        raise CaitError(f"{p}: not a caitdeploy engine sidecar (format {safe_text(fmt, 60)!r})")
    if (why := _sidecar_problem(data)) is not None:
        raise CaitError(f"{p}: bad engine sidecar: {why}")
    return data


def check_engine_file(engine_path: str | os.PathLike, side: dict[str, Any] | None,
                      data: bytes | None = None) -> dict[str, Any]:
    """The engine file against its sidecar: its size must equal `engine_bytes` and its SHA-256 `engine_sha256`
    (a truncated, appended-to or swapped plan is refused in one line naming the file). Sidecars written before
    caitdeploy recorded the hash are checked by size only, and the result says so.

    Returns {"bytes": size, "bytes_match": bool | None, "sha256": hex | None, "sha256_match": bool | None,
    "note": str | None}; None entries mean the sidecar has no such field. `data`: the file's bytes when the
    caller already read them (hashed instead of reading the file again)."""
    path = Path(engine_path)
    size = len(data) if data is not None else regular_file_size(path, MAX_ENGINE_BYTES, "engine")
    out: dict[str, Any] = {"bytes": size, "bytes_match": None, "sha256": None, "sha256_match": None, "note": None}
    if side is None:
        return out
    want = side.get("engine_bytes")
    if want is not None:
        out["bytes_match"] = size == want
        if size != want:
            raise CaitError(f"{path}: engine is {size} bytes but its sidecar {sidecar_path(path).name} records "
                            f"{want}: the file was truncated, extended or replaced since the build")
    if side.get("engine_sha256") is None:
        out["note"] = ("the sidecar records no engine SHA-256 (written by an older caitdeploy): only the byte count "
                       "was checked" if want is not None else "the sidecar records neither the engine's size nor "
                       "its SHA-256: the engine file is unchecked")
        return out
    digest = hashlib.sha256(data).hexdigest() if data is not None else sha256_file(path)
    out["sha256"], out["sha256_match"] = digest, digest == side["engine_sha256"]
    if digest != side["engine_sha256"]:
        raise CaitError(f"{path}: engine SHA-256 {digest[:16]}... differs from the {side['engine_sha256'][:16]}... "
                        f"its sidecar {sidecar_path(path).name} records: the file changed since the build")
    return out


def engine_header_check(engine_bytes: bytes, flavour: str | None = None) -> dict[str, Any]:
    """GPU-free plausibility check of a TensorRT-RTX engine header (`Runtime.get_engine_validity`).

    Returns {"supported", "validity", "diagnostics": [names], "malformed", "version_mismatch"}. Without a GPU
    the runtime cannot read the device properties and reports INVALID with no diagnostic bit for a good engine;
    a corrupt or foreign file is flagged MALFORMED_ENGINE / VERSION_MISMATCH.
    """
    trt = import_trt(flavour)
    logger = _make_logger(trt)
    runtime = trt.Runtime(logger)
    if not hasattr(runtime, "get_engine_validity"):
        return {"supported": False}
    size = int(getattr(runtime, "engine_header_size", 0) or 0)
    if len(engine_bytes) < max(size, 1):
        return {"supported": True, "validity": "INVALID", "diagnostics": ["TRUNCATED"], "malformed": True,
                "version_mismatch": False}
    validity, diag = runtime.get_engine_validity(engine_bytes[:size] if size else engine_bytes)
    names = [n for n, v in trt.EngineInvalidityDiagnostics.__members__.items() if int(diag) & int(v)]
    return {"supported": True, "validity": validity.name, "diagnostics": names,
            "malformed": "MALFORMED_ENGINE" in names, "version_mismatch": "VERSION_MISMATCH" in names}


class TrtRunner:
    """Deserialize an engine and run it on CUDA with named tensors and `execute_async_v3`.

    runner = TrtRunner("m.plan"); logits = runner(images)  # images: torch tensor [B, C, H, W]
    Buffers are torch CUDA tensors; the batch must lie inside the engine's optimization profile.
    """

    def __init__(self, engine_path: str | os.PathLike, flavour: str | None = None, device: int = 0):
        import torch

        self.path = Path(engine_path)
        if not self.path.is_file():
            raise CaitError(f"{self.path}: no such file")
        side = read_sidecar(self.path)
        from caitdeploy.core.budgets import check_memory

        size = regular_file_size(self.path, MAX_ENGINE_BYTES, "engine")
        check_memory(2 * size, f"loading the engine {self.path} ({size} bytes, read and deserialized)")
        if flavour is None and side:
            flavour = side.get("flavour")
        self.trt = trt = import_trt(flavour)
        if not torch.cuda.is_available():
            raise CaitError(f"{self.path}: running a TensorRT engine needs a CUDA GPU and none is available "
                            "(torch.cuda.is_available() is False)")
        self.device = torch.device("cuda", device)
        torch.cuda.set_device(self.device)
        self.logger = _make_logger(trt)
        self.runtime = trt.Runtime(self.logger)
        plan = read_bounded(self.path, MAX_ENGINE_BYTES, "engine")
        check_engine_file(self.path, side, plan)
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        del plan
        if self.engine is None:
            errs = self.logger.errors()
            raise CaitError(f"{self.path}: {flavour_of(trt)} {trt.__version__} cannot deserialize the engine: "
                            f"{errs[-1] if errs else 'no error message'}")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.stream = torch.cuda.Stream(self.device)

    def _torch_dtype(self, name: str):
        import torch

        dt = self.engine.get_tensor_dtype(name)
        table = {self.trt.DataType.FLOAT: torch.float32, self.trt.DataType.HALF: torch.float16,
                 self.trt.DataType.INT32: torch.int32, self.trt.DataType.INT64: torch.int64,
                 self.trt.DataType.BOOL: torch.bool}
        if hasattr(self.trt.DataType, "BF16"):
            table[self.trt.DataType.BF16] = torch.bfloat16
        if dt not in table:
            raise CaitError(f"{self.path}: tensor {name!r} has unsupported dtype {dt}")
        return table[dt]

    def __call__(self, images):
        import torch

        if len(self.inputs) != 1:
            raise CaitError(f"{self.path}: expected one input tensor, engine has {self.inputs}")
        name = self.inputs[0]
        x = images.to(self.device, self._torch_dtype(name)).contiguous()
        if not self.context.set_input_shape(name, tuple(x.shape)):
            raise CaitError(f"{self.path}: input shape {tuple(x.shape)} is outside the engine's profile")
        self.context.set_tensor_address(name, x.data_ptr())
        outs = {}
        for out in self.outputs:
            shape = tuple(self.context.get_tensor_shape(out))
            outs[out] = torch.empty(shape, dtype=self._torch_dtype(out), device=self.device)
            self.context.set_tensor_address(out, outs[out].data_ptr())
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise CaitError(f"{self.path}: execute_async_v3 failed: {'; '.join(self.logger.errors()[-1:])}")
        self.stream.synchronize()
        return outs[self.outputs[0]] if len(outs) == 1 else outs
