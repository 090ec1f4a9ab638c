"""The CPU a measurement ran on, named by what decides its speed: model, logical cores, and the instruction-set
extensions int8 and bf16 kernels use (read from /proc/cpuinfo, bounded; empty elsewhere).

    info = cpu_info()   # {"model": "AMD EPYC", "logical_cores": 2, "isa": ["avx2", "fma", "avx512f", ...]}
    isa_text(info)      # "avx2 fma avx512f avx512_vnni avx512_bf16"
    int8_note(info)     # "" with VNNI (AVX512-VNNI, AVX-VNNI or AMX-INT8), else a note for int8 rows

Why these flags: ONNX Runtime's and OpenVINO's int8 GEMMs use VPDPBUSD (AVX512-VNNI / AVX-VNNI) or AMX-INT8 tiles;
without them int8 falls back to AVX2 multiply-add sequences (measured here: int8 static 1.36x fp32 on an AVX2 +
FMA machine, 2.30x on an AVX512-VNNI one). bf16 is native with AVX512_BF16 or AMX-BF16, emulated otherwise.
"""

from __future__ import annotations

import os
import platform
from functools import lru_cache
from typing import Any

# the flags that decide int8/bf16/fp32 kernel choice, in the order reports print them
SPEED_FLAGS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
)
MAX_CPUINFO_BYTES = 8 << 20


def parse_cpuinfo(text: str) -> dict[str, Any]:
    """Model name and the speed flags of the first processor described in /proc/cpuinfo text."""
    model, flags = "", set[str]()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
        if model and flags:
            break
    return {"model": model, "isa": [f for f in SPEED_FLAGS if f in flags]}


@lru_cache(maxsize=1)
def cpu_info() -> dict[str, Any]:
    text = ""
    try:
        with open("/proc/cpuinfo", "rb") as f:
            text = f.read(MAX_CPUINFO_BYTES).decode("utf-8", "replace")
    except OSError:
        pass
    info = parse_cpuinfo(text)
    info["model"] = info["model"] or platform.processor() or platform.machine()
    info["logical_cores"] = os.cpu_count() or 1
    return info


def isa_text(info: dict[str, Any] | None = None) -> str:
    isa = (info or cpu_info())["isa"]
    return " ".join(isa) if isa else "unknown (no /proc/cpuinfo flags)"


def has_vnni(info: dict[str, Any] | None = None) -> bool:
    isa = set((info or cpu_info())["isa"])
    return bool(isa & {"avx512_vnni", "avx_vnni", "amx_int8"})


def has_bf16(info: dict[str, Any] | None = None) -> bool:
    isa = set((info or cpu_info())["isa"])
    return bool(isa & {"avx512_bf16", "amx_bf16"})


def int8_note(info: dict[str, Any] | None = None) -> str:
    """A note for int8 rows measured on a CPU without VNNI (empty with it)."""
    if has_vnni(info):
        return ""
    return "no VNNI on this CPU (AVX2 int8 path): int8 gains are smaller than on AVX512-VNNI/AMX CPUs"
