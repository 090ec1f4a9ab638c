"""Hostile input, round two (issue 24): options, reads before size checks, terminal injection, wrong answers.

Table-driven through the real CLI, as tests/security/test_untrusted.py:
- 9: every numeric option goes through the shared click types (commands/options.py): `²`, `٣`, `1_0`, 2**64,
  nan, negative or too-large block indices end in one `error:` line naming the option, exit 2, before any work;
- 4: sizes are checked before reading (paths.read_bounded): a sparse 6 GB sidecar (or a symlink to one) and a
  sparse 8 GB .onnx are refused at once, in a subprocess whose peak RSS is measured;
- 5: strings from files and file names (ONNX producer, op types, dims, metadata, sidecar fields, bench statuses)
  never reach the terminal raw: no ESC, no bidi override, no rich markup or emoji code interpreted, no line of
  their own (a fake `error:` line);
- 6: a plan that does not match its sidecar's byte count or SHA-256 is refused; metadata of the wrong type or
  range (`"flops_dense": "xxx"`) is one error line, not a TypeError.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from caitdeploy.cli.main import main
from caitdeploy.core.errors import CaitError, safe_text
from caitdeploy.core.names import ENGINE_FORMAT
from caitdeploy.testing.checkpoints import random_checkpoint
from caitdeploy.testing.cli import one_line_error

HAS_TRT = importlib.util.find_spec("tensorrt_rtx") is not None or importlib.util.find_spec("tensorrt") is not None
SMALL = dict(embed_dim=24, depth=2, num_heads=2, img_size=16, patch_size=8, num_classes=5)
EVIL = "\x1b[2J\x1b[31m[red]x[/red]\nerror: fake\u202e\u2066:smile:\x9b2J\r"
EVIL_NAME = EVIL.replace("/", "|")  # the same, as a file name
GIB = 1 << 30


# ---- helpers ------------------------------------------------------------------------------------
def cli(*args, env=None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env)


def assert_terminal_safe(text: str) -> None:
    """Nothing from a file reached the terminal raw."""
    for bad in ("\x1b", "\x9b", "\u202e", "\u2066", "\r"):
        assert bad not in text, (bad, text[:2000])
    for ln in text.splitlines():
        assert not ln.lstrip().startswith("error:"), ln


def listing(folder: Path) -> set[str]:
    return {p.name for p in folder.rglob("*")}


def with_fused_meta(src: Path, dst: Path, **fields) -> Path:
    """A copy of the fused file `src` whose `caitdeploy` metadata has `fields` set."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), "pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open: no __iter__
    extra = json.loads(meta.get("caitdeploy", "{}"))
    extra.update(fields)
    meta["caitdeploy"] = json.dumps(extra)
    save_file(tensors, str(dst), metadata=meta)
    return dst


def fake_engine(folder: Path, name: str, plan: bytes, **side) -> Path:
    """A plan file and a sidecar that passes read_sidecar; `side` overrides fields (None removes one)."""
    path = folder / name
    path.write_bytes(plan)
    d = {
        "format": ENGINE_FORMAT,
        "engine": name,
        "flavour": "tensorrt_rtx",
        "trt_version": "1.0",
        "strongly_typed": True,
        "dtype": "fp32",
        "io_dtype": "float32",
        "input": "images",
        "outputs": ["logits"],
        "profile": {"min": [1, 3, 16, 16], "opt": [2, 3, 16, 16], "max": [2, 3, 16, 16]},
        "engine_bytes": len(plan),
        "engine_sha256": hashlib.sha256(plan).hexdigest(),
        "build_seconds": 0.5,
    }
    for k, v in side.items():
        if v is None:
            d.pop(k, None)
        else:
            d[k] = v
    (folder / (name + ".json")).write_text(json.dumps(d))
    return path


@pytest.fixture()
def no_header_check(monkeypatch):
    """The engine header check as on a machine without a TensorRT module (fake plans are not engines)."""
    import caitdeploy.runtime.tensorrt as T

    monkeypatch.setattr(T, "engine_header_check", lambda data, flavour=None: {"supported": False})


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A small checkpoint, its fused file, ONNX and (with a TensorRT module) engine + sidecar, made once."""
    d = tmp_path_factory.mktemp("hostile")
    torch.save(random_checkpoint(**SMALL, merges={1: "h"}), d / "ck.pth")
    res = cli("fuse", d / "ck.pth", "-q", "--verify-batch", 0)
    assert res.exit_code == 0, res.output
    extra = ["--trt", "--opt-batch", 2, "--max-batch", 2] if HAS_TRT else []
    res = cli("export", d / "ck.fused.safetensors", "--no-verify", "-q", *extra)
    assert res.exit_code == 0, res.output
    return d


# ---- 9. options: one set of click types ---------------------------------------------------------------
OPTION_CASES = {
    "make-checkpoint --seed 2**64": (
        ["make-checkpoint", "-o", "m.pth", "--seed", "18446744073709551616"],
        r"'--seed': 18446744073709551616 is not in the range 0<=x<=4294967295",
    ),
    "make-checkpoint --seed -1": (
        ["make-checkpoint", "-o", "m.pth", "--seed", "-1"],
        r"'--seed': -1 is not in the range",
    ),
    "make-checkpoint --seed ²": (
        ["make-checkpoint", "-o", "m.pth", "--seed", "²"],
        r"'--seed': '²' is not a valid integer",
    ),
    "make-checkpoint --img-size ²": (["make-checkpoint", "-o", "m.pth", "--img-size", "²"], r"'--img-size'"),
    "make-checkpoint --num-classes ٣": (["make-checkpoint", "-o", "m.pth", "--num-classes", "٣"], r"'--num-classes'"),
    "make-checkpoint --flops-reduction ٠.٥": (
        ["make-checkpoint", "-o", "m.pth", "--flops-reduction", "٠.٥"],
        r"'--flops-reduction'",
    ),
    "make-checkpoint --flops-reduction inf": (
        ["make-checkpoint", "-o", "m.pth", "--flops-reduction", "inf"],
        r"--flops-reduction must be a finite number",
    ),
    "fuse --align ²": (["fuse", "ck.pth", "--align", "²"], r"'--align': '²' is not a valid integer"),
    "fuse --verify-batch 1_0": (["fuse", "ck.pth", "--verify-batch", "1_0"], r"'--verify-batch'"),
    "fuse --threshold ٣": (["fuse", "ck.pth", "--threshold", "٣"], r"'--threshold'"),
    "fuse --max-dropped-norm -inf": (
        ["fuse", "ck.pth", "--max-dropped-norm", "-inf"],
        r"--max-dropped-norm must be a finite number",
    ),
    "convert --num-heads ٣": (["convert", "ck.pth", "--from", "sit", "--num-heads", "٣"], r"'--num-heads'"),
    "convert --align 2**64": (["convert", "ck.pth", "--from", "sit", "--align", str(2**64)], r"'--align'"),
    "export --img-size ²": (["export", "ck.fused.safetensors", "--img-size", "²"], r"--img-size '²': give one integer"),
    "export --img-size 16x²": (["export", "ck.fused.safetensors", "--img-size", "16x²"], r"--img-size '16x²'"),
    "export --img-size 0": (
        ["export", "ck.fused.safetensors", "--img-size", "0"],
        r"--img-size = 0 is outside 1\.\.8192",
    ),
    "export --features -1": (
        ["export", "ck.fused.safetensors", "--features", "-1"],
        r"--features block -1 is outside 0\.\.255 \(blocks count from 0",
    ),
    "export --features 0,-2": (
        ["export", "ck.fused.safetensors", "--features", "0,-2"],
        r"--features block -2 is outside",
    ),
    "export --features 2 (depth 2)": (
        ["export", "ck.fused.safetensors", "--features", "2"],
        r"--features.*block 2 is outside 0\.\.1",
    ),
    "export --features ٣": (
        ["export", "ck.fused.safetensors", "--features", "٣"],
        r"--features '٣': give block indices",
    ),
    "export --min-batch ٣": (["export", "ck.fused.safetensors", "--min-batch", "٣"], r"'--min-batch'"),
    "export --max-batch 2**64": (["export", "ck.fused.safetensors", "--max-batch", str(2**64)], r"'--max-batch'"),
    "export --workspace-mb 0": (["export", "ck.fused.safetensors", "--workspace-mb", "0"], r"'--workspace-mb'"),
    "export --opt-level ²": (["export", "ck.fused.safetensors", "--opt-level", "²"], r"'--opt-level'"),
    "export --int8-min-cosine nan": (
        ["export", "ck.fused.safetensors", "--int8-min-cosine", "nan"],
        r"'--int8-min-cosine': 'nan' is not a finite number",
    ),
    "export --int8-min-top1 2": (["export", "ck.fused.safetensors", "--int8-min-top1", "2"], r"'--int8-min-top1'"),
    "export --calib-samples 1_0": (["export", "ck.fused.safetensors", "--calib-samples", "1_0"], r"'--calib-samples'"),
    "export --fp16-samples ²": (["export", "ck.fused.safetensors", "--fp16-samples", "²"], r"'--fp16-samples'"),
    "export --opset ٣": (["export", "ck.fused.safetensors", "--opset", "٣"], r"unsupported opset"),
    "export --max-queue-delay-us -1": (
        ["export", "ck.fused.safetensors", "--max-queue-delay-us", "-1"],
        r"'--max-queue-delay-us'",
    ),
    "bench --img-size ²": (["bench", "ck.fused.safetensors", "--img-size", "²"], r"bench: --img-size '²'"),
    "bench --features -1": (
        ["bench", "ck.fused.safetensors", "--features", "-1"],
        r"bench: --features block -1 is outside",
    ),
    "bench --features 5 (depth 2)": (
        ["bench", "ck.fused.safetensors", "--features", "5", "-q"],
        r"block 5 is outside 0\.\.1",
    ),
    "bench --warmup ٣": (["bench", "ck.fused.safetensors", "--warmup", "٣"], r"--warmup .*not an integer"),
    "bench --min-seconds ²": (["bench", "ck.fused.safetensors", "--min-seconds", "²"], r"--min-seconds .*not a number"),
    "bench --repeats 2**64": (["bench", "ck.fused.safetensors", "--repeats", str(2**64)], r"--repeats \d+: must be in"),
    "bench --threads 1_0": (["bench", "ck.fused.safetensors", "--threads", "1_0"], r"--threads .*not an integer"),
    "bench --batch ٣": (["bench", "ck.fused.safetensors", "--batch", "٣"], r"--batch .*not an integer"),
    "bench --tome-r ²": (["bench", "ck.fused.safetensors", "--tome-r", "²"], r"--tome-r .*non-negative integer"),
    "bench --tome-r 2**64": (["bench", "ck.fused.safetensors", "--tome-r", str(2**64)], r"--tome-r \d+: must be in"),
}


@pytest.mark.parametrize("name", list(OPTION_CASES))
def test_bad_option_values_are_one_line_before_any_work(small, name, monkeypatch):
    args, pattern = OPTION_CASES[name]
    monkeypatch.chdir(small)
    before = listing(small)
    t0 = time.perf_counter()
    one_line_error(cli(*args), pattern)
    assert time.perf_counter() - t0 < 10, "an option error must come before the work"
    assert listing(small) == before


def test_option_types():
    import click

    from caitdeploy.cli.options import (
        PORT,
        BlockList,
        Float,
        ImageSize,
        Int,
        StrictFloat,
        StrictInt,
        parse_float,
        parse_int,
    )

    def conv(t, v):
        return t.convert(v, None, None)

    assert conv(Int(0, 10), "7") == 7 and conv(Int(-5, 5), "-5") == -5 and conv(Int(0, 10), " 3 ") == 3
    for bad in ("²", "٣", "1_0", "0x10", "1e3", "", " ", "nan", "1.0", "+", "9" * 100, "\x1b[2J"):
        with pytest.raises(click.BadParameter):
            conv(Int(-(10**200), 10**200), bad)
    with pytest.raises(click.BadParameter, match="is not in the range 1<=x<=65535"):
        conv(PORT, "99999")
    assert conv(PORT, "8000") == 8000
    assert conv(Float(0, 1), "0.25") == 0.25 and conv(Float(0, 1), "1e-3") == 1e-3 and conv(Float(0, 1), ".5") == 0.5
    for bad in ("nan", "NaN", "inf", "-inf", "1e400", "٠.٥", "1_0.0", "0x1p-2", "²"):
        with pytest.raises(click.BadParameter):
            conv(Float(-1e300, 1e300), bad)
    with pytest.raises(click.BadParameter):
        conv(Float(0, 1, lo_open=True), "0")
    assert conv(ImageSize(), "224") == "224" and conv(ImageSize(), "224X320") == "224x320"
    assert conv(ImageSize(), "64x64") == "64" and conv(ImageSize(), "64×32") == "64x32"
    for bad in ("²", "224x²", "0", "99999", "224x320x3", "x", "-224", "1" * 100):
        with pytest.raises(click.UsageError):
            conv(ImageSize(), bad)
    assert conv(BlockList(), "3, 5,7") == "3,5,7"
    for bad in ("-1", "3,-1", "256", "", ",", "a", "٣"):
        with pytest.raises(click.UsageError):
            conv(BlockList(), bad)
    assert conv(StrictInt(), "-3") == -3 and str(conv(StrictFloat(), "nan")) == "nan"  # checked by the library
    with pytest.raises(click.BadParameter):
        conv(StrictFloat(), "٣")
    assert parse_int("٣") is None and parse_int("12") == 12 and parse_float("inf") is None
    assert parse_float("inf", finite=False) == float("inf") and parse_float("2.5") == 2.5


def test_option_ranges_agree_with_the_library():
    from caitdeploy.cli import export as E
    from caitdeploy.export.quantize import MAX_CALIB_IMAGES
    from caitdeploy.export.tensorrt import MAX_PROFILE_BATCH

    assert E.MAX_CALIB_IMAGES == MAX_CALIB_IMAGES and E.MAX_PROFILE_BATCH == MAX_PROFILE_BATCH


def test_image_size_parser_takes_ascii_digits_only():
    from caitdeploy.families.vit.config import ConfigError, image_size

    assert image_size("224") == 224 and image_size("224x320") == (224, 320)
    for bad in ("²", "224x²", "٣٢", "1" * 40):
        with pytest.raises(ConfigError):
            image_size(bad)


# ---- 4. sizes checked before reading -------------------------------------------------------------------
def test_read_bounded(tmp_path, monkeypatch):
    from caitdeploy.core import paths
    from caitdeploy.core.paths import read_bounded

    p = tmp_path / "f.json"
    p.write_bytes(b"x" * 100)
    assert read_bounded(p, 100, "sidecar") == b"x" * 100
    with pytest.raises(CaitError, match=r"f\.json: sidecar is 100 bytes, over the limit of 99 bytes"):
        read_bounded(p, 99, "sidecar")
    (tmp_path / "empty").write_bytes(b"")
    assert read_bounded(tmp_path / "empty", 10, "x") == b""
    with pytest.raises(CaitError, match="no such file"):
        read_bounded(tmp_path / "missing", 10, "sidecar")
    with pytest.raises(CaitError, match="is a folder"):
        read_bounded(tmp_path, 10, "sidecar")
    os.mkfifo(tmp_path / "fifo")  # a read would block forever
    with pytest.raises(CaitError, match="not a regular file"):
        read_bounded(tmp_path / "fifo", 10, "sidecar")
    big = tmp_path / "big"
    with open(big, "wb") as f:
        f.truncate(6 << 30)  # sparse: no disk used
    (tmp_path / "link").symlink_to(big)
    with pytest.raises(CaitError, match=r"link: sidecar is 6 GiB, over the limit of 4 MiB"):
        read_bounded(tmp_path / "link", 4 << 20, "sidecar")
    # a file that grows after the size check is still read no further than limit + 1 bytes
    monkeypatch.setattr(paths, "regular_file_size", lambda path, limit, what: 5)
    with pytest.raises(CaitError, match="grew past the 10 bytes limit"):
        read_bounded(p, 10, "sidecar")


BIG_READS = {
    # name: (setup, args, pattern)
    "sidecar symlink to a sparse 6 GB file": (
        "link",
        ["inspect", "a.plan"],
        r"a\.plan\.json: engine sidecar is 6 GiB, over the limit of 4 MiB",
    ),
    "sparse 6 GB sidecar": (
        "sidecar",
        ["inspect", "b.plan"],
        r"b\.plan\.json: engine sidecar is 6 GiB, over the limit",
    ),
    "sparse 8 GB .onnx": ("onnx", ["inspect", "big.onnx"], r"big\.onnx: ONNX file is 8 GiB, over the limit of 2 GiB"),
    "sparse 1.5 GB .onnx over the memory budget": (
        "mid",
        ["inspect", "mid.onnx"],
        r"mid\.onnx: reading a \d+-byte ONNX file needs about .* budget",
    ),
}


def test_big_files_are_refused_before_reading_with_small_rss(tmp_path):
    """Every case in one subprocess: peak RSS (VmHWM) barely moves from the imports' level."""

    def sparse(path: Path, size: int) -> None:
        with open(path, "wb") as f:
            f.truncate(size)

    sparse(tmp_path / "huge.bin", 6 << 30)
    (tmp_path / "a.plan").write_bytes(b"\0" * 64)
    (tmp_path / "a.plan.json").symlink_to(tmp_path / "huge.bin")
    (tmp_path / "b.plan").write_bytes(b"\0" * 64)
    sparse(tmp_path / "b.plan.json", 6 << 30)
    sparse(tmp_path / "big.onnx", 8 * GIB)
    sparse(tmp_path / "mid.onnx", 1536 << 20)
    cases = {name: args for name, (_, args, _) in BIG_READS.items()}
    code = textwrap.dedent(f"""
        import json, os, resource, sys, time
        resource.setrlimit(resource.RLIMIT_AS, ({4 << 30}, {4 << 30}))
        os.environ["CAITDEPLOY_MAX_MEMORY_MB"] = "1024"
        from click.testing import CliRunner
        from caitdeploy.cli.main import main
        # the imports' RSS, before any case (read_sidecar's config reader brings torch)
        import caitdeploy.formats.describe, caitdeploy.formats.sidecar, caitdeploy.families.vit.config, onnx
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent (pytest) across fork and exec
        rss = lambda: int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM:")).split()[1]) * 1024
        out = {{"base": rss()}}
        for name, args in {cases!r}.items():
            t0 = time.perf_counter()
            r = CliRunner().invoke(main, args)
            out[name] = [r.exit_code, r.stderr, time.perf_counter() - t0, rss()]
        print(json.dumps(out))
    """)
    p = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False
    )
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    base = res.pop("base")
    for name, (rc, err, secs, peak) in res.items():
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), (name, err)
        assert re.search(BIG_READS[name][2], lines[0]), (name, lines[0])
        assert secs < 5, f"{name}: {secs:.1f} s"
        assert peak - base < 64 << 20 and peak < GIB, f"{name}: peak RSS {peak >> 20} MiB (imports {base >> 20} MiB)"
        print(f"{name}: {secs:.2f} s, peak RSS {peak / 2**20:.0f} MiB (after imports {base / 2**20:.0f} MiB)")


# ---- 5. terminal injection ------------------------------------------------------------------------------
def test_safe_text():
    from caitdeploy.cli.common import rich_safe

    for ch in (
        "\x1b",
        "\x9b",
        "\x07",
        "\x7f",
        "\n",
        "\r",
        "\t",
        "\v",
        "\f",
        "\x85",
        "\u2028",
        "\u2029",
        "\u202a",
        "\u202b",
        "\u202c",
        "\u202d",
        "\u202e",
        "\u2066",
        "\u2067",
        "\u2068",
        "\u2069",
        "\u200b",
        "\ufeff",
        "\ud800",
    ):
        out = safe_text(f"a{ch}b")
        assert ch not in out and out.startswith("a\\") and out.endswith("b") and out.isprintable(), repr(out)
    assert safe_text("plain text, ünïcode ok") == "plain text, ünïcode ok"
    assert len(safe_text("x" * 10_000)) == 200 and safe_text("x" * 10_000).endswith("...")
    cut = safe_text("x" * 9 + "\x1b" * 5, 12)  # never cut inside an escape
    assert cut == "x" * 9 + "..."
    assert safe_text(["a\nb"]) == "['a\\nb']"  # str() of a list: repr already escaped it
    assert rich_safe("[red]x[/red]") == "\\[red]x\\[/red]"


def _hostile_onnx(path: Path) -> Path:
    from onnx import TensorProto, helper

    node = helper.make_node("Relu" + EVIL, ["x" + EVIL], ["y"], domain="evil" + EVIL, name="n" + EVIL)
    graph = helper.make_graph(
        [node],
        "g" + EVIL,
        [helper.make_tensor_value_info("x" + EVIL, TensorProto.FLOAT, ["b" + EVIL, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b" + EVIL, 3])],
    )
    m = helper.make_model(
        graph,
        producer_name="prod" + EVIL,
        producer_version="1" + EVIL,
        opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("evil" + EVIL, 1)],
    )
    for k in (
        "caitdeploy.format",
        "caitdeploy.dtype",
        "caitdeploy.attention",
        "caitdeploy.features",
        "caitdeploy.restore",
    ):
        m.metadata_props.add(key=k, value=k + EVIL)
    path.write_bytes(m.SerializeToString())
    return path


def test_inspect_onnx_prints_nothing_raw(tmp_path):
    p = _hostile_onnx(tmp_path / f"evil{EVIL_NAME}.onnx")
    r = cli("inspect", p)
    assert r.exit_code == 0, r.output
    assert_terminal_safe(r.stdout)
    assert "[red]x[/red]" in r.stdout and ":smile:" in r.stdout  # shown as text: no markup, no emoji
    assert "prod\\x1b[2J" in r.stdout and "\\nerror: fake" in r.stdout and "\\u202e" in r.stdout
    assert "::Relu" in r.stdout and "evil\\x1b[2J" in r.stdout  # the op type (its domain first), the file name
    # JSON stays JSON: the exact strings, escaped by json
    r = cli("inspect", p, "--json")
    assert r.exit_code == 0 and "\x1b" not in r.stdout and "\u202e" not in r.stdout
    info = json.loads(r.stdout)
    assert info["producer"] == f"prod{EVIL} 1{EVIL}".strip() and info["file"] == str(p)
    assert info["inputs"][0]["name"] == "x" + EVIL and info["inputs"][0]["shape"] == ["b" + EVIL, 3]


def test_hostile_file_names_in_fuse_and_export_reports(small, tmp_path):
    ck = tmp_path / f"ck{EVIL_NAME}.pth"
    ck.write_bytes((small / "ck.pth").read_bytes())
    fused = tmp_path / "f[red]x[|red].fused.safetensors"
    r = cli("fuse", ck, "-o", fused, "--verify-batch", 0)
    assert r.exit_code == 0, r.output
    assert_terminal_safe(r.stdout)
    assert "ck\\x1b[2J" in r.stdout and "f[red]x[|red]" in r.stdout
    evil_fused = tmp_path / f"m{EVIL_NAME}.fused.safetensors"
    evil_fused.write_bytes(fused.read_bytes())
    r = cli("export", evil_fused, "--no-verify", "-o", tmp_path / "out.onnx")
    assert r.exit_code == 0, r.output
    assert_terminal_safe(r.stdout)
    assert "m\\x1b[2J" in r.stdout


def test_inspect_engine_sidecar_fields_print_nothing_raw(tmp_path, no_header_check):
    p = fake_engine(
        tmp_path,
        "e.plan",
        b"\x01" * 300,
        trt_version="1" + EVIL,
        dtype="fp32" + EVIL,
        io_dtype=EVIL,
        input="images" + EVIL,
        build_target={"gpu": EVIL},
        onnx={"path": str(tmp_path / f"src{EVIL_NAME}.onnx"), "sha256": "0" * 64, "bytes": 5},
        created=EVIL,
        outputs=["logits" + EVIL],
    )
    r = cli("inspect", p)
    assert r.exit_code == 0, r.output
    assert_terminal_safe(r.stdout)
    assert "[red]x[/red]" in r.stdout and "matches its sidecar (byte count and SHA-256)" in r.stdout
    r = cli("inspect", p, "--json")
    assert r.exit_code == 0 and "\x1b" not in r.stdout and json.loads(r.stdout)["trt_version"] == "1" + EVIL


def test_bench_table_prints_nothing_raw():
    from rich.console import Console

    from caitdeploy.bench.report import print_table, to_markdown

    rec = {
        "status": "ok",
        "note": "note" + EVIL,
        "model": "cait",
        "model_detail": "m" + EVIL,
        "arch": "a",
        "backend": "torch",
        "dtype": "fp32",
        "batch": 1,
        "flops_per_img": 1e9,
        "params": 1e6,
        "latency_ms_p50": 1.0,
        "latency_ms_p90": 1.0,
        "latency_ms_p99": 1.0,
        "throughput_img_s": 10.0,
        "speedup_vs_dense": None,
        "speedup_vs_tome": None,
        "repeat_spread_pct": 1.0,
        "peak_mem_mb": 1.0,
        "env_cpu": "cpu" + EVIL,
        "env_cpu_count": 2,
        "env_threads": 1,
        "env_gpu": None,
        "env_torch": "2",
        "env_onnxruntime": None,
        "env_tensorrt": None,
        "env_python": "3",
        "env_os": "linux",
        "input": "3x16x16",
        "outputs": "logits",
        "warmup": 1,
        "repeats": 1,
        "iters": 2,
    }
    bad = dict(rec, status="n/a: failed: " + EVIL, note=None)
    buf = io.StringIO()
    print_table([rec, bad], Console(file=buf, width=300, highlight=False), title="t" + EVIL)
    out = buf.getvalue()
    assert_terminal_safe(out)
    assert "[red]x[/red]" in out
    assert "\x1b" not in to_markdown([rec, bad])


# ---- 6. wrong answers -----------------------------------------------------------------------------------
def test_truncated_plan_with_a_valid_sidecar_is_refused(tmp_path):
    p = fake_engine(tmp_path, "t.plan", b"\x02" * 3000)
    with open(p, "r+b") as f:
        f.truncate(100)
    before = listing(tmp_path)
    one_line_error(cli("inspect", p), r"t\.plan: engine is 100 bytes but its sidecar t\.plan\.json records 3000")
    assert listing(tmp_path) == before


def test_replaced_plan_of_the_same_size_is_refused(tmp_path):
    p = fake_engine(tmp_path, "r.plan", b"\x02" * 3000)
    p.write_bytes(b"\x03" * 3000)
    one_line_error(cli("inspect", p), r"r\.plan: engine SHA-256 [0-9a-f]{16}\.\.\. differs from the [0-9a-f]{16}")


def test_old_sidecar_without_hash_checks_the_byte_count(tmp_path, no_header_check):
    p = fake_engine(tmp_path, "o.plan", b"\x02" * 3000, engine_sha256=None)
    r = cli("inspect", p)
    assert r.exit_code == 0, r.output
    assert "records no engine SHA-256" in r.stdout and "only the byte count was checked" in r.stdout
    info = json.loads(cli("inspect", p, "--json").stdout)
    assert info["engine_check"]["bytes_match"] is True and info["engine_check"]["sha256_match"] is None
    p.write_bytes(b"\x02" * 2999)
    one_line_error(cli("inspect", p), r"engine is 2999 bytes but its sidecar o\.plan\.json records 3000")


@pytest.mark.parametrize(
    "field, value, pattern",
    [
        ("engine_sha256", "zz", r"'engine_sha256' must be 64 hexadecimal digits"),
        ("engine_bytes", -1, r"'engine_bytes' must be an integer in 0\.\."),
        ("engine_bytes", "3000", r"'engine_bytes' must be an integer"),
        ("build_seconds", -1, r"'build_seconds' must be a finite number >= 0"),
        ("opt_level", 99, r"'opt_level' must be an integer in 0\.\.5"),
        ("workspace_mb", "x", r"'workspace_mb' must be an integer"),
        ("created", 5, r"'created' must be a string"),
        ("onnx", {"path": "x.onnx", "sha256": "g" * 64}, r"'onnx.sha256' must be 64 hexadecimal digits"),
    ],
)
def test_bad_sidecar_fields_are_one_line(tmp_path, field, value, pattern):
    p = fake_engine(tmp_path, "s.plan", b"\x02" * 300, **{field: value})
    one_line_error(cli("inspect", p), r"s\.plan\.json: bad engine sidecar: " + pattern)


@pytest.mark.skipif(not HAS_TRT, reason="no TensorRT module (pip install tensorrt-rtx-cu13)")
def test_real_engine_sidecar_records_its_hash_and_truncation_is_caught(small, tmp_path):
    plan = small / "ck.plan"
    side = json.loads((small / "ck.plan.json").read_text())
    assert side["engine_sha256"] == hashlib.sha256(plan.read_bytes()).hexdigest()
    assert side["engine_bytes"] == plan.stat().st_size
    info = json.loads(cli("inspect", plan, "--json").stdout)
    assert info["engine_check"]["sha256_match"] is True
    cut = tmp_path / "cut.plan"
    cut.write_bytes(plan.read_bytes()[:100])
    (tmp_path / "cut.plan.json").write_text(json.dumps(side))
    one_line_error(
        cli("inspect", cut),
        rf"cut\.plan: engine is 100 bytes but its sidecar cut\.plan\.json records "
        rf"{side['engine_bytes']}",
    )
    old = dict(side)
    old.pop("engine_sha256")
    (tmp_path / "old.plan").write_bytes(plan.read_bytes())
    (tmp_path / "old.plan.json").write_text(json.dumps(old))
    r = cli("inspect", tmp_path / "old.plan")
    assert r.exit_code == 0 and "only the byte count was checked" in r.stdout, r.output


def test_check_engine_file(tmp_path):
    from caitdeploy.formats.sidecar import check_engine_file

    p = fake_engine(tmp_path, "c.plan", b"abc")
    side = json.loads((tmp_path / "c.plan.json").read_text())
    assert check_engine_file(p, side)["sha256_match"] is True
    assert check_engine_file(p, side, b"abc")["sha256_match"] is True
    with pytest.raises(CaitError, match="SHA-256"):
        check_engine_file(p, side, b"abd")
    assert check_engine_file(p, None)["bytes_match"] is None


@pytest.mark.parametrize(
    "fields, pattern",
    [
        ({"flops_dense": "xxx"}, r"field 'flops_dense' must be a finite number in 1\.\.1e\+18, got 'xxx'"),
        ({"flops_dense": -5}, r"field 'flops_dense' must be a finite number"),
        ({"flops_dense": True}, r"field 'flops_dense' must be a finite number"),
        ({"flops_dense": [1, 2]}, r"field 'flops_dense'"),
        ({"flops_dense": 1e300}, r"field 'flops_dense'"),
        ({"source": {"a": 1}}, r"field 'source' must be a string"),
        ({"converted_from": ["sit"]}, r"field 'converted_from' must be a string"),
        ({"options": "x"}, r"field 'options' must be a JSON object"),
    ],
)
def test_bad_fused_metadata_is_one_line(small, tmp_path, fields, pattern):
    bad = with_fused_meta(small / "ck.fused.safetensors", tmp_path / "bad.fused.safetensors", **fields)
    before = listing(tmp_path)
    one_line_error(cli("inspect", bad), r"bad\.fused\.safetensors: metadata 'caitdeploy' " + pattern)
    one_line_error(cli("bench", bad, "-q", "--batch", 1, "--backends", "torch"), pattern)
    assert listing(tmp_path) == before


def test_good_fused_metadata_still_reads(small, tmp_path):
    ok = with_fused_meta(
        small / "ck.fused.safetensors", tmp_path / "ok.fused.safetensors", flops_dense=2e5, source="a[red]b" + EVIL
    )
    r = cli("inspect", ok)
    assert r.exit_code == 0, r.output
    assert_terminal_safe(r.stdout)
    info = json.loads(cli("inspect", ok, "--json").stdout)
    assert info["flops_dense"] == 2e5 and 0 < info["flops_reduction"] < 1


def test_unknown_family_in_file_metadata_is_one_config_error():
    """Found by the fuzz run: a config (ONNX metadata, sidecar) naming an unknown family reached the FLOPs code
    and raised UnknownFamily uncaught; `config_from_dict`, the one reader, now refuses it as a ConfigError."""
    from caitdeploy.families import config_from_dict
    from caitdeploy.families.vit.config import CaitConfig, ConfigError

    d = CaitConfig.from_format(random_checkpoint(**SMALL)["config"]).to_dict()
    assert config_from_dict(d).family == "vit"
    with pytest.raises(ConfigError, match=r"unknown model family 'fp16'; known: vit"):
        config_from_dict(dict(d, family="fp16"))
