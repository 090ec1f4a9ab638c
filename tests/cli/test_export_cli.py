"""`caitdeploy export` end to end: a real export + engine + Triton repo, and every bad input as one line."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from caitdeploy.cli.main import main
from caitdeploy.compress.cdcp import make_checkpoint, save_checkpoint_dict
from caitdeploy.compress.fuse import FuseOptions, fuse_file
from caitdeploy.families.vit.config import BlockConfig, CaitConfig
from caitdeploy.families.vit.model import CaitViT
from caitdeploy.formats.fused import save_fused

HAS_TRT = importlib.util.find_spec("tensorrt_rtx") is not None or importlib.util.find_spec("tensorrt") is not None


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    ckpt, _ = make_checkpoint("deit_tiny_patch16_224", 0.5, {4: "h", 8: "v"}, img_size=64, num_classes=10)
    save_checkpoint_dict(ckpt, d / "c.pth")
    save_checkpoint_dict(ckpt, d / "c.safetensors")
    fuse_file(d / "c.pth", d / "m.fused.safetensors", FuseOptions(align=8), verify_batch=0)
    # a small fused model whose q/k head width differs from its v head width
    s = 16**-0.5
    cfg = CaitConfig(32, 16, 3, 5, 32, True, (BlockConfig(2, 8, 16, 64, s, "h"), BlockConfig(2, 16, 8, 64, s)))
    torch.manual_seed(0)
    save_fused(d / "uneq.fused.safetensors", cfg, CaitViT(cfg).state_dict())
    (d / "junk.safetensors").write_bytes(b"\x00" * 64)
    return d


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.slow
def test_real_export_with_engine_and_triton(files, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    args = [
        "export",
        files / "m.fused.safetensors",
        "-o",
        out / "m.onnx",
        "--report",
        out / "r.json",
        "--triton-repo",
        out / "repo",
        "--name",
        "cait_tiny",
        "--max-batch",
        16,
        "--opt-batch",
        8,
    ]
    if HAS_TRT:
        args += ["--trt", "--min-batch", 1]
    r = run(*args)
    assert r.exit_code == 0, r.output
    text = " ".join(r.stdout.split())  # rich wraps long lines
    assert "op census" in text and "LayerNormalization" in text and "top-1 agreement 100.0%" in text
    rep = json.loads((out / "r.json").read_text())
    v = rep["onnx"]["verify"]
    assert v["passed"] and v["max_abs_diff"] <= 1e-4 * max(1, v["logit_scale"])
    assert rep["onnx"]["census"]["Softmax"] == 12 and "Where" not in rep["onnx"]["census"]
    assert (out / "m.onnx").is_file()
    served = "model.plan" if HAS_TRT else "model.onnx"
    assert (out / "repo" / "cait_tiny" / "1" / served).is_file()
    assert rep["triton"]["max_batch_size"] == 16 and rep["triton"]["preferred_batch_sizes"] == [8, 16]
    if HAS_TRT:
        assert (out / "m.plan").is_file() and (out / "m.plan.json").is_file()
        assert rep["engine"]["profile"]["opt"][0] == 8 and "strongly typed" in text


def _unwritable_dir(tmp_path: Path) -> Path:
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o555)
    try:
        (d / "probe").write_text("x")
    except OSError:
        return d
    (d / "probe").unlink()
    return Path("/sys")  # root ignores modes; sysfs refuses new files even for root


@pytest.mark.parametrize(
    "case",
    [
        "ckpt_pth",
        "ckpt_safetensors",
        "junk",
        "missing",
        "dtype",
        "opset_text",
        "opset_range",
        "attention",
        "trt_module",
        "unwritable",
        "no_dir",
    ],
)
def test_bad_input_one_line_no_output(files, tmp_path, case):
    out = tmp_path / "o.onnx"
    model = files / "m.fused.safetensors"
    extra: list = []
    expect = ""
    if case == "ckpt_pth":
        model, expect = files / "c.pth", "run `caitdeploy fuse`"
    elif case == "ckpt_safetensors":
        model, expect = files / "c.safetensors", "run `caitdeploy fuse`"
    elif case == "junk":
        model, expect = files / "junk.safetensors", "not a readable safetensors file"
    elif case == "missing":
        model, expect = files / "nope.safetensors", "no such file"
    elif case == "dtype":
        extra, expect = ["--dtype", "int8"], "unknown dtype 'int8'"
    elif case == "opset_text":
        extra, expect = ["--opset", "abc"], "unsupported opset 'abc'"
    elif case == "opset_range":
        extra, expect = ["--opset", "12"], "unsupported opset 12"
    elif case == "attention":
        extra, expect = ["--attention", "flash"], "unknown attention"
    elif case == "trt_module":
        if importlib.util.find_spec("tensorrt") is not None:
            pytest.skip("full TensorRT is installed")
        extra, expect = ["--trt", "--trt-module", "tensorrt"], "pip install tensorrt-rtx-cu13"
    elif case == "unwritable":
        out = _unwritable_dir(tmp_path) / "o.onnx"
        expect = "not writable"
    elif case == "no_dir":
        out, expect = tmp_path / "missing" / "o.onnx", "does not exist"
    before = sorted(p.name for p in files.iterdir())
    r = run("export", model, "-o", out, *extra)
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], r.stderr
    assert not out.exists()
    assert sorted(p.name for p in files.iterdir()) == before
    assert not [p for p in tmp_path.rglob("*") if p.name != "ro"]


@pytest.mark.skipif(
    importlib.util.find_spec("tensorrt_rtx") is None, reason="needs tensorrt_rtx (pip install tensorrt-rtx-cu13)"
)
def test_build_failure_leaves_no_engine(files, tmp_path):
    out = tmp_path / "u.onnx"
    r = run(
        "export",
        files / "uneq.fused.safetensors",
        "-o",
        out,
        "--attention",
        "op",
        "--trt",
        "--trt-module",
        "tensorrt_rtx",
        "--opt-batch",
        2,
        "--max-batch",
        2,
        "--no-verify",
    )
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "ONNX parser" in lines[0] and "Attention" in lines[0]
    assert "[nothing written: the ONNX export succeeded;" in lines[0]  # --no-verify: it does not say "verified"
    assert not (tmp_path / "u.plan").exists() and not (tmp_path / "u.plan.json").exists()
    assert not out.exists()  # all or nothing: the ONNX is not kept either
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
