"""Reading our ONNX files: metadata, I/O signature and op census of an `onnx.ModelProto`.

Pure readers, no export logic: `export.onnx` writes the files and checks its own graphs with them, and
`formats.describe` (`caitdeploy inspect`) reports what they say about any ONNX file, hostile ones included.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any


def parse_onnx(data: bytes, path) -> Any:
    """`onnx.ModelProto` of a file's bytes; a hostile file is one CaitError line naming it."""
    import onnx

    from caitdeploy.core.errors import CaitError

    try:
        return onnx.load_from_string(data)
    except Exception as e:  # noqa: BLE001 - onnx raises many types for a hostile file: one line for all
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CaitError(f"{path}: not a readable ONNX file ({first[:200]})") from None


def read_onnx_bytes(path) -> bytes:
    """An ONNX file's bytes, read as untrusted input: a regular file within MAX_ONNX_BYTES (checked before onnx is
    even imported), memory counted first for them, the parsed protobuf (about as large again) and onnx's copies
    while parsing, then read bounded. `parse_onnx` parses them."""
    from caitdeploy.core.budgets import check_memory
    from caitdeploy.core.paths import MAX_ONNX_BYTES, read_bounded, regular_file_size

    size = regular_file_size(path, MAX_ONNX_BYTES, "ONNX file")
    check_memory(3 * size, f"{path}: reading a {size}-byte ONNX file")
    return read_bounded(path, MAX_ONNX_BYTES, "ONNX file")


def _all_nodes(graph) -> Iterable:
    """Every node of a GraphProto, including nodes inside If/Loop/Scan subgraphs."""
    import onnx

    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _all_nodes(g)


def _op_name(node) -> str:
    """`domain::op_type` of a node as text, even when a hostile file's strings are not valid UTF-8."""
    op = node.op_type if isinstance(node.op_type, str) else repr(node.op_type)
    dom = node.domain if isinstance(node.domain, str) else repr(node.domain)
    return op if dom in ("", "ai.onnx") else f"{dom}::{op}"


def op_census(model) -> dict[str, int]:
    """op_type -> count over the whole model (subgraphs included), most frequent first."""
    counts = Counter(_op_name(n) for n in _all_nodes(model.graph))
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _elem_type_name(value_info) -> str:
    import onnx

    t = value_info.type.tensor_type.elem_type
    try:
        return onnx.helper.tensor_dtype_to_np_dtype(t).name
    except (KeyError, ValueError, TypeError):
        return onnx.TensorProto.DataType.Name(t).lower() if t in onnx.TensorProto.DataType.values() else f"type {t}"


def io_signature(model) -> dict[str, Any]:
    """{"inputs": [{"name", "shape", "dtype"}], "outputs": [...]} of a ModelProto (dynamic dims as names)."""

    def sig(v):
        dims = [d.dim_param if d.dim_param else d.dim_value for d in v.type.tensor_type.shape.dim]
        return {"name": v.name, "shape": dims, "dtype": _elem_type_name(v)}

    inits = {i.name for i in model.graph.initializer}
    return {
        "inputs": [sig(v) for v in model.graph.input if v.name not in inits],
        "outputs": [sig(v) for v in model.graph.output],
    }


def _numel(t) -> int:  # element count of an ONNX TensorProto
    n = 1
    for d in t.dims:
        n *= d
    return n


def read_onnx_metadata(model) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}
