"""The CPU's speed-deciding flags, parsed from /proc/cpuinfo text (two real machine kinds of this project)."""

from __future__ import annotations

from caitdeploy.core.cpu import SPEED_FLAGS, cpu_info, has_bf16, has_vnni, int8_note, isa_text, parse_cpuinfo

AVX512 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC
flags\t\t: fpu sse2 avx2 fma avx512f avx512dq avx512_bf16 avx512_vnni avx512bw amx_foo
processor\t: 1
model name\t: other
"""
AVX2 = "model name\t: AMD EPYC 7B13\nflags\t\t: fpu sse2 avx avx2 fma bmi2\n"


def test_flags_that_decide_int8_and_bf16_speed():
    a = parse_cpuinfo(AVX512)
    assert a == {"model": "AMD EPYC", "isa": ["avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16"]}
    assert has_vnni(a) and has_bf16(a) and int8_note(a) == ""
    b = parse_cpuinfo(AVX2)
    assert b["isa"] == ["avx2", "fma"] and not has_vnni(b) and not has_bf16(b)
    assert "no VNNI" in int8_note(b) and isa_text(b) == "avx2 fma"
    assert parse_cpuinfo("")["isa"] == [] and "unknown" in isa_text({"isa": []})


def test_this_machine():
    info = cpu_info()
    assert info["model"] and info["logical_cores"] >= 1
    assert set(info["isa"]) <= set(SPEED_FLAGS)
