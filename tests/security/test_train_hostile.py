"""`caitdeploy train` under hostile input (issue 24, items 7-9): bad images in --data, a forged or damaged
`last.pt` for --resume, a full disk, and options out of range. Each ends in one `error:` line naming the file or
option, exit 2, nothing written (no run folder, no temporary file), no input changed."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from caitdeploy.cli.main import main
from caitdeploy.testing.cli import one_line_error
from caitdeploy.training.loop import STATE_FORMAT

REPO = Path(__file__).resolve().parents[2]
MODEL = [
    "--arch",
    "vit_tiny_patch16_224",
    "--model-args",
    "patch_size=8,depth=2,embed_dim=24,num_heads=2",
    "--img-size",
    "32",
]
FAST = [
    "--epochs",
    "2",
    "--batch-size",
    "4",
    "--micro-batch",
    "2",
    "--prune-start-epoch",
    "0",
    "--step-ratio",
    "0.05",
    "--every",
    "1",
    "--flops-reduction",
    "0.5",
    "--workers",
    "0",
    "--teacher",
    "none",
    "-q",
]


# ---- helpers ------------------------------------------------------------------------------------------


def train(*args):
    return CliRunner().invoke(main, ["train", *[str(a) for a in args]])


def tree(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): (p.read_bytes() if p.is_file() and not p.is_symlink() else b"")
        for p in sorted(folder.rglob("*"))
    }


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bytes(w: int, h: int, honest: bool = True) -> bytes:
    c = zlib.compressobj(9)
    idat = (b"".join(c.compress(bytes(w + 1)) for _ in range(h)) if honest else c.compress(bytes(64))) + c.flush()
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
        + _chunk(b"IDAT", idat)
        + _chunk(b"IEND", b"")
    )


def write_data(root: Path, n_train=4, n_val=2, size=32) -> Path:
    """Three classes of small random RGB PNGs, train/ and val/."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for c in ("a", "b", "c"):
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8)).save(d / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def run1(data, tmp_path_factory):
    """A run stopped after its first epoch: run/last.pt and run/log.jsonl."""
    out = tmp_path_factory.mktemp("run1") / "run"
    r = train(*MODEL, "--data", data, "-o", out, *FAST, "--stop-after-epochs", "1")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == ["last.pt", "log.jsonl"]
    return out


# ---- 7. images in --data ------------------------------------------------------------------------------------
def _damaged_stream() -> bytes:
    """A PNG whose chunks and CRCs are intact but whose compressed data is garbage: it passes the check before
    the first step and fails to decode mid-run."""
    raw = b"".join(b"\x00" + bytes(range(96)) for _ in range(32))
    comp = zlib.compress(raw)
    idat = comp[:10] + bytes(b ^ 0x5A for b in comp[10:])
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", struct.pack(">IIBBBBB", 32, 32, 8, 2, 0, 0, 0))
        + _chunk(b"IDAT", idat)
        + _chunk(b"IEND", b"")
    )


BAD_IMAGES = {
    "zero bytes": (
        "train/a/zero.png",
        lambda: b"",
        r"train/a/zero\.png: not a readable PNG/JPEG image \(the file is empty\)",
    ),
    "corrupt": ("train/b/junk.jpg", lambda: b"\xff\xd8\xff\xe0 not really", r"train/b/junk\.jpg: not a readable"),
    "truncated": (
        "train/a/cut.png",
        lambda: (png_bytes(32, 32))[:50],
        r"cut\.png: not a readable PNG/JPEG image \(truncated PNG",
    ),
    "30000 x 30000": (
        "train/c/huge.png",
        lambda: png_bytes(30000, 30000, honest=False),
        r"huge\.png: 30000x30000 pixels: a side longer than the 16384 allowed",
    ),
    "13000 x 13000": (
        "train/c/big.png",
        lambda: png_bytes(13000, 13000),
        r"big\.png: 13000x13000 pixels, more than the 67108864 allowed \(refused before decoding\)",
    ),
    "60000000 x 1 (validation)": (
        "val/a/long.png",
        lambda: png_bytes(60_000_000, 1),
        r"val/a/long\.png: 60000000x1 pixels: a side longer",
    ),
}


@pytest.mark.parametrize("name", list(BAD_IMAGES))
def test_a_bad_image_is_one_line_before_any_run_folder(data, tmp_path, name):
    rel, make, pattern = BAD_IMAGES[name]
    d = tmp_path / "d"
    shutil.copytree(data, d)
    (d / rel).write_bytes(make())
    before = tree(d)
    line = one_line_error(train(*MODEL, "--data", d, "-o", tmp_path / "run", *FAST), pattern)
    assert line.startswith(f"error: --data {d / rel}: ") and "add --skip-bad-images" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # no run folder, no temporary file
    assert tree(d) == before


def test_special_files_named_like_images_are_never_read(data, tmp_path):
    """A FIFO would block an open() for ever, /dev/zero never ends: both are refused from stat."""
    d = tmp_path / "d"
    shutil.copytree(data, d)
    os.mkfifo(d / "train" / "a" / "fifo.png")
    os.symlink("/dev/zero", d / "train" / "b" / "zero.png")
    line = one_line_error(train(*MODEL, "--data", d, "-o", tmp_path / "run", *FAST), r"not a regular file")
    assert "(and 1 more bad image of 20)" in line
    assert not (tmp_path / "run").exists()


def test_skip_bad_images_says_how_many_once(data, tmp_path):
    d = tmp_path / "d"
    shutil.copytree(data, d)
    for rel, make, _ in BAD_IMAGES.values():
        (d / rel).write_bytes(make())
    r = train(*MODEL, "--data", d, "-o", tmp_path / "run", *FAST, "--skip-bad-images", "--stop-after-epochs", "1")
    assert r.exit_code == 0, r.output
    assert r.stderr.strip() == ""  # no warnings at all, let alone twice
    said = [ln for ln in r.stdout.splitlines() if "skipped" in ln]
    assert len(said) == 1 and said[0].startswith("--skip-bad-images: skipped 6 of 24 images"), r.stdout
    assert "12 train / 6 val images" in r.stdout


def test_too_few_usable_images_after_skipping(data, tmp_path):
    d = tmp_path / "d"
    shutil.copytree(data, d)
    for p in (d / "train").rglob("*.png"):
        if p.name != "0.png":
            p.write_bytes(b"")
    r = train(*MODEL, "--data", d, "-o", tmp_path / "run", *FAST, "--skip-bad-images", "--micro-batch", "4")
    one_line_error(r, r"--data .*train: 3 usable images, fewer than one global micro-batch \(4 x 1\)")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("workers", ["0", "2"])
def test_an_image_that_fails_to_decode_mid_run_is_one_line(data, tmp_path, workers):
    """Damage the check cannot see without decoding: one line naming the file, from a worker too; the first epoch
    had not ended, so there is no run folder."""
    d = tmp_path / "d"
    shutil.copytree(data, d)
    for c in "abc":
        (d / "train" / c / "9.png").write_bytes(_damaged_stream())
    r = train(*MODEL, "--data", d, "-o", tmp_path / "run", *FAST, "--workers", workers)
    one_line_error(
        r, r"--data .*/9\.png: not a readable PNG/JPEG image \(.*\) \(it passed the check before the first step\)"
    )
    assert not (tmp_path / "run").exists()


# ---- 8. --resume: last.pt read like every other .pth, its structure checked ----------------------------------
class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/caitdeploy-pwned",))


def _state(run1):
    return torch.load(run1 / "last.pt", weights_only=True)


def _shared_bomb(levels=64):
    x: list = []
    for _ in range(levels):
        x = [x, x]
    return x


def _edit(fn):
    def make(run1, path):
        s = _state(run1)
        fn(s)
        torch.save(s, path)

    return make


BAD_STATES = {
    "code pickle": (
        lambda run1, p: torch.save({"format": STATE_FORMAT, "x": Evil()}, p),
        r"refused: the pickle needs code to load",
    ),
    "legacy pickle": (
        lambda run1, p: p.write_bytes(pickle.dumps({"format": STATE_FORMAT, "options": "{}"}, 2)),
        r"a legacy \(pre-1\.6\) torch\.save file or a bare pickle",
    ),
    "a list": (lambda run1, p: torch.save([1, 2, 3], p), r"top level is a list, expected a dict"),
    "truncated": (lambda run1, p: p.write_bytes((run1 / "last.pt").read_bytes()[:100_000]), r"truncated or corrupt"),
    "empty": (lambda run1, p: p.write_bytes(b""), r"last\.pt: "),
    "a safetensors file": (
        lambda run1, p: p.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}              "),
        r"not a readable checkpoint",
    ),
    "wrong format": (_edit(lambda s: s.update(format="cait-compactor/1")), r"not a caitdeploy training state"),
    "format a shared-reference bomb": (_edit(lambda s: s.update(format=_shared_bomb())), r"last\.pt: "),
    "missing options": (_edit(lambda s: s.pop("options")), r"malformed training state: missing key 'options'"),
    "options not a string": (
        _edit(lambda s: s.update(options={"arch": "x"})),
        r"key 'options' is a dict, expected str",
    ),
    "options deep JSON": (_edit(lambda s: s.update(options="[" * 30000 + "]" * 30000)), r"'options' .*JSON"),
    "options huge": (_edit(lambda s: s.update(options=" " * 200_000 + "{}")), r"more than the 65536 allowed"),
    "options a JSON list": (_edit(lambda s: s.update(options="[1, 2]")), r"'options' is a JSON list"),
    "options NaN": (_edit(lambda s: s.update(options='{"lr": NaN}')), r"NaN is not a JSON number"),
    "epoch a string": (_edit(lambda s: s.update(epoch="1")), r"key 'epoch' is a str, expected int"),
    "epoch negative": (_edit(lambda s: s.update(epoch=-5)), r"out of range"),
    "epoch past the run": (_edit(lambda s: s.update(epoch=7, history=s["history"] * 7)), r"epoch 7 is past --epochs 2"),
    "history a shared-reference bomb": (_edit(lambda s: s["history"][0].update(kept=_shared_bomb())), r"last\.pt: "),
    "history deep": (
        _edit(lambda s: s["history"][0].update(kept=json.loads("[" * 20 + "]" * 20))),
        r"nested more than 12 levels deep",
    ),
    "model a list": (_edit(lambda s: s.update(model=[1])), r"key 'model' is a list, expected dict"),
    "model value not a tensor": (
        _edit(lambda s: s["model"].update(extra=5)),
        r"'model': key 'extra' is a int, expected a tensor",
    ),
    "model tensor of another shape": (
        _edit(lambda s: s["model"].update(pos_embed=torch.zeros(3))),
        r"its model does not fit this run \(.*pos_embed",
    ),
    "model stride-0 view": (
        _edit(lambda s: s["model"].update(pos_embed=torch.zeros(1).expand(1, 17, 24))),
        r"expanded \(stride-0\) view",
    ),
    "optimizer state of another shape": (
        _edit(lambda s: s["opt"]["state"][0].update(exp_avg=torch.zeros(1000))),
        r"optimizer state 'exp_avg' has shape \(1000,\)",
    ),
    "optimizer without groups": (_edit(lambda s: s["opt"].pop("param_groups")), r"'opt' is not an optimizer state"),
    "CDCP ratio NaN": (_edit(lambda s: s["ctl"].update(ratio=float("nan"))), r"'ctl' ratio nan is not in \[0, 1\]"),
    "CDCP state lacks a key": (_edit(lambda s: s["ctl"].pop("frozen")), r"'ctl' lacks 'frozen'"),
    "RNG states missing": (_edit(lambda s: s.update(rng=[])), r"0 RNG states for 1 process"),
    "RNG state forged": (
        _edit(lambda s: s["rng"][0].update(torch=torch.zeros(3, dtype=torch.uint8))),
        r"rng\[0\]\['torch'\] is not a torch RNG state",
    ),
    "numpy RNG state forged": (
        _edit(lambda s: s["rng"][0]["numpy"].__setitem__(2, 10**6)),
        r"rng\[0\]\['numpy'\] is not a numpy MT19937 state",
    ),
    "a teacher the run does not have": (
        _edit(lambda s: s.update(teacher={})),
        r"it has a teacher state though the run does not distil",
    ),
    "another world size": (
        _edit(lambda s: s.update(world=2, rng=s["rng"] * 2)),
        r"last\.pt: the run used 2 process\(es\), this one 1",
    ),
}


@pytest.mark.parametrize("name", list(BAD_STATES))
def test_a_bad_training_state_is_one_line_naming_it(data, run1, tmp_path, name):
    make, pattern = BAD_STATES[name]
    run = tmp_path / "run"
    shutil.copytree(run1, run)
    make(run1, run / "last.pt")
    before = tree(tmp_path)
    line = one_line_error(train(*MODEL, "--data", data, "-o", run, *FAST, "--resume"), pattern)
    assert f"{run / 'last.pt'}" in line, line
    assert tree(tmp_path) == before  # nothing written, nothing changed
    assert not Path("/tmp/caitdeploy-pwned").exists()


def test_plain_parts_are_bounded_without_the_pickle_check():
    """The structure check stands on its own: a shared-reference bomb or deep nesting handed to it directly (not
    through a pickle, whose reader refuses them first) is refused in bounded time, never walked."""
    import time

    from caitdeploy.training.loop import _check_plain, _Malformed

    t = time.perf_counter()
    wide: list = []
    for _ in range(9):  # 100^9 items within the depth bound, a few KB as objects
        wide = [wide] * 100
    with pytest.raises(_Malformed, match="more than 1000000 objects"):
        _check_plain([{"kept": wide}], "'history'")
    with pytest.raises(_Malformed, match="nested more than 12 levels"):
        _check_plain([{"kept": _shared_bomb(64)}], "'history'")
    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(_Malformed, match="nested more than 12 levels"):
        _check_plain(deep, "'history'")
    with pytest.raises(_Malformed, match="holds a set"):
        _check_plain({"a": {1, 2}}, "'scaler'")
    assert time.perf_counter() - t < 10


def test_a_link_to_a_device_is_refused(data, run1, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run1, run)
    (run / "last.pt").unlink()
    os.symlink("/dev/zero", run / "last.pt")
    one_line_error(
        train(*MODEL, "--data", data, "-o", run, *FAST, "--resume"), r"--resume .*last\.pt: not a regular file"
    )


def test_resume_of_the_real_state_still_works(data, run1, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run1, run)
    r = train(*MODEL, "--data", data, "-o", run, *FAST, "--resume")
    assert r.exit_code == 0, r.output
    assert f"resumed {run / 'last.pt'}: epoch 1/2" in r.stdout
    recs = [json.loads(ln) for ln in (run / "log.jsonl").read_text().splitlines()]
    assert [x.get("epoch") for x in recs[:-1]] == [1, 2] and "final" in recs[-1]  # one line per epoch, then final
    assert sorted(p.name for p in run.iterdir()) == ["cait-compactor.safetensors", "last.pt", "log.jsonl"]


# ---- full disk: train's outputs under the staging contract ------------------------------------------------------
def _train_with_fsize_limit(limit: int, *args) -> subprocess.CompletedProcess:
    code = textwrap.dedent(f"""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
        sys.argv = ["caitdeploy", "train", *{[str(a) for a in args]!r}]
        from caitdeploy.cli.main import main
        main()
    """)
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO, check=False
    )


@pytest.mark.slow
def test_full_disk_during_the_first_epoch_leaves_nothing(data, tmp_path):
    out = tmp_path / "work" / "run"
    (tmp_path / "work").mkdir()
    p = _train_with_fsize_limit(64 << 10, *MODEL, "--data", data, "-o", out, *FAST)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1, p.stderr
    assert re.fullmatch(
        rf"error: {re.escape(str(out / 'last.pt'))}: cannot write \(File too large\); nothing was "
        r"written",
        lines[0],
    ), lines[0]
    assert list((tmp_path / "work").iterdir()) == []  # no run folder, no run/last.pt.tmp, no hidden temp


@pytest.mark.slow
def test_full_disk_after_an_epoch_keeps_that_epoch(data, run1, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run1, run)
    before = tree(run)
    p = _train_with_fsize_limit(64 << 10, *MODEL, "--data", data, "-o", run, *FAST, "--resume")
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1, p.stderr
    assert "cannot write (File too large); the state of epoch 1 is kept: continue with --resume" in lines[0]
    assert tree(run) == before  # last.pt and log.jsonl as they were, no temporary file


def test_unwritable_output_is_refused_before_any_work(data, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK) and os.geteuid() == 0:
            probe = ro / "probe"
            try:
                probe.write_text("x")
                probe.unlink()
                pytest.skip("root writes into read-only folders here")
            except OSError:
                pass
        one_line_error(
            train(*MODEL, "--data", data, "-o", ro / "run", *FAST), r"--output .*: the folder .* is not writable"
        )
    finally:
        ro.chmod(0o755)
    assert list(ro.iterdir()) == []


def test_output_below_a_file_is_refused_before_any_work(data, tmp_path):
    (tmp_path / "file").write_text("x")
    one_line_error(
        train(*MODEL, "--data", data, "-o", tmp_path / "file" / "run", *FAST),
        rf"--output {tmp_path / 'file' / 'run'}: {tmp_path / 'file'} is not a folder",
    )
    assert (tmp_path / "file").read_text() == "x"


# ---- 9. options ---------------------------------------------------------------------------------------------
BAD_OPTIONS = [
    (["--model-args", "embed_dim=0"], r"--model-args embed_dim=0: 0 is outside 1\.\.16384"),
    (["--model-args", "num_heads=nan"], r"--model-args 'num_heads=nan': a value must be a finite number"),
    (["--model-args", "patch_size=0"], r"--model-args patch_size=0: 0 is outside 1\.\.128"),
    (["--model-args", "embed_dim=16384,depth=256"], r"--model-args embed_dim=16384,depth=256: timm cannot build"),
    (["--model-args", "embed_dim=16384,depth=256,num_heads=128"], r"needs about .* GiB, more than the .* budget"),
    (["--model-args", "depth=100000"], r"--model-args depth=100000: 100000 is outside 1\.\.256"),
    (["--model-args", "patch_size=8,depth=2,embed_dim=24,num_heads=2,mlp_ratio=1e300"], r"mlp_ratio=1e\+300"),
    (["--model-args", "patch_size=8,depth=2,embed_dim=24,num_heads=2,drop_path_rate=2"], r"a rate in \[0, 1\)"),
    (
        ["--model-args", "patch_size=1,depth=2,embed_dim=24,num_heads=2", "--img-size", "8192"],
        r"--model-args patch_size=1.*tokens",
    ),
    (["--micro-batch", "0"], r"Invalid value for '--micro-batch': 0 is not in the range 1<=x<="),
    (["--micro-batch", "8"], r"--micro-batch 8: must be in 1\.\.4"),
    (["--seed", "-1"], r"'--seed': -1 is not in the range 0<=x<=4294967295"),
    (["--seed", "18446744073709551616"], r"'--seed': 18446744073709551616 is not in the range"),
    (["--lr", "nan"], r"'--lr': 'nan' is not a finite number"),
    (["--epochs", "0"], r"'--epochs': 0 is not in the range 1<=x<=100000"),
    (["--img-size", "²"], r"'--img-size': '²' is not a valid integer"),
    (["--workers", "1000"], r"'--workers': 1000 is not in the range 0<=x<=256"),
    (["--token-reduction", "inf"], r"'--token-reduction': 'inf' is not a finite number"),
    (["--flops-reduction", "nan"], r"--flops-reduction nan: must be in"),
    (["--every", "0"], r"'--every': 0 is not in the range"),
]


@pytest.mark.parametrize("args,pattern", BAD_OPTIONS, ids=[" ".join(a) for a, _ in BAD_OPTIONS])
def test_bad_options_are_one_line_exit_2(data, tmp_path, args, pattern):
    argv = [*MODEL, "--data", str(data), "-o", str(tmp_path / "run"), *FAST]
    for flag, value in zip(args[::2], args[1::2]):
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    one_line_error(train(*argv), pattern)
    assert not (tmp_path / "run").exists()


def test_library_refuses_micro_batch_zero(data, tmp_path):
    """0 is no sentinel: None is the default (batch size / processes)."""
    from caitdeploy.core.errors import OptionError
    from caitdeploy.training.loop import TrainOptions, check_options

    o = TrainOptions(
        arch="vit_tiny_patch16_224",
        data=str(data),
        output=str(tmp_path / "o"),
        batch_size=4,
        micro_batch=0,
        teacher="none",
    )
    with pytest.raises(OptionError, match=r"micro_batch 0: must be in 1\.\.4"):
        check_options(o)
    o.micro_batch = None
    assert check_options(o)["micro_batch"] == 4
