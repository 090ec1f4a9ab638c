"""`caitdeploy train`: one process and torchrun (2 ranks, gloo) on a small ImageFolder written here; masks equal
on every rank, the result fuses strictly, --resume is bit-exact, --merges auto, bad input gets one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from caitdeploy.cli.main import main
from caitdeploy.compress.fuse import FuseOptions, fuse_file
from caitdeploy.core.errors import CaitError
from caitdeploy.families.timm_compat import arch_config
from caitdeploy.families.vit.family import auto_merges, merge_reduction
from caitdeploy.testing.files import write_shapes
from caitdeploy.training.loop import lr_at

MODEL = [
    "--arch",
    "vit_tiny_patch16_224",
    "--model-args",
    "patch_size=8,depth=4,embed_dim=48,num_heads=3",
    "--img-size",
    "32",
]
FAST = [
    "--epochs",
    "3",
    "--batch-size",
    "8",
    "--micro-batch",
    "4",
    "--prune-start-epoch",
    "1",
    "--step-ratio",
    "0.05",
    "--every",
    "1",
    "--flops-reduction",
    "0.5",
    "--workers",
    "0",
    "--lr",
    "1e-3",
    "--warmup-epochs",
    "1",
    "-q",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = write_shapes(tmp_path_factory.mktemp("shapes"))
    # a dense teacher for these 3 classes (random weights: the mechanics, not the accuracy, are under test)
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(1)
    t = timm.create_model(
        "vit_tiny_patch16_224", patch_size=8, depth=4, embed_dim=48, num_heads=3, img_size=32, num_classes=3
    )
    save_file({k: v.contiguous() for k, v in t.state_dict().items()}, str(d / "teacher.safetensors"))
    return d


def run(*args):
    args = list(args)
    if "--teacher" not in args:  # random init has no dense teacher worth the name: distil from the file
        data = args[args.index("--data") + 1]
        args += ["--teacher", os.path.join(data, "teacher.safetensors")]
    return CliRunner().invoke(main, ["train", *args])


def records(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_auto_merges_rule():
    fmt = arch_config("deit_small_patch16_224")
    merges, info = auto_merges(fmt, 0.55)
    assert merges == {4: "h", 8: "v"} and info["uniform"] == {4: "h", 8: "v"}  # uniform thirds, kept
    assert abs(info["token_reduction"] - merge_reduction(fmt, merges)) < 1e-12
    assert info["token_reduction"] + info["channel_reduction"] == pytest.approx(0.55)
    # a bigger token budget moves the merges earlier; the merges never exceed the total
    m2, i2 = auto_merges(fmt, 0.6, token_reduction=0.55)
    assert min(m2) < 4 and abs(i2["token_reduction"] - 0.55) < 0.01 and i2["token_reduction"] <= 0.6
    with pytest.raises(CaitError, match="token_reduction"):
        auto_merges(fmt, 0.3, token_reduction=0.5)


def test_lr_schedule():
    assert lr_at(0, 100, 10, 1.0, 0.0) == pytest.approx(0.1)
    assert lr_at(9, 100, 10, 1.0, 0.0) == pytest.approx(1.0)
    assert lr_at(10, 100, 10, 1.0, 0.0) == pytest.approx(1.0)
    assert lr_at(100, 100, 10, 1.0, 0.01) == pytest.approx(0.01)
    assert lr_at(55, 100, 10, 1.0, 0.0) == pytest.approx(0.5)


def test_one_process_run_fuses_strictly_and_resume_is_bit_exact(data, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    r = run(*MODEL, "--data", str(data), "-o", str(a), *FAST)
    assert r.exit_code == 0, r.output
    assert "merges 1:h,3:v (auto)" in r.output and "masks identical on 1 rank(s)" in r.output
    recs = records(a)
    epochs = [x for x in recs if "epoch" in x]
    assert [x["epoch"] for x in epochs] == [1, 2, 3] and epochs[0]["val_images"] == 12
    assert not epochs[0]["pruning"] and epochs[1]["pruning"] and epochs[-1]["target_reached"]
    assert recs[-1]["final"]["flops_reduction"] >= 0.5
    # the final file is a cait-compactor/1 checkpoint that fuses with strict consistency
    rep = fuse_file(
        a / "cait-compactor.safetensors",
        tmp_path / "a.fused.safetensors",
        FuseOptions(consistency="strict", align=1),
        verify_batch=2,
    )
    assert rep["flops_reduction"] >= 0.5 and rep["verify"]["max_abs_diff"] < 1e-4

    # stopped after one epoch and resumed: the same weights, bit for bit
    r = run(*MODEL, "--data", str(data), "-o", str(b), *FAST, "--stop-after-epochs", "1")
    assert r.exit_code == 0 and "continue with --resume" in r.output and not (b / "cait-compactor.safetensors").exists()
    r = run(*MODEL, "--data", str(data), "-o", str(b), *FAST, "--resume")
    assert r.exit_code == 0, r.output
    ta, tb = load_file(a / "cait-compactor.safetensors"), load_file(b / "cait-compactor.safetensors")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert [x["train_loss"] for x in records(b) if "epoch" in x] == [x["train_loss"] for x in epochs]

    # a finished run is not overwritten; a resume must keep the options
    r = run(*MODEL, "--data", str(data), "-o", str(a), *FAST)
    assert r.exit_code == 2 and "holds a previous run" in r.output
    r = run(*MODEL, "--data", str(data), "-o", str(b), *FAST[:-1], "--lr", "2e-3", "-q", "--resume")
    assert r.exit_code == 2 and "--lr" in r.output and "differs from the run being resumed" in r.output


@pytest.mark.slow
def test_torchrun_two_ranks_same_masks(data, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "caitdeploy.cli.main",
        "train",
        *MODEL,
        "--data",
        str(data),
        "-o",
        str(out),
        *FAST,
        "--teacher",
        str(data / "teacher.safetensors"),
    ]
    cmd[cmd.index("--micro-batch") + 1] = "2"  # 8 = 2 per rank x 2 ranks x 2 accumulation steps
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "2 process(es) (gloo), global batch 8 = micro 2 x 2 x 2 accumulation" in res.stdout
    recs = records(out)
    epochs = [x for x in recs if "epoch" in x]
    assert len(epochs) == 3 and all(len(x["mask_digests"]) == 2 and len(set(x["mask_digests"])) == 1 for x in epochs)
    assert epochs[-1]["mask_updates"] > 0 and recs[-1]["final"]["world"] == 2
    assert epochs[0]["images"] == 24 and epochs[0]["val_images"] == 12  # every image once over both ranks
    fuse_file(
        out / "cait-compactor.safetensors",
        tmp_path / "ddp.fused.safetensors",
        FuseOptions(consistency="strict", align=1),
        verify_batch=2,
    )


@pytest.mark.parametrize(
    "change,needle",
    [
        (lambda d: (d / "train" / "circle" / "x.txt").write_text("x"), None),  # stray non-images are ignored
        (lambda d: (d / "train" / "empty").mkdir(), "class folder without images"),
        (
            lambda d: (
                (d / "val" / "other").mkdir()
                or (d / "val" / "other" / "0.png").write_bytes((d / "val" / "circle" / "0.png").read_bytes())
            ),
            "class folders differ",
        ),
    ],
)
def test_bad_data_one_line(tmp_path, change, needle):
    d = write_shapes(tmp_path / "d", n_train=2, n_val=1)
    change(d)
    r = run(
        *MODEL,
        "--data",
        str(d),
        "-o",
        str(tmp_path / "o"),
        *FAST,
        "--micro-batch",
        "2",
        "--batch-size",
        "2",
        "--epochs",
        "2",
        "--stop-after-epochs",
        "1",
        "--teacher",
        "none",
    )
    if needle is None:
        assert r.exit_code == 0, r.output
        return
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and needle in lines[0], r.output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--data", "nowhere", "--teacher", "none"], "nowhere/train: no such folder"),
        (["--micro-batch", "3", "--batch-size", "6"], "must be even"),
        (["--batch-size", "6"], "not a multiple of --micro-batch 4"),
        (["--prune-start-epoch", "3"], "or CDCP never prunes"),
        (["--model-args", "depth"], "--model-args 'depth': expected KEY=VALUE"),
        (["--merges", "1:x"], "--merges"),
        (["--amp", "fp8"], "--amp 'fp8'"),
        (["--teacher", "missing.pth"], "--teacher missing.pth: no such file"),
        (["--resume"], "no training state to resume from"),
        (["--flops-reduction", "1.5"], "--flops-reduction 1.5"),
        (["--arch", "resnet18"], "--arch"),
        (["--teacher", "dense"], "without --weights that is a random one"),
    ],
)
def test_bad_options_one_line(data, tmp_path, args, needle):
    argv = [*MODEL, "--data", str(data), "-o", str(tmp_path / "o"), *FAST]
    for flag, value in zip(args[::2], args[1::2]):
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    if args == ["--resume"]:
        argv.append("--resume")
    r = run(*argv)
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], r.output
    assert not (tmp_path / "o" / "last.pt").exists()


# ---- Swin (issue 15's left-out: the train CLI for a timm Swin) ------------------------------------------
SWIN = [
    "--arch",
    "swin_tiny_patch4_window7_224",
    "--model-args",
    "embed_dim=16,depths=[2,4],num_heads=[1,2],window_size=4,drop_path_rate=0.1",
    "--img-size",
    "32",
]
SWIN_FAST = [a for a in FAST if a not in ("--flops-reduction", "0.5")]  # the Swin default, 0.354


@pytest.fixture(scope="module")
def swin_weights(data):
    """A dense timm Swin for the shapes' 3 classes, saved in Microsoft's layout (what --weights also reads)."""
    from safetensors.torch import save_file

    from caitdeploy.families.swin.family import timm_model as swin_timm_model
    from caitdeploy.testing.upstream_swin import to_microsoft

    torch.manual_seed(2)
    m = swin_timm_model(
        "swin_tiny_patch4_window7_224", 3, 32, dict(embed_dim=16, depths=(2, 4), num_heads=(1, 2), window_size=4)
    )
    path = data / "swin_dense_ms.safetensors"
    save_file({k: v.contiguous() for k, v in to_microsoft(m.state_dict()).items()}, str(path))
    return path


def test_swin_run_fuses_strictly_and_resume_is_bit_exact(data, swin_weights, tmp_path):
    """`train --arch swin_*`: the paper's Swin merges and target by default, a dense teacher from Microsoft-layout
    weights, a checkpoint that fuses strictly at the target, and a bit-exact --resume."""
    a, b = tmp_path / "a", tmp_path / "b"
    args = [*SWIN, "--data", str(data), "--weights", str(swin_weights), "--teacher", "dense", *SWIN_FAST]
    r = run(*args, "-o", str(a))
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert "merges 1.2:h,1.3:v (auto)" in text and "total 35.40%" in text and "distillation alpha 0.25 (dense)" in text
    recs = records(a)
    assert recs[-1]["final"]["flops_reduction"] >= 0.354 and recs[-1]["final"]["merges"] == "1.2:h,1.3:v"
    with open(a / "cait-compactor.safetensors", "rb") as f:  # the config travels in the safetensors header
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))["__metadata__"]
    cfg = json.loads(header["config"])
    assert cfg["family"] == "swin" and cfg["arch"] == "swin_tiny_patch4_window7_224" and cfg["depths"] == [2, 4]
    rep = fuse_file(
        a / "cait-compactor.safetensors",
        tmp_path / "a.fused.safetensors",
        FuseOptions(consistency="strict", align=1),
        verify_batch=2,
    )
    assert rep["flops_reduction"] == pytest.approx(recs[-1]["final"]["flops_reduction"], abs=1e-9)
    assert rep["verify"]["max_abs_diff"] < 1e-4

    r = run(*args, "-o", str(b), "--stop-after-epochs", "1")
    assert r.exit_code == 0, r.output
    r = run(*args, "-o", str(b), "--resume")
    assert r.exit_code == 0, r.output
    ta, tb = load_file(a / "cait-compactor.safetensors"), load_file(b / "cait-compactor.safetensors")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert "layers.1.blocks.2.htm.fc.weight" in ta and "layers.1.blocks.3.attn.q_compactor.mask" in ta


def test_swin_wrapper_keeps_timm_stochastic_depth():
    """drop_path_rate reaches the CAIT-Swin training model block by block (timm's linear rule), acts in training
    (samples differ from the eval output) and never in eval."""
    from caitdeploy.families.swin.family import timm_model as swin_timm_model
    from caitdeploy.training.wrappers import cait_wrap

    m = swin_timm_model(
        "swin_tiny_patch4_window7_224",
        3,
        32,
        dict(embed_dim=16, depths=(2, 4), num_heads=(1, 2), window_size=4, drop_path_rate=0.3),
    )
    w = cait_wrap(m, {(1, 2): "h"}, "swin_tiny_patch4_window7_224")
    rates = [blk.drop_prob for st in w.model.layers for blk in st.blocks]
    assert rates[0] == 0 and rates[-1] == pytest.approx(0.3) and rates == sorted(rates)
    assert w.format_config["arch"] == "swin_tiny_patch4_window7_224"
    x = torch.randn(8, 3, 32, 32)
    w.eval()
    with torch.no_grad():
        e1, e2 = w(x), w(x)
        assert torch.equal(e1, e2)
        w.train()
        torch.manual_seed(0)
        t = w(x)
    assert not torch.allclose(t, e1)


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--token-reduction", "0.1"], "--token-reduction is for a ViT's --merges auto"),
        (["--merges", "3.0:h"], "--merges"),
        (["--merges", "1.2:h,1.3:v", "--flops-reduction", "0.1"], "the merges alone cut FLOPs by"),
        (["--model-args", "depths=[2,4"], "unbalanced [ ]"),
        (["--model-args", "depths=[2,,4]"], "an empty list entry"),
        (["--model-args", "depths=[a,b]"], "--model-args depths=[a,b]: must be an integer (or a list of integers)"),
        # timm >= 1.0.31 refuses the unknown `foo` first; 1.0.22 (the floor leg) swallows it in **kwargs, and the
        # width check names the stage: either is the one-line refusal
        (
            ["--model-args", "embed_dim=16,depths=[2,4],foo=2"],
            (
                "--arch swin_tiny_patch4_window7_224: timm cannot build it",
                "stage 0: width 16 is not divisible by num_heads 3",
            ),
        ),
    ],
)
def test_swin_bad_options_one_line(data, tmp_path, args, needle):
    argv = [*SWIN, "--data", str(data), "-o", str(tmp_path / "o"), *SWIN_FAST, "--teacher", "none"]
    for flag, value in zip(args[::2], args[1::2]):
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    r = run(*argv)
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    needles = needle if isinstance(needle, tuple) else (needle,)
    assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error:"), r.output
    assert any(n in lines[0] for n in needles), r.output
    assert not (tmp_path / "o").exists()


def test_model_args_lists():
    from caitdeploy.cli.train import _model_args

    assert _model_args("depths=[2,2,6,2],num_heads=[3, 6],drop_path_rate=0.2,qkv_bias=false,act=gelu") == {
        "depths": (2, 2, 6, 2),
        "num_heads": (3, 6),
        "drop_path_rate": 0.2,
        "qkv_bias": False,
        "act": "gelu",
    }
