"""`caitdeploy inspect FILE`: what a checkpoint, fused model, ONNX file or engine is, and its shapes."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import click

from ..errors import CaitError
from .common import console, handle_errors, human

ONNX_SUFFIXES = (".onnx",)
ENGINE_SUFFIXES = (".plan", ".engine", ".trt")
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


def block_rows(config, flops: dict | None = None) -> list[dict[str, Any]]:
    from ..flops import model_flops

    flops = flops or model_flops(config)
    tokens = config.tokens()
    return [{"block": i, "merge": b.merge, "tokens": tokens[i], "heads": b.num_heads, "qk_per_head": b.qk_dim,
             "v_per_head": b.v_dim, "mlp": b.mlp_hidden, "attn_scale": b.attn_scale,
             "flops": flops["blocks"][i]["total"]} for i, b in enumerate(config.blocks)]


def _config_summary(config) -> dict[str, Any]:
    from ..flops import model_flops, model_params

    f = model_flops(config)
    return {"img_size": config.img_size, "patch_size": config.patch_size, "in_chans": config.in_chans,
            "num_classes": config.num_classes, "embed_dim": config.embed_dim, "depth": config.depth,
            "merges": config.merges, "flops": f["total"], "params": model_params(config),
            "blocks": block_rows(config, f)}


def inspect_checkpoint(path: Path) -> dict[str, Any]:
    from ..checkpoint import load_checkpoint
    from ..config import BlockConfig, CaitConfig
    from ..flops import model_flops

    ckpt = load_checkpoint(path)
    cfg = ckpt.config
    blocks = []
    kept_detail = []
    for i, b in enumerate(cfg.blocks):
        widths = {}
        for name, full in (("q", b.qk_dim), ("k", b.qk_dim), ("v", b.v_dim)):
            c = ckpt.compactor(i, name)
            widths[name] = [int(x) for x in c[1].sum(-1).tolist()] if c is not None else [full] * b.num_heads
        c = ckpt.compactor(i, "fc1")
        mlp = int(c[1].sum()) if c is not None else b.mlp_hidden
        qk = max(max(widths["q"]), max(widths["k"]))
        kept_detail.append({"q": widths["q"], "k": widths["k"], "v": widths["v"], "fc1": mlp})
        blocks.append(BlockConfig(b.num_heads, qk, max(widths["v"]), mlp, b.attn_scale, b.merge))
    pruned = CaitConfig(cfg.img_size, cfg.patch_size, cfg.in_chans, cfg.num_classes, cfg.embed_dim, cfg.qkv_bias,
                        tuple(blocks), cfg.ln_eps)
    out = {"kind": "checkpoint", "format": "cait-compactor/1", "file": str(path), **_config_summary(pruned)}
    dense = model_flops(cfg.unpruned())  # the dense ViT without merges, as `fuse` reports it
    out["flops_dense"] = dense["total"]
    out["flops_reduction"] = 1 - out["flops"] / dense["total"]
    out["inferred_config"] = ckpt.inferred
    out["kept_per_head"] = kept_detail
    out["note"] = "widths are kept channels (mask == 1), the largest head where heads differ"
    return out


def inspect_fused(path: Path) -> dict[str, Any]:
    from ..io import load_fused

    config, sd, meta = load_fused(path)
    out = {"kind": "fused", "format": "cait-fused/1", "file": str(path), **_config_summary(config)}
    out["tensors"] = len(sd)
    out["stored_params"] = int(sum(t.numel() for t in sd.values()))
    if meta.get("flops_dense"):
        out["flops_dense"] = meta["flops_dense"]
        out["flops_reduction"] = 1 - out["flops"] / meta["flops_dense"]
    out["source"] = meta.get("source")
    return out


def inspect_onnx(path: Path) -> dict[str, Any]:
    import onnx

    from ..config import CaitConfig
    from ..export.onnx import _numel, io_signature, op_census, read_onnx_metadata

    try:
        m = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CaitError(f"{path}: not a readable ONNX file ({first[:200]})") from None
    if not m.graph.node or not m.opset_import:
        raise CaitError(f"{path}: not an ONNX model (no graph nodes or opset)")
    meta = read_onnx_metadata(m)
    census = op_census(m)
    out: dict[str, Any] = {
        "kind": "onnx", "format": meta.get("caitdeploy.format", "onnx"), "file": str(path),
        "opset": {o.domain or "ai.onnx": o.version for o in m.opset_import}, "ir_version": m.ir_version,
        "producer": f"{m.producer_name} {m.producer_version}".strip(), **io_signature(m),
        "dtype": meta.get("caitdeploy.dtype"), "attention": meta.get("caitdeploy.attention"),
        "census": census, "nodes": sum(census.values()),
        "params": int(sum(_numel(t) for t in m.graph.initializer)),
    }
    if "caitdeploy.config" in meta:
        from ..config import ConfigError

        try:
            cfg = CaitConfig.from_json(meta["caitdeploy.config"])
        except ConfigError as e:
            raise CaitError(f"{path}: bad 'caitdeploy.config' metadata: {e}") from None
        out.update(_config_summary(cfg))
    return out


def _same_onnx(src: Path, recorded: dict[str, Any]) -> bool | None:
    """Whether the ONNX file the sidecar names (an untrusted path) still has the recorded SHA-256: None when it
    is not a regular file; False without hashing when its size differs from the recorded size."""
    from ..export.tensorrt import sha256_file

    try:
        if not src.is_file():
            return None
        size = src.stat().st_size
        if size != recorded.get("bytes") or size > 2**31:  # an ONNX protobuf is < 2 GiB
            return False
        return sha256_file(src) == recorded["sha256"]
    except OSError:
        return None


def inspect_engine(path: Path) -> dict[str, Any]:
    from ..config import CaitConfig
    from ..export.tensorrt import engine_header_check, read_sidecar

    side = read_sidecar(path)
    with open(path, "rb") as f:
        data = f.read(1 << 20)  # the header check needs the first bytes only, never the whole engine
    out: dict[str, Any] = {"kind": "engine", "file": str(path), "bytes": path.stat().st_size,
                           "sidecar": side is not None}
    try:
        check = engine_header_check(data, side.get("flavour") if side else None)
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
    keep = ("flavour", "trt_version", "build_target", "strongly_typed", "dtype", "io_dtype", "input", "outputs",
            "profile", "onnx", "opt_level", "workspace_mb", "build_seconds", "engine_bytes", "created")
    out.update({k: side.get(k) for k in keep})
    src = Path(side["onnx"]["path"]) if (side.get("onnx") or {}).get("path") else None
    out["onnx_matches"] = _same_onnx(src, side["onnx"]) if src is not None else None
    if side.get("config"):
        out.update(_config_summary(CaitConfig.from_dict(side["config"])))  # validated by read_sidecar
    return out


def inspect_file(path: str | os.PathLike) -> dict[str, Any]:
    """Describe FILE; raises CaitError for a missing, unknown or corrupt file."""
    path = Path(path)
    if not path.exists():
        raise CaitError(f"{path}: no such file")
    if not path.is_file():
        raise CaitError(f"{path}: not a regular file")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from ..io import read_safetensors

        _, meta = read_safetensors(path)
        fmt = meta.get("format")
        if fmt == "cait-fused/1":
            return inspect_fused(path)
        if fmt == "cait-compactor/1":
            return inspect_checkpoint(path)
        raise CaitError(f"{path}: safetensors file with format {str(fmt)[:60]!r}: neither a cait-compactor/1 checkpoint nor "
                        "a cait-fused/1 model")
    if suffix in TORCH_SUFFIXES:
        return inspect_checkpoint(path)
    if suffix in ONNX_SUFFIXES:
        return inspect_onnx(path)
    if suffix in ENGINE_SUFFIXES or Path(str(path) + ".json").is_file():
        return inspect_engine(path)
    raise CaitError(f"{path}: unrecognised file type {suffix or '(no suffix)'!r}: expected a checkpoint "
                    "(.pth/.safetensors), a fused model (.safetensors), an ONNX file (.onnx) or an engine (.plan)")


def print_inspect(info: dict[str, Any]) -> None:
    from rich.table import Table

    from rich.markup import escape

    con = console()

    def say(text: str) -> None:
        con.print(escape(text))

    kind = info["kind"]
    title = {"checkpoint": "CAIT training checkpoint (cait-compactor/1)", "fused": "fused CAIT model (cait-fused/1)",
             "onnx": f"ONNX model ({info.get('format')})", "engine": "TensorRT engine"}[kind]
    say(f"{info['file']}: {title}")
    if "img_size" in info:
        merges = ", ".join(f"{k}:{v}" for k, v in info["merges"].items()) or "none"
        say(f"  image {info['in_chans']}x{info['img_size']}x{info['img_size']}, patch {info['patch_size']}, "
                  f"embed {info['embed_dim']}, depth {info['depth']}, classes {info['num_classes']}, merges {merges}")
    if kind == "onnx":
        opsets = ", ".join(f"{k} {v}" for k, v in info["opset"].items())
        say(f"  opset {opsets}, IR {info['ir_version']}, producer {info['producer']}, dtype "
                  f"{info.get('dtype') or '?'}, attention {info.get('attention') or '?'}")
        for s in info["inputs"]:
            say(f"  input  {s['name']} {s['shape']} {s['dtype']}")
        for s in info["outputs"]:
            say(f"  output {s['name']} {s['shape']} {s['dtype']}")
        say(f"  {info['nodes']} nodes, {human(info['params'])} parameters; census: "
                  + ", ".join(f"{op} {n}" for op, n in info["census"].items()))
    if kind == "engine":
        hc = info["header_check"]
        if not hc.get("supported"):
            state = "unavailable"
        elif hc.get("validity") == "VALID":
            state = "valid for this GPU"
        else:
            state = f"well-formed, version matches ({hc['validity']} here: {', '.join(hc['diagnostics']) or 'no GPU to check against'})"
        say(f"  {human(info['bytes'], 'B')}; engine header: {state}")
        if info.get("sidecar"):
            p = info.get("profile") or {}
            say(f"  {info.get('flavour')} {info.get('trt_version')}, {info.get('dtype')} (I/O {info.get('io_dtype')}), "
                f"strongly typed {info.get('strongly_typed')}, target {info.get('build_target')}")
            built = f"{info['build_seconds']:.2f} s" if info.get("build_seconds") is not None else "?"
            say(f"  profile {info.get('input')}: min {p.get('min')} opt {p.get('opt')} max {p.get('max')}; built in "
                f"{built}; opt level {info.get('opt_level')}")
            if info.get("onnx"):
                match = {True: "matches", False: "CHANGED since the build", None: "not found"}[info.get("onnx_matches")]
                say(f"  source ONNX {info['onnx']['path']} sha256 {info['onnx']['sha256'][:16]}... ({match})")
        else:
            say(f"  {info.get('note')}")
    if info.get("blocks"):
        t = Table(show_lines=False)
        for col in ("block", "merge", "tokens", "heads", "qk/head", "v/head", "mlp", "GFLOPs"):
            t.add_column(col, justify="right")
        for b in info["blocks"]:
            t.add_row(str(b["block"]), b["merge"] or "-", str(b["tokens"]), str(b["heads"]), str(b["qk_per_head"]),
                      str(b["v_per_head"]), str(b["mlp"]), f"{b['flops'] / 1e9:.3f}")
        con.print(t)
        line = f"  FLOPs/img {human(info['flops'])}, params {human(info['params'])}"
        if info.get("flops_dense"):
            line += f" (dense {human(info['flops_dense'])}, -{100 * info['flops_reduction']:.1f}%)"
        say(line)
    if info.get("note") and kind == "checkpoint":
        say(f"  {info['note']}")


@click.command("inspect")
@click.argument("file", type=click.Path(dir_okay=False, path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables.")
@handle_errors
def inspect_cmd(file, as_json):
    """Describe a checkpoint, fused model, ONNX file or TensorRT engine."""
    from .common import _jsonable

    info = inspect_file(file)
    if as_json:
        click.echo(json.dumps(_jsonable(info), indent=2))
    else:
        print_inspect(info)
