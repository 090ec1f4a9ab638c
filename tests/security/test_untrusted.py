"""Untrusted input can't hurt: bounded memory, inputs never outputs, one-line errors, nothing written on error.

Table-driven: each category of the reliability issue has a table of hostile cases run through the real CLI.
Memory bombs run in a subprocess under RLIMIT_AS = 4 GiB and must fail with the one-line error in < 10 s.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from caitdeploy.cli.main import main
from caitdeploy.families.vit.config import CaitConfig
from caitdeploy.formats.checkpoint import FORMAT, expected_shapes
from caitdeploy.testing.checkpoints import random_checkpoint
from caitdeploy.testing.cli import one_line_error, run_cli_limited

REPO = Path(__file__).resolve().parents[2]
SMALL = dict(embed_dim=24, depth=2, num_heads=2, img_size=16, patch_size=8, num_classes=5)


# ---- helpers ------------------------------------------------------------------------------------
def cli(*args, env=None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env)


def listing(folder: Path) -> set[str]:
    return {p.name for p in folder.rglob("*")}


def save(ck, path: Path) -> Path:
    if path.suffix == ".safetensors":
        from caitdeploy.compress.cdcp import save_checkpoint_dict

        save_checkpoint_dict(ck, path)
    else:
        torch.save(ck, path)
    return path


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A small valid checkpoint and its fused file, ONNX and engine-less sidecar, made once."""
    d = tmp_path_factory.mktemp("small")
    ck = save(random_checkpoint(**SMALL, merges={1: "h"}), d / "ck.pth")
    res = cli("fuse", ck, "-q")
    assert res.exit_code == 0, res.output
    return d


def _format_cfg(**over):
    cfg = {
        "img_size": 224,
        "patch_size": 16,
        "in_chans": 3,
        "num_classes": 1000,
        "embed_dim": 384,
        "depth": 12,
        "num_heads": 6,
        "mlp_ratio": 4.0,
        "qkv_bias": True,
        "merges": {},
    }
    cfg.update(over)
    return cfg


# ---- 1. budget before allocation: memory bombs under RLIMIT_AS = 4 GiB ----------------------------------
def _stride0_bomb(path: Path, embed: int) -> Path:
    """A few-KB .pth whose config claims `embed` and whose tensors are stride-0 views of one element."""
    fmt = _format_cfg(embed_dim=embed, num_heads=embed // 64, depth=2, num_classes=10)
    cfg = CaitConfig.from_format(fmt)
    req, _ = expected_shapes(cfg, fmt)
    one = torch.zeros(1)
    sd = {k: one.expand(*shape) for k, shape in req.items()}
    torch.save({"format": FORMAT, "config": fmt, "state_dict": sd}, path)
    return path


def _alias_bomb(path: Path) -> Path:
    """Every tensor a view of one shared buffer: the file is much smaller than the model it describes."""
    fmt = _format_cfg(embed_dim=1024, num_heads=16, depth=4, num_classes=10)
    cfg = CaitConfig.from_format(fmt)
    req, _ = expected_shapes(cfg, fmt)
    big = max(math.prod(s) for s in req.values())
    base = torch.zeros(big)
    sd = {k: base[: math.prod(s)].view(*s) for k, s in req.items()}
    torch.save({"format": FORMAT, "config": fmt, "state_dict": sd}, path)
    return path


def _lying_fused(path: Path, small_fused: Path) -> Path:
    """A fused file whose metadata config claims DeiT-Base-like widths x 10 while its tensors are tiny."""
    from safetensors.torch import load_file, save_file

    from caitdeploy.formats.fused import read_safetensors_header

    _, meta = read_safetensors_header(small_fused)
    cfg = json.loads(meta["config"])
    cfg["embed_dim"] = 8192
    for b in cfg["blocks"]:
        b.update(num_heads=64, qk_dim=128, v_dim=128, mlp_hidden=32768)
    meta = dict(meta, config=json.dumps(cfg))
    save_file(load_file(small_fused), str(path), metadata=meta)
    return path


def _deep_config(path: Path) -> Path:
    ck = random_checkpoint(**SMALL)
    ck["config"]["depth"] = 10**9
    torch.save(ck, path)
    return path


BOMBS = {
    # name: (maker, command args (FILE substituted), expected message)
    "stride-0 views, embed 8192": (
        lambda d: _stride0_bomb(d / "s0.pth", 8192),
        ["fuse", "FILE", "-q"],
        r"expanded \(stride-0\) view: its storage holds only 1 element for shape \(1, 1, 8192\)",
    ),
    "stride-0 views, embed 16384": (
        lambda d: _stride0_bomb(d / "s1.pth", 16384),
        ["fuse", "FILE", "-q"],
        r"expanded \(stride-0\) view",
    ),
    "tensors sharing one buffer": (
        lambda d: _alias_bomb(d / "alias.pth"),
        ["fuse", "FILE", "-q"],
        r"share or overlap storage",
    ),
    "depth 10^9": (
        lambda d: _deep_config(d / "deep.pth"),
        ["fuse", "FILE", "-q"],
        r"config depth = 1000000000 is outside 1\.\.256",
    ),
    "fused config lies (export)": (
        lambda d: _lying_fused(d / "lie.fused.safetensors", d / "ck.fused.safetensors"),
        ["export", "FILE", "-q", "--no-verify"],
        r"(has shape|do not match their config)",
    ),
    "fused config lies (bench)": (
        lambda d: _lying_fused(d / "lie2.fused.safetensors", d / "ck.fused.safetensors"),
        ["bench", "FILE", "-q", "--batch", "1"],
        r"(has shape|do not match their config)",
    ),
}


def test_memory_bombs_fail_fast_under_4gib(small):
    """Every bomb through the CLI in ONE fresh process under RLIMIT_AS = 4 GiB (imports paid once): each must
    give the one-line error, exit 2, in under 10 s, writing nothing."""
    files = {name: maker(small) for name, (maker, _, _) in BOMBS.items()}
    for f in files.values():
        assert f.stat().st_size < 20_000_000  # small files describing models of GBs
    before = listing(small)
    cases = {name: [a.replace("FILE", str(files[name])) for a in args] for name, (_, args, _) in BOMBS.items()}
    results, _ = run_cli_limited(cases, small)
    import re

    for name, (rc, err, secs) in results.items():
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), (name, err)
        assert re.search(BOMBS[name][2], lines[0]), (name, lines[0])
        assert secs < 10, f"{name}: {secs:.1f} s"
    assert listing(small) == before  # nothing written, no temp file


def test_memory_budget_is_checked_before_the_work(small):
    """The memory rule: a command that would need more than the budget stops before allocating it."""
    ck = small / "ck.pth"
    out = small / "budget.fused.safetensors"
    res = cli("fuse", ck, "-o", out, env={"CAITDEPLOY_MAX_MEMORY_MB": "0.01"})
    one_line_error(res, r"needs about .* GiB, more than the 0\.00 GiB budget \(CAITDEPLOY_MAX_MEMORY_MB\)")
    assert not out.exists()
    res = cli(
        "bench",
        small / "ck.fused.safetensors",
        "--batch",
        "65536",
        "--backends",
        "torch",
        "-q",
        "--baselines",
        "dense",
        env={"CAITDEPLOY_MAX_MEMORY_MB": "64"},
    )
    one_line_error(res, r"benchmarking its dense architecture at batch 65536 needs about .* choose a smaller --batch")


# ---- 2. configs and tensors real checkpoints (and hostile ones) contain --------------------------------
def _cfg(**over):
    def f(ck):
        ck["config"].update(over)

    return f


def _sd(fn):
    return lambda ck: fn(ck["state_dict"])


BAD_CHECKPOINTS = {
    "num_heads 0": (_cfg(num_heads=0), r"config num_heads = 0 is outside 1\.\.256"),
    "patch_size 0": (_cfg(patch_size=0), r"patch_size = 0 is outside 1\.\.128"),
    "mlp_ratio NaN": (_cfg(mlp_ratio=float("nan")), r"mlp_ratio must be a number in \(0, 16\], got nan"),
    "mlp_ratio Inf": (_cfg(mlp_ratio=float("inf")), r"mlp_ratio must be a number in \(0, 16\], got inf"),
    "negative img_size": (_cfg(img_size=-16), r"img_size = -16 is outside 1\.\.8192"),
    "embed_dim 10^6": (_cfg(embed_dim=10**6), r"embed_dim = 1000000 is outside 1\.\.16384"),
    "string depth": (_cfg(depth="2"), r"config key 'depth' has value '2', expected int"),
    "unknown config key": (_cfg(ln_epsilon=1e-6), r"config has unknown key 'ln_epsilon'"),
    "negative ln_eps": (_cfg(ln_eps=-1.0), r"ln_eps must be a number in \(0, 0\.1\]"),
    "string class_token": (_cfg(class_token="yes"), r"config key 'class_token' has value 'yes', expected bool"),
    "skip_lam NaN": (_cfg(skip_lam=float("nan")), r"skip_lam"),
    "duplicate merges 1/01": (_cfg(merges={"1": "h", "01": "v"}), r"merges name block 1 twice"),
    "non-tensor cls_token": (
        _sd(lambda sd: sd.update(cls_token=[1.0, 2.0])),
        r"key 'cls_token' is a list, expected a tensor",
    ),
    "0-d cls_token": (
        _sd(lambda sd: sd.update(cls_token=torch.tensor(1.0))),
        r"key 'cls_token' has shape \(\), expected \(1, 1, 24\)",
    ),
    "complex weights": (
        _sd(lambda sd: sd.update({"head.weight": sd["head.weight"].to(torch.complex64)})),
        r"key 'head\.weight' has complex dtype torch\.complex64: CAIT weights are real",
    ),
    "integer weights": (
        _sd(lambda sd: sd.update({"head.weight": sd["head.weight"].long()})),
        r"key 'head\.weight' has torch\.int64 values: CAIT weights are floating point",
    ),
    "int8 weights": (
        _sd(lambda sd: sd.update({"blocks.0.mlp.fc1.weight": sd["blocks.0.mlp.fc1.weight"].to(torch.int8)})),
        r"torch\.int8 values",
    ),
    "non-string key": (_sd(lambda sd: sd.update({7: torch.zeros(1)})), r"state dict key 7 is not a string"),
}


@pytest.mark.parametrize("name", list(BAD_CHECKPOINTS))
def test_bad_checkpoint_is_one_line(tmp_path, name):
    mutate, pattern = BAD_CHECKPOINTS[name]
    ck = random_checkpoint(**SMALL)
    mutate(ck)
    path = save(ck, tmp_path / "bad.pth")
    before = listing(tmp_path)
    one_line_error(cli("fuse", path, "-q"), pattern)
    assert listing(tmp_path) == before


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_half_precision_checkpoints_are_accepted_and_reported(tmp_path, dtype, suffix):
    ck = random_checkpoint(**SMALL, merges={1: "h"})
    ck["state_dict"] = {k: v.to(dtype) for k, v in ck["state_dict"].items()}
    path = save(ck, tmp_path / f"half{suffix}")
    rep = tmp_path / "r.json"
    res = cli("fuse", path, "--report", rep)
    assert res.exit_code == 0, res.output
    name = str(dtype).removeprefix("torch.")
    assert f"note: {len(ck['state_dict'])} {name} tensors upcast to float32 for surgery" in res.output
    assert json.loads(rep.read_text())["notes"] == [
        (f"{len(ck['state_dict'])} {name} tensors upcast to float32 for surgery (the fused model is float32)")
    ]


@pytest.mark.parametrize("wrap", ["module.", "model.", "module.model."])
def test_wrapper_prefixes_and_integer_masks_are_accepted(tmp_path, wrap):
    ck = random_checkpoint(**SMALL)
    sd = {wrap + k: (v.bool() if k.endswith(".mask") else v) for k, v in ck["state_dict"].items()}
    path = save({"model": sd}, tmp_path / "deit.pth")
    res = cli("fuse", path, "-q")
    assert res.exit_code == 0, res.stderr
    assert (tmp_path / "deit.fused.safetensors").is_file()


# ---- 3. inputs are never outputs; extensions name the format -------------------------------------------
INPUT_IS_OUTPUT = {
    # name: (args, expected)
    "fuse -o CHECKPOINT": (["fuse", "ck.pth", "-o", "ck.pth"], r"expected a \.safetensors file name"),
    "fuse -o CHECKPOINT.safetensors": (["fuse", "ck.safetensors", "-o", "ck.safetensors"], r"is the input CHECKPOINT"),
    "fuse -o symlink to CHECKPOINT": (
        ["fuse", "ck.safetensors", "-o", "sym-ck.safetensors"],
        r"is the input CHECKPOINT",
    ),
    "fuse -o hard link to CHECKPOINT": (
        ["fuse", "ck.safetensors", "-o", "hard-ck.safetensors"],
        r"is the input CHECKPOINT",
    ),
    "fuse --report CHECKPOINT": (["fuse", "ck.pth", "--report", "ck.pth"], r"--report ck\.pth: expected a \.json"),
    "fuse --report == -o": (
        ["fuse", "ck.pth", "-o", "x.safetensors", "--report", "x.safetensors"],
        r"--report .*expected a \.json",
    ),
    "export -o MODEL": (
        ["export", "ck.fused.safetensors", "-o", "ck.fused.safetensors"],
        r"expected a \.onnx file name",
    ),
    "export -o symlink to MODEL": (["export", "ck.fused.safetensors", "-o", "via.onnx"], r"is the input MODEL"),
    "export --engine == -o": (
        ["export", "ck.fused.safetensors", "--trt", "-o", "x.onnx", "--engine", "x.onnx"],
        r"--engine x\.onnx: expected a \.plan or \.engine or \.trt",
    ),
    "export --engine sidecar == --report": (
        ["export", "ck.fused.safetensors", "--trt", "-o", "x.onnx", "--report", "x.plan.json"],
        r"is also the --engine \(its sidecar\) output",
    ),
    "export --report == MODEL": (
        ["export", "ck.fused.safetensors", "--report", "ck.fused.safetensors"],
        r"expected a \.json",
    ),
    "export --timing-cache == -o": (
        ["export", "ck.fused.safetensors", "--trt", "-o", "x.onnx", "--timing-cache", "x.onnx"],
        r"--timing-cache x\.onnx: the extension \.onnx means ONNX",
    ),
    "export --triton-repo file == -o": (
        ["export", "ck.fused.safetensors", "-o", "repo/m/1/model.onnx", "--triton-repo", "repo", "--name", "m"],
        r"is also the --output output",
    ),
    "bench --json MODEL": (["bench", "ck.fused.safetensors", "--json", "ck.fused.safetensors"], r"expected a \.json"),
    "bench --json symlink to MODEL": (["bench", "ck.fused.safetensors", "--json", "link.json"], r"is the input MODEL"),
    "bench --plot == --json": (
        ["bench", "ck.fused.safetensors", "--json", "b.json", "--plot", "b.json"],
        r"--plot b\.json: expected a \.png or \.svg or \.pdf",
    ),
    "bench --markdown == --json": (
        ["bench", "ck.fused.safetensors", "--json", "b.md", "--markdown", "b.md"],
        r"--json b\.md: expected a \.json",
    ),
    "make-checkpoint -o --weights": (
        ["make-checkpoint", "--arch", "deit_tiny_patch16_224", "--weights", "w.pth", "-o", "w.pth"],
        r"--output w\.pth: is the input --weights",
    ),
    "make-checkpoint -o .onnx": (["make-checkpoint", "-o", "c.onnx"], r"expected a \.pth or \.pt or \.safetensors"),
}


@pytest.mark.parametrize("name", list(INPUT_IS_OUTPUT))
def test_inputs_are_never_outputs(small, name, monkeypatch):
    args, pattern = INPUT_IS_OUTPUT[name]
    monkeypatch.chdir(small)
    if not (small / "ck.safetensors").exists():
        save(random_checkpoint(**SMALL), small / "ck.safetensors")
        (small / "sym-ck.safetensors").symlink_to(small / "ck.safetensors")
        os.link(small / "ck.safetensors", small / "hard-ck.safetensors")
        (small / "via.onnx").symlink_to(small / "ck.fused.safetensors")
        (small / "w.pth").write_bytes((small / "ck.pth").read_bytes())
        (small / "link.json").symlink_to(small / "ck.fused.safetensors")
        (small / "repo" / "m" / "1").mkdir(parents=True)
    sizes = {p.name: p.stat().st_size for p in small.iterdir() if p.is_file()}
    before = listing(small)
    t0 = time.perf_counter()
    one_line_error(cli(*args), pattern)
    assert time.perf_counter() - t0 < 5  # refused before any work
    assert listing(small) == before
    assert {p.name: p.stat().st_size for p in small.iterdir() if p.is_file()} == sizes


# ---- 4. everything checked before any work: nothing written on error -----------------------------------
BEFORE_WORK = {
    "fuse --report in a missing folder": (
        ["fuse", "ck.pth", "-o", "f.safetensors", "--report", "nodir/r.json"],
        r"--report directory nodir does not exist",
    ),
    "fuse --max-dropped-norm nan": (
        ["fuse", "ck.pth", "--max-dropped-norm", "nan"],
        r"--max-dropped-norm must be a finite number",
    ),
    "fuse --threshold -1": (["fuse", "ck.pth", "--threshold", "-1"], r"--threshold = -1\.0 is outside"),
    "fuse --align 1000000": (
        ["fuse", "ck.pth", "--align", "1000000"],
        r"'--align': 1000000 is not in the range 1<=x<=256",
    ),
    "fuse --verify-batch 1000000": (["fuse", "ck.pth", "--verify-batch", "1000000"], r"--verify-batch.* 0<=x<=256"),
    "export bad opset": (["export", "ck.fused.safetensors", "--opset", "12"], r"unsupported opset 12"),
    "export triton: bad instance kind": (
        ["export", "ck.fused.safetensors", "--triton-repo", "repo", "--instance-kind", "tpu"],
        r"instance kind 'tpu'",
    ),
    "export triton: plan on cpu": (
        ["export", "ck.fused.safetensors", "--trt", "--triton-repo", "repo", "--instance-kind", "cpu"],
        r"a TensorRT plan runs on GPU instances only",
    ),
    "export trt: bad profile": (
        ["export", "ck.fused.safetensors", "--trt", "--opt-batch", "300"],
        r"1 <= min <= opt <= max",
    ),
    "export trt: bad opt level": (
        ["export", "ck.fused.safetensors", "--trt", "--opt-level", "9"],
        r"--opt-level must be 0\.\.5",
    ),
    "export engine option without --trt": (
        ["export", "ck.fused.safetensors", "--engine", "e.plan"],
        r"--engine is an engine option: add --trt",
    ),
    "export --report in a missing folder": (
        ["export", "ck.fused.safetensors", "--report", "nodir/r.json"],
        r"nodir does not exist",
    ),
    "bench --json in a missing folder": (
        ["bench", "ck.fused.safetensors", "--json", "nodir/b.json"],
        r"nodir does not exist",
    ),
    "bench --plot in a missing folder": (
        ["bench", "ck.fused.safetensors", "--plot", "nodir/b.png"],
        r"nodir does not exist",
    ),
    "bench --min-seconds inf": (
        ["bench", "ck.fused.safetensors", "--min-seconds", "inf"],
        r"--min-seconds inf: must be in",
    ),
    "bench --min-seconds nan": (
        ["bench", "ck.fused.safetensors", "--min-seconds", "nan"],
        r"--min-seconds nan: must be in",
    ),
    "bench --batch 10^6": (
        ["bench", "ck.fused.safetensors", "--batch", "1000000"],
        r"--batch 1000000: must be in 1\.\.65536",
    ),
    "make-checkpoint duplicate merges": (
        ["make-checkpoint", "--merges", "4:h,4:v", "-o", "m.pth"],
        r"block 4 is named twice",
    ),
    "make-checkpoint --flops-reduction nan": (
        ["make-checkpoint", "--flops-reduction", "nan", "-o", "m.pth"],
        r"--flops-reduction must be a finite number",
    ),
}


@pytest.mark.parametrize("name", list(BEFORE_WORK))
def test_everything_is_checked_before_any_work(small, name, monkeypatch):
    args, pattern = BEFORE_WORK[name]
    monkeypatch.chdir(small)
    before = listing(small)
    t0 = time.perf_counter()
    one_line_error(cli(*args), pattern)
    assert time.perf_counter() - t0 < 5, "an option error must come before the work"
    assert listing(small) == before


@pytest.mark.slow
def test_engine_build_failure_writes_nothing(small, monkeypatch):
    """An error after the ONNX export (here: the engine build) leaves no ONNX, engine, report or Triton entry."""
    pytest.importorskip("tensorrt_rtx")
    import caitdeploy.export.tensorrt as T

    def fail(*a, **k):
        raise T.CaitError("engine build failed: simulated")

    monkeypatch.setattr(T, "build_engine_bytes", fail)
    monkeypatch.chdir(small)
    before = listing(small)
    line = one_line_error(
        cli(
            "export",
            "ck.fused.safetensors",
            "-o",
            "t.onnx",
            "--trt",
            "--triton-repo",
            "trepo",
            "--report",
            "t.json",
            "--no-verify",
        )
    )
    assert "[nothing written: the ONNX export succeeded;" in line and "verified" not in line
    assert listing(small) == before


# ---- 5. one error contract: user errors exit 2, bugs exit 1 in one line, traceback only with --debug -----
def test_internal_error_is_one_line_and_debug_shows_the_traceback(small, monkeypatch):
    import caitdeploy.compress.fuse as F

    def boom(*a, **k):
        raise TypeError("simulated bug")

    monkeypatch.setattr(F, "fuse", boom)
    out = small / "bug.fused.safetensors"
    line = one_line_error(cli("fuse", small / "ck.pth", "-o", out), code=1)
    assert line.startswith("internal error (a bug in caitdeploy") and "TypeError: simulated bug" in line
    assert "--debug" in line and not out.exists()
    res = cli("--debug", "fuse", small / "ck.pth", "-o", out)
    assert res.exit_code == 1 and isinstance(res.exception, TypeError)  # re-raised: click's runner holds it
    assert not out.exists()


def test_click_usage_errors_are_one_line():
    one_line_error(cli("fuse"), r"Missing argument 'CHECKPOINT'")
    one_line_error(cli("fuse", "x.pth", "--no-such-option"), r"fuse: No such option '--no-such-option'")
    one_line_error(cli("bench", "x.fused.safetensors", "--repeats", "0"), r"--repeats 0: must be in 1\.\.")


# ---- 6. signals and file modes -------------------------------------------------------------------------
def test_outputs_get_ordinary_permissions(small):
    umask = os.umask(0o022)
    try:
        out = small / "perm.fused.safetensors"
        rep = small / "perm.json"
        assert cli("fuse", small / "ck.pth", "-o", out, "--report", rep, "-q").exit_code == 0
        for p in (out, rep):
            assert p.stat().st_mode & 0o777 == 0o644, oct(p.stat().st_mode)
    finally:
        os.umask(umask)


def _signal_state(pid: int) -> str:
    """The kernel's view of a process that did not exit: its state and signal masks (for the failure message)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return "no /proc status"
    return "; ".join(ln for ln in lines if ln.startswith(("State", "SigPnd", "ShdPnd", "SigBlk", "SigIgn", "SigCgt")))


@pytest.mark.parametrize("inherited_mask", ["open", "sigterm_blocked"])
def test_sigterm_removes_temporary_files(tmp_path, inherited_mask):
    """A command killed by SIGTERM while its outputs are staged leaves nothing behind (exit 143), also when
    it was started with SIGTERM blocked (a mask inherited from the runner that started it)."""
    code = textwrap.dedent(f"""
        import time, click
        from caitdeploy.cli.common import handle_errors
        from caitdeploy.core.errors import Staging

        @click.command()
        @handle_errors
        def cmd():
            with Staging() as st:
                st.write_bytes({str(tmp_path / "out.json")!r}, b"{{}}")
                print("staged", flush=True)
                time.sleep(120)
        cmd()
    """)

    def block_sigterm():
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

    p = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=block_sigterm if inherited_mask == "sigterm_blocked" else None,  # noqa: PLW1509
    )
    try:
        assert p.stdout.readline().strip() == "staged", p.stderr.read()
        assert [q.name for q in tmp_path.iterdir() if ".cdtmp-" in q.name]  # the temporary file exists
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"SIGTERM did not end the command within 60 s: {_signal_state(p.pid)}")
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 143, p.stderr.read()
    assert list(tmp_path.iterdir()) == []


def test_temporary_files_of_a_killed_process_are_swept(tmp_path):
    """SIGKILL cannot be caught: the next write into the folder removes what a dead process left."""
    from caitdeploy.core.errors import Staging, _host

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".x.json.cdtmp-{_host()}-{dead.pid}-abc.tmp"
    stale.write_text("half")
    alive = tmp_path / f".y.json.cdtmp-{_host()}-{os.getppid()}-abc.tmp"  # a live process: kept
    alive.write_text("busy")
    other = tmp_path / f".z.json.cdtmp-otherhost-{dead.pid}-abc.tmp"  # another host's: kept
    other.write_text("remote")
    with Staging() as st:
        st.write_text(tmp_path / "new.json", "{}")
    assert not stale.exists() and alive.exists() and other.exists()
    assert (tmp_path / "new.json").read_text() == "{}"


def test_full_disk_is_one_line_and_leaves_nothing(small, tmp_path):
    """A write that fails (file-size limit: EFBIG, as ENOSPC on a full disk) is a one-line error."""
    out = tmp_path / "fz.fused.safetensors"
    code = textwrap.dedent(f"""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        sys.argv = ["caitdeploy", "fuse", {str(small / "ck.pth")!r}, "-o", {str(out)!r}, "-q"]
        from caitdeploy.cli.main import main
        main()
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1, p.stderr
    assert "cannot write (File too large" in lines[0] and "nothing was written" in lines[0]
    assert list(tmp_path.iterdir()) == []


# ---- 7. numbers: NaN weights, eps, duplicate merges, all-failed benchmarks --------------------------------
def _fused_variant(small: Path, name: str, tensors=None, config=None) -> Path:
    from safetensors.torch import load_file, save_file

    from caitdeploy.formats.fused import read_safetensors_header

    src = small / "ck.fused.safetensors"
    _, meta = read_safetensors_header(src)
    sd = load_file(src)
    if tensors:
        tensors(sd)
    cfg = json.loads(meta["config"])
    if config:
        config(cfg)
    path = small / name
    save_file(sd, str(path), metadata=dict(meta, config=json.dumps(cfg)))
    return path


BAD_FUSED = {
    "NaN weight": (
        dict(tensors=lambda sd: sd["head.weight"].__setitem__((0, 0), float("nan"))),
        r"key 'head\.weight' contains NaN or Inf",
    ),
    "negative LayerNorm eps": (
        dict(config=lambda c: c.update(ln_eps=-1e-6)),
        r"ln_eps must be a number in \(0, 0\.1\]",
    ),
    "NaN LayerNorm eps": (dict(config=lambda c: c.update(ln_eps=float("nan"))), r"NaN is not a JSON number"),
    "config is a JSON list": (dict(config=lambda c: None), None),
    "integer weights": (
        dict(tensors=lambda sd: sd.update({"head.bias": sd["head.bias"].long()})),
        r"key 'head\.bias' has dtype I64",
    ),
}


@pytest.mark.parametrize("name", list(BAD_FUSED))
@pytest.mark.parametrize("command", ["export", "bench", "inspect"])
def test_bad_fused_files_are_refused_by_every_reader(small, name, command):
    kw, pattern = BAD_FUSED[name]
    if name == "config is a JSON list":
        from safetensors.torch import load_file, save_file

        path = small / "list.fused.safetensors"
        save_file(
            load_file(small / "ck.fused.safetensors"),
            str(path),
            metadata={"format": "cait-fused/1", "config": "[1, 2]", "caitdeploy": "{}"},
        )
        pattern = r"config must be a JSON object, got list"
    else:
        path = _fused_variant(small, name.replace(" ", "_") + ".fused.safetensors", **kw)
    extra = {"export": ["-q", "-o", str(small / "never.onnx")], "bench": ["-q", "--batch", "1"], "inspect": []}[command]
    one_line_error(cli(command, path, *extra), pattern)
    assert not (small / "never.onnx").exists()


def test_bad_fused_files_are_refused_by_load_model(small):
    from caitdeploy.core.errors import CaitError
    from caitdeploy.formats.fused import load_model

    path = _fused_variant(
        small,
        "nan2.fused.safetensors",
        tensors=lambda sd: sd["blocks.0.mlp.fc1.weight"].__setitem__((1, 1), float("inf")),
    )
    with pytest.raises(CaitError, match=r"blocks\.0\.mlp\.fc1\.weight' contains NaN or Inf"):
        load_model(path)
    from safetensors.torch import load_file, save_file

    from caitdeploy.formats.fused import read_safetensors_header

    weights = load_file(small / "ck.fused.safetensors")
    _, meta = read_safetensors_header(small / "ck.fused.safetensors")
    bad_meta = small / "meta.fused.safetensors"
    for text, pattern in (
        ("not json", r"not valid JSON"),
        ('{"a": 1, "a": 2}', r"duplicate key 'a'"),
        ("[]", r"'caitdeploy' must be a JSON object"),
    ):
        save_file(weights, str(bad_meta), metadata=dict(meta, caitdeploy=text))
        with pytest.raises(CaitError, match=pattern):
            load_model(bad_meta)


def test_bench_exits_nonzero_when_nothing_was_measured(small):
    """On a CPU-only machine every TensorRT row is n/a: the command says so and writes nothing."""
    out = small / "none.json"
    line = one_line_error(
        cli(
            "bench",
            small / "ck.fused.safetensors",
            "--backends",
            "trt",
            "--baselines",
            "none",
            "--batch",
            "1",
            "-q",
            "--json",
            out,
        )
    )
    assert line.startswith("error: no measurement succeeded (trt: n/a") and "nothing written" in line
    assert not out.exists()


def test_htm_and_vtm_at_one_block_are_refused(tmp_path):
    ck = random_checkpoint(**SMALL, merges={1: "h"})
    sd = ck["state_dict"]
    sd["blocks.1.vtm.fc.weight"] = sd["blocks.1.htm.fc.weight"].clone()
    sd["blocks.1.vtm.fc.bias"] = sd["blocks.1.htm.fc.bias"].clone()
    path = save({"model": sd}, tmp_path / "both.pth")
    one_line_error(cli("fuse", path), r"block 1 has both an htm and a vtm merge")


# ---- 8. pickles: a refusal never invites the user to disable the safe loader -----------------------------
class _System:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


@pytest.mark.parametrize("how", ["torch.save", "bare pickle"])
def test_code_pickles_are_refused_with_our_words(tmp_path, monkeypatch, how):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pth"
    if how == "torch.save":
        torch.save({"format": FORMAT, "config": {}, "state_dict": {"x": _System()}}, path)
    else:
        path.write_bytes(pickle.dumps({"state_dict": _System()}))
    for command in (["fuse", path], ["inspect", path], ["export", path]):
        line = one_line_error(cli(*command))
        assert (
            "refused: the pickle needs code to load (it references posix.system); caitdeploy never runs code "
            "from a checkpoint" in line
        ), line
        assert "weights_only" not in line and "Re-running" not in line
    assert not (tmp_path / "PWNED").exists()


def test_compressed_and_legacy_files_are_refused_before_torch_reads_them(tmp_path):
    import zipfile

    good = save(random_checkpoint(**SMALL), tmp_path / "good.pth")
    comp = tmp_path / "comp.pth"
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(comp, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info.filename))
    one_line_error(cli("fuse", comp), r"zip record .* is compressed; torch\.save never compresses")
    legacy = tmp_path / "legacy.pth"
    torch.save(random_checkpoint(**SMALL), legacy, _use_new_zipfile_serialization=False)
    one_line_error(cli("fuse", legacy), r"a legacy \(pre-1\.6\) torch\.save file or a bare pickle: re-save it")


# ---- sidecars and ONNX metadata -------------------------------------------------------------------------
SIDECARS = {
    "not JSON": ("{", r"engine sidecar is not valid JSON"),
    "a JSON list": ("[1]", r"not a caitdeploy engine sidecar"),
    "profile of strings": (
        json.dumps({"format": "caitdeploy-engine/1", "profile": {"min": "a", "opt": [1], "max": []}}),
        r"bad engine sidecar: 'profile.min' must be 4 positive integers",
    ),
    "config that lies": (
        json.dumps({"format": "caitdeploy-engine/1", "config": {"blocks": [{"num_heads": 0}]}}),
        r"bad engine sidecar: 'config': config blocks\[0\]",
    ),
    "depth 10^6 config": (
        json.dumps({"format": "caitdeploy-engine/1", "config": {"blocks": [{}] * 10**6}}),
        r"depth = 1000000 is outside 1\.\.256",
    ),
    "NaN build time": ('{"format": "caitdeploy-engine/1", "build_seconds": NaN}', r"NaN is not a JSON number"),
}


@pytest.mark.parametrize("name", list(SIDECARS))
def test_bad_engine_sidecars_are_one_line(tmp_path, name):
    text, pattern = SIDECARS[name]
    engine = tmp_path / "m.plan"
    engine.write_bytes(b"\0" * 64)
    (tmp_path / "m.plan.json").write_text(text)
    t0 = time.perf_counter()
    one_line_error(cli("inspect", engine), pattern)
    assert time.perf_counter() - t0 < 5


def test_bad_onnx_metadata_is_one_line(small):
    import onnx

    onnx_path = small / "meta.onnx"
    res = cli("export", small / "ck.fused.safetensors", "-o", onnx_path, "-q", "--no-verify")
    assert res.exit_code == 0, res.stderr
    m = onnx.load(str(onnx_path))
    for p in m.metadata_props:
        if p.key == "caitdeploy.config":
            p.value = json.dumps(dict(json.loads(p.value), embed_dim=10**9))
    bad = small / "badmeta.onnx"
    onnx.save(m, str(bad))
    one_line_error(
        cli("inspect", bad),
        r"badmeta\.onnx: bad 'caitdeploy\.config' metadata: embed_dim = 1000000000 "
        r"is outside 1\.\.16384",
    )
