"""Dense prediction: any input size (position embedding resampled as timm does), full-grid feature maps in
PyTorch and ONNX, the feature benchmark with ToMe unmerged, and hostile sizes/blocks refused in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from caitdeploy.cli.main import main
from caitdeploy.compress.fuse import FuseOptions, fuse_file
from caitdeploy.families.layers import restore_grid
from caitdeploy.families.vit.config import CaitConfig, ConfigError
from caitdeploy.families.vit.reference import reference_forward
from caitdeploy.families.vit.resize import at_size, resample_pos_embed
from caitdeploy.formats.checkpoint import load_checkpoint
from caitdeploy.formats.fused import load_model
from caitdeploy.testing.checkpoints import random_checkpoint

MERGES = {1: "h", 2: "v"}


@pytest.fixture(scope="module")
def fused224(tmp_path_factory):
    """A random CAIT checkpoint at 224 px, patch 16 (grid 14x14 -> 14x7 -> 7x7), and its fused file."""
    d = tmp_path_factory.mktemp("dense")
    ckpt = d / "c.pth"
    torch.save(random_checkpoint(img_size=224, patch_size=16, merges=MERGES, depth=4), ckpt)
    fused = d / "c.fused.safetensors"
    fuse_file(ckpt, fused, FuseOptions())
    return ckpt, fused


# ---- position embedding ------------------------------------------------------------------------
@pytest.mark.parametrize("prefix", [0, 1, 2])
@pytest.mark.parametrize("new", [(20, 20), (6, 6), (8, 16), (5, 9)])
def test_resample_equals_timm(prefix, new):
    from timm.layers import resample_abs_pos_embed

    pos = torch.randn(1, prefix + 14 * 14, 24, generator=torch.Generator().manual_seed(1))
    ours = resample_pos_embed(pos, (14, 14), new, prefix)
    theirs = resample_abs_pos_embed(pos, list(new), [14, 14], num_prefix_tokens=prefix)
    assert ours.shape == theirs.shape == (1, prefix + new[0] * new[1], 24)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert torch.equal(ours[:, :prefix], pos[:, :prefix])  # prefix tokens untouched


def test_plain_vit_at_another_size_equals_timm(tmp_path):
    """A timm ViT -> cait_wrap (no merges) -> fuse -> run at 96x160: the logits of timm's own model built at
    96x160 from the same weights through its checkpoint filter (which resamples pos_embed)."""
    from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

    from caitdeploy.training.wrappers import cait_wrap, save_checkpoint

    torch.manual_seed(0)
    kw = dict(patch_size=16, num_classes=7, embed_dim=48, depth=2, num_heads=3)
    vit = VisionTransformer(img_size=64, **kw).eval()
    with torch.no_grad():
        vit.pos_embed.normal_()
    save_checkpoint(cait_wrap(vit), tmp_path / "c.pth")
    fused = tmp_path / "c.fused.safetensors"
    fuse_file(tmp_path / "c.pth", fused, FuseOptions())
    ours = load_model(fused, img_size="96x160")
    big = VisionTransformer(img_size=(96, 160), **kw).eval()
    big.load_state_dict(checkpoint_filter_fn(vit.state_dict(), big))
    x = torch.randn(2, 3, 96, 160)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), big(x), rtol=0, atol=1e-5)


# ---- features -------------------------------------------------------------------------------------
def test_restore_repeat_is_the_inverse_of_the_grouping():
    """Patch (r, c) of the 4x8 grid, merged h then v (4x8 -> 4x4 -> 2x4): it lives in token (r // 2, c // 2)."""
    tokens = torch.arange(2 * 4, dtype=torch.float64).reshape(1, 8, 1)  # token id as its value
    fmap = restore_grid(tokens, (2, 4), (4, 8))
    want = torch.tensor([[(r // 2) * 4 + c // 2 for c in range(8)] for r in range(4)], dtype=torch.float64)
    assert torch.equal(fmap[0, 0], want)


@pytest.mark.parametrize("size", [224, 512, "320x512"])
@pytest.mark.parametrize("restore", ["repeat", "bilinear"])
def test_fused_features_equal_the_checkpoint_reference(fused224, size, restore):
    ckpt_path, fused = fused224
    ckpt = load_checkpoint(ckpt_path)
    model = load_model(fused, img_size=size).double()
    cfg = model.config
    h, w = cfg.image_hw
    x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with torch.no_grad():
        ours = model.forward_features(x, [0, 1, 3], restore=restore)
    ref = reference_forward(ckpt, x, features=[0, 1, 3], restore=restore)
    for got, want in zip(ours, ref):
        assert got.shape == want.shape == (2, 48, h // 16, w // 16)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    # logits at the new size too (the head after the resampled trunk)
    torch.testing.assert_close(model(x), reference_forward(ckpt, x), rtol=0, atol=1e-5)


def test_repeat_copies_merged_tokens(fused224):
    """After the v merge at block 2 every 2x2 patch block carries one token; before any merge nothing repeats."""
    _, fused = fused224
    model = load_model(fused, img_size=512)
    with torch.no_grad():
        f0, f3 = model.forward_features(torch.randn(1, 3, 512, 512), "0,3")
    blocks = f3[0].reshape(48, 16, 2, 16, 2)
    assert torch.equal(blocks, blocks[:, :, :1, :, :1].expand_as(blocks))
    assert not torch.equal(f0[0, :, 0, 0], f0[0, :, 0, 1])


def test_feature_blocks_validation():
    c = CaitConfig.dense(img_size=64, patch_size=8, embed_dim=32, depth=4, num_heads=2, merges=MERGES)
    assert c.feature_blocks("3,1,-1") == (1, 3)
    for bad, msg in [("9", "outside 0..3"), ("a", "block indices"), ([], "at least one"), ([True], "not an integer")]:
        with pytest.raises(ConfigError, match=msg):
            c.feature_blocks(bad)


def test_odd_grids_and_bad_sizes_are_refused(fused224):
    _, fused = fused224
    model = load_model(fused)
    with pytest.raises(ConfigError, match=r"img_size 240: block 1: horizontal merge on an odd grid width 15"):
        at_size(model, 240)
    with pytest.raises(ConfigError, match="vertical merge on an odd grid height 7"):
        model.config.at_size("112x224")
    for bad in ("abc", "0", "512x", "1x2x3", "99999"):
        with pytest.raises(ConfigError, match="img_size"):
            model.config.at_size(bad)


# ---- ONNX ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("restore", ["repeat", "bilinear"])
@pytest.mark.slow
def test_onnx_features_equal_pytorch_at_batch_1_and_3(fused224, tmp_path, restore):
    import onnx
    import onnxruntime as ort

    _, fused = fused224
    out = tmp_path / "f.onnx"
    r = CliRunner().invoke(
        main,
        [
            "export",
            str(fused),
            "--img-size",
            "256x320",
            "--features",
            "3,1",
            "--restore",
            restore,
            "-o",
            str(out),
            "--report",
            str(tmp_path / "r.json"),
            "-q",
        ],
    )
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "r.json").read_text())["onnx"]
    assert [o["name"] for o in rep["outputs"]] == ["feat1", "feat3"]
    assert all(o["shape"] == ["batch", 48, 16, 20] for o in rep["outputs"])
    assert rep["verify"]["passed"] and set(rep["verify"]["outputs"]) == {"feat1", "feat3"}
    m = onnx.load(out)
    ops = {n.op_type for n in m.graph.node}
    assert not ops & {
        "Gather",
        "GatherElements",
        "GatherND",
        "ScatterND",
        "ScatterElements",
        "TopK",
        "NonZero",
        "Where",
        "If",
        "Loop",
    }
    assert ("Resize" in ops) == (restore == "bilinear")
    meta = {p.key: p.value for p in m.metadata_props}
    assert meta["caitdeploy.features"] == "1,3" and meta["caitdeploy.restore"] == restore
    model = load_model(fused, img_size="256x320")
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for b in (1, 3):
        x = torch.randn(b, 3, 256, 320, generator=torch.Generator().manual_seed(b))
        got = sess.run(None, {"images": x.numpy()})
        with torch.no_grad():
            want = model.forward_features(x, [1, 3], restore=restore)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w.numpy(), rtol=0, atol=1e-4)


def test_export_refuses_bad_feature_options_in_one_line(fused224, tmp_path):
    _, fused = fused224
    out = tmp_path / "x.onnx"
    for args, msg in [
        (["--img-size", "240"], "odd grid width 15"),
        (["--img-size", "abc"], "--img-size 'abc'"),
        (["--features", "7"], "--features block 7 is outside 0..3"),
        (["--features", "1", "--restore", "nearest"], "--restore 'nearest'"),
        (["--restore", "bilinear"], "add --features"),
        (["--features", "1", "--triton-repo", str(tmp_path / "repo")], "--triton-repo serves classifiers"),
    ]:
        r = CliRunner().invoke(main, ["export", str(fused), "-o", str(out), *args])
        assert r.exit_code == 2, (args, r.output)
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and msg in lines[0], (args, r.stderr)
        assert not out.exists() and not (tmp_path / "repo").exists()


def test_export_default_name_says_size_and_features(fused224, tmp_path):
    from caitdeploy.cli.export import default_onnx_path

    assert default_onnx_path("a/m.fused.safetensors", "fp16", "512", "3,5").name == "m.512.feat3-5.fp16.onnx"
    assert default_onnx_path("m.fused.safetensors", "fp32").name == "m.onnx"


# ---- bench ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_bench_features_cait_dense_tome_same_maps(tmp_path):
    """CAIT, dense and ToMe (unmerged) all give feat1/feat3 at 128x192 on ort and torch; ToMe is FLOPs-matched
    on the encoder."""
    ckpt = tmp_path / "c.pth"
    torch.save(random_checkpoint(img_size=64, patch_size=16, merges={1: "h"}, depth=4, keep=0.95), ckpt)
    fused = tmp_path / "c.fused.safetensors"
    fuse_file(ckpt, fused, FuseOptions())
    js = tmp_path / "b.json"
    r = CliRunner().invoke(
        main,
        [
            "bench",
            str(fused),
            "--img-size",
            "128x192",
            "--features",
            "1,3",
            "--batch",
            "2",
            "--backends",
            "torch,ort",
            "--warmup",
            "0",
            "--min-iters",
            "1",
            "--min-seconds",
            "0",
            "--repeats",
            "1",
            "--json",
            str(js),
            "-q",
        ],
    )
    assert r.exit_code == 0, r.output
    recs = json.loads(js.read_text())
    assert sorted((x["model"], x["backend"]) for x in recs) == sorted(
        (m, b) for m in ("cait", "dense", "tome") for b in ("torch", "ort")
    )
    for x in recs:
        assert x["status"] == "ok", x["status"]
        assert x["input"] == "3x128x192" and x["outputs"] == "feat1,feat3"
    f = {x["model"]: x["flops_per_img"] for x in recs}
    assert abs(f["tome"] / f["cait"] - 1) <= 0.02 and f["cait"] < f["dense"]


def test_tome_features_unmerge_to_the_full_grid():
    from caitdeploy.baselines.tome import tome_model

    c = CaitConfig.dense(img_size=64, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=5)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        # r = 0: exactly the dense model's maps
        t0 = tome_model(c, 0)
        for a, b in zip(t0.forward_features(x, [0, 2]), t0.vit.forward_features(x, [0, 2])):
            assert torch.equal(a, b)
        # r = 5 per block: 3 merges leave 65 - 15 tokens, 49 of them patches (the class token is never merged)
        (fmap,) = tome_model(c, 5).forward_features(x, [2])
    assert fmap.shape == (2, 32, 8, 8)
    assert torch.unique(fmap[0].flatten(1).T, dim=0).shape[0] == 64 - 15


def test_other_families_at_another_size():
    """LV-ViT's conv stem, SPViT's convolution blocks and SiT's token slimming are resolution-free; features after
    a slimming are refused (the tokens are no longer a grid)."""
    from dataclasses import replace

    from caitdeploy.families.vit.model import CaitViT

    base = CaitConfig.dense(img_size=64, patch_size=16, embed_dim=32, depth=3, num_heads=2, num_classes=5)
    lv = replace(
        CaitConfig.dense(
            img_size=64, patch_size=16, embed_dim=32, depth=3, num_heads=2, num_classes=5, family="lvvit", stem="4c"
        ),
    )
    sp = replace(
        base,
        family="spvit",
        blocks=(replace(base.blocks[0], kind="conv3"), replace(base.blocks[1], kind="skip"), base.blocks[2]),
    )
    sit = replace(lv, blocks=(lv.blocks[0], replace(lv.blocks[1], slim=6), lv.blocks[2]))
    x = torch.randn(2, 3, 96, 128)
    for cfg in (lv, sp, sit):
        torch.manual_seed(0)
        model = at_size(CaitViT(cfg).eval(), "96x128")
        assert model.config.grid == (6, 8)
        with torch.no_grad():
            assert model(x).shape == (2, 5)
            maps = model.forward_features(x, [0])
        assert maps[0].shape == (2, 32, 6, 8)
    with pytest.raises(ConfigError, match="block 1 comes after token slimming"):
        sit.feature_blocks([1])
    with pytest.raises(ConfigError, match="^img_size 96x120: image width 120 is not a multiple of patch_size 16$"):
        lv.at_size("96x120")
