"""ONNX -> TensorRT engine, one code path for TensorRT >= 10 (`tensorrt`) and TensorRT-RTX (`tensorrt_rtx`).

Networks are always created STRONGLY_TYPED (no FP16 builder flag): the precision of every layer is the one
in the ONNX file, so an fp16 engine comes from an fp16 ONNX (`caitdeploy export --dtype fp16`).

TensorRT-RTX builds ahead of time on the CPU (no GPU needed); by default its engines run on compute
capability 8.0, 8.6, 8.9, 12.0 and later (pass `compute_capabilities` to choose). Its timing-cache API is a
no-op (deprecated in TensorRT-RTX 1.2), so a timing-cache path is only used with full TensorRT.
Running an engine needs a CUDA GPU in both flavours (`runtime.tensorrt.TrtEngine`); the TensorRT module
itself comes from `runtime.tensorrt.import_trt`.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from caitdeploy.core.errors import CaitError, OptionError, Staging, check_output_dir
from caitdeploy.core.names import ENGINE_FORMAT
from caitdeploy.core.paths import (
    MAX_ONNX_BYTES,
    MAX_TIMING_CACHE_BYTES,
    read_bounded,
    regular_file_size,
)
from caitdeploy.formats.sidecar import normalize_build_options, sidecar_path

MAX_PROFILE_BATCH = 65536


def _onnx_facts(onnx_path: Path, data: bytes) -> dict[str, Any]:
    import onnx

    from caitdeploy.formats.onnx_meta import parse_onnx

    m = parse_onnx(data, onnx_path)
    inits = {i.name for i in m.graph.initializer}
    inputs = [i for i in m.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise CaitError(f"{onnx_path}: expected one image input, found {[i.name for i in inputs]}")
    dims = [d.dim_param or d.dim_value for d in inputs[0].type.tensor_type.shape.dim]
    if len(dims) != 4 or not all(isinstance(d, int) and d > 0 for d in dims[1:]):
        raise CaitError(
            f"{onnx_path}: input {inputs[0].name!r} must be [batch, C, H, W] with fixed C, H, W, got {dims}"
        )
    meta = {p.key: p.value for p in m.metadata_props}
    if "caitdeploy.config" in meta:
        from caitdeploy.families import config_from_json
        from caitdeploy.families.vit.config import ConfigError

        try:
            config_from_json(meta["caitdeploy.config"])
        except ConfigError as e:
            raise CaitError(f"{onnx_path}: bad 'caitdeploy.config' metadata: {e}") from None
    wtypes = {
        onnx.helper.tensor_dtype_to_np_dtype(i.data_type).name
        for i in m.graph.initializer
        if i.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
    }
    dtype = meta.get("caitdeploy.dtype") or ("fp16" if wtypes == {"float16"} else "fp32")
    if "caitdeploy.int8" in meta:
        dtype = f"int8-{meta['caitdeploy.int8']}"
    return {
        "input": inputs[0].name,
        "chw": dims[1:],
        "dtype": dtype,
        "meta": meta,
        "outputs": [o.name for o in m.graph.output],
    }


def check_build_options(
    min_batch: int = 1,
    opt_batch: int = 256,
    max_batch: int = 256,
    workspace_mb: int | None = None,
    opt_level: int | None = None,
    compute_capabilities: list[str] | None = None,
    flavour: str | None = None,
):
    """Validate every engine-build option before any work; returns the TensorRT module to build with."""
    for name, v in (("min_batch", min_batch), ("opt_batch", opt_batch), ("max_batch", max_batch)):
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_PROFILE_BATCH:
            raise OptionError(name, f"must be an integer in 1..{MAX_PROFILE_BATCH}, got {v!r}")
    if not (1 <= min_batch <= opt_batch <= max_batch):
        raise CaitError(f"batch profile must satisfy 1 <= min <= opt <= max, got {min_batch}/{opt_batch}/{max_batch}")
    if opt_level is not None and (
        isinstance(opt_level, bool) or not isinstance(opt_level, int) or not 0 <= opt_level <= 5
    ):
        raise OptionError("opt_level", f"must be 0..5, got {opt_level!r}")
    if workspace_mb is not None and (
        isinstance(workspace_mb, bool) or not isinstance(workspace_mb, int) or not 1 <= workspace_mb <= 1 << 20
    ):
        raise OptionError("workspace_mb", f"must be an integer in 1..{1 << 20}, got {workspace_mb!r}")
    from caitdeploy.runtime.tensorrt import flavour_of, import_trt

    trt = import_trt(flavour)
    if compute_capabilities:
        if flavour_of(trt) != "tensorrt_rtx":
            raise OptionError(
                "compute_capability", "is a TensorRT-RTX option; full TensorRT builds for the GPU present"
            )
        names = [n for n in trt.ComputeCapability.__members__ if n not in ("NONE",)]
        for name in compute_capabilities:
            if str(name).upper() not in names:
                raise OptionError("compute_capability", f"{name!r}: choose from {', '.join(names)}")
    return trt


def build_engine(
    onnx_path: str | os.PathLike,
    engine_path: str | os.PathLike | None = None,
    *,
    min_batch: int = 1,
    opt_batch: int = 256,
    max_batch: int = 256,
    workspace_mb: int | None = None,
    timing_cache: str | os.PathLike | None = None,
    opt_level: int | None = None,
    compute_capabilities: list[str] | None = None,
    flavour: str | None = None,
) -> dict[str, Any]:
    """Build a serialized engine from an exported ONNX file; write it and `<engine>.json` atomically (see
    `build_engine_bytes`). Returns the sidecar dict plus `output`, `sidecar`, `seconds_total`."""
    t0 = time.perf_counter()
    from caitdeploy.core.budgets import check_memory

    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise CaitError(f"{onnx_path}: no such file")
    size = regular_file_size(onnx_path, MAX_ONNX_BYTES, "ONNX file")
    check_memory(
        3 * size, f"building an engine from {onnx_path} ({size} bytes: the file, its parsed graph and the engine)"
    )
    engine_path = Path(engine_path) if engine_path else onnx_path.with_suffix(".plan")
    check_output_dir(engine_path, "engine")
    tc_path = Path(timing_cache) if timing_cache else None
    if tc_path is not None:
        check_output_dir(tc_path, "timing cache")
    with Staging() as st:
        onnx_data = read_bounded(onnx_path, MAX_ONNX_BYTES, "ONNX file")
        built = build_engine_bytes(
            onnx_data,
            onnx_path,
            engine_path,
            min_batch=min_batch,
            opt_batch=opt_batch,
            max_batch=max_batch,
            workspace_mb=workspace_mb,
            timing_cache=tc_path,
            opt_level=opt_level,
            compute_capabilities=compute_capabilities,
            flavour=flavour,
        )
        write_engine(st, built, engine_path, tc_path)
    sidecar = built.sidecar
    sidecar.update(
        output=str(engine_path), sidecar=str(sidecar_path(engine_path)), seconds_total=time.perf_counter() - t0
    )
    return sidecar


@dataclass
class BuiltEngine:
    engine: bytes
    sidecar: dict[str, Any]
    timing_cache: bytes | None = None  # to save (full TensorRT with a timing-cache path)


def write_engine(staging: Staging, built: BuiltEngine, engine_path: Path, timing_cache: Path | None = None) -> None:
    """Stage the engine, its sidecar and the timing cache (they appear when `staging` commits)."""
    staging.write_bytes(engine_path, built.engine)
    staging.write_text(sidecar_path(engine_path), json.dumps(built.sidecar, indent=2) + "\n")
    if built.timing_cache is not None and timing_cache is not None:
        staging.write_bytes(timing_cache, built.timing_cache)
        built.sidecar["timing_cache"]["saved_bytes"] = len(built.timing_cache)


def build_engine_bytes(
    onnx_data: bytes,
    onnx_path: str | os.PathLike,
    engine_path: str | os.PathLike,
    *,
    min_batch: int = 1,
    opt_batch: int = 256,
    max_batch: int = 256,
    workspace_mb: int | None = None,
    timing_cache: str | os.PathLike | None = None,
    opt_level: int | None = None,
    compute_capabilities: list[str] | None = None,
    flavour: str | None = None,
) -> BuiltEngine:
    """Build a serialized engine from ONNX bytes in memory; nothing is written (see `write_engine`).

    One optimization profile for the image input: batch min/opt/max. workspace_mb: workspace pool limit.
    timing_cache: file loaded if present and saved after the build (full TensorRT only). opt_level: builder
    optimization level 0..5. compute_capabilities (TensorRT-RTX): e.g. ["SM86", "SM89"]; None = library
    default. Parser and builder failures raise CaitError naming the node; no engine file is left behind.
    """
    from caitdeploy.runtime.tensorrt import _clean, _make_logger, flavour_of

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
            hint = (
                " -- this parser's Attention import needs equal q/k and v head widths: export with "
                "--attention matmul, or fuse with --equal-head-dims"
            )
        raise CaitError(
            f"{onnx_path}: {flav} {trt.__version__} ONNX parser: {errs[0] if errs else 'failed'}"
            + (f" (+{len(errs) - 1} more)" if len(errs) > 1 else "")
            + hint
        )

    quant = None
    if "caitdeploy.int8" in facts["meta"]:  # explicit quantization: count the Q/DQ layers the parser made
        kinds = [network.get_layer(i).type for i in range(network.num_layers)]
        quant = {
            "int8": facts["meta"]["caitdeploy.int8"],
            "quantize_layers": sum(k == trt.LayerType.QUANTIZE for k in kinds),
            "dequantize_layers": sum(k == trt.LayerType.DEQUANTIZE for k in kinds),
            "network_layers": len(kinds),
        }
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
            raise CaitError(
                "full TensorRT builds engines on a CUDA GPU and none is available "
                "(TensorRT-RTX builds on the CPU: pip install tensorrt-rtx-cu13)"
            )
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
        raise CaitError(
            f"{onnx_path}: {flav} {trt.__version__} engine build failed: {errs[-1] if errs else 'no error message'}"
        )
    engine_bytes = bytes(serialized)

    sidecar = {
        "format": ENGINE_FORMAT,
        "engine": engine_path.name,
        "flavour": flav,
        "trt_version": trt.__version__,
        "build_target": target,
        "strongly_typed": strongly_typed,
        "dtype": facts["dtype"],
        "io_dtype": facts["meta"].get("caitdeploy.io_dtype", "float32"),
        "input": facts["input"],
        "outputs": facts["outputs"],
        "profile": {"min": [min_batch, c, h, w], "opt": [opt_batch, c, h, w], "max": [max_batch, c, h, w]},
        "onnx": {"path": str(onnx_path), "sha256": hashlib.sha256(onnx_data).hexdigest(), "bytes": len(onnx_data)},
        "opt_level": config.builder_optimization_level,
        "workspace_mb": workspace_mb,
        "timing_cache": tc_info,
        "build_key": normalize_build_options(
            dict(
                min_batch=min_batch,
                opt_batch=opt_batch,
                max_batch=max_batch,
                workspace_mb=workspace_mb,
                opt_level=opt_level,
                compute_capabilities=compute_capabilities,
                flavour=flavour,
            )
        ),
        "build_seconds": build_s,
        "engine_bytes": len(engine_bytes),
        "engine_sha256": hashlib.sha256(engine_bytes).hexdigest(),
        "host": platform.node(),
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
