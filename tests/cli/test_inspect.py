"""`caitdeploy inspect` on a checkpoint, a fused model, an ONNX file and an engine; corrupt files fail in one line."""

from __future__ import annotations

import importlib.util
import json

import onnx
import pytest
import torch
from click.testing import CliRunner

from caitdeploy.cli.main import main
from caitdeploy.compress.cdcp import make_checkpoint, save_checkpoint_dict
from caitdeploy.export.onnx import export_onnx
from caitdeploy.families.flops import model_flops
from caitdeploy.families.vit.config import BlockConfig, CaitConfig
from caitdeploy.families.vit.model import CaitViT
from caitdeploy.formats.fused import save_fused
from caitdeploy.formats.onnx_meta import op_census

HAS_TRT = importlib.util.find_spec("tensorrt_rtx") is not None or importlib.util.find_spec("tensorrt") is not None
S = 16**-0.5
CFG = CaitConfig(
    64,
    16,
    3,
    10,
    32,
    True,
    (BlockConfig(2, 8, 16, 64, S, "h"), BlockConfig(2, 16, 8, 48, S, "v"), BlockConfig(2, 8, 8, 32, S)),
)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("insp")
    ckpt, summary = make_checkpoint("deit_tiny_patch16_224", 0.5, {4: "h", 8: "v"}, img_size=64, num_classes=10)
    save_checkpoint_dict(ckpt, d / "c.pth")
    torch.manual_seed(0)
    model = CaitViT(CFG).eval()
    save_fused(d / "m.fused.safetensors", CFG, model.state_dict())
    export_onnx(model, d / "m.onnx", verify=False)
    if HAS_TRT:
        from caitdeploy.export.tensorrt import build_engine

        build_engine(d / "m.onnx", d / "m.plan", opt_batch=2, max_batch=4)
    return d, ckpt, summary


def inspect_json(path):
    r = CliRunner().invoke(main, ["inspect", str(path), "--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_checkpoint(files):
    d, ckpt, summary = files
    info = inspect_json(d / "c.pth")
    assert info["kind"] == "checkpoint" and info["depth"] == 12 and info["merges"] == {"4": "h", "8": "v"}
    for i, b in enumerate(info["blocks"]):
        sd = ckpt["state_dict"]
        assert b["qk_per_head"] == int(sd[f"blocks.{i}.attn.q_compactor.mask"].sum(-1).max())
        assert b["v_per_head"] == int(sd[f"blocks.{i}.attn.v_compactor.mask"].sum(-1).max())
        assert b["mlp"] == int(sd[f"blocks.{i}.mlp.fc1_compactor.mask"].sum()) == summary["kept"][i]["fc1"]
    assert [b["tokens"] for b in info["blocks"]] == [17] * 4 + [9] * 4 + [5] * 4
    assert 0 < info["flops"] < info["flops_dense"]


def test_fused_and_table(files):
    d = files[0]
    info = inspect_json(d / "m.fused.safetensors")
    assert info["kind"] == "fused" and info["flops"] == model_flops(CFG)["total"]
    assert [(b["heads"], b["qk_per_head"], b["v_per_head"], b["mlp"], b["merge"]) for b in info["blocks"]] == [
        (2, 8, 16, 64, "h"),
        (2, 16, 8, 48, "v"),
        (2, 8, 8, 32, None),
    ]
    r = CliRunner().invoke(main, ["inspect", str(d / "m.fused.safetensors")], env={"COLUMNS": "160"})
    assert r.exit_code == 0 and "fused CAIT model" in r.stdout and "qk/head" in r.stdout


def test_onnx(files):
    d = files[0]
    info = inspect_json(d / "m.onnx")
    assert info["kind"] == "onnx" and info["format"] == "caitdeploy-onnx/1"
    assert info["census"] == op_census(onnx.load(str(d / "m.onnx")))
    assert info["inputs"] == [{"name": "images", "shape": ["batch", 3, 64, 64], "dtype": "float32"}]
    assert info["outputs"] == [{"name": "logits", "shape": ["batch", 10], "dtype": "float32"}]
    assert info["flops"] == model_flops(CFG)["total"] and len(info["blocks"]) == 3


@pytest.mark.skipif(not HAS_TRT, reason="no TensorRT module (pip install tensorrt-rtx-cu13)")
def test_engine(files):
    d = files[0]
    info = inspect_json(d / "m.plan")
    assert info["kind"] == "engine" and info["sidecar"] and info["onnx_matches"] is True
    assert info["profile"]["max"] == [4, 3, 64, 64] and info["dtype"] == "fp32"
    assert not info["header_check"].get("malformed")
    assert info["header_check"]["supported"], info["header_check"]  # pipelines.inspect passes TensorRT's check
    assert [b["mlp"] for b in info["blocks"]] == [64, 48, 32]


@pytest.mark.parametrize(
    "name, content, needle",
    [
        ("bad.onnx", b"\x08\x07garbage-not-onnx" * 10, "ONNX"),
        ("bad.plan", b"\x00" * 200, "engine"),
        ("bad.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json", "not a readable safetensors"),
        ("bad.pth", b"PK\x03\x04truncated", "checkpoint"),
        ("notes.txt", b"hello", "unrecognised file type"),
    ],
)
def test_corrupt_files_one_line(tmp_path, name, content, needle):
    p = tmp_path / name
    p.write_bytes(content)
    r = CliRunner().invoke(main, ["inspect", str(p)])
    assert r.exit_code == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], r.stderr
