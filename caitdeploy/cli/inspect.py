"""`caitdeploy inspect FILE`: what a checkpoint, fused model, ONNX file or engine is, and its shapes."""

from __future__ import annotations

from typing import Any

import click

from caitdeploy.cli.common import block_table, console, handle_errors, human
from caitdeploy.core.errors import safe_text


def _listing(items: list[str], most: int) -> str:
    shown = ", ".join(items[:most])
    return shown + (f", ... ({len(items) - most} more)" if len(items) > most else "")


def print_inspect(info: dict[str, Any]) -> None:
    """The human report. Every string in `info` may come from the file (names, producer, op types, dims,
    metadata, sidecar fields) or its name: each goes through `safe_text` (control characters, ESC, line breaks
    and bidi overrides escaped, length bounded) and lines are printed without rich markup, emoji codes or
    wrapping, so nothing a file holds can colour or clear the terminal or start a line of its own."""
    from caitdeploy.cli.common import print_plain

    con = console()

    def t(x: Any, limit: int = 200) -> str:
        return safe_text(x, limit)

    def say(text: str) -> None:
        print_plain(con, text)

    kind = info["kind"]
    title = {
        "checkpoint": "CAIT training checkpoint (cait-compactor/1)",
        "fused": "fused CAIT model (cait-fused/1)",
        "onnx": f"ONNX model ({t(info.get('format'), 60)})",
        "engine": "TensorRT engine",
        "openvino-ir": "OpenVINO IR (.xml + .bin)",
    }[kind]
    say(f"{t(info['file'], 1000)}: {title}")
    if "img_size" in info:
        merges = ", ".join(f"{k}:{v}" for k, v in info["merges"].items()) or "none"
        hw = info["img_size"] if isinstance(info["img_size"], list) else [info["img_size"]] * 2
        say(
            f"  image {info['in_chans']}x{hw[0]}x{hw[1]}, patch {info['patch_size']}, "
            f"embed {info['embed_dim']}, depth {info['depth']}, classes {info['num_classes']}, merges {t(merges)}"
        )
    if kind == "onnx":
        opsets = _listing([f"{t(k, 60)} {v}" for k, v in info["opset"].items()], 8)
        say(
            f"  opset {opsets}, IR {info['ir_version']}, producer {t(info['producer'])}, dtype "
            f"{t(info.get('dtype') or '?', 80)}, attention {t(info.get('attention') or '?', 40)}"
        )
        for label, sigs in (("input ", info["inputs"]), ("output", info["outputs"])):
            for s in sigs[:16]:
                shape = (
                    "["
                    + ", ".join(t(d, 40) if isinstance(d, str) else str(d) for d in s["shape"][:16])
                    + (", ...]" if len(s["shape"]) > 16 else "]")
                )
                say(f"  {label} {t(s['name'])} {shape} {t(s['dtype'], 40)}")
            if len(sigs) > 16:
                say(f"  ... {len(sigs) - 16} more {label.strip()}s")
        if info.get("features"):
            say(
                f"  feature maps after blocks {t(info['features'])} on the unmerged grid (merged grids restored: "
                f"{t(info.get('restore') or '?', 40)}), no head"
            )
        say(
            f"  {info['nodes']} nodes, {human(info['params'])} parameters; census: "
            + _listing([f"{t(op, 80)} {n}" for op, n in info["census"].items()], 40)
        )
    if kind == "openvino-ir":
        side = info.get("sidecar")
        if side:
            v = side.get("verify") or {}
            say(
                f"  openvino {t(side.get('openvino'), 40)}, {t(side.get('dtype'), 40)}, weights {t(side.get('weights'), 60)}, "
                f"{info['bin_bytes']} weight bytes; from ONNX sha256 {t(str(side.get('onnx_sha256') or '?')[:16], 20)}..."
            )
            if v:
                say(
                    f"  verified against the ONNX graph: cosine min {v.get('cosine_min', 0):.6f} on {v.get('images')} images"
                )
        else:
            say("  no sidecar: not written by caitdeploy export --openvino")
        if isinstance(info.get("model"), str):
            say(f"  model {t(info['model'], 200)}")
        for label, sigs in (("input ", info.get("inputs", [])), ("output", info.get("outputs", []))):
            for sig in sigs[:16]:
                say(f"  {label} {t(sig['name'], 80)} {t(sig['shape'], 80)}")
        if info.get("ops"):
            say("  ops " + ", ".join(f"{t(k, 40)} {v}" for k, v in info["ops"].items()))
    if kind == "engine":
        hc = info["header_check"]
        if not hc.get("supported"):
            state = "unavailable"
        elif hc.get("validity") == "VALID":
            state = "valid for this GPU"
        else:
            state = (
                f"well-formed, version matches ({t(hc['validity'], 40)} here: "
                f"{', '.join(t(d, 40) for d in hc['diagnostics']) or 'no GPU to check against'})"
            )
        say(f"  {human(info['bytes'], 'B')}; engine header: {state}")
        chk = info.get("engine_check") or {}
        if chk.get("sha256_match"):
            say("  engine file matches its sidecar (byte count and SHA-256)")
        elif chk.get("bytes_match"):
            say(f"  engine file matches its sidecar's byte count; {t(chk.get('note') or 'no SHA-256 recorded', 300)}")
        elif info.get("sidecar") and chk.get("note"):
            say(f"  {t(chk['note'], 300)}")
        if info.get("sidecar"):
            p = info.get("profile") or {}
            say(
                f"  {t(info.get('flavour'), 40)} {t(info.get('trt_version'), 40)}, {t(info.get('dtype'), 40)} "
                f"(I/O {t(info.get('io_dtype'), 40)}), strongly typed {info.get('strongly_typed')}, "
                f"target {t(info.get('build_target'), 300)}"
            )
            built = f"{info['build_seconds']:.2f} s" if info.get("build_seconds") is not None else "?"
            say(
                f"  profile {t(info.get('input'))}: min {p.get('min')} opt {p.get('opt')} max {p.get('max')}; built "
                f"in {built}; opt level {info.get('opt_level')}"
            )
            if info.get("onnx"):
                match = {True: "matches", False: "CHANGED since the build", None: "not found"}[info.get("onnx_matches")]
                say(
                    f"  source ONNX {t(info['onnx']['path'], 1000)} sha256 {t(info['onnx']['sha256'][:16], 16)}... "
                    f"({match})"
                )
        else:
            say(f"  {t(info.get('note'), 300)}")
    if info.get("blocks"):
        con.print(block_table(info["blocks"]))
        line = f"  FLOPs/img {human(info['flops'])}, params {human(info['params'])}"
        if info.get("flops_dense"):
            line += f" (dense {human(info['flops_dense'])}, -{100 * info['flops_reduction']:.1f}%)"
        say(line)
    if kind == "fused" and info.get("source"):
        say(f"  source {t(info['source'], 300)}")
    if info.get("note") and kind == "checkpoint":
        say(f"  {t(info['note'], 300)}")


@click.command("inspect")
@click.argument("file", type=click.Path(dir_okay=False, path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables.")
@handle_errors
def inspect_cmd(file, as_json):
    """Describe a checkpoint, fused model, ONNX file or TensorRT engine."""
    from caitdeploy.pipelines.inspect import inspect

    result = inspect(file)
    if as_json:
        click.echo(result.json())
    else:
        print_inspect(result.info)
