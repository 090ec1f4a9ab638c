"""Every model family through the commands: timm variants (fuse --arch, cait_wrap), SiT / LV-ViT / SPViT-DeiT
(convert), CAIT on LV-ViT; checked against timm's own forward or the independent upstream-format references in
caitdeploy/testing/upstream_sit.py and upstream_spvit.py (written from docs/formats/)."""

from __future__ import annotations

import json

import onnx
import pytest
import timm
import torch
from click.testing import CliRunner

from caitdeploy.cli.main import main
from caitdeploy.formats.fused import load_fused, load_model
from caitdeploy.testing.upstream_sit import (
    lvvit_forward,
    lvvit_spec,
    lvvit_state_dict,
    sit_forward,
    sit_spec,
    sit_state_dict,
)
from caitdeploy.testing.upstream_spvit import spvit_forward, spvit_state_dict

X = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def run(*args):
    res = CliRunner().invoke(main, [str(a) for a in args])
    return res


def timm_small(name, img=32, **kw):
    torch.manual_seed(0)
    m = timm.create_model(name, pretrained=False, num_classes=7, img_size=img, **kw).eval()
    with torch.no_grad():  # layer scale far from its 1e-5 init, so folding it is visible
        for n, p in m.named_parameters():
            if n.endswith("gamma") or n in ("cls_token", "reg_token", "dist_token", "pos_embed"):
                p.normal_(0, 0.5)
    return m


# timm name, extra create_model kwargs: layer scale, distillation, registers + GAP, patch 8/14/32, 384px, no qkv bias
VARIANTS = [
    ("deit_tiny_patch16_224", {}),
    ("deit3_small_patch16_224", {"depth": 2}),
    ("deit_small_distilled_patch16_224", {"depth": 2}),
    ("vit_base_patch16_reg4_gap_256", {"depth": 2, "embed_dim": 96, "num_heads": 3}),
    ("vit_small_patch8_224", {"depth": 2}),
    ("vit_small_patch14_dinov2", {"depth": 2, "img": 28}),
    ("vit_base_patch32_384", {"depth": 2, "img": 64, "embed_dim": 96, "num_heads": 3}),
    ("vit_small_patch16_224", {"depth": 2, "qkv_bias": False}),
]


@pytest.mark.parametrize("name,kw", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_timm_variant_fuses_to_timms_forward(tmp_path, name, kw):
    """cait_wrap (identity compactors, no merges) -> checkpoint -> fuse: the fused model computes timm's forward."""
    from caitdeploy.training.wrappers import cait_wrap, save_checkpoint

    kw = dict(kw)
    img = kw.pop("img", 32)
    vit = timm_small(name, img, **kw)
    x = torch.randn(2, 3, img, img, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = vit(x)
        assert (cait_wrap(vit).eval()(x) - want).abs().max() < 1e-5
    save_checkpoint(cait_wrap(vit), tmp_path / "c.pth")
    res = run("fuse", tmp_path / "c.pth", "-q", "--align", "1")
    assert res.exit_code == 0, res.stderr
    with torch.no_grad():
        got = load_model(tmp_path / "c.fused.safetensors")(x)
    assert (got - want).abs().max() < 1e-5


def test_fuse_arch_reads_a_plain_timm_state_dict(tmp_path):
    """{"model": timm_state_dict} of deit_tiny: heads (and eps, pooling) come from timm's definition."""
    vit = timm_small("deit_tiny_patch16_224")
    torch.save({"model": vit.state_dict()}, tmp_path / "t.pth")
    res = run("fuse", tmp_path / "t.pth", "-q")
    assert res.exit_code == 2 and "cannot infer num_heads" in res.stderr and "--arch" in res.stderr
    res = run("fuse", tmp_path / "t.pth", "-q", "--arch", "deit_small_patch16_224")
    assert res.exit_code == 2 and "does not match --arch deit_small_patch16_224" in res.stderr, res.stderr
    res = run("fuse", tmp_path / "t.pth", "-q", "--arch", "deit_tiny_patch16_224")
    assert res.exit_code == 0, res.stderr
    with torch.no_grad():
        assert (load_model(tmp_path / "t.fused.safetensors")(X) - vit(X)).abs().max() < 1e-5


@pytest.mark.slow
def test_distilled_deit_exports_with_timms_output(tmp_path):
    """Two prefix tokens, a merge that leaves both alone, the mean of both heads; ONNX = PyTorch."""
    res = run(
        "make-checkpoint",
        "--arch",
        "deit_small_distilled_patch16_224",
        "--img-size",
        "32",
        "--num-classes",
        "5",
        "--merges",
        "1:h",
        "--flops-reduction",
        "0.3",
        "-o",
        tmp_path / "d.pth",
    )
    assert res.exit_code == 0, res.stderr
    assert run("fuse", tmp_path / "d.pth", "-q").exit_code == 0
    cfg, _, _ = load_fused(tmp_path / "d.fused.safetensors")
    assert cfg.dist_token and cfg.num_prefix_tokens == 2 and cfg.tokens()[1] == 2 + 2
    res = run("export", tmp_path / "d.fused.safetensors", "-o", tmp_path / "d.onnx", "-q")
    assert res.exit_code == 0, res.stderr


def test_odd_grid_merge_is_refused_clearly(tmp_path):
    res = run(
        "make-checkpoint",
        "--arch",
        "vit_small_patch14_dinov2",
        "--img-size",
        "42",
        "--num-classes",
        "10",
        "--merges",
        "0:h",
        "--flops-reduction",
        "0.1",
        "-o",
        tmp_path / "o.pth",
    )
    assert res.exit_code == 2 and "odd grid width 3" in res.stderr and "even grid sides" in res.stderr
    assert not (tmp_path / "o.pth").exists()


SMALL_SIT = dict(img_size=64, embed_dim=48, num_heads=3, stage_blocks=(2, 1, 1, 1))


def _onnx_ops(path):
    return {n.op_type for n in onnx.load(str(path)).graph.node}


@pytest.mark.slow
def test_sit_converts_exports_and_matches_upstream(tmp_path):
    sd = sit_state_dict("s", num_classes=10, **SMALL_SIT)
    torch.save({"model": sd, "epoch": 1}, tmp_path / "sit.pth")
    res = run(
        "convert",
        tmp_path / "sit.pth",
        "--from",
        "sit",
        "--stages",
        "2,1,1,1",
        "--num-heads",
        "3",
        "--report",
        tmp_path / "r.json",
    )
    assert res.exit_code == 0, res.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["verify"]["max_abs_diff"] < 1e-5 and [b["slim"] for b in report["blocks"]] == [None, None, 8, 4, 2]
    x = torch.randn(2, 3, 64, 64)
    ref = sit_forward(sd, sit_spec("s", num_classes=10, **SMALL_SIT), x.double())
    with torch.no_grad():
        assert (load_model(tmp_path / "sit.fused.safetensors")(x).double() - ref).abs().max() < 1e-5
    res = run("export", tmp_path / "sit.fused.safetensors", "-o", tmp_path / "sit.onnx", "-q")
    assert res.exit_code == 0, res.stderr
    ops = _onnx_ops(tmp_path / "sit.onnx")
    assert "Cast" not in ops and {"Softmax", "MatMul"} <= ops  # TSM: MatMul/Softmax, no casts


def test_lvvit_teacher_converts(tmp_path):
    kw = dict(img_size=64, embed_dim=48, num_heads=3, depth=3)
    sd = lvvit_state_dict("s", num_classes=10, **kw)
    torch.save({"model": sd}, tmp_path / "lv.pth")
    res = run("convert", tmp_path / "lv.pth", "--from", "lvvit", "--num-heads", "3", "-q")
    assert res.exit_code == 0, res.stderr
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        got = load_model(tmp_path / "lv.fused.safetensors")(x).double()
    assert (got - lvvit_forward(sd, lvvit_spec("s", num_classes=10, **kw), x.double())).abs().max() < 1e-5


def test_spvit_converts_every_block_kind(tmp_path):
    sd = spvit_state_dict(
        ["attn", "conv1", "conv3", "skip"], [100, 37, 190, 64], embed_dim=48, num_heads=3, img_size=64, num_classes=10
    )
    torch.save({"model": sd}, tmp_path / "sp.pth")
    res = run("convert", tmp_path / "sp.pth", "--from", "spvit", "--align", "8", "-q")
    assert res.exit_code == 0, res.stderr
    cfg, _, _ = load_fused(tmp_path / "sp.fused.safetensors")
    assert [b.kind for b in cfg.blocks] == ["attn", "conv1", "conv3", "skip"]
    assert [b.mlp_hidden for b in cfg.blocks] == [104, 40, 192, 64]  # zero-padded exactly
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        got = load_model(tmp_path / "sp.fused.safetensors")(x).double()
    assert (got - spvit_forward(sd, x.double(), num_heads=3)).abs().max() < 1e-5
    assert cfg.unpruned().family == "spvit" or cfg.unpruned().blocks[0].kind == "attn"
    res = run("export", tmp_path / "sp.fused.safetensors", "-o", tmp_path / "sp.onnx", "-q")
    assert res.exit_code == 0, res.stderr
    assert "Conv" in _onnx_ops(tmp_path / "sp.onnx")


@pytest.mark.parametrize(
    "args,message",
    [
        (["--from", "spvit"], "is a SiT checkpoint (tsm.* keys), not --from spvit: use --from sit"),
        (["--from", "lvvit"], "is a SiT checkpoint (tsm.* keys), not --from lvvit: use --from sit"),
        (["--from", "sit"], "does not store where it slims tokens: give --variant"),
        (["--from", "sit", "--variant", "s"], "has embed_dim 48, depth 5, stem 4c, but --variant s is 384/16/4c"),
        (["--from", "sit", "--stages", "2,2,2"], "must be >= 1 each and sum to the checkpoint's depth 5"),
        (["--from", "sit", "--stages", "1,1,1,1,1", "--num-heads", "3"], "has 3 token slimming modules"),
        (["--from", "spvit", "--variant", "s"], "--variant SPViT's layout is read from its keys"),
    ],
)
def test_mislabelled_checkpoints_get_one_line(tmp_path, args, message):
    torch.save({"model": sit_state_dict("s", num_classes=10, **SMALL_SIT)}, tmp_path / "sit.pth")
    res = run("convert", tmp_path / "sit.pth", *args, "-q")
    assert res.exit_code == 2 and message in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "sit.fused.safetensors").exists()


def test_spvit_file_given_as_sit(tmp_path):
    sd = spvit_state_dict(["attn", "conv1"], [64, 32], embed_dim=48, num_heads=3, img_size=32, num_classes=4)
    torch.save({"model": sd}, tmp_path / "sp.pth")
    res = run("convert", tmp_path / "sp.pth", "--from", "sit", "--variant", "s", "-q")
    assert res.exit_code == 2 and "is an SPViT-DeiT checkpoint" in res.stderr and "use --from spvit" in res.stderr


@pytest.mark.slow
def test_cait_on_lvvit_fuses_and_benches(tmp_path):
    res = run(
        "make-checkpoint",
        "--arch",
        "lvvit_t",
        "--img-size",
        "64",
        "--num-classes",
        "5",
        "--merges",
        "2:h",
        "--flops-reduction",
        "0.45",
        "-o",
        tmp_path / "l.pth",
    )
    assert res.exit_code == 0, res.stderr
    res = run("fuse", tmp_path / "l.pth", "--report", tmp_path / "f.json", "-q")
    assert res.exit_code == 0, res.stderr
    rep = json.loads((tmp_path / "f.json").read_text())
    assert rep["verify"]["max_abs_diff"] < 1e-4 and rep["flops_reduction"] > 0.4
    cfg, _, _ = load_fused(tmp_path / "l.fused.safetensors")
    assert cfg.family == "lvvit" and cfg.stem == "4c" and cfg.unpruned().family == "lvvit"
    res = run(
        "bench",
        tmp_path / "l.fused.safetensors",
        "--batch",
        "2",
        "--backends",
        "torch",
        "--baselines",
        "dense,tome",
        "--warmup",
        "1",
        "--min-iters",
        "1",
        "--min-seconds",
        "0",
        "--repeats",
        "1",
        "--json",
        tmp_path / "b.json",
        "-q",
    )
    assert res.exit_code == 0, res.stderr
    rows = json.loads((tmp_path / "b.json").read_text())
    assert {r["status"] for r in rows} == {"ok"} and len(rows) == 3
