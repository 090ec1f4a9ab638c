"""Bad input to `caitdeploy fuse`: one clear line naming the file/key/block, exit != 0, no output file."""

from __future__ import annotations

import pickle
import re

import pytest
import torch
from click.testing import CliRunner

from caitdeploy.cli.main import main
from caitdeploy.testing.checkpoints import random_checkpoint


class Evil:
    """A pickle that would run code when loaded with weights_only=False."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def run_fuse(path, out, *extra):
    res = CliRunner().invoke(main, ["fuse", str(path), "-o", str(out), "-q", *extra])
    return res


def assert_fails(res, pattern, out):
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error: ")

    assert re.search(pattern, lines[0]), lines[0]
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]  # no temp file left


def _mutated(tmp_path, fn, name="bad.pth", **kw):
    ck = random_checkpoint(**kw)
    fn(ck)
    path = tmp_path / name
    torch.save(ck, path)
    return path


def _sd(fn):
    return lambda ck: fn(ck["state_dict"])


CASES = {
    "unknown format": (lambda ck: ck.update(format="cait-compactor/9"), r"unknown format 'cait-compactor/9'"),
    "missing key": (_sd(lambda sd: sd.pop("blocks.1.mlp.fc2.bias")), r"missing key 'blocks\.1\.mlp\.fc2\.bias'"),
    "extra key": (
        _sd(lambda sd: sd.update({"blocks.0.attn.extra": torch.zeros(3)})),
        r"unexpected key 'blocks\.0\.attn\.extra'",
    ),
    "wrong shape": (
        _sd(lambda sd: sd.update({"blocks.2.attn.qkv.weight": torch.zeros(10, 48)})),
        r"key 'blocks\.2\.attn\.qkv\.weight' has shape \(10, 48\), expected \(144, 48\)",
    ),
    "nan": (
        _sd(lambda sd: sd["blocks.1.mlp.fc1.weight"].__setitem__((0, 0), float("nan"))),
        r"key 'blocks\.1\.mlp\.fc1\.weight' contains NaN or Inf",
    ),
    "inf": (
        _sd(lambda sd: sd["blocks.0.attn.v_compactor.weight"].__setitem__((0, 0, 0), float("inf"))),
        r"key 'blocks\.0\.attn\.v_compactor\.weight' contains NaN or Inf",
    ),
    "mask not 0/1": (
        _sd(lambda sd: sd["blocks.2.attn.k_compactor.mask"].__setitem__((1, 3), 0.5)),
        r"key 'blocks\.2\.attn\.k_compactor\.mask' must hold only 0 and 1, found 0\.5",
    ),
    "all masked": (
        _sd(lambda sd: sd["blocks.1.mlp.fc1_compactor.mask"].zero_()),
        r"block 1: every fc1 channel is masked",
    ),
    "all masked head": (
        _sd(lambda sd: sd["blocks.2.attn.v_compactor.mask"][2].zero_()),
        r"block 2: every v channel head 2 is masked",
    ),
    "mask without compactor": (
        _sd(lambda sd: sd.pop("blocks.0.attn.q_compactor.weight")),
        r"mask 'blocks\.0\.attn\.q_compactor\.mask' has no compactor",
    ),
    "config key missing": (lambda ck: ck["config"].pop("num_heads"), r"config is missing key 'num_heads'"),
    "merge key without config": (
        _sd(lambda sd: sd.update({"blocks.1.htm.fc.weight": torch.zeros(48, 96)})),
        r"unexpected key 'blocks\.1\.htm\.fc\.weight' \(config merges say block 1 has no merge\)",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_checkpoint(tmp_path, case):
    fn, pattern = CASES[case]
    path = _mutated(tmp_path, fn)
    out = tmp_path / "out.safetensors"
    assert_fails(run_fuse(path, out), re.escape(str(path)) + ": " + pattern, out)


def test_odd_grid_merge(tmp_path):
    # 32/8 = 4x4 grid: h -> 4x2, h -> 4x1, h on width 1 is odd
    ck = random_checkpoint(depth=3)
    ck["config"]["merges"] = {"0": "h", "1": "h", "2": "h"}
    for i in range(3):
        ck["state_dict"][f"blocks.{i}.htm.fc.weight"] = torch.zeros(48, 96)
        ck["state_dict"][f"blocks.{i}.htm.fc.bias"] = torch.zeros(48)
    path = tmp_path / "odd.pth"
    torch.save(ck, path)
    out = tmp_path / "o.safetensors"
    assert_fails(run_fuse(path, out), r"block 2: horizontal merge on an odd grid width 1", out)


def test_inconsistent_masks_strict(tmp_path):
    path = tmp_path / "c.pth"
    torch.save(random_checkpoint(qk_differs=True), path)
    out = tmp_path / "o.safetensors"
    assert_fails(run_fuse(path, out), r"block 0 head 0: q keeps .*attention-level consistency broken", out)
    res = run_fuse(path, out, "--consistency", "repair")
    assert res.exit_code == 0 and out.exists()


def test_missing_file(tmp_path):
    out = tmp_path / "o.safetensors"
    assert_fails(run_fuse(tmp_path / "nope.pth", out), r"nope\.pth: no such file", out)


def test_truncated_file(tmp_path):
    path = tmp_path / "c.pth"
    torch.save(random_checkpoint(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    out = tmp_path / "o.safetensors"
    assert_fails(run_fuse(path, out), r"c\.pth: truncated or corrupt checkpoint", out)
    st = tmp_path / "c.safetensors"
    st.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    assert_fails(run_fuse(st, out), r"c\.safetensors: not a readable safetensors file", out)


def test_pickle_with_code_is_refused_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"format": "cait-compactor/1", "config": {}, "state_dict": {}, "x": Evil(str(marker))}, path)
    out = tmp_path / "o.safetensors"
    assert_fails(run_fuse(path, out), r"evil\.pth: refused: the pickle needs code to load", out)
    assert not marker.exists()
    raw = tmp_path / "raw.pth"  # a plain pickle (not a torch zip) with a code-running reduce
    # pickle names builtins.open by its module: io.open on Python 3.11, _io.open on 3.12
    raw.write_bytes(pickle.dumps(Evil(str(marker))))
    assert_fails(
        run_fuse(raw, out),
        r"raw\.pth: refused: the pickle needs code to load \(it references "
        r"_?io\.open\); caitdeploy never runs code",
        out,
    )
    assert not marker.exists()
    garbage = tmp_path / "garbage.pth"
    garbage.write_text("not a checkpoint\n")
    assert_fails(run_fuse(garbage, out), r"garbage\.pth: not a readable checkpoint", out)


def test_unwritable_output(tmp_path):
    path = tmp_path / "c.pth"
    torch.save(random_checkpoint(), path)
    out = tmp_path / "no" / "such" / "dir" / "o.safetensors"
    res = run_fuse(path, out)
    assert res.exit_code == 2 and "does not exist" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = run_fuse(path, blocker / "o.safetensors")
    assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1


def test_good_checkpoint_cli_writes_report(tmp_path):
    import json

    path = tmp_path / "c.pth"
    torch.save(random_checkpoint(merges={1: "v"}), path)
    out = tmp_path / "c.fused.safetensors"
    res = CliRunner().invoke(main, ["fuse", str(path), "--report", str(tmp_path / "r.json")])
    assert res.exit_code == 0, res.output
    assert out.exists() and "max |logit diff|" in res.stdout
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["blocks"][1]["merge"] == "v" and rep["blocks"][1]["tokens"] == 1 + 2 * 4
    assert rep["verify"]["max_abs_diff"] < 1e-4 and rep["flops_fused"] < rep["flops_dense"]
    assert rep["verify"]["torch_flops_per_img"] == rep["flops_fused"]
    assert sum(b["flops"] for b in rep["blocks"]) < rep["flops_fused"]  # + patch embed and head
    assert all(b["params"] < b["params_dense"] for b in rep["blocks"] if not b["merge"])
    assert rep["blocks"][1]["flops_parts"]["merge"] > 0 and rep["blocks"][0]["flops_parts"]["merge"] == 0
    assert "FLOPs check: analytic count equals torch.utils.flop_counter" in res.stdout
