"""`caitdeploy inspect FILE`: what a checkpoint, fused model, ONNX file or engine is, and its shapes."""
from __future__ import annotations

import json
from typing import Any

import click

from .common import block_table, console, handle_errors, human


def print_inspect(info: dict[str, Any]) -> None:
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
        hw = info["img_size"] if isinstance(info["img_size"], list) else [info["img_size"]] * 2
        say(f"  image {info['in_chans']}x{hw[0]}x{hw[1]}, patch {info['patch_size']}, "
                  f"embed {info['embed_dim']}, depth {info['depth']}, classes {info['num_classes']}, merges {merges}")
    if kind == "onnx":
        opsets = ", ".join(f"{k} {v}" for k, v in info["opset"].items())
        say(f"  opset {opsets}, IR {info['ir_version']}, producer {info['producer']}, dtype "
                  f"{info.get('dtype') or '?'}, attention {info.get('attention') or '?'}")
        for s in info["inputs"]:
            say(f"  input  {s['name']} {s['shape']} {s['dtype']}")
        for s in info["outputs"]:
            say(f"  output {s['name']} {s['shape']} {s['dtype']}")
        if info.get("features"):
            say(f"  feature maps after blocks {info['features']} on the unmerged grid (merged grids restored: "
                f"{info.get('restore') or '?'}), no head")
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
        t = block_table(info["blocks"])
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

    from ..describe import describe_file

    info = describe_file(file)
    if as_json:
        click.echo(json.dumps(_jsonable(info), indent=2))
    else:
        print_inspect(info)
