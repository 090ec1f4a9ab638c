"""Fused model vs the checkpoint's own forward pass, for every selection/consistency/alignment option."""

from __future__ import annotations

import pytest
import torch

from caitdeploy import load_model
from caitdeploy.compress.cdcp import make_checkpoint, save_checkpoint_dict
from caitdeploy.compress.fuse import FuseOptions, fuse, fuse_file, max_logit_diff
from caitdeploy.core.errors import CaitError
from caitdeploy.families.vit.model import CaitViT
from caitdeploy.families.vit.reference import reference_forward
from caitdeploy.formats.checkpoint import load_checkpoint
from caitdeploy.testing.checkpoints import random_checkpoint

DEIT = {  # the option matrix runs on a small ViT; one full-size DeiT-Small case checks real shapes
    "small-vit": dict(embed_dim=96, num_heads=3, depth=4, mlp_ratio=4.0, img_size=64, patch_size=16, num_classes=100),
    "small": dict(embed_dim=384, num_heads=6, depth=12, mlp_ratio=4.0, img_size=224, patch_size=16, num_classes=1000),
}
MERGES = {"small-vit": {1: "h", 2: "v"}, "small": {4: "h", 8: "v"}}
OPTIONS = {
    "strict-align1": FuseOptions(align=1),
    "strict-align8": FuseOptions(align=8),
    "repair-align8": FuseOptions(consistency="repair", align=8),
    "strict-align16-equal": FuseOptions(align=16, equal_head_dims=True),
    "threshold": FuseOptions(threshold=1e-6, align=8),
}


def _close(ckpt, model, rel=1e-5):
    v = max_logit_diff(ckpt, model)
    return v["max_abs_diff"] <= rel * max(1.0, v["logit_scale"])


def _fused_model(ckpt, opts):
    res = fuse(ckpt, opts)
    model = CaitViT(res.config, attn_impl="math").eval()
    model.load_state_dict(res.state_dict)
    return res, model


@pytest.fixture(scope="module")
def deit_ckpts(tmp_path_factory):
    """(arch, merged) -> checkpoint, each made on first use (a full-size one takes seconds)."""

    class Lazy(dict):
        def __missing__(self, key):
            arch, merged = key
            merges = MERGES[arch] if merged else {}
            path = tmp_path_factory.mktemp("ck") / f"{arch}-{len(merges)}.pth"
            torch.save(random_checkpoint(**DEIT[arch], merges=merges, keep=0.55, seed=1), path)
            self[key] = load_checkpoint(path)
            return self[key]

    return Lazy()


MATRIX = [("small-vit", merged, opt) for merged in (False, True) for opt in OPTIONS] + [
    ("small", True, "strict-align8")
]


@pytest.mark.parametrize(
    "arch, merged, opt", MATRIX, ids=[f"{a}-{'merge' if m else 'no-merge'}-{o}" for a, m, o in MATRIX]
)
def test_fused_equals_checkpoint_deit(deit_ckpts, arch, merged, opt):
    ckpt = deit_ckpts[arch, merged]
    res, model = _fused_model(ckpt, OPTIONS[opt])
    v = max_logit_diff(ckpt, model, batch=2)
    assert v["logit_scale"] > 1.0  # real logits, not a vanishing signal
    assert v["max_abs_diff"] <= 1e-4, v
    assert v["top1_agree"] == 1.0
    align = OPTIONS[opt].align
    for b in res.config.blocks:
        assert b.qk_dim % align == 0 and b.v_dim % align == 0 and b.mlp_hidden % align == 0
        if OPTIONS[opt].equal_head_dims:
            assert b.qk_dim == b.v_dim
        assert b.attn_scale == pytest.approx((DEIT[arch]["embed_dim"] // DEIT[arch]["num_heads"]) ** -0.5)
    assert res.config.merges == (MERGES[arch] if merged else {})


def test_fused_is_physically_smaller(deit_ckpts):
    ckpt = deit_ckpts["small", True]
    res, _ = _fused_model(ckpt, FuseOptions(align=1))
    d = 64
    kept = int(ckpt.state_dict["blocks.0.attn.q_compactor.mask"][0].sum())
    kept_v = int(ckpt.state_dict["blocks.0.attn.v_compactor.mask"][0].sum())
    kept_f = int(ckpt.state_dict["blocks.0.mlp.fc1_compactor.mask"].sum())
    assert res.state_dict["blocks.0.attn.qkv.weight"].shape == (6 * (2 * kept + kept_v), 384)
    assert res.state_dict["blocks.0.attn.proj.weight"].shape == (384, 6 * kept_v)
    assert res.state_dict["blocks.0.mlp.fc1.weight"].shape == (kept_f, 384)
    assert res.state_dict["blocks.0.mlp.fc2.weight"].shape == (384, kept_f)
    assert kept < d and "blocks.4.merge.fc.weight" in res.state_dict


def test_small_fused_equals_reference_with_bias_off_and_pad_beyond_width(tmp_path):
    # head width 20 with --align 16: a head keeping > 16 channels must be zero-padded past 20
    ck = random_checkpoint(embed_dim=80, num_heads=4, depth=2, keep=0.95, qkv_bias=False, merges={1: "v"})
    path = tmp_path / "c.pth"
    torch.save(ck, path)
    ckpt = load_checkpoint(path)
    res, model = _fused_model(ckpt, FuseOptions(align=16))
    assert res.config.blocks[0].qk_dim == 32 and res.config.blocks[0].qk_dim > 20
    assert "blocks.0.attn.qkv.bias" not in res.state_dict
    assert _close(ckpt, model)


def test_near_zero_dropped_rows_give_small_reported_difference(tmp_path):
    ck = random_checkpoint(embed_dim=96, num_heads=3, depth=4, merges={2: "h"}, dropped_scale=1e-4, seed=3)
    path = tmp_path / "near.pth"
    torch.save(ck, path)
    report = fuse_file(path, tmp_path / "near.fused.safetensors", FuseOptions(align=1))
    diff = report["verify"]["max_abs_diff"]
    assert 1e-7 < diff < 1e-2  # not exact, but small
    assert 1e-5 < report["max_dropped_norm"] < 1e-3
    exact = random_checkpoint(embed_dim=96, num_heads=3, depth=4, merges={2: "h"}, dropped_scale=0.0, seed=3)
    torch.save(exact, tmp_path / "exact.pth")
    r0 = fuse_file(tmp_path / "exact.pth", tmp_path / "exact.fused.safetensors", FuseOptions(align=1))
    assert r0["verify"]["max_abs_diff"] < diff / 10
    assert r0["max_dropped_norm"] == 0.0


def test_large_dropped_rows_refused_unless_forced(tmp_path):
    torch.save(random_checkpoint(dropped_scale=0.5), tmp_path / "big.pth")
    out = tmp_path / "big.fused.safetensors"
    with pytest.raises(
        CaitError, match=r"block 0: a dropped compactor row has norm .* max_dropped_norm \(--max-dropped-norm\)"
    ):
        fuse_file(tmp_path / "big.pth", out)
    assert not out.exists()
    report = fuse_file(tmp_path / "big.pth", out, FuseOptions(force=True))
    assert out.exists() and report["max_dropped_norm"] > 0.1


def test_strict_rejects_inconsistent_masks_and_repair_fixes_them(tmp_path):
    torch.save(random_checkpoint(qk_differs=True), tmp_path / "qk.pth")
    ckpt = load_checkpoint(tmp_path / "qk.pth")
    with pytest.raises(CaitError, match=r"block 0 head 0: q keeps \d+ channels and k keeps \d+.*attention-level"):
        fuse(ckpt, FuseOptions())
    res, model = _fused_model(ckpt, FuseOptions(consistency="repair", align=1))
    assert any(r.part == "qk" and r.head == 0 and "union" in r.reason for p in res.plans for r in p.repairs)
    assert _close(ckpt, model)

    torch.save(random_checkpoint(unequal_heads=True), tmp_path / "heads.pth")
    ckpt = load_checkpoint(tmp_path / "heads.pth")
    with pytest.raises(CaitError, match=r"block 0 head 1: keeps \d+ q/k channels but head 0 keeps \d+.*head-level"):
        fuse(ckpt, FuseOptions())
    res, model = _fused_model(ckpt, FuseOptions(consistency="repair", align=1))
    added = [r for p in res.plans for r in p.repairs if r.head == 1 and r.part == "qk"]
    assert added and added[0].added == 1
    assert _close(ckpt, model)


def test_threshold_selects_by_folded_norm(tmp_path):
    torch.save(random_checkpoint(keep=0.5), tmp_path / "t.pth")
    ckpt = load_checkpoint(tmp_path / "t.pth")
    by_mask = fuse(ckpt, FuseOptions(align=1))
    by_norm = fuse(ckpt, FuseOptions(align=1, threshold=1e-6))
    assert [b.qk_dim for b in by_mask.config.blocks] == [b.qk_dim for b in by_norm.config.blocks]
    huge = fuse(ckpt, FuseOptions(align=1, threshold=1e-6, consistency="repair"))
    assert huge.config == by_norm.config
    with pytest.raises(CaitError, match="would be dropped"):
        fuse(ckpt, FuseOptions(threshold=1e6))


def test_fused_file_roundtrip_and_load_model(tmp_path):
    torch.save(random_checkpoint(merges={1: "h"}), tmp_path / "c.pth")
    report = fuse_file(tmp_path / "c.pth", None, FuseOptions())
    out = tmp_path / "c.fused.safetensors"
    assert report["output"] == str(out) and out.exists()
    model = load_model(out, attn_impl="math")
    ckpt = load_checkpoint(tmp_path / "c.pth")
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = reference_forward(ckpt, x)
        assert (model(x).double() - ref).abs().max() <= 1e-5 * ref.abs().max()
        sdpa = load_model(out)  # default attention implementation agrees with the export pattern
        assert torch.allclose(sdpa(x), model(x), atol=1e-5)


def test_safetensors_checkpoint_and_deit_style_inference(tmp_path):
    ck = random_checkpoint(merges={1: "v"})
    save_checkpoint_dict(ck, tmp_path / "c.safetensors")
    a = load_checkpoint(tmp_path / "c.safetensors")
    assert a.inferred == {} and a.config.merges == {1: "v"}
    torch.save({"model": ck["state_dict"], "epoch": 3}, tmp_path / "deit.pth")
    b = load_checkpoint(tmp_path / "deit.pth")
    assert b.inferred["num_heads"] == 3 and b.inferred["merges"] == {1: "v"} and b.inferred["img_size"] == 32
    assert b.config == a.config


def test_make_checkpoint_hits_flops_target_and_fuses_exactly(tmp_path):
    from caitdeploy.families.flops import model_flops

    for arch, target in (("deit_tiny_patch16_224", 0.505), ("deit_small_patch16_224", 0.55)):
        ckpt, summary = make_checkpoint(arch, target, {4: "h", 8: "v"}, seed=0)
        assert abs(summary["flops_reduction"] - target) <= 0.01
        path = tmp_path / f"{arch}.pth"
        save_checkpoint_dict(ckpt, path)
        loaded = load_checkpoint(path)
        res = fuse(loaded, FuseOptions(align=1))  # strict: CDCP selection is consistent by construction
        achieved = 1 - model_flops(res.config)["total"] / model_flops(loaded.config.unpruned())["total"]
        assert abs(achieved - target) <= 0.01, (arch, achieved)
        for m in summary["kept"]:
            assert m["q"] == m["k"]
