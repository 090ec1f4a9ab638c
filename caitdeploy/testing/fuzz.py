"""Property-based fuzzing (hypothesis) of every reader of untrusted files: the only thing that may come out is the
one-line `CaitError`, within 2 s and a memory limit per call.

The harness (strategies, targets, the worker and its supervisor `run_fuzz`); hypothesis, from the `test` extra,
is imported inside the functions that use it. The command line is benchmarks/fuzz_readers.py:

    .venv/bin/python benchmarks/fuzz_readers.py [--examples N] [--seconds S] [--seed 0] [--targets a,b]
                                                [--json OUT] [--md OUT] [--findings DIR]

Targets (small valid seed files, mutated; each case runs every reader of its target on the mutated file):

    checkpoint_pth          torch.save zip: bytes of the zip headers and of data.pkl, pickle opcodes (ints, strings,
                            globals, inserted/deleted ops), zip records    -> load_checkpoint, inspect
    checkpoint_dict         the checkpoint dict before torch.save: config values, format, top level, DeiT-style
                            (config inferred), state-dict dtypes, shapes, stride-0 / overlapping / shared views,
                            sparse and meta tensors, non-tensor values, NaN, masks      -> load_checkpoint, inspect
    checkpoint_safetensors  the .safetensors checkpoint: 8-byte header length, header JSON (shapes, dtypes,
                            data_offsets, metadata config JSON), raw bytes, re-saved mutated dicts
                                                                                        -> load_checkpoint, inspect
    fused                   the fused .safetensors model: the same header mutations, the config and caitdeploy
                            metadata JSON (tree and text), NaN data, random valid configs
                                                                              -> load_fused, load_model, inspect
    onnx_metadata           metadata_props (caitdeploy.families.vit.config JSON tree and text, other keys, duplicates),
                            graph I/O, opsets, raw protobuf bytes               -> inspect
    engine_sidecar          `<engine>.json` (JSON tree and text, onnx path, sizes), engine bytes
                                                                                -> read_sidecar, inspect

Readers: caitdeploy.formats.checkpoint.load_checkpoint; caitdeploy.formats.fused.load_fused, and load_model after it;
caitdeploy.formats.sidecar.read_sidecar; "inspect" is what `caitdeploy inspect FILE` runs, inspect_file then
print_inspect of its result (rendered into a string).

Outcome of one reader call: success, or a `CaitError` whose message is one line (no line break) of at most
MAX_MESSAGE_CHARS characters, within CASE_SECONDS (SIGALRM interrupts it; a call that only returns later counts
too) and with a peak RSS at most CASE_MEMORY_MB above the RSS before the call; the worker process also runs under
RLIMIT_AS (its address space after setup + MEMORY_MB). Anything else is a finding: another exception type
(MemoryError and RecursionError included), a multi-line or over-long message, a CaitError hiding a failed
allocation, a timeout, a memory overrun, a crash or a hang (the supervisor kills a worker stuck in C code for
HANG_SECONDS and restarts it on the remaining targets). Each finding keeps the failing file(s), the traceback and
a repro.py under the findings folder; identical findings (same target, reader, kind, exception and raising line)
are counted once.

The hypothesis loop runs in a worker process (torch imported once); this process supervises it and prints a JSON
summary (cases, seconds, findings, machine). tests/security/test_fuzz_readers.py runs a bounded version of the same
harness.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import zlib
from collections.abc import Callable, Sequence
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]  # the folder holding the caitdeploy package (a checkout: the repository)

CASE_SECONDS = 2.0  # per reader call
CASE_MEMORY_MB = 512  # peak RSS growth allowed per reader call (the seed files are ~100 KB)
MEMORY_MB = 4096  # RLIMIT_AS headroom above the worker's address space after setup
MAX_MESSAGE_CHARS = 1000  # a one-line error, not a dump
HARNESS_ERROR = 70  # worker exit status for an error of the harness itself
HANG_SECONDS = 30.0  # the supervisor kills a worker whose reader call has not returned after this long
SETUP_SECONDS = 600.0  # worker imports + seed files (the ONNX export takes seconds)
CHUNK = 100  # examples per hypothesis run when fuzzing for --seconds
CI_EXAMPLES = 20  # per target in tests/security/test_fuzz_readers.py (the long run: benchmarks/results)
TARGETS = ("checkpoint_pth", "checkpoint_dict", "checkpoint_safetensors", "fused", "onnx_metadata", "engine_sidecar")
ALLOC_MARKERS = ("can't allocate memory", "cannot allocate memory", "memoryerror", "bad_alloc", "out of memory")


# =====================================================================================================
# Mutations (hypothesis draws through `data`, a st.data() object)
# =====================================================================================================
def _st():
    from hypothesis import strategies as st

    return st


BIG = "__fuzz_bigint__"  # stands for a 5000-digit integer in JSON (json.dumps cannot write one)
BIG_DIGITS = "1" + "0" * 5000

INTERESTING_INTS = [
    0,
    1,
    -1,
    2,
    3,
    7,
    8,
    16,
    24,
    255,
    256,
    257,
    4096,
    65535,
    65536,
    2**31 - 1,
    2**31,
    -(2**31),
    2**32,
    2**32 + 1,
    2**40,
    2**53 + 1,
    2**62,
    2**63 - 1,
    2**63,
    -(2**63),
    2**64 - 1,
    2**64,
    10**30,
]
INTERESTING_FLOATS = [0.0, -0.0, 0.5, 1.5, 1e-300, 5e-324, 1e308, float("inf"), float("-inf"), float("nan")]
INTERESTING_STRINGS = [
    "",
    "h",
    "v",
    "x",
    "0",
    "1",
    "16",
    "1e3",
    "-1",
    "NaN",
    "null",
    "true",
    "a\nb",
    "l1\r\nl2",
    "\u2028",
    "\x00",
    "\x1b[31mred",
    "é" * 8,
    "x" * 5000,
    "cait-compactor/1",
    "cait-fused/1",
    "caitdeploy-engine/1",
    "tensorrt",
    "tensorrt_rtx",
    "float16",
    "fp16",
    "images",
    "logits",
]


def evil_value(data, json_safe: bool = True) -> Any:
    """A value that a config or metadata field should refuse (or survive)."""
    st = _st()
    kind = data.draw(st.sampled_from(["int", "int", "float", "str", "str", "other", "container", "random"]))
    if kind == "int":
        return data.draw(st.sampled_from(INTERESTING_INTS + [BIG] if json_safe else INTERESTING_INTS + [10**5000]))
    if kind == "float":
        return data.draw(st.sampled_from(INTERESTING_FLOATS))
    if kind == "str":
        return data.draw(st.sampled_from(INTERESTING_STRINGS))
    if kind == "other":
        return data.draw(st.sampled_from([True, False, None]))
    if kind == "container":
        return data.draw(
            st.sampled_from(
                [
                    [],
                    [1],
                    [1, 2],
                    [[[[[]]]]],
                    {},
                    {"a": 1},
                    {"blocks": []},
                    {"": None},
                    [None] * 300,
                    {"x": {"y": {"z": [0.5]}}},
                ]
            )
        )
    return data.draw(
        st.one_of(st.integers(), st.floats(), st.text(max_size=12), st.lists(st.integers(-3, 300), max_size=5))
    )


def json_dumps(obj: Any) -> str:
    """json.dumps that writes NaN/Infinity literals and 5000-digit integers for the BIG marker."""
    return json.dumps(obj).replace(json.dumps(BIG), BIG_DIGITS)


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, prefix + (i,))
    return out


def _get(obj: Any, path: tuple) -> Any:
    for p in path:
        obj = obj[p]
    return obj


def mutate_tree(data, obj: Any, desc: list[str], json_safe: bool = True, keys: tuple[str, ...] = ()) -> Any:
    """1-3 structured mutations of a JSON-like tree (a deep copy): replace, delete, add a key, resize a list,
    nudge a number, change a type."""
    st = _st()
    obj = json.loads(json.dumps(obj))
    for _ in range(data.draw(st.integers(1, 3))):
        paths = _paths(obj)
        path = data.draw(st.sampled_from(paths))
        op = data.draw(st.sampled_from(["replace", "replace", "delete", "add", "resize", "nudge", "retype"]))
        if not path and op != "add":
            op = "replace"
        target = _get(obj, path)
        if op == "replace":
            new = evil_value(data, json_safe)
            if not path:
                obj = new
            else:
                _get(obj, path[:-1])[path[-1]] = new
            desc.append(f"tree {list(path)} = {_short(new)}")
        elif op == "delete":
            parent = _get(obj, path[:-1])
            del parent[path[-1]]
            desc.append(f"tree delete {list(path)}")
        elif op == "add":
            holder = target if isinstance(target, dict) else obj if isinstance(obj, dict) else None
            if holder is None:
                continue
            key = data.draw(st.sampled_from(list(keys) + ["extra", "", "blocks", "source", "__proto__", "x\ny"]))
            holder[key] = evil_value(data, json_safe)
            desc.append(f"tree add key {key!r}")
        elif op == "resize":
            lists = [p for p in paths if isinstance(_get(obj, p), list)]
            if not lists:
                continue
            lp = data.draw(st.sampled_from(lists))
            lst = _get(obj, lp)
            n = data.draw(st.sampled_from([0, 1, 2, 3, 5, 17, 255, 256, 257, 1000]))
            new = [lst[i % len(lst)] for i in range(n)] if lst else [0] * n
            if not lp:
                obj = new
            else:
                _get(obj, lp[:-1])[lp[-1]] = new
            desc.append(f"tree resize {list(lp)} to {n}")
        elif op == "nudge":
            nums = [
                p for p in paths if p and isinstance(_get(obj, p), (int, float)) and not isinstance(_get(obj, p), bool)
            ]
            if not nums:
                continue
            np_ = data.draw(st.sampled_from(nums))
            v = _get(obj, np_)
            fn = data.draw(st.sampled_from(["+1", "-1", "*2", "neg", "*1000", "float", "half", "str", "pow"]))
            ops: dict[str, Callable[[Any], Any]] = {
                "+1": lambda x: x + 1,
                "-1": lambda x: x - 1,
                "*2": lambda x: x * 2,
                "neg": lambda x: -x,
                "*1000": lambda x: x * 1000,
                "float": float,
                "half": lambda x: x / 2,
                "str": str,
                "pow": lambda x: x**3 if abs(x) < 1e6 else x,
            }
            new = ops[fn](v)
            _get(obj, np_[:-1])[np_[-1]] = new
            desc.append(f"tree nudge {list(np_)} {fn}")
        elif op == "retype" and path:
            new = {
                "str": str(target)[:100],
                "list": [target],
                "dict": {"v": target},
                "none": None,
                "bool": bool(target) if not isinstance(target, (dict, list)) else True,
            }
            kind = data.draw(st.sampled_from(sorted(new)))
            _get(obj, path[:-1])[path[-1]] = new[kind]
            desc.append(f"tree retype {list(path)} -> {kind}")
    return obj


def mutate_json_text(data, text: str, desc: list[str]) -> str:
    """Textual mutations of JSON: truncation, flipped/inserted characters, duplicate keys, huge numbers,
    non-JSON constants, deep nesting, other top-level types."""
    st = _st()
    op = data.draw(st.sampled_from(["truncate", "char", "insert", "duplicate", "number", "replace", "nest"]))
    if op == "truncate":
        n = data.draw(st.integers(0, len(text)))
        desc.append(f"json truncate at {n}")
        return text[:n]
    if op == "char" and text:
        i = data.draw(st.integers(0, len(text) - 1))
        c = data.draw(st.sampled_from(list('{}[]",:0-.eE \\\x00') + ["\n", "\ud800", "é", "\u2028"]))
        desc.append(f"json char {i} -> {c!r}")
        return text[:i] + c + text[i + 1 :]
    if op == "insert":
        i = data.draw(st.integers(0, len(text)))
        junk = data.draw(
            st.sampled_from(
                [
                    ",",
                    "}",
                    "]",
                    '"',
                    "NaN",
                    "Infinity",
                    "-Infinity",
                    "1e999",
                    "-1e999",
                    "\\ud800",
                    '"\\ud800"',
                    "\x00",
                    "\ufeff",
                    "//",
                    "/*x*/",
                    "  ",
                    "\n",
                ]
            )
        )
        desc.append(f"json insert {junk!r} at {i}")
        return text[:i] + junk + text[i:]
    if op == "duplicate":
        s = text.lstrip()
        if s.startswith("{") and len(s) > 2:
            try:
                obj = json.loads(s)
            except ValueError:
                obj = None
            if isinstance(obj, dict) and obj:
                k = data.draw(st.sampled_from(list(obj)))
                desc.append(f"json duplicate key {k!r}")
                return "{" + json.dumps(k) + ": " + json_dumps(evil_value(data)) + ", " + s[1:]
        desc.append("json duplicate (none)")
        return text
    if op == "number":
        import re

        nums = list(re.finditer(r"-?\d+(\.\d+)?([eE][-+]?\d+)?", text))
        if nums:
            m = data.draw(st.sampled_from(nums))
            rep = data.draw(
                st.sampled_from(
                    [
                        "1e999",
                        "-1e999",
                        "1e-999",
                        BIG_DIGITS,
                        "-" + BIG_DIGITS,
                        "0",
                        "-0",
                        "9" * 30,
                        "0.0000001",
                        "NaN",
                        "Infinity",
                        "01",
                        "1.",
                        ".5",
                        "+1",
                    ]
                )
            )
            desc.append(f"json number {m.group(0)!r} -> {rep[:20]!r}")
            return text[: m.start()] + rep + text[m.end() :]
        return text
    if op == "nest":
        depth = data.draw(st.sampled_from([100, 1000, 5000, 100000]))
        desc.append(f"json nested {depth} deep")
        return "[" * depth + "]" * depth if data.draw(st.booleans()) else '{"a":' * depth + "1" + "}" * depth
    rep = data.draw(
        st.sampled_from(
            ["", "null", "[]", "{}", '"str"', "1", "true", "[{}]", '{"blocks": null}', "\ufeff{}", "x" * 100]
        )
    )
    desc.append(f"json replaced by {rep[:20]!r}")
    return rep


def mutate_json_value(data, text: str, desc: list[str], keys: tuple[str, ...] = ()) -> str:
    """A JSON string mutated as a tree (when it parses) or as text."""
    st = _st()
    try:
        obj = json.loads(text)
        parsed = True
    except ValueError:
        parsed = False
    if parsed and data.draw(st.integers(0, 3)) > 0:
        out = json_dumps(mutate_tree(data, obj, desc, keys=keys))
        if data.draw(st.integers(0, 4)) == 0:
            out = mutate_json_text(data, out, desc)
        return out
    return mutate_json_text(data, text, desc)


BYTE_OPS = ("flip", "set", "int", "insert", "delete", "dup", "truncate", "ascii")


def mutate_bytes(data, buf: bytes, hot: list[tuple[int, int]], desc: list[str], max_ops: int = 4) -> bytes:
    """1..max_ops byte mutations; positions fall in a `hot` region (headers, pickle, JSON) half of the time."""
    st = _st()
    b = bytearray(buf)
    for _ in range(data.draw(st.integers(1, max_ops))):
        if not b:
            b = bytearray(b"\x00")
        n = len(b)
        regions = [(max(0, lo), min(hi, n)) for lo, hi in hot if max(0, lo) < min(hi, n)]
        if regions and data.draw(st.booleans()):
            lo, hi = data.draw(st.sampled_from(regions))
            pos = data.draw(st.integers(lo, hi - 1))
        else:
            pos = data.draw(st.integers(0, n - 1))
        op = data.draw(st.sampled_from(BYTE_OPS))
        if op == "flip":
            bit = data.draw(st.integers(0, 7))
            b[pos] ^= 1 << bit
        elif op == "set":
            b[pos] = data.draw(
                st.one_of(st.sampled_from([0, 0xFF, 0x7F, 0x80, 0x20, 0x0A, 0x22, 0x7B]), st.integers(0, 255))
            )
        elif op == "int":
            width = data.draw(st.sampled_from([2, 4, 8]))
            v = data.draw(
                st.one_of(
                    st.sampled_from([0, 1, 2, 64, n, n - 1, n + 1, 2**31 - 1, 2**31, 2**32 - 1, 2**63 - 1, 2**64 - 1]),
                    st.integers(0, 2**64 - 1),
                )
            )
            b[pos : pos + width] = (v % (1 << (8 * width))).to_bytes(width, "little")
        elif op == "insert":
            b[pos:pos] = data.draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del b[pos : pos + data.draw(st.integers(1, 64))]
        elif op == "dup":
            src = data.draw(st.integers(0, n - 1))
            b[pos:pos] = b[src : src + data.draw(st.integers(1, 256))]
        elif op == "truncate":
            del b[pos:]
        else:
            b[pos:pos] = data.draw(
                st.sampled_from(
                    [b"-1", b"0", b"99999999999999999999", b"1e999", b"NaN", b'"', b"{", b"}", b"[", b"]", b","]
                )
            )
        desc.append(f"bytes {op} @{pos}")
    return bytes(b)


# ---- zip and pickle (torch.save files) ----------------------------------------------------------
def zip_hot_regions(buf: bytes) -> tuple[list[tuple[int, int]], tuple[int, int]]:
    """(hot regions: local headers, central directory, end record, data.pkl; the data.pkl payload range)."""
    import io
    import zipfile

    hot: list[tuple[int, int]] = []
    pkl = (0, 0)
    with zipfile.ZipFile(io.BytesIO(buf)) as z:
        for info in z.infolist():
            o = info.header_offset
            nlen, elen = struct.unpack("<HH", buf[o + 26 : o + 30])
            start = o + 30 + nlen + elen
            hot.append((o, start))
            if info.filename.endswith("data.pkl"):
                pkl = (start, start + info.file_size)
    first_cd = buf.find(b"PK\x01\x02")
    hot += [(first_cd, len(buf)) if first_cd >= 0 else (len(buf) - 22, len(buf)), pkl, (len(buf) - 22, len(buf))]
    return hot, pkl


def rebuild_zip(
    buf: bytes,
    replace: dict[str, bytes] | None = None,
    drop: AbstractSet[str] = frozenset(),
    compress: AbstractSet[str] = frozenset(),
    extra: Sequence[tuple[str, bytes]] = (),
) -> bytes:
    """The zip rewritten with zipfile (stored records), some records replaced, dropped, compressed or added."""
    import io
    import warnings
    import zipfile

    replace = replace or {}
    out = io.BytesIO()
    with (
        zipfile.ZipFile(io.BytesIO(buf)) as z,
        zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as w,
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")  # duplicate names
        for info in z.infolist():
            if info.filename in drop:
                continue
            payload = replace.get(info.filename, z.read(info.filename))
            kind = zipfile.ZIP_DEFLATED if info.filename in compress else zipfile.ZIP_STORED
            w.writestr(info.filename, payload, compress_type=kind)
        for name, payload in extra:
            w.writestr(name, payload)
    return out.getvalue()


PICKLE_GLOBALS = [
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_tensor"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch._utils", "_rebuild_sparse_tensor"),
    ("torch._utils", "_rebuild_meta_tensor_no_storage"),
    ("torch._utils", "_rebuild_wrapper_subclass"),
    ("torch._utils", "_rebuild_qtensor"),
    ("torch._utils", "_rebuild_nested_tensor"),
    ("torch._utils", "_rebuild_device_tensor_from_numpy"),
    ("torch._utils", "_rebuild_tensor_v3"),
    ("torch._tensor", "_rebuild_from_type_v2"),
    ("torch", "FloatStorage"),
    ("torch", "HalfStorage"),
    ("torch", "BFloat16Storage"),
    ("torch", "DoubleStorage"),
    ("torch", "LongStorage"),
    ("torch", "IntStorage"),
    ("torch", "ByteStorage"),
    ("torch", "BoolStorage"),
    ("torch", "ComplexFloatStorage"),
    ("torch", "QInt8Storage"),
    ("torch", "float16"),
    ("torch", "bfloat16"),
    ("torch", "complex64"),
    ("torch", "device"),
    ("torch", "Size"),
    ("torch", "Tensor"),
    ("torch", "strided"),
    ("torch", "sparse_coo"),
    ("torch.nn.parameter", "Parameter"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "bytearray"),
    ("builtins", "complex"),
    ("builtins", "slice"),
    ("builtins", "getattr"),
    ("builtins", "eval"),
    ("os", "system"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy", "dtype"),
    ("torch.serialization", "_get_layout"),
    ("__main__", "x"),
    ("", ""),
    ("torch", "x" * 300),
    ("torch", "FloatTensor"),
    ("torch", "LongTensor"),
    ("collections", "Counter"),
    ("_codecs", "encode"),
    ("argparse", "Namespace"),
    ("__builtin__", "bytearray"),
    ("copy_reg", "_reconstructor"),
]
PICKLE_STRINGS = [
    "format",
    "config",
    "state_dict",
    "model",
    "img_size",
    "patch_size",
    "embed_dim",
    "depth",
    "num_heads",
    "mlp_ratio",
    "merges",
    "qkv_bias",
    "cait-compactor/1",
    "",
    "0",
    "1",
    "7",
    "99",
    "cpu",
    "cuda",
    "cuda:0",
    "meta",
    "mps",
    "storage",
    "data/0",
    "../../etc/passwd",
    "x" * 300,
    "blocks.0.attn.qkv.weight",
    "blocks.9.htm.fc.weight",
    "module.x",
    "a\nb",
    "h",
    "v",
]
PICKLE_OPS = [
    b"(",
    b"0",
    b"1",
    b"2",
    b"t",
    b")",
    b"}",
    b"]",
    b"R",
    b"b",
    b"s",
    b"u",
    b"a",
    b"e",
    b"N",
    b".",
    b"Q",
    b"\x85",
    b"\x86",
    b"\x87",
    b"\x88",
    b"\x89",
    b"q\x00",
    b"h\x00",
    b"h\xff",
    b"\x81",
    b"\x92",
    b"\x93",
    b"\x94",
    b"G\x7f\xf8\x00\x00\x00\x00\x00\x00",
    b"i",
    b"o",
    b"\x82\x01",
    b"C\x04abcd",
    b"K\xff",
    b"J\xff\xff\xff\xff",
    b"X\xff\xff\xff\x7f",
    b"\x8b\xff\xff\xff\x7f",
]


def _pickle_int(v: int) -> bytes:
    if -(2**31) <= v < 2**31:
        return b"J" + struct.pack("<i", v)
    n = (v.bit_length() + 8) // 8
    raw = v.to_bytes(n, "little", signed=True)
    return (b"\x8a" + bytes([n]) + raw) if n < 256 else (b"\x8b" + struct.pack("<i", n) + raw)


def _pickle_str(s: str) -> bytes:
    raw = s.encode("utf-8", "surrogatepass")
    return b"X" + struct.pack("<I", len(raw)) + raw


def _memo(op: str, i: int) -> bytes:
    return (b"r" if op == "put" else b"j") + struct.pack("<I", i)  # LONG_BINPUT / LONG_BINGET


def pickle_bomb(kind: str, n: int, base: int = 1 << 20) -> bytes:
    """A pickle fragment that pushes exactly one value, built to hurt a reader that trusts `weights_only`:
    memo (shared-reference) chains of lists or tuples `n` levels deep (2^n items as a tree), `n`-deep nesting,
    a list that contains itself, allocations the safe unpickler allows (bytearray(n), FloatTensor of shared
    lists). Memo slots start at `base`, clear of the seed's own."""
    if kind in ("memo-list", "memo-tuple"):
        out = (b"]" if kind == "memo-list" else b")") + _memo("put", base) + b"0"
        for i in range(n):
            pair = (
                b"(" + _memo("get", base + i) * 2 + b"l"
                if kind == "memo-list"
                else _memo("get", base + i) * 2 + b"\x86"
            )
            out += pair + _memo("put", base + i + 1) + b"0"
        return out + _memo("get", base + n)
    if kind == "deep":
        return b"]" * n + b"a" * (n - 1)
    if kind == "cycle":
        return b"]" + _memo("put", base) + _memo("get", base) + b"a"
    if kind == "bytearray":
        return b"c__builtin__\nbytearray\n" + _pickle_int(n) + b"\x85R"
    if kind == "float-tensor":
        return b"ctorch\nFloatTensor\n(" + pickle_bomb("memo-list", n, base) + b"tR"
    raise ValueError(kind)


BOMBS = {
    "memo-list": [16, 40, 64],
    "memo-tuple": [16, 40, 80],
    "deep": [40, 1000, 200_000],
    "cycle": [1],
    "bytearray": [1 << 20, 5 << 30],
    "float-tensor": [10, 30],
}


def mutate_pickle(data, pkl: bytes, desc: list[str]) -> bytes:
    """1-3 opcode-level mutations: integer and string arguments, globals, inserted, deleted, duplicated,
    swapped ops, truncation, and bombs (a value replaced by a `pickle_bomb`)."""
    import pickletools

    st = _st()
    for _ in range(data.draw(st.integers(1, 3))):
        try:
            ops = list(pickletools.genops(pkl))
        except Exception:  # noqa: BLE001 - an earlier mutation broke the stream: stop at the bytes we have
            break
        spans = [
            (op, arg, pos, ops[i + 1][2] if i + 1 < len(ops) else len(pkl)) for i, (op, arg, pos) in enumerate(ops)
        ]
        kind = data.draw(
            st.sampled_from(
                ["int", "int", "str", "global", "insert", "delete", "dup", "swap", "truncate", "bomb", "bomb"]
            )
        )
        ints = [s for s in spans if s[0].name in ("BININT", "BININT1", "BININT2", "LONG1", "INT", "LONG")]
        strs = [
            s
            for s in spans
            if s[0].name in ("BINUNICODE", "SHORT_BINUNICODE", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "STRING")
        ]
        globs = [s for s in spans if s[0].name == "GLOBAL"]
        if kind == "int" and ints:
            op, arg, lo, hi = data.draw(st.sampled_from(ints))
            v = data.draw(st.one_of(st.sampled_from(INTERESTING_INTS + [10**5000, 2**100]), st.integers()))
            pkl = pkl[:lo] + _pickle_int(v) + pkl[hi:]
            desc.append(f"pickle int @{lo} {arg!r} -> {_short(v)}")
        elif kind == "str" and strs:
            op, arg, lo, hi = data.draw(st.sampled_from(strs))
            s = data.draw(st.one_of(st.sampled_from(PICKLE_STRINGS), st.text(max_size=12)))
            pkl = pkl[:lo] + _pickle_str(s) + pkl[hi:]
            desc.append(f"pickle str @{lo} {str(arg)[:40]!r} -> {s[:40]!r}")
        elif kind == "bomb" and (ints or strs):
            op, arg, lo, hi = data.draw(st.sampled_from(ints + strs))
            bomb = data.draw(st.sampled_from(sorted(BOMBS)))
            n = data.draw(st.sampled_from(BOMBS[bomb]))
            pkl = pkl[:lo] + pickle_bomb(bomb, n) + pkl[hi:]
            desc.append(f"pickle bomb @{lo} {str(arg)[:40]!r} -> {bomb} {n}")
        elif kind == "global" and globs:
            op, arg, lo, hi = data.draw(st.sampled_from(globs))
            mod, name = data.draw(st.sampled_from(PICKLE_GLOBALS))
            pkl = pkl[:lo] + b"c" + mod.encode() + b"\n" + name.encode() + b"\n" + pkl[hi:]
            desc.append(f"pickle global @{lo} {arg!r} -> {mod} {name[:40]}")
        elif kind == "insert":
            op, arg, lo, hi = data.draw(st.sampled_from(spans))
            ins = data.draw(st.sampled_from(PICKLE_OPS))
            pkl = pkl[:lo] + ins + pkl[lo:]
            desc.append(f"pickle insert {ins[:6]!r} @{lo}")
        elif kind == "delete":
            op, arg, lo, hi = data.draw(st.sampled_from(spans))
            pkl = pkl[:lo] + pkl[hi:]
            desc.append(f"pickle delete {op.name} @{lo}")
        elif kind == "dup":
            op, arg, lo, hi = data.draw(st.sampled_from(spans))
            pkl = pkl[:hi] + pkl[lo:hi] + pkl[hi:]
            desc.append(f"pickle duplicate {op.name} @{lo}")
        elif kind == "swap" and len(spans) > 2:
            i = data.draw(st.integers(0, len(spans) - 2))
            a, b = spans[i], spans[i + 1]
            pkl = pkl[: a[2]] + pkl[b[2] : b[3]] + pkl[a[2] : a[3]] + pkl[b[3] :]
            desc.append(f"pickle swap {a[0].name} {b[0].name} @{a[2]}")
        elif kind == "truncate":
            n = data.draw(st.integers(0, len(pkl)))
            pkl = pkl[:n]
            desc.append(f"pickle truncate at {n}")
    return pkl


# ---- safetensors ---------------------------------------------------------------------------------
ST_DTYPES = [
    "F32",
    "F16",
    "BF16",
    "F64",
    "I64",
    "I32",
    "I16",
    "I8",
    "U8",
    "U16",
    "U32",
    "U64",
    "BOOL",
    "F8_E4M3",
    "F8_E5M2",
    "C64",
    "E8M0",
    "F4",
    "",
    "f32",
    "FLOAT",
    "F128",
]
ST_SIZES = {
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "F64": 8,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "U16": 2,
    "U32": 4,
    "U64": 8,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "C64": 8,
}


def st_split(buf: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(buf[:8], "little")
    return json.loads(buf[8 : 8 + n]), buf[8 + n :]


def st_join(header: dict | bytes, rest: bytes, pad: bool = True) -> bytes:
    text = header if isinstance(header, bytes) else json_dumps(header).encode("utf-8", "surrogatepass")
    if pad and len(text) % 8:
        text += b" " * (8 - len(text) % 8)
    return len(text).to_bytes(8, "little") + text + rest


def _dims_for(data, nbytes: int, size: int, old: list) -> list[int] | None:
    if nbytes % size:
        return None
    n = nbytes // size
    st = _st()
    opts = [[n], [1, n], [n, 1]]
    for d in (2, 3, 4, 8, 12, 24):
        if n % d == 0:
            opts += [[d, n // d], [n // d, d]]
    if old and math.prod(old) == n:
        opts.append(list(reversed(old)))
    return data.draw(st.sampled_from(opts))


def mutate_safetensors(data, buf: bytes, desc: list[str], meta_keys: tuple[str, ...] = ()) -> bytes:
    """Mutations of a safetensors file: the tensor entries of the JSON header (dtype, shape, data_offsets,
    reinterpretation with a consistent size, aliasing), the metadata (JSON trees and text of the values), the
    8-byte length, raw header bytes, the data section."""
    st = _st()
    header, rest = st_split(buf)
    n_hdr = int.from_bytes(buf[:8], "little")
    kind = data.draw(
        st.sampled_from(
            [
                "entry",
                "entry",
                "reinterpret",
                "metadata",
                "metadata",
                "metadata",
                "length",
                "header_bytes",
                "data",
                "bytes",
            ]
        )
    )
    names = sorted(k for k in header if k != "__metadata__")
    if kind == "bytes":
        return mutate_bytes(data, buf, [(0, 8), (8, 8 + n_hdr)], desc)
    if kind == "header_bytes":
        raw = mutate_bytes(data, buf[8 : 8 + n_hdr], [(0, n_hdr)], desc, max_ops=2)
        fix = data.draw(st.booleans())
        desc.append(f"header bytes, length {'fixed' if fix else 'kept'}")
        return (len(raw) if fix else n_hdr).to_bytes(8, "little") + raw + rest
    if kind == "length":
        v = data.draw(
            st.one_of(
                st.sampled_from(
                    [
                        0,
                        1,
                        2,
                        7,
                        n_hdr - 1,
                        n_hdr + 1,
                        n_hdr + 8,
                        len(buf) - 8,
                        len(buf),
                        100 << 20,
                        2**31,
                        2**63 - 1,
                        2**64 - 1,
                    ]
                ),
                st.integers(0, 2**64 - 1),
            )
        )
        desc.append(f"header length {n_hdr} -> {v}")
        return (v % 2**64).to_bytes(8, "little") + buf[8:]
    if kind == "data":
        op = data.draw(st.sampled_from(["truncate", "extend", "nan", "inf", "flip"]))
        rest_b = bytearray(rest)
        pos = data.draw(st.integers(0, max(0, len(rest_b) - 4)))
        if op == "truncate":
            del rest_b[pos:]
        elif op == "extend":
            rest_b += b"\x00" * data.draw(st.sampled_from([1, 3, 4, 8, 4096]))
        elif op in ("nan", "inf"):
            pos -= pos % 4
            rest_b[pos : pos + 4] = struct.pack("<f", float(op))
        else:
            rest_b[pos] ^= 0xFF
        desc.append(f"data {op} @{pos}")
        return st_join(header, bytes(rest_b))
    header = json.loads(json.dumps(header))
    for _ in range(data.draw(st.integers(1, 3))):
        if kind == "metadata":
            meta = header.get("__metadata__")
            op = data.draw(st.sampled_from(["value", "value", "value", "delete", "nonstring", "retype", "add"]))
            if not isinstance(meta, dict) or op == "retype":
                header["__metadata__"] = evil_value(data)
                desc.append("metadata replaced")
                continue
            key = data.draw(st.sampled_from(sorted(meta) or ["format"]))
            if op == "value" and isinstance(meta.get(key), str):
                meta[key] = (
                    mutate_json_value(data, meta[key], desc, keys=meta_keys)
                    if meta[key][:1] in "{["
                    else data.draw(st.sampled_from(INTERESTING_STRINGS))
                )
                desc.append(f"metadata {key!r} value")
            elif op == "delete":
                meta.pop(key, None)
                desc.append(f"metadata delete {key!r}")
            elif op == "nonstring":
                meta[key] = evil_value(data)
                desc.append(f"metadata {key!r} non-string")
            else:
                k = data.draw(st.sampled_from(["format", "config", "caitdeploy", "x", "", "\n"]))
                meta[k] = data.draw(st.sampled_from(INTERESTING_STRINGS + ["{}", "[]", '{"a": 1}']))
                desc.append(f"metadata add {k!r}")
            continue
        if not names:
            break
        name = data.draw(st.sampled_from(names))
        entry = header.get(name)
        if not isinstance(entry, dict):
            continue
        if kind == "reinterpret":
            s, e = entry["data_offsets"]
            dt = data.draw(st.sampled_from([d for d in ST_SIZES]))
            dims = _dims_for(data, e - s, ST_SIZES[dt], entry["shape"])
            if dims is None:
                continue
            entry.update(dtype=dt, shape=dims)
            desc.append(f"reinterpret {name} as {dt} {dims}")
            continue
        field = data.draw(
            st.sampled_from(["dtype", "shape", "shape", "offsets", "offsets", "delete", "alias", "rename", "entry"])
        )
        if field == "dtype":
            entry["dtype"] = data.draw(st.one_of(st.sampled_from(ST_DTYPES), st.sampled_from([1, None, ["F32"]])))
        elif field == "shape":
            shape = list(entry["shape"])
            op = data.draw(st.sampled_from(["dim", "append", "pop", "empty", "many", "nonint", "swap"]))
            if op == "dim" and shape:
                shape[data.draw(st.integers(0, len(shape) - 1))] = data.draw(
                    st.sampled_from([0, -1, 1, 2, 2**31, 2**32, 2**63 - 1, 2**63, 2**64, 2**70, 1.5, "2", None])
                )
            elif op == "append":
                shape.append(data.draw(st.sampled_from([0, 1, 2, 2**40])))
            elif op == "pop" and shape:
                shape.pop()
            elif op == "empty":
                shape = []
            elif op == "many":
                shape = shape + [1] * data.draw(st.sampled_from([8, 64, 1000]))
            elif op == "nonint":
                shape = data.draw(st.sampled_from(["x", 3, None, {"a": 1}, [[1]]]))
            elif op == "swap" and len(shape) > 1:
                shape = list(reversed(shape))
            entry["shape"] = shape
        elif field == "offsets":
            s, e = entry["data_offsets"]
            op = data.draw(st.sampled_from(["start", "end", "swap", "shift", "other", "short", "long", "nonint"]))
            other = header[data.draw(st.sampled_from(names))]
            values = [0, 1, -1, s + 1, e - 1, e + 4, len(rest), len(rest) + 4, 2**32, 2**63 - 1, 2**64 - 1, 2**64]
            if op == "start":
                offs = [data.draw(st.sampled_from(values)), e]
            elif op == "end":
                offs = [s, data.draw(st.sampled_from(values))]
            elif op == "swap":
                offs = [e, s]
            elif op == "shift":
                offs = [s + 4, e + 4]
            elif op == "other":
                offs = list(other["data_offsets"]) if isinstance(other, dict) else [s, e]
            elif op == "short":
                offs = [s]
            elif op == "long":
                offs = [s, e, e]
            else:  # nonint
                offs = [str(s), e]
            entry["data_offsets"] = offs
        elif field == "delete":
            del header[name]
            names.remove(name)
        elif field == "alias":
            header[data.draw(st.sampled_from(["alias", name + "_copy", "blocks.0.extra"]))] = dict(entry)
        elif field == "rename":
            new = data.draw(
                st.sampled_from(
                    names + ["", "x\ny", "blocks.9.attn.qkv.weight", "module." + name, "blocks.0.vtm.fc.weight", "é"]
                )
            )
            header[new] = header.pop(name)
            names = sorted(k for k in header if k != "__metadata__")
        else:
            header[name] = evil_value(data)
        desc.append(f"entry {name} {field}")
    return st_join(header, rest, pad=data.draw(st.integers(0, 9)) > 0)


# ---- checkpoint dicts ----------------------------------------------------------------------------
TORCH_DTYPES = (
    "float16",
    "bfloat16",
    "float64",
    "int64",
    "int32",
    "int8",
    "uint8",
    "bool",
    "complex64",
    "float8_e4m3fn",
)


def mutate_checkpoint_dict(data, ck: dict, desc: list[str], safetensors: bool) -> dict:
    """Structured mutations of a cait-compactor/1 dict: config values and merges, format, top level (DeiT-style
    inference included), and 1-3 state-dict edits (dtypes, shapes, views, values, keys)."""
    import torch

    st = _st()
    cfg = dict(ck["config"])
    sd = dict(ck["state_dict"])
    top: Any = {"format": ck["format"], "config": cfg, "state_dict": sd}  # a dict, or what a mutation makes it
    parts = data.draw(st.sampled_from(["config", "state_dict", "state_dict", "both", "top", "deit"]))
    if parts in ("config", "both"):
        for _ in range(data.draw(st.integers(1, 3))):
            key = data.draw(st.sampled_from(sorted(cfg) + ["merges", "extra"]))
            op = data.draw(st.sampled_from(["value", "value", "delete", "merges"]))
            if op == "delete":
                cfg.pop(key, None)
                desc.append(f"config delete {key}")
            elif op == "merges":
                m = data.draw(
                    st.sampled_from(
                        [
                            {},
                            {"0": "h"},
                            {"1": "v"},
                            {"0": "h", "1": "h"},
                            {"-1": "h"},
                            {"2": "h"},
                            {"99999": "v"},
                            {"1": "x"},
                            {"1": None},
                            {"1.5": "h"},
                            {" 1": "h"},
                            {"1": "h", "01": "v"},
                            ["h"],
                            "1:h",
                            None,
                            {"1": ["h"]},
                            {"": "h"},
                            {"1" * 5000: "h"},
                        ]
                    )
                )
                if not safetensors and data.draw(st.booleans()) and isinstance(m, dict):
                    m = {(int(k) if k.lstrip("-").isdigit() and len(k) < 20 else k): v for k, v in m.items()}
                    if data.draw(st.booleans()):
                        m = {True: "h"} if data.draw(st.booleans()) else {1.0: "h"}
                cfg["merges"] = m
                desc.append(f"config merges = {_short(m)}")
            else:
                v = evil_value(data, json_safe=safetensors)
                if not safetensors and data.draw(st.integers(0, 5)) == 0:
                    v = data.draw(
                        st.sampled_from(
                            [
                                torch.tensor(16),
                                torch.tensor([16.0]),
                                (16,),
                                b"16",
                                torch.float32,
                                torch.device("cpu"),
                                {1, 2},
                            ]
                        )
                    )
                cfg[key] = v
                desc.append(f"config {key} = {_short(v)}")
    if parts == "top":
        op = data.draw(
            st.sampled_from(["format", "format", "no_config", "no_sd", "sd_type", "cfg_type", "extra", "list", "empty"])
        )
        if op == "format":
            top["format"] = data.draw(
                st.sampled_from(
                    ["cait-compactor/2", "", "CAIT-COMPACTOR/1", 1, None, ["cait-compactor/1"], "x" * 5000, "a\nb"]
                )
            )
        elif op == "no_config":
            del top["config"]
        elif op == "no_sd":
            del top["state_dict"]
        elif op == "sd_type":
            top["state_dict"] = data.draw(st.sampled_from([[], None, "sd", 1, [("a", torch.zeros(1))]]))
        elif op == "cfg_type":
            top["config"] = data.draw(st.sampled_from([[], None, "cfg", 1, json.dumps(cfg)]))
        elif op == "extra":
            top["optimizer"] = {"state": {}, "lr": 0.1}
        elif op == "list":
            top = [top] if not safetensors else top
        else:
            top = {}
        desc.append(f"top {op}")
        # only a string format survives a safetensors file
        if safetensors and isinstance(top, dict) and not isinstance(top.get("format", ""), str):
            top["format"] = str(top["format"])
    if parts == "deit":
        wrap = data.draw(st.sampled_from(["model", "state_dict", "module.", "model.module."]))
        if wrap.endswith("."):
            sd = {wrap + k: v for k, v in sd.items()}
            top = {"model": sd}
        else:
            top = {wrap: sd}
        desc.append(f"DeiT-style {wrap} (no format, config inferred)")
    if parts in ("state_dict", "both", "deit"):
        for _ in range(data.draw(st.integers(1, 3))):
            _mutate_sd(data, sd, desc, safetensors)
    return top


def _plain(t: Any) -> bool:
    """A dense CPU tensor whose storage holds all its elements: safe to copy, convert, share."""
    import torch

    return (
        isinstance(t, torch.Tensor)
        and t.layout == torch.strided
        and not t.is_meta
        and t.untyped_storage().nbytes() >= t.numel() * t.element_size()
    )


def _mutate_sd(data, sd: dict, desc: list[str], safetensors: bool) -> None:
    import torch

    st = _st()
    if not sd:
        return
    names = sorted(k for k in sd if isinstance(k, str))
    key = data.draw(st.sampled_from(names))
    t = sd[key]
    ops = ["dtype", "dtype", "shape", "shape", "values", "mask", "delete", "add", "rename"]
    if not safetensors:
        ops += ["expand", "overlap", "share", "noncontig", "nontensor", "sparse", "meta", "offset", "param"]
    op = data.draw(st.sampled_from(ops))
    if not _plain(t) and op not in ("delete", "add", "rename", "nontensor"):
        return  # a tensor made exotic by an earlier edit (expanded, sparse, meta) is only moved or dropped
    if op == "dtype":
        dt = getattr(torch, data.draw(st.sampled_from(TORCH_DTYPES)))
        sd[key] = t.to(dt)
        desc.append(f"sd {key} dtype {dt}")
    elif op == "shape":
        how = data.draw(st.sampled_from(["flatten", "unsqueeze", "transpose", "slice", "zero", "scalar", "grow"]))
        if how == "flatten":
            t = t.reshape(-1)
        elif how == "unsqueeze":
            t = t.unsqueeze(0)
        elif how == "transpose" and t.dim() >= 2:
            t = t.transpose(0, 1).contiguous()
        elif how == "slice" and t.dim() >= 1 and t.shape[0] > 1:
            t = t[:-1].clone()
        elif how == "zero":
            t = t.reshape(-1)[:0].reshape(0, *t.shape[1:]) if t.dim() else t.reshape(-1)[:0]
        elif how == "scalar":
            t = t.reshape(-1)[0].clone()
        elif how == "grow":
            t = torch.cat([t, t], dim=0) if t.dim() else t.reshape(1).repeat(2)
        sd[key] = t
        desc.append(f"sd {key} shape {how} -> {tuple(t.shape)}")
    elif op == "values":
        v = data.draw(st.sampled_from([float("nan"), float("inf"), float("-inf"), 1e38, -0.0, 65504.0 * 2]))
        t = t.clone()
        if t.numel():
            t.view(-1)[data.draw(st.integers(0, t.numel() - 1))] = v if t.is_floating_point() else 7
        sd[key] = t
        desc.append(f"sd {key} value {v}")
    elif op == "mask":
        masks = [k for k in names if k.endswith("_compactor.mask")]
        if masks:
            k = data.draw(st.sampled_from(masks))
            m = sd[k].clone()
            v = data.draw(st.sampled_from([2.0, -1.0, 0.5, 0.0, 1.0]))
            if data.draw(st.booleans()):
                m.fill_(v)
            elif m.numel():
                m.view(-1)[0] = v
            sd[k] = m
            desc.append(f"sd {k} mask {v}")
    elif op == "delete":
        del sd[key]
        desc.append(f"sd delete {key}")
    elif op == "add":
        name = data.draw(
            st.sampled_from(
                [
                    "blocks.2.attn.qkv.weight",
                    "blocks.0.htm.fc.weight",
                    "blocks.1.vtm.fc.weight",
                    "blocks.0.attn.q_compactor.weight",
                    "blocks.99999999.mlp.fc1.weight",
                    "blocks.0.attn.qkv.bias.x",
                    "",
                    "x" * 300,
                    "module.cls_token",
                    "a\nb",
                ]
            )
        )
        sd[name] = torch.zeros(data.draw(st.sampled_from([(1,), (24,), (24, 48), (2, 6, 6), (0,)])))
        desc.append(f"sd add {name[:40]!r}")
    elif op == "rename":
        new = data.draw(st.sampled_from(names + ["module." + key, key.upper(), key + ".", "blocks.1.htm.fc.weight"]))
        sd[new] = sd.pop(key)
        if not safetensors and data.draw(st.integers(0, 4)) == 0:
            sd[data.draw(st.sampled_from([0, None, 1.5, ("a",)]))] = sd.pop(new)
        desc.append(f"sd rename {key} -> {new}")
    elif op == "expand":
        shape = data.draw(
            st.sampled_from([tuple(t.shape) or (2,), (1 << 20, 1 << 20), (2**31, 2), (1 << 62, 1), (24, 1 << 30)])
        )
        sd[key] = t.reshape(-1)[:1].expand(*shape)
        desc.append(f"sd {key} stride-0 expand {shape}")
    elif op == "overlap":
        n = max(t.numel(), 4)
        shape = tuple(t.shape) if t.dim() >= 2 else (n, n)
        base = torch.zeros(max(n, sum(shape)))
        sd[key] = base.as_strided(shape, (1,) * len(shape))
        desc.append(f"sd {key} overlapping as_strided {shape}")
    elif op == "share":
        other = data.draw(st.sampled_from(names))
        if _plain(sd[other]) and sd[other].numel() >= t.numel():
            sd[key] = sd[other].reshape(-1)[: t.numel()].reshape(t.shape)
            desc.append(f"sd {key} shares {other}'s storage")
    elif op == "noncontig" and t.dim() >= 2:
        sd[key] = t.transpose(0, 1).contiguous().transpose(0, 1)
        desc.append(f"sd {key} non-contiguous")
    elif op == "nontensor":
        sd[key] = data.draw(st.sampled_from([1, 1.5, "w", None, [1.0], {"a": 1}, (1,), True, b"x"]))
        desc.append(f"sd {key} non-tensor")
    elif op == "sparse":
        sd[key] = t.to_sparse() if t.dim() else t
        desc.append(f"sd {key} sparse")
    elif op == "meta":
        sd[key] = torch.empty(t.shape, device="meta")
        desc.append(f"sd {key} meta")
    elif op == "offset":
        flat = torch.cat([torch.zeros(3), t.reshape(-1).float()])
        sd[key] = flat[3:].view(t.shape)
        desc.append(f"sd {key} storage offset 3")
    elif op == "param":
        sd[key] = torch.nn.Parameter(t.float(), requires_grad=False)
        desc.append(f"sd {key} Parameter")


# ---- ONNX ----------------------------------------------------------------------------------------
ONNX_KEYS = (
    "caitdeploy.format",
    "caitdeploy.dtype",
    "caitdeploy.io_dtype",
    "caitdeploy.attention",
    "caitdeploy.model",
    "caitdeploy.config",
)


def mutate_onnx(data, model, raw: bytes, desc: list[str], cfg_keys: tuple[str, ...]) -> bytes:
    """metadata_props (caitdeploy.families.vit.config as a JSON tree or text, other keys, duplicates), graph I/O, opsets,
    or the raw protobuf bytes."""
    import onnx

    st = _st()
    kind = data.draw(st.sampled_from(["config", "config", "config", "props", "graph", "bytes"]))
    if kind == "bytes":
        at = raw.find(b"caitdeploy.")
        hot = [(at, len(raw))] if at >= 0 else []
        return mutate_bytes(data, raw, hot + [(0, 64)], desc)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    props = {p.key: p for p in m.metadata_props}
    if kind == "config":
        p = props.get("caitdeploy.config")
        assert p is not None  # the seed model carries its config
        p.value = mutate_json_value(data, p.value, desc, keys=cfg_keys)
        if data.draw(st.integers(0, 5)) == 0:  # a second, different config entry
            extra = m.metadata_props.add()
            extra.key, extra.value = "caitdeploy.config", data.draw(st.sampled_from(["{}", "x", p.value[:50]]))
            desc.append("duplicate caitdeploy.families.vit.config entry")
    elif kind == "props":
        for _ in range(data.draw(st.integers(1, 3))):
            op = data.draw(st.sampled_from(["value", "delete", "add", "many"]))
            key = data.draw(st.sampled_from(ONNX_KEYS))
            if op == "value" and key in props:
                props[key].value = data.draw(st.one_of(st.sampled_from(INTERESTING_STRINGS), st.text(max_size=20)))
            elif op == "delete":
                keep = [q for q in m.metadata_props if q.key != key]
                del m.metadata_props[:]
                m.metadata_props.extend(keep)
                props = {q.key: q for q in m.metadata_props}
            elif op == "add":
                q = m.metadata_props.add()
                q.key = data.draw(st.sampled_from(list(ONNX_KEYS) + ["", "x\ny", "é"]))
                q.value = data.draw(st.sampled_from(INTERESTING_STRINGS))
            else:
                for i in range(data.draw(st.sampled_from([100, 5000]))):
                    q = m.metadata_props.add()
                    q.key, q.value = f"k{i}", "v"
            desc.append(f"props {op} {key}")
    else:
        op = data.draw(
            st.sampled_from(
                ["no_nodes", "no_opset", "ir", "io_dims", "io_type", "no_io", "opset_ver", "init_dims", "domain"]
            )
        )
        if op == "no_nodes":
            del m.graph.node[:]
        elif op == "no_opset":
            del m.opset_import[:]
        elif op == "ir":
            m.ir_version = data.draw(st.sampled_from([0, 1, 99, 2**62]))
        elif op == "io_dims":
            v = m.graph.input[0] if m.graph.input else None
            if v is not None and v.type.tensor_type.shape.dim:
                d = v.type.tensor_type.shape.dim[0]
                if data.draw(st.booleans()):
                    d.dim_value = data.draw(st.sampled_from([0, -1, 2**62]))
                else:
                    d.dim_param = data.draw(st.sampled_from(["", "x\ny", "b" * 1000]))
        elif op == "io_type":
            vs = list(m.graph.input) + list(m.graph.output)
            if vs:
                vs[0].type.tensor_type.elem_type = data.draw(st.sampled_from([0, 10, 16, 99, 2**31 - 1]))
        elif op == "no_io":
            del m.graph.output[:]
            if data.draw(st.booleans()):
                del m.graph.input[:]
        elif op == "opset_ver":
            m.opset_import[0].version = data.draw(st.sampled_from([0, 1, 99, 2**62]))
        elif op == "init_dims" and m.graph.initializer:
            init = m.graph.initializer[0]
            init.dims[:] = data.draw(st.sampled_from([[2**40, 2**40], [-1], [], [0]]))
        elif op == "domain" and m.graph.node:
            m.graph.node[0].domain = data.draw(st.sampled_from(["com.microsoft", "x" * 1000, "\n"]))
        desc.append(f"graph {op}")
    return m.SerializeToString()


# ---- engine sidecar ------------------------------------------------------------------------------
SIDECAR_KEYS = (
    "format",
    "engine",
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
    "created",
    "config",
    "host",
    "timing_cache",
)


def mutate_sidecar(data, side: dict, engine: bytes, desc: list[str], paths: dict[str, str]) -> tuple[bytes, bytes]:
    """(sidecar bytes, engine bytes): the sidecar as a JSON tree (onnx path among real, missing, special and
    large files), as text or bytes; the engine truncated, empty or random."""
    st = _st()
    kind = data.draw(st.sampled_from(["tree", "tree", "tree", "onnx_path", "text", "bytes", "engine"]))
    # flavour "tensorrt_rtx": inspect checks the engine header with tensorrt_rtx (installed here) and stops at it;
    # "tensorrt" (not installed here): no header check, inspect goes on through the whole sidecar
    side = {**side, "flavour": data.draw(st.sampled_from(["tensorrt", "tensorrt_rtx"]))}
    text = json.dumps(side)
    if kind == "tree":
        text = json_dumps(mutate_tree(data, side, desc, keys=SIDECAR_KEYS))
    elif kind == "onnx_path":
        s = json.loads(text)
        which = data.draw(st.sampled_from(sorted(paths)))
        s["onnx"]["path"] = paths[which]
        desc.append(f"sidecar onnx.path = {which}")
        text = json.dumps(s)
    elif kind == "text":
        text = mutate_json_text(data, text, desc)
    raw = text.encode("utf-8", "surrogatepass")
    if kind == "bytes":
        raw = mutate_bytes(data, raw, [(0, len(raw))], desc)
        if data.draw(st.integers(0, 9)) == 0:
            raw = data.draw(st.sampled_from([b"\xff\xfe{\x00}\x00", b"\xef\xbb\xbf{}", b"\xc3\x28", b" " * (5 << 20)]))
            desc.append(f"sidecar raw {raw[:8]!r}")
    if kind == "engine":
        engine = data.draw(
            st.sampled_from(
                [b"", engine[:1], engine[:16], engine[:64], b"\x00" * 4096, data.draw(st.binary(max_size=256))]
            )
        )
        desc.append(f"engine {len(engine)} bytes")
    return raw, engine


def _short(v: Any) -> str:
    if isinstance(v, int) and not isinstance(v, bool) and v.bit_length() > 64:
        return f"<{v.bit_length()}-bit int>"
    s = repr(v) if not isinstance(v, str) or len(v) < 40 else repr(v[:40]) + "..."
    return s[:60]


# =====================================================================================================
# Seeds and targets (worker side)
# =====================================================================================================
def build_seeds(folder: Path) -> dict[str, Any]:
    """Small valid files (made once per run, kept in `folder`): a 2-block CAIT checkpoint (.pth and .safetensors),
    its fused model, the fused model's ONNX export, an engine sidecar; the checkpoint dict itself."""
    import hashlib

    import torch

    from caitdeploy.compress.cdcp import save_checkpoint_dict
    from caitdeploy.testing.checkpoints import random_checkpoint

    folder.mkdir(parents=True, exist_ok=True)
    ck = random_checkpoint(embed_dim=24, depth=2, num_heads=2, img_size=16, patch_size=8, merges={1: "h"})
    pth, sft, fused, onnx_p = (folder / n for n in ("ckpt.pth", "ckpt.safetensors", "fused.safetensors", "m.onnx"))
    if not pth.is_file():
        torch.save(ck, pth)
    if not sft.is_file():
        save_checkpoint_dict(ck, sft)
    if not fused.is_file():
        from caitdeploy.compress.fuse import fuse_file

        fuse_file(pth, fused, verify_batch=0)
    from caitdeploy.formats.fused import load_fused, load_model

    config, _, _ = load_fused(fused)
    if not onnx_p.is_file():
        from caitdeploy.export.onnx import export_onnx

        export_onnx(load_model(fused), onnx_p, verify=False)
    engine = bytes(zlib.crc32(i.to_bytes(2, "little")) & 0xFF for i in range(4096))  # fixed pseudo-random bytes
    onnx_bytes = onnx_p.read_bytes()
    side = {
        "format": "caitdeploy-engine/1",
        "engine": "case.plan",
        "flavour": "tensorrt",
        "trt_version": "1.7.1",
        "build_target": {},
        "strongly_typed": True,
        "dtype": "fp32",
        "io_dtype": "float32",
        "input": "images",
        "outputs": ["logits"],
        "profile": {"min": [1, 3, 16, 16], "opt": [2, 3, 16, 16], "max": [4, 3, 16, 16]},
        "onnx": {"path": str(onnx_p), "sha256": hashlib.sha256(onnx_bytes).hexdigest(), "bytes": len(onnx_bytes)},
        "opt_level": 3,
        "build_seconds": 1.0,
        "engine_bytes": len(engine),
        "config": json.loads(config.to_json()),
    }
    big = folder / "big.bin"  # a sparse 4 GiB file for a sidecar to name
    if not big.exists():
        with open(big, "wb") as f:
            f.truncate(4 << 30)
    special = {
        "seed onnx": str(onnx_p),
        "missing": str(folder / "missing.onnx"),
        "folder": str(folder),
        "empty": "",
        "dev null": "/dev/null",
        "proc self mem": "/proc/self/mem",
        "4 GiB sparse file": str(big),
        "relative": "m.onnx",
        "fifo-like /proc/self/fd/0": "/proc/self/fd/0",
    }
    return {
        "ckpt": ck,
        "pth": pth,
        "safetensors": sft,
        "fused": fused,
        "onnx": onnx_p,
        "sidecar": side,
        "engine": engine,
        "config": config,
        "special_paths": special,
    }


class Target:
    def __init__(
        self,
        name: str,
        suffix: str,
        readers: dict[str, Callable[[Path], Any]],
        make: Callable[[Any, list[str]], dict[str, bytes]],
    ):
        self.name, self.suffix, self.readers, self.make = name, suffix, readers, make


def make_targets(seeds: dict[str, Any]) -> dict[str, Target]:
    import io

    import onnx
    import torch
    from safetensors.torch import save as save_st_bytes

    from caitdeploy.cli.inspect import print_inspect
    from caitdeploy.families.vit.config import BlockConfig, CaitConfig
    from caitdeploy.formats.checkpoint import load_checkpoint
    from caitdeploy.formats.describe import describe_file
    from caitdeploy.formats.fused import load_fused, load_model, save_fused
    from caitdeploy.formats.sidecar import read_sidecar
    from caitdeploy.pipelines.inspect import engine_header_check

    def inspect_file(path):  # what `caitdeploy inspect` runs (pipelines.inspect): with TensorRT's header check
        return describe_file(path, header_check=engine_header_check)

    st = _st()
    pth = seeds["pth"].read_bytes()
    hot, pkl_span = zip_hot_regions(pth)
    pkl = pth[pkl_span[0] : pkl_span[1]]
    pkl_name = next(n for n in __import__("zipfile").ZipFile(io.BytesIO(pth)).namelist() if n.endswith("data.pkl"))
    sft = seeds["safetensors"].read_bytes()
    fused = seeds["fused"].read_bytes()
    onnx_raw = seeds["onnx"].read_bytes()
    onnx_model = onnx.load_from_string(onnx_raw)
    ck = seeds["ckpt"]
    cfg_keys = tuple(json.loads(seeds["config"].to_json())) + (
        "num_heads",
        "qk_dim",
        "v_dim",
        "mlp_hidden",
        "attn_scale",
        "merge",
    )
    ck_keys = tuple(ck["config"]) + ("extra",)

    def save_torch(obj) -> bytes:
        buf = io.BytesIO()
        torch.save(obj, buf)
        return buf.getvalue()

    def save_st(top: dict) -> bytes:
        sd = top.get("state_dict", top.get("model", {})) if isinstance(top, dict) else {}
        meta = {}
        if isinstance(top, dict):
            if "format" in top:
                meta["format"] = str(top["format"])
            if "config" in top:
                meta["config"] = top["config"] if isinstance(top["config"], str) else json_dumps(top["config"])
        tensors = {k: v.detach().clone().contiguous() for k, v in sd.items() if isinstance(v, torch.Tensor)}
        return save_st_bytes(tensors, metadata=meta)

    def reject_on_error(fn, *a):
        from hypothesis import reject
        from hypothesis.errors import HypothesisException

        try:
            return fn(*a)
        except HypothesisException:
            raise
        except Exception:  # noqa: BLE001 - the generator cannot write this object (e.g. torch.save of a meta tensor)
            reject()

    def make_pth(data, desc):
        kind = data.draw(st.sampled_from(["bytes", "pickle", "pickle", "zip"]))
        if kind == "bytes":
            return {"": mutate_bytes(data, pth, hot, desc)}
        if kind == "pickle":
            new = mutate_pickle(data, pkl, desc)
            if len(new) == len(pkl) and data.draw(st.booleans()):  # in place: the zip CRC stays stale
                desc.append("in place (stale CRC)")
                return {"": pth[: pkl_span[0]] + new + pth[pkl_span[1] :]}
            return {"": rebuild_zip(pth, replace={pkl_name: new})}
        names = __import__("zipfile").ZipFile(io.BytesIO(pth)).namelist()
        op = data.draw(st.sampled_from(["drop", "compress", "extra", "dup"]))
        name = data.draw(st.sampled_from(names))
        desc.append(f"zip {op} {name}")
        if op == "drop":
            return {"": rebuild_zip(pth, drop={name})}
        if op == "compress":
            return {"": rebuild_zip(pth, compress={name})}
        if op == "extra":
            return {"": rebuild_zip(pth, extra=[(name.split("/")[0] + "/data/999", b"\x00" * 64)])}
        return {"": rebuild_zip(pth, extra=[(name, b"\x00" * 8)])}

    def make_dict(data, desc):
        top = mutate_checkpoint_dict(data, ck, desc, safetensors=False)
        return {"": reject_on_error(save_torch, top)}

    def make_st(data, desc):
        if data.draw(st.integers(0, 3)) == 0:
            top = mutate_checkpoint_dict(data, ck, desc, safetensors=True)
            if isinstance(top, dict) and isinstance(top.get("config"), dict) and data.draw(st.booleans()):
                top["config"] = mutate_json_text(data, json_dumps(top["config"]), desc)
            return {"": reject_on_error(save_st, top)}
        return {"": mutate_safetensors(data, sft, desc, meta_keys=ck_keys)}

    def make_fused(data, desc):
        if data.draw(st.integers(0, 5)) == 0:
            return {"": reject_on_error(random_fused, data, desc)}
        return {"": mutate_safetensors(data, fused, desc, meta_keys=cfg_keys)}

    def random_fused(data, desc) -> bytes:
        """A valid fused model with a random small config: every reader must accept it."""
        g = data.draw(st.sampled_from([1, 2, 4]))
        patch = data.draw(st.sampled_from([1, 2, 4]))
        depth = data.draw(st.integers(1, 3))
        blocks = []
        gh = gw = g
        for _ in range(depth):
            merge = data.draw(st.sampled_from([None, "h", "v"]))
            if merge == "h" and gw % 2 == 0:
                gw //= 2
            elif merge == "v" and gh % 2 == 0:
                gh //= 2
            else:
                merge = None
            blocks.append(
                BlockConfig(
                    data.draw(st.integers(1, 3)),
                    data.draw(st.integers(1, 5)),
                    data.draw(st.integers(1, 5)),
                    data.draw(st.integers(1, 9)),
                    data.draw(st.sampled_from([0.125, 1.0, 1e-3, 7.5])),
                    merge,
                )
            )
        config = CaitConfig(
            g * patch,
            patch,
            data.draw(st.integers(1, 4)),
            data.draw(st.integers(1, 5)),
            data.draw(st.integers(1, 8)),
            data.draw(st.booleans()),
            tuple(blocks),
            data.draw(st.sampled_from([1e-6, 1e-5, 0.1])),
        )
        from caitdeploy.families.vit.model import CaitViT

        torch.manual_seed(0)
        sd = CaitViT(config).state_dict()
        if data.draw(st.booleans()):
            dt = data.draw(st.sampled_from([torch.float16, torch.bfloat16, torch.float64]))
            sd = {k: v.to(dt) for k, v in sd.items()}
        desc.append(f"random valid fused config {config.to_json()[:300]}")
        with tempfile.TemporaryDirectory() as d:
            save_fused(f"{d}/x.safetensors", config, sd)
            return Path(f"{d}/x.safetensors").read_bytes()

    def make_onnx(data, desc):
        return {"": mutate_onnx(data, onnx_model, onnx_raw, desc, cfg_keys)}

    def make_sidecar(data, desc):
        side, engine = mutate_sidecar(data, seeds["sidecar"], seeds["engine"], desc, seeds["special_paths"])
        return {"": engine, ".json": side}

    def fused_then_model(p):
        load_fused(p)
        return load_model(p)

    def inspect(p):
        return inspect_and_print(inspect_file, print_inspect, p)

    return {
        "checkpoint_pth": Target(
            "checkpoint_pth", ".pth", {"load_checkpoint": load_checkpoint, "inspect": inspect}, make_pth
        ),
        "checkpoint_dict": Target(
            "checkpoint_dict", ".pth", {"load_checkpoint": load_checkpoint, "inspect": inspect}, make_dict
        ),
        "checkpoint_safetensors": Target(
            "checkpoint_safetensors", ".safetensors", {"load_checkpoint": load_checkpoint, "inspect": inspect}, make_st
        ),
        "fused": Target(
            "fused",
            ".safetensors",
            {"load_fused": load_fused, "load_model": fused_then_model, "inspect": inspect},
            make_fused,
        ),
        "onnx_metadata": Target("onnx_metadata", ".onnx", {"inspect": inspect}, make_onnx),
        "engine_sidecar": Target(
            "engine_sidecar", ".plan", {"read_sidecar": read_sidecar, "inspect": inspect}, make_sidecar
        ),
    }


SEED_FILES = {
    "checkpoint_pth": "pth",
    "checkpoint_dict": "pth",
    "checkpoint_safetensors": "safetensors",
    "fused": "fused",
    "onnx_metadata": "onnx",
}


def inspect_and_print(inspect_file, print_inspect, path):
    """What `caitdeploy inspect FILE` does: describe the file, then print the description (into a string)."""
    import contextlib
    import io

    info = inspect_file(path)
    with contextlib.redirect_stdout(io.StringIO()):
        print_inspect(info)
    return info


def seed_case(seeds: dict[str, Any], name: str) -> dict[str, bytes]:
    if name == "engine_sidecar":
        return {"": seeds["engine"], ".json": json.dumps(seeds["sidecar"]).encode()}
    return {"": Path(seeds[SEED_FILES[name]]).read_bytes()}


# =====================================================================================================
# One reader call under the limits
# =====================================================================================================
class CaseTimeout(BaseException):
    """Raised by SIGALRM inside a reader call that ran past CASE_SECONDS (a BaseException: `except Exception`
    in the reader cannot swallow it)."""


def _on_alarm(signum, frame):
    raise CaseTimeout(f"reader call exceeded {CASE_SECONDS} s")


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class _Capture:
    """File descriptors 1 and 2 redirected into a file during a call: what a library prints by itself."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        sys.stdout.flush()
        sys.stderr.flush()
        self.saved = (os.dup(1), os.dup(2))
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(self.fd, 1)
        os.dup2(self.fd, 2)
        return self

    def __exit__(self, *exc):
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(self.saved[0], 1)
        os.dup2(self.saved[1], 2)
        for fd in (*self.saved, self.fd):
            os.close(fd)
        self.text = self.path.read_text(errors="replace")
        return False


def call_reader(fn: Callable[[Path], Any], path: Path, capture: Path, limits: dict[str, float]) -> dict[str, Any]:
    """Run fn(path) under the time limit; returns {"outcome": accepted|refused|finding, ...}."""
    import warnings

    from caitdeploy.core.errors import CaitError

    rss0 = _status_kb("VmRSS")
    peak_ok = _reset_peak_rss()
    exc: BaseException | None = None
    result = None
    with warnings.catch_warnings(record=True) as caught, _Capture(capture) as cap:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        try:
            try:
                signal.setitimer(signal.ITIMER_REAL, limits["case_seconds"])
                result = fn(path)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        except KeyboardInterrupt:
            raise
        except BaseException as e:  # noqa: BLE001 - everything else is classified below
            exc = e
        elapsed = time.perf_counter() - t0
    del result
    peak_mb = ((_status_kb("VmHWM") if peak_ok else _status_kb("VmRSS")) - rss0) / 1024
    out: dict[str, Any] = {
        "seconds": elapsed,
        "rss_growth_mb": max(0.0, peak_mb),
        "warnings": [f"{w.category.__name__}: {(str(w.message).splitlines() or [''])[0][:160]}" for w in caught],
        "output": cap.text.strip()[:400],
    }
    kind = None
    if exc is None:
        out["outcome"] = "accepted"
    elif isinstance(exc, CaitError):
        msg = str(exc)
        out["outcome"], out["message"], out["message_chars"] = "refused", msg[:300], len(msg)
        lines = msg.splitlines()
        if "\n" in msg or "\r" in msg:
            kind = "multi-line error"
        elif len(lines) > 1:
            out["separator"] = next(c for c in msg if (c + "x").splitlines() != [c + "x"])
            kind = "error message with a line separator"
        elif not msg.strip():
            kind = "empty error message"
        elif len(msg) > limits["max_message"]:
            kind = "over-long error message"
        elif any(m in msg.lower() for m in ALLOC_MARKERS):
            kind = "failed allocation reported as CaitError"
    elif isinstance(exc, CaseTimeout):
        kind = "timeout"
    else:
        kind = f"uncaught {_type_name(exc)}"
    if kind is None and elapsed > limits["case_seconds"]:
        kind = "slow"
    if kind is None and out["rss_growth_mb"] > limits["case_memory_mb"]:
        kind = "memory"
    if kind is not None:
        out["outcome"] = "finding"
        out["kind"] = kind
        if exc is not None:
            out["exception"] = _type_name(exc)
            out["message"] = (str(exc).strip().splitlines() or [""])[0][:300]
            out["multi_line_message"] = str(exc)[:2000] if kind == "multi-line error" else None
            tb = traceback.extract_tb(exc.__traceback__)
            ours = [
                f
                for f in tb
                if f"{os.sep}caitdeploy{os.sep}" in f.filename  # the readers' frames, not ours
                and f"{os.sep}caitdeploy{os.sep}testing{os.sep}" not in f.filename
            ]
            where = ours[-1] if ours else (tb[-1] if tb else None)
            out["where"] = f"{_rel(where.filename)}:{where.lineno} ({where.name})" if where else "?"
            out["raised_at"] = f"{_rel(tb[-1].filename)}:{tb[-1].lineno} ({tb[-1].name})" if tb else "?"
            out["traceback"] = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-6000:]
    return out


def _type_name(exc: BaseException) -> str:
    t = type(exc)
    return t.__qualname__ if t.__module__ in ("builtins", __name__) else f"{t.__module__}.{t.__qualname__}"


def _rel(filename: str) -> str:
    for marker in ("/caitdeploy/", "/site-packages/"):
        if marker in filename:
            return filename[filename.index(marker) + 1 :]
    return filename


# =====================================================================================================
# Worker: the hypothesis loop
# =====================================================================================================
class Heartbeat:
    def __init__(self, path: Path):
        self.path = path

    def beat(self, **info):
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({**info, "time": time.time()}))
        os.replace(tmp, self.path)


def _write_case(folder: Path, suffix: str, files: dict[str, bytes]) -> Path:
    """Write the case files under fresh inodes (a previous case may still be memory-mapped)."""
    main = folder / f"case{suffix}"
    for ext, payload in files.items():
        final = Path(str(main) + ext)
        tmp = folder / f".tmp{ext or suffix}"
        tmp.write_bytes(payload)
        os.replace(tmp, final)
    stale = Path(str(main) + ".json")
    if ".json" not in files and stale.exists():
        stale.unlink()
    return main


REPRO = {
    "load_checkpoint": "from caitdeploy.formats.checkpoint import load_checkpoint\nload_checkpoint(path)",
    "inspect": "from caitdeploy.cli.inspect import print_inspect\n"
    "from caitdeploy.pipelines.inspect import inspect\nprint_inspect(inspect(path).info)",
    "load_fused": "from caitdeploy.formats.fused import load_fused\nload_fused(path)",
    "load_model": "from caitdeploy.formats.fused import load_fused, load_model\nload_fused(path)\nload_model(path)",
    "read_sidecar": "from caitdeploy.formats.sidecar import read_sidecar\nread_sidecar(path)",
}


def save_finding(
    findings_dir: Path,
    target: str,
    reader: str,
    case_path: Path,
    files: dict[str, bytes],
    desc: list[str],
    res: dict[str, Any],
    index: int,
) -> str:
    folder = findings_dir / f"{target}-{reader}-{index:03d}"
    folder.mkdir(parents=True, exist_ok=True)
    for ext, payload in files.items():
        (folder / (case_path.name + ext)).write_bytes(payload)
    info = {k: v for k, v in res.items() if k != "outcome"}
    (folder / "finding.json").write_text(
        json.dumps({"target": target, "reader": reader, "mutations": desc, **info}, indent=2)
    )

    def comment(text: str) -> str:
        return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)

    (folder / "repro.py").write_text(
        f"# {comment(str(res.get('kind')))}: {res.get('exception', '')} {comment(res.get('message') or '')}\n"
        f"# mutations: {comment('; '.join(desc)[:500])}\n"
        + (
            "# the sidecar's onnx.path may name a file of the fuzz run's (deleted) seed folder: the 4 GiB sparse file\n"
            "# was made with open(p, 'wb').truncate(4 << 30)\n"
            if target == "engine_sidecar"
            else ""
        )
        + "import pathlib\n"
        f"path = pathlib.Path(__file__).with_name({case_path.name!r})\n"
        f"{REPRO[reader]}\n"
    )
    return str(folder)


def fuzz_target(target: Target, opts: dict[str, Any], hb: Heartbeat) -> dict[str, Any]:
    from hypothesis import HealthCheck, Phase, Verbosity, given, reject, seed, settings
    from hypothesis import strategies as st
    from hypothesis.errors import HypothesisException, Unsatisfiable, UnsatisfiedAssumption

    work = Path(opts["workdir"]) / "cases" / target.name
    work.mkdir(parents=True, exist_ok=True)
    findings_dir = Path(opts["findings_dir"])
    capture = Path(opts["workdir"]) / "capture.txt"
    limits = {k: opts[k] for k in ("case_seconds", "case_memory_mb", "max_message")}
    stats: dict[str, Any] = {
        "cases": 0,
        "rejected_generations": 0,
        "seconds": 0.0,
        "readers": {
            r: {"calls": 0, "accepted": 0, "refused": 0, "findings": 0, "max_seconds": 0.0, "max_rss_growth_mb": 0.0}
            for r in target.readers
        },
        "findings": [],
        "warnings": {},
        "stray_output": {},
        "generation_errors": {},
    }
    seen: dict[tuple, dict] = {}
    t_start = time.monotonic()
    stop_at = t_start + opts["seconds"] if opts.get("seconds") else None
    examples = opts.get("examples")

    def one_case(data):
        desc: list[str] = []
        hb.beat(stage="generate", target=target.name, case=stats["cases"])
        try:
            files = target.make(data, desc)
        except HypothesisException as e:
            if isinstance(e, UnsatisfiedAssumption):
                stats["rejected_generations"] += 1
            raise
        except Exception as e:  # noqa: BLE001 - a mutation this harness cannot write: not a reader finding
            key = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}"
            stats["generation_errors"][key] = stats["generation_errors"].get(key, 0) + 1
            reject()
        n = stats["cases"]
        stats["cases"] += 1
        path = _write_case(work, target.suffix, files)
        for rname, fn in target.readers.items():
            hb.beat(
                stage="case",
                target=target.name,
                case=n,
                reader=rname,
                files=sorted(str(path) + e for e in files),
                mutations=desc,
            )
            res = call_reader(fn, path, capture, limits)
            r = stats["readers"][rname]
            r["calls"] += 1
            r["max_seconds"] = max(r["max_seconds"], res["seconds"])
            r["max_rss_growth_mb"] = max(r["max_rss_growth_mb"], res["rss_growth_mb"])
            for w in res["warnings"]:
                stats["warnings"][f"{rname}: {w}"] = stats["warnings"].get(f"{rname}: {w}", 0) + 1
            if res["output"]:
                key = f"{rname}: {res['output'].splitlines()[0][:200]}"
                stats["stray_output"][key] = stats["stray_output"].get(key, 0) + 1
            if res["outcome"] != "finding":
                r[res["outcome"]] += 1
                continue
            r["findings"] += 1
            where = res.get("where")
            if res["kind"] == "timeout" and where:  # the alarm lands anywhere in the code that runs too long
                where = where.split(":")[0]
            fkey = (rname, res["kind"], res.get("exception"), where)
            if fkey in seen:
                seen[fkey]["count"] += 1
                continue
            folder = save_finding(findings_dir, target.name, rname, path, files, desc, res, len(stats["findings"]))
            f = {
                "target": target.name,
                "reader": rname,
                "kind": res["kind"],
                "exception": res.get("exception"),
                "message": res.get("message"),
                "where": res.get("where"),
                "raised_at": res.get("raised_at"),
                "message_chars": res.get("message_chars"),
                "mutations": desc,
                "seconds": round(res["seconds"], 3),
                "rss_growth_mb": round(res["rss_growth_mb"], 1),
                "count": 1,
                "repro": folder,
                **({"separator": res["separator"]} if "separator" in res else {}),
            }
            seen[fkey] = f
            stats["findings"].append(f)

    # --examples: one hypothesis run of that many examples. --seconds: runs of CHUNK examples, each with its own
    # seed, until the time is spent (hypothesis has no time budget; a test that stops drawing because of the clock
    # is "flaky" to it, so the clock is read only between runs and a target may overrun by one chunk).
    chunk = 0
    while True:
        todo = examples - stats["cases"] if examples else CHUNK
        if todo <= 0 or (stop_at is not None and time.monotonic() >= stop_at):
            break
        run = seed(zlib.crc32(f"{opts['seed']}:{target.name}:{chunk}".encode()))(
            settings(
                max_examples=todo,
                deadline=None,
                database=None,
                phases=[Phase.generate],
                suppress_health_check=list(HealthCheck),
                verbosity=Verbosity.quiet,
                print_blob=False,
            )(given(st.data())(one_case))
        )
        before = stats["cases"]
        try:
            run()
        except Unsatisfiable:
            stats["unsatisfiable"] = True
        chunk += 1
        if stats["cases"] == before or (examples and stop_at is None):
            break
    stats["hypothesis_runs"] = chunk
    stats["seconds"] = round(time.monotonic() - t_start, 2)
    for r in stats["readers"].values():
        r["max_seconds"] = round(r["max_seconds"], 3)
        r["max_rss_growth_mb"] = round(r["max_rss_growth_mb"], 1)
    return stats


def worker_main(args) -> int:
    import faulthandler
    import resource

    workdir = Path(args.workdir)
    hb = Heartbeat(workdir / "heartbeat.json")
    hb.beat(stage="setup")
    dump = open(workdir / "stacks.txt", "w")  # noqa: SIM115 - open for the process's life; the supervisor asks for every thread's stack before killing a hang
    faulthandler.register(signal.SIGUSR1, file=dump, all_threads=True)
    t0 = time.monotonic()
    seeds = build_seeds(workdir / "seeds")
    targets = make_targets(seeds)
    opts = {
        "workdir": str(workdir),
        "findings_dir": args.findings,
        "seed": args.seed,
        "examples": args.examples,
        "seconds": args.seconds,
        "case_seconds": args.case_seconds,
        "case_memory_mb": args.case_memory_mb,
        "max_message": MAX_MESSAGE_CHARS,
    }
    signal.signal(signal.SIGALRM, _on_alarm)
    # every reader on its seed: accepted, and the lazy imports (onnx, tensorrt_rtx) done before timing starts
    capture = workdir / "capture.txt"
    for name in args.targets.split(","):
        t = targets[name]
        (workdir / "cases" / name).mkdir(parents=True, exist_ok=True)
        path = _write_case(workdir / "cases" / name, t.suffix, seed_case(seeds, name))
        for rname, fn in t.readers.items():
            res = call_reader(fn, path, capture, {**opts, "case_seconds": 60.0, "case_memory_mb": 1e9})
            if res["outcome"] != "accepted" and not (
                name == "engine_sidecar" and rname == "inspect" and res["outcome"] == "refused"
            ):
                print(f"seed file of {name} not accepted by {rname}: {json.dumps(res)[:2000]}", file=sys.stderr)
                return 3
    vm = _status_kb("VmSize") * 1024
    limit = vm + int(args.memory_mb) * (1 << 20)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    setup = {
        "setup_seconds": round(time.monotonic() - t0, 2),
        "address_space_limit_mb": limit >> 20,
        "address_space_after_setup_mb": vm >> 20,
        "peak_rss_measured_per_call": _reset_peak_rss(),
    }
    with open(workdir / "results.jsonl", "a") as f:
        f.write(json.dumps({"setup": setup}) + "\n")
    for name in args.targets.split(","):
        hb.beat(stage="target", target=name)
        stats = fuzz_target(targets[name], opts, hb)
        with open(workdir / "results.jsonl", "a") as f:
            f.write(json.dumps({"target": name, "stats": stats}) + "\n")
    hb.beat(stage="done")
    return 0


# =====================================================================================================
# Supervisor
# =====================================================================================================
def machine() -> dict[str, Any]:
    from importlib import metadata

    from caitdeploy.bench.runners import _cpu_name

    cpu = _cpu_name()
    versions: dict[str, str | None] = {}
    for pkg in ("torch", "hypothesis", "safetensors", "onnx", "tensorrt_rtx_cu13"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    try:
        mem_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        mem_gb = None
    gpus = Path("/proc/driver/nvidia/gpus")
    gpu = f"{len(list(gpus.iterdir()))} NVIDIA" if gpus.is_dir() else None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": mem_gb,
        "gpu": gpu,
        "python": platform.python_version(),
        "platform": platform.platform(),
        **versions,
    }


def source_state() -> dict[str, Any]:
    """The commit fuzzed and whether caitdeploy/ had uncommitted changes (results name what they tested)."""

    def git(*a: str) -> str:
        try:
            return subprocess.run(
                ["git", *a], cwd=ROOT, capture_output=True, text=True, timeout=20, check=False
            ).stdout.rstrip()
        except (OSError, subprocess.SubprocessError):
            return ""

    changed = git("status", "--porcelain", "--", "caitdeploy")
    return {
        "commit": git("rev-parse", "HEAD").strip() or None,
        "caitdeploy_uncommitted": [line[3:] for line in changed.splitlines()],
    }


def run_fuzz(
    examples: int | None = None,
    seconds: float | None = None,
    seed: int = 0,
    targets: tuple[str, ...] | list[str] = TARGETS,
    findings_dir: str | os.PathLike | None = None,
    case_seconds: float = CASE_SECONDS,
    case_memory_mb: float = CASE_MEMORY_MB,
    memory_mb: int = MEMORY_MB,
    hang_seconds: float = HANG_SECONDS,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Fuzz `targets` in a worker process (restarted after a crash or a hang); returns the summary."""
    if examples is None and seconds is None:
        examples = 200
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise ValueError(f"unknown target {unknown[0]!r}; targets: {', '.join(TARGETS)}")
    log = log or (lambda s: None)
    findings_dir = Path(findings_dir) if findings_dir else Path(tempfile.mkdtemp(prefix="caitdeploy-fuzz-findings-"))
    findings_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    source = source_state()  # what is fuzzed: read before the run, the tree may change while it runs
    results: dict[str, dict] = {}
    setup: list[dict] = []
    crashes: list[dict] = []
    remaining = list(targets)
    with tempfile.TemporaryDirectory(prefix="caitdeploy-fuzz-") as tmp:
        wd = Path(tmp)
        pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
        env = {**os.environ, "PYTHONPATH": pythonpath, "PYTHONHASHSEED": "0"}
        while remaining:
            cmd = [
                sys.executable,
                "-c",
                WORKER,
                "--workdir",
                str(wd),
                "--targets",
                ",".join(remaining),
                "--seed",
                str(seed),
                "--findings",
                str(findings_dir),
                "--case-seconds",
                str(case_seconds),
                "--case-memory-mb",
                str(case_memory_mb),
                "--memory-mb",
                str(memory_mb),
            ]
            if examples:
                cmd += ["--examples", str(examples)]
            if seconds:
                cmd += ["--seconds", str(seconds)]
            (wd / "results.jsonl").unlink(missing_ok=True)
            (wd / "heartbeat.json").unlink(missing_ok=True)
            log(f"worker: {', '.join(remaining)}")
            with open(wd / "worker.log", "wb") as logf:
                proc = subprocess.Popen(cmd, cwd=wd, env=env, stdout=logf, stderr=subprocess.STDOUT)
                killed = None
                while proc.poll() is None:
                    time.sleep(0.2)
                    hb = _read_json(wd / "heartbeat.json") or {"stage": "setup", "time": time.time()}
                    limit = SETUP_SECONDS if hb.get("stage") == "setup" else hang_seconds
                    if time.time() - hb.get("time", time.time()) > limit:
                        killed = hb
                        proc.send_signal(signal.SIGUSR1)  # faulthandler: where it is stuck
                        time.sleep(2)
                        proc.kill()
                        proc.wait()
            done = (
                [json.loads(line) for line in (wd / "results.jsonl").read_text().splitlines()]
                if (wd / "results.jsonl").is_file()
                else []
            )
            for rec in done:
                if "setup" in rec:
                    setup.append(rec["setup"])
                else:
                    results[rec["target"]] = rec["stats"]
                    log(
                        f"  {rec['target']}: {rec['stats']['cases']} cases, {rec['stats']['seconds']} s, "
                        f"{len(rec['stats']['findings'])} findings"
                    )
            remaining = [t for t in remaining if t not in results]
            if proc.returncode == 0 and not killed:
                continue
            hb = killed or _read_json(wd / "heartbeat.json") or {}
            tail = (wd / "worker.log").read_text(errors="replace")[-3000:]
            stacks = (wd / "stacks.txt").read_text(errors="replace")[-6000:] if (wd / "stacks.txt").is_file() else ""
            if hb.get("stage") != "case" or proc.returncode == HARNESS_ERROR:
                raise RuntimeError(
                    f"fuzz worker failed outside a reader call (exit {proc.returncode}, stage "
                    f"{hb.get('stage')}, target {hb.get('target')}):\n{tail}\n{stacks}"
                )
            name = hb["target"]
            folder = findings_dir / f"{name}-{hb['reader']}-crash{len(crashes):02d}"
            folder.mkdir(parents=True, exist_ok=True)
            for f in hb.get("files", []):
                if Path(f).is_file():
                    shutil.copy(f, folder)
            captured = (
                (wd / "capture.txt").read_text(errors="replace")[-3000:] if (wd / "capture.txt").is_file() else ""
            )
            last = (captured.strip().splitlines() or tail.strip().splitlines() or [""])[-1][:300]
            kind = "hang (killed)" if killed else f"worker died (exit {proc.returncode})"
            crash = {
                "target": name,
                "reader": hb["reader"],
                "kind": kind,
                "exception": None,
                "message": last,
                "where": None,
                "mutations": hb.get("mutations"),
                "count": 1,
                "repro": str(folder),
            }
            (folder / "finding.json").write_text(
                json.dumps({**crash, "output": captured, "log": tail, "stacks": stacks}, indent=2)
            )
            crashes.append(crash)
            results[name] = {"cases": hb.get("case", 0) + 1, "incomplete": kind, "findings": [crash]}
            remaining = [t for t in remaining if t != name]
            log(f"  {name}: {kind} at case {hb.get('case')} ({hb['reader']})")
    findings = [f for t in targets for f in results.get(t, {}).get("findings", [])]
    return {
        "tool": "benchmarks/fuzz_readers.py",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seed": seed,
        "examples_per_target": examples,
        "seconds_per_target": seconds,
        "limits": {
            "case_seconds": case_seconds,
            "case_memory_mb": case_memory_mb,
            "address_space_headroom_mb": memory_mb,
            "max_message_chars": MAX_MESSAGE_CHARS,
            "hang_seconds": hang_seconds,
        },
        "machine": machine(),
        "source": source,
        "setup": setup,
        "seconds": round(time.monotonic() - t0, 1),
        "cases": sum(r.get("cases", 0) for r in results.values()),
        "reader_calls": sum(x["calls"] for r in results.values() for x in r.get("readers", {}).values()),
        "targets": {t: {k: v for k, v in results.get(t, {}).items() if k != "findings"} for t in targets},
        "findings": findings,
        "findings_dir": str(findings_dir),
        "notes": {k: _merge_counts(results.values(), k) for k in ("warnings", "stray_output", "generation_errors")},
    }


def _merge_counts(results, key: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in results:
        for k, v in (r.get(key) or {}).items():
            out[k] = out.get(k, 0) + v
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def format_summary(s: dict[str, Any]) -> str:
    m = s["machine"]
    lines = [
        (
            f"fuzz_readers: {s['cases']} cases, {s['reader_calls']} reader calls in {s['seconds']} s "
            f"(seed {s['seed']}; {m['cpu']}, {m['cores']} cores; torch {m['torch']}, hypothesis {m['hypothesis']})"
        ),
        f"{'target':24} {'cases':>6} {'s':>7}  reader: calls accepted/refused/findings max_s max_MB",
    ]
    for name, t in s["targets"].items():
        readers = "; ".join(
            f"{r}: {x['calls']} {x['accepted']}/{x['refused']}/{x['findings']} {x['max_seconds']} "
            f"{x['max_rss_growth_mb']}"
            for r, x in t.get("readers", {}).items()
        )
        lines.append(
            f"{name:24} {t.get('cases', 0):>6} {t.get('seconds', 0):>7}  {readers}"
            + (f"  [{t['incomplete']}]" if t.get("incomplete") else "")
        )
    lines.append(format_findings(s))
    return "\n".join(lines)


def format_findings(s: dict[str, Any]) -> str:
    if not s["findings"]:
        return "findings: none"
    out = [f"findings: {len(s['findings'])} (repro files under {s['findings_dir']})"]
    for f in s["findings"]:
        out.append(
            f"- {f['target']} / {f['reader']}: {f['kind']}"
            + (f" {f['exception']}: {str(f['message'])[:200]}" if f.get("exception") else f": {f.get('message')}")
            + (f" at {f['where']}" if f.get("where") else "")
            + f" (x{f['count']}; {'; '.join(f['mutations'] or [])[:200]})"
        )
    return "\n".join(out)


def _md(text: Any, limit: int = 160) -> str:
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text)).replace("`", "'")
    return text if len(text) <= limit else text[:limit] + "..."


def write_markdown(s: dict[str, Any], path: Path, json_name: str) -> None:
    m = s["machine"]
    budget = (
        (f"{s['examples_per_target']} examples" if s["examples_per_target"] else "")
        + (" / " if s["examples_per_target"] and s["seconds_per_target"] else "")
        + (f"{s['seconds_per_target']} s" if s["seconds_per_target"] else "")
    )
    lim = s["limits"]
    rows = ["| target | cases | seconds | reader calls (accepted / refused / findings) |", "|---|---|---|---|"]
    for name, t in s["targets"].items():
        rd = ", ".join(
            f"{r} {x['calls']} ({x['accepted']}/{x['refused']}/{x['findings']})"
            for r, x in t.get("readers", {}).items()
        )
        rows.append(f"| {name} | {t.get('cases', 0)} | {t.get('seconds', '?')} | {rd or t.get('incomplete', '')} |")
    groups: dict[tuple, list[dict]] = {}  # one line per problem, whichever targets and readers showed it
    for f in s["findings"]:
        where = (f.get("where") or "").split(":")[0] if f["kind"] == "timeout" else f.get("where")
        groups.setdefault(
            (f["kind"], f.get("exception") if f["kind"].startswith("uncaught") else None, where), []
        ).append(f)
    finds = (
        ["None: every call returned or raised a one-line CaitError within the limits."]
        if not groups
        else [
            f"- {kind}"
            + (f" at `{where}`" if where else "")
            + f": `{_md(fs[0].get('message'))}`"
            + (f" ({fs[0]['message_chars']} characters)" if fs[0].get("message_chars") and "long" in kind else "")
            + f"; {sum(f['count'] for f in fs)} calls: "
            + ", ".join(sorted({f"{f['target']}/{f['reader']}" for f in fs}))
            for (kind, _, where), fs in groups.items()
        ]
    )
    src = s.get("source") or {}
    changed = src.get("caitdeploy_uncommitted") or []
    notes = [
        f"Fuzzed: commit {str(src.get('commit'))[:12]}"
        + (f" plus uncommitted changes to {', '.join(changed)}" if changed else "")
        + "."
    ]
    warns = s.get("notes", {}).get("warnings") or {}
    if warns:
        notes.append("Warnings (not findings): " + "; ".join(f"{k} x{v}" for k, v in list(warns.items())[:3]) + ".")
    notes.append("")
    text = "\n".join(
        [
            "# Reader fuzzing (`benchmarks/fuzz_readers.py`)",
            "",
            (
                f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB, GPU {m['gpu'] or 'none'}; "
                f"Python {m['python']}, "
                f"torch {m['torch']}, hypothesis {m['hypothesis']}, safetensors {m['safetensors']}, onnx {m['onnx']}, "
                f"tensorrt_rtx {m['tensorrt_rtx_cu13']}. Date {s['date']}, seed {s['seed']}, budget {budget} per target."
            ),
            "",
            (
                f"**{s['cases']} cases, {s['reader_calls']} reader calls, {s['seconds']} s wall, "
                f"{len(groups)} distinct problem(s) found.** Limits per call: {lim['case_seconds']} s, peak RSS growth "
                f"{lim['case_memory_mb']} MiB, address space +{lim['address_space_headroom_mb']} MiB (RLIMIT_AS), message "
                f"one line of at most {lim['max_message_chars']} characters."
            ),
            "",
            *rows,
            "",
            (
                f"Findings ({len(groups)} distinct problems; the JSON lists them per target and reader, with "
                "the mutations that produced them):"
            ),
            "",
            *finds,
            "",
            *notes,
            f"Full numbers: `{json_name}`. Command:",
            "",
            "    .venv/bin/python benchmarks/fuzz_readers.py "
            + (f"--examples {s['examples_per_target']} " if s["examples_per_target"] else "")
            + (f"--seconds {s['seconds_per_target']} " if s["seconds_per_target"] else "")
            + f"--seed {s['seed']} --json {json_name} --md {path.as_posix()}",
            "",
        ]
    )
    path.write_text(text)


# the worker process run_fuzz starts (cwd: its work folder; caitdeploy found through PYTHONPATH = ROOT)
WORKER = "import sys; from caitdeploy.testing.fuzz import worker_cli; sys.exit(worker_cli())"


def worker_cli(argv: list[str] | None = None) -> int:
    """The worker's command line (what run_fuzz passes); exit 0, HARNESS_ERROR, or 3 when a seed file is refused."""
    ap = argparse.ArgumentParser(prog="caitdeploy.testing.fuzz worker")
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--targets", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--findings", required=True)
    ap.add_argument("--examples", type=int, default=None)
    ap.add_argument("--seconds", type=float, default=None)
    ap.add_argument("--case-seconds", type=float, default=CASE_SECONDS)
    ap.add_argument("--case-memory-mb", type=float, default=CASE_MEMORY_MB)
    ap.add_argument("--memory-mb", type=int, default=MEMORY_MB)
    args = ap.parse_args(argv)
    globals()["CASE_SECONDS"] = args.case_seconds  # the timeout message names the limit
    try:
        return worker_main(args)
    except Exception:  # noqa: BLE001 - a bug of this harness, not a reader finding
        traceback.print_exc()
        return HARNESS_ERROR
