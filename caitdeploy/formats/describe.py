"""What a file is: a CAIT checkpoint, a fused model, an ONNX file or an engine (with its sidecar).

`describe_file(path)` returns a JSON-able dict (kind, input shape, per-block widths from `flops.block_rows`,
merges, op census, FLOPs, params); `caitdeploy inspect` prints it. Every reader is the validated one
(checkpoints, fused files, ONNX metadata and sidecars), so hostile files get the one-line error.
An engine's header is checked by TensorRT, which this layer does not import: the caller passes the check
(`header_check`, `runtime.tensorrt.engine_header_check` from `pipelines.inspect`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from caitdeploy.core.errors import CaitError, safe_text

ONNX_SUFFIXES = (".onnx",)
ENGINE_SUFFIXES = (".plan", ".engine", ".trt")
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


def _config_summary(config) -> dict[str, Any]:
    from caitdeploy.families.flops import block_rows, model_flops, model_params

    return {
        "img_size": config.img_size if isinstance(config.img_size, int) else list(config.img_size),
        "patch_size": config.patch_size,
        "in_chans": config.in_chans,
        "num_classes": config.num_classes,
        "embed_dim": config.embed_dim,
        "depth": config.depth,
        "merges": config.merges,
        "flops": model_flops(config)["total"],
        "params": model_params(config),
        "blocks": block_rows(config),
    }


def inspect_checkpoint(path: Path) -> dict[str, Any]:
    from caitdeploy.families import family_of
    from caitdeploy.families.flops import model_flops
    from caitdeploy.formats.checkpoint import load_checkpoint

    ckpt = load_checkpoint(path)
    cfg = ckpt.config
    fam = family_of(cfg)
    blocks = []
    kept_detail = []
    for i, b in enumerate(fam.blocks(cfg)):
        widths = {}
        for name, full in (("q", b.qk_dim), ("k", b.qk_dim), ("v", b.v_dim)):
            c = ckpt.compactor(i, name)
            widths[name] = [int(x) for x in c[1].sum(-1).tolist()] if c is not None else [full] * b.num_heads
        c = ckpt.compactor(i, "fc1")
        mlp = int(c[1].sum()) if c is not None else b.mlp_hidden
        qk = max(max(widths["q"]), max(widths["k"]))
        kept_detail.append({"q": widths["q"], "k": widths["k"], "v": widths["v"], "fc1": mlp})
        blocks.append(replace(b, qk_dim=qk, v_dim=max(widths["v"]), mlp_hidden=mlp))
    pruned = fam.with_blocks(cfg, blocks)
    out = {"kind": "checkpoint", "format": "cait-compactor/1", "file": str(path), **_config_summary(pruned)}
    dense = model_flops(cfg.unpruned())  # the dense ViT without merges, as `fuse` reports it
    out["flops_dense"] = dense["total"]
    out["flops_reduction"] = 1 - out["flops"] / dense["total"]
    out["inferred_config"] = ckpt.inferred
    out["kept_per_head"] = kept_detail
    out["note"] = "widths are kept channels (mask == 1), the largest head where heads differ"
    return out


# the fields of a fused file's `caitdeploy` metadata (written by `fuse` and `convert`) that readers use:
# name -> (kind, lowest, highest). Counts are of one image's FLOPs / the model's parameters.
FUSED_META_FIELDS: dict[str, tuple[str, float, float]] = {
    "flops": ("number", 0, 1e18),
    "flops_dense": ("number", 1, 1e18),
    "flops_fused": ("number", 0, 1e18),
    "params": ("number", 0, 1e15),
    "params_dense": ("number", 0, 1e15),
    "params_fused": ("number", 0, 1e15),
    "source": ("text", 0, 4096),
    "converted_from": ("text", 0, 64),
    "options": ("object", 0, 0),
}


def fused_meta(meta: dict[str, Any], path: str | os.PathLike) -> dict[str, Any]:
    """The `caitdeploy` metadata of a fused file with every field a reader uses checked (type and range;
    FUSED_META_FIELDS): a one-line CaitError naming the file and the field otherwise. Unknown fields are kept
    as they are: no reader uses them."""
    import math

    from caitdeploy.families.vit.config import short

    for key, (kind, lo, hi) in FUSED_META_FIELDS.items():
        if key not in meta or meta[key] is None:
            continue
        v = meta[key]
        if kind == "number":
            ok = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v) and lo <= v <= hi
            want = f"a finite number in {lo:g}..{hi:g}"
        elif kind == "text":
            ok = isinstance(v, str) and len(v) <= hi
            want = f"a string of at most {hi:g} characters"
        else:
            ok = isinstance(v, dict)
            want = "a JSON object"
        if not ok:
            raise CaitError(f"{path}: metadata 'caitdeploy' field {key!r} must be {want}, got {short(v)}")
    return meta


def inspect_fused(path: Path) -> dict[str, Any]:
    from caitdeploy.formats.fused import load_fused

    config, sd, meta = load_fused(path)
    meta = fused_meta(meta, path)
    out = {"kind": "fused", "format": "cait-fused/1", "file": str(path), **_config_summary(config)}
    out["tensors"] = len(sd)
    out["stored_params"] = int(sum(t.numel() for t in sd.values()))
    if meta.get("flops_dense"):
        out["flops_dense"] = meta["flops_dense"]
        out["flops_reduction"] = 1 - out["flops"] / meta["flops_dense"]
    out["source"] = meta.get("source")
    return out


def inspect_onnx(path: Path) -> dict[str, Any]:
    from caitdeploy.formats.onnx_meta import (
        _numel,
        io_signature,
        op_census,
        parse_onnx,
        read_onnx_bytes,
        read_onnx_metadata,
    )

    m = parse_onnx(read_onnx_bytes(path), path)  # bounded: size and memory checked before onnx is imported
    if not m.graph.node or not m.opset_import:
        raise CaitError(f"{path}: not an ONNX model (no graph nodes or opset)")
    meta = read_onnx_metadata(m)
    census = op_census(m)
    out: dict[str, Any] = {
        "kind": "onnx",
        "format": meta.get("caitdeploy.format", "onnx"),
        "file": str(path),
        "opset": {o.domain or "ai.onnx": o.version for o in m.opset_import},
        "ir_version": m.ir_version,
        "producer": f"{m.producer_name} {m.producer_version}".strip(),
        **io_signature(m),
        "dtype": (
            f"int8 {meta['caitdeploy.int8'][:20]} ({meta.get('caitdeploy.int8.activations', '?')[:20]} "
            f"activations, {meta.get('caitdeploy.int8.weight_bits', '8')[:2]}-bit weights)"
            if "caitdeploy.int8" in meta
            else meta.get("caitdeploy.dtype")
        ),
        "attention": meta.get("caitdeploy.attention"),
        "features": (meta.get("caitdeploy.features") or "")[:200] or None,
        "restore": (meta.get("caitdeploy.restore") or "")[:40] or None,
        "census": census,
        "nodes": sum(census.values()),
        "params": int(sum(_numel(t) for t in m.graph.initializer)),
    }
    if "caitdeploy.config" in meta:
        from caitdeploy.families.vit.config import ConfigError

        try:
            from caitdeploy.families import config_from_json

            cfg = config_from_json(meta["caitdeploy.config"])
        except ConfigError as e:
            raise CaitError(f"{path}: bad 'caitdeploy.config' metadata: {e}") from None
        out.update(_config_summary(cfg))
    return out


def _same_onnx(src: Path, recorded: dict[str, Any]) -> bool | None:
    """Whether the ONNX file the sidecar names (an untrusted path) still has the recorded SHA-256: None when it
    is not a regular file; False without hashing when its size differs from the recorded size."""
    from caitdeploy.formats.sidecar import sha256_file

    try:
        if not src.is_file():
            return None
        size = src.stat().st_size
        if size != recorded.get("bytes") or size > 2**31:  # an ONNX protobuf is < 2 GiB
            return False
        return sha256_file(src) == recorded["sha256"]
    except OSError:
        return None


# (engine bytes, flavour or None) -> {'supported': ...}: `runtime.tensorrt.engine_header_check`
HeaderCheck = Callable[[bytes, str | None], dict[str, Any]]


def inspect_engine(path: Path, header_check: HeaderCheck | None = None) -> dict[str, Any]:
    """An engine and its sidecar; `header_check` None: the header is not checked (reported unsupported)."""
    from caitdeploy.core.paths import MAX_ENGINE_BYTES, regular_file_size
    from caitdeploy.formats.sidecar import check_engine_file, read_sidecar

    side = read_sidecar(path)
    size = regular_file_size(path, MAX_ENGINE_BYTES, "engine")
    # the plan against the sidecar's byte count and SHA-256 (streamed): a truncated or swapped plan is refused
    # before anything is said about it
    file_check = check_engine_file(path, side)
    with open(path, "rb") as f:
        data = f.read(1 << 20)  # the header check needs the first bytes only, never the whole engine
    out: dict[str, Any] = {
        "kind": "engine",
        "file": str(path),
        "bytes": size,
        "sidecar": side is not None,
        "engine_check": file_check,
    }
    check: dict[str, Any]
    if header_check is None:
        check = {"supported": False, "reason": "no engine header check given (pipelines.inspect passes TensorRT's)"}
    else:
        try:
            check = header_check(data, side.get("flavour") if side else None)
        except CaitError as e:  # no TensorRT module installed
            check = {"supported": False, "reason": str(e)}
    out["header_check"] = check
    if check.get("supported") and (check.get("malformed") or check.get("version_mismatch")):
        raise CaitError(f"{path}: not a valid engine for this TensorRT ({', '.join(check['diagnostics'])})")
    if side is None:
        if not check.get("supported"):
            raise CaitError(f"{path}: no sidecar {path.name}.json and no TensorRT module to check the engine")
        out["note"] = f"no sidecar {path.name}.json: build details unknown"
        return out
    keep = (
        "flavour",
        "trt_version",
        "build_target",
        "strongly_typed",
        "dtype",
        "io_dtype",
        "input",
        "outputs",
        "profile",
        "onnx",
        "opt_level",
        "workspace_mb",
        "build_seconds",
        "engine_bytes",
        "engine_sha256",
        "created",
    )
    out.update({k: side.get(k) for k in keep})
    src = Path(side["onnx"]["path"]) if (side.get("onnx") or {}).get("path") else None
    out["onnx_matches"] = _same_onnx(src, side["onnx"]) if src is not None else None
    if side.get("config"):
        from caitdeploy.families import config_from_dict

        out.update(_config_summary(config_from_dict(side["config"])))  # validated by read_sidecar
    return out


def inspect_openvino_ir(path: Path) -> dict[str, Any]:
    """An OpenVINO IR written by `export --openvino`: its sidecar (bounded read: version, dtype, source ONNX,
    verification) and, where openvino is installed, the model's inputs, outputs and op counts."""
    import json

    from caitdeploy.core.paths import read_bounded, regular_file_size

    regular_file_size(path, 1 << 30, "OpenVINO IR")
    bin_path = path.with_suffix(".bin")
    side_path = Path(str(path) + ".json")
    out: dict[str, Any] = {"kind": "openvino-ir", "file": str(path), "weights_file": str(bin_path)}
    if not bin_path.is_file():
        raise CaitError(f"{path}: its weights {bin_path.name} are missing (an IR is the .xml and the .bin together)")
    out["bin_bytes"] = regular_file_size(bin_path, 1 << 40, "OpenVINO IR weights")
    if side_path.is_file():
        try:
            side = json.loads(read_bounded(side_path, 1 << 20, "IR sidecar"))
        except ValueError:
            raise CaitError(f"{side_path}: not JSON") from None
        if not isinstance(side, dict):
            raise CaitError(f"{side_path}: not a JSON object")
        out["sidecar"] = {k: side.get(k) for k in ("format", "openvino", "dtype", "weights", "onnx_sha256", "verify")}
    else:
        out["sidecar"] = None
    try:  # imported here, not through runtime/ (formats/ must not import runtime/: a package cycle)
        import openvino as ov
    except ImportError:
        out["model"] = "not read: openvino is not installed (pip install 'caitdeploy[openvino]')"
        return out
    try:
        model = ov.Core().read_model(str(path))
    except Exception as e:  # noqa: BLE001 - a hostile or broken IR: one line
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and not ln.startswith("Exception from ")]
        raise CaitError(f"{path}: not a readable OpenVINO IR ({(lines or [type(e).__name__])[0][:200]})") from None
    ops: dict[str, int] = {}
    for op in model.get_ops():
        ops[op.get_type_name()] = ops.get(op.get_type_name(), 0) + 1
    out["inputs"] = [{"name": p.get_any_name(), "shape": str(p.get_partial_shape())} for p in model.inputs]
    out["outputs"] = [
        {"name": min(p.get_names()) if p.get_names() else f"output{i}", "shape": str(p.get_partial_shape())}
        for i, p in enumerate(model.outputs)
    ]
    out["ops"] = dict(sorted(ops.items(), key=lambda kv: -kv[1])[:12])
    return out


def describe_file(path: str | os.PathLike, header_check: HeaderCheck | None = None) -> dict[str, Any]:
    """Describe FILE; raises CaitError for a missing, unknown or corrupt file. header_check: how an engine's
    header is checked (`inspect_engine`)."""
    path = Path(path)
    if not path.exists():
        raise CaitError(f"{path}: no such file")
    if not path.is_file():
        raise CaitError(f"{path}: not a regular file")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from caitdeploy.core.tensorfile import read_safetensors_header

        _, meta = read_safetensors_header(path)  # the header says which reader; no tensor is read twice
        fmt = meta.get("format")
        if fmt == "cait-fused/1":
            return inspect_fused(path)
        if fmt == "cait-compactor/1":
            return inspect_checkpoint(path)
        raise CaitError(
            f"{path}: safetensors file with format {safe_text(fmt, 60)!r}: neither a cait-compactor/1 checkpoint nor "
            "a cait-fused/1 model"
        )
    if suffix in TORCH_SUFFIXES:
        return inspect_checkpoint(path)
    if suffix in ONNX_SUFFIXES:
        return inspect_onnx(path)
    if suffix == ".xml":
        return inspect_openvino_ir(path)
    if suffix in ENGINE_SUFFIXES or Path(str(path) + ".json").is_file():
        return inspect_engine(path, header_check)
    raise CaitError(
        f"{path}: unrecognised file type {suffix or '(no suffix)'!r}: expected a checkpoint "
        "(.pth/.safetensors), a fused model (.safetensors), an ONNX file (.onnx) or an engine (.plan)"
    )
