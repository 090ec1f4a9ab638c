"""One definition of the supported timm ViTs: make-checkpoint, cait_wrap and fuse agree on every name tried."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from caitdeploy.cli.main import main
from caitdeploy.core.errors import CaitError
from caitdeploy.families.timm_compat import timm_model, unsupported_feature
from caitdeploy.training.wrappers import cait_wrap

# timm name -> None (supported) or the feature the refusal must name
NAMES = {
    "deit_tiny_patch16_224": None,
    "vit_small_patch16_224": None,
    "deit3_small_patch16_224": None,
    "deit_small_distilled_patch16_224": None,
    "vit_base_patch16_reg4_gap_256": None,
    "vit_small_patch14_dinov2": None,
    "vit_base_patch16_clip_224": "norm_pre",
    "vit_base_patch16_siglip_224": "global_pool 'map'",
    "vit_small_patch16_rope_224": "not a timm VisionTransformer",
    "vit_small_patch16_224.augreg_in21k": None,
    "resnet18": "not a timm VisionTransformer",
}


@pytest.mark.parametrize("name", list(NAMES))
def test_timm_model_and_cait_wrap_agree(name):
    want = NAMES[name]
    if want is None:
        model = timm_model(name, num_classes=10, img_size=28 if "patch14" in name else 32)
        cait_wrap(model, {})  # the same definition accepts it
    else:
        with pytest.raises(CaitError, match=want):
            timm_model(name, num_classes=10, img_size=32)


@pytest.mark.parametrize("name", [n for n, w in NAMES.items() if w is not None])
def test_make_checkpoint_refuses_up_front(tmp_path, name):
    out = tmp_path / "c.pth"
    res = CliRunner().invoke(main, ["make-checkpoint", "--arch", name, "-o", str(out), "--img-size", "32"])
    assert res.exit_code == 2 and res.stderr.startswith("error: --arch") and NAMES[name] in res.stderr, res.stderr
    assert not out.exists()


def test_make_checkpoint_then_fuse_agree(tmp_path):
    out = tmp_path / "c.pth"
    res = CliRunner().invoke(
        main,
        [
            "make-checkpoint",
            "--arch",
            "deit_tiny_patch16_224",
            "--img-size",
            "32",
            "--num-classes",
            "10",
            "--merges",
            "1:h",
            "--flops-reduction",
            "0.4",
            "-o",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.stderr
    res = CliRunner().invoke(main, ["fuse", str(out), "-q"])
    assert res.exit_code == 0, res.stderr
    # a target the merges alone overshoot (1:h cuts 35.4% here): one line, nothing written
    bad = tmp_path / "b.pth"
    res = CliRunner().invoke(
        main,
        [
            "make-checkpoint",
            "--arch",
            "deit_tiny_patch16_224",
            "--img-size",
            "32",
            "--num-classes",
            "10",
            "--merges",
            "1:h",
            "--flops-reduction",
            "0.3",
            "-o",
            str(bad),
        ],
    )
    assert res.exit_code == 2 and "the merges alone cut FLOPs by 35.42%, more than --flops-reduction 0.3" in res.stderr
    assert not bad.exists()


def test_fuse_names_the_feature_of_an_unsupported_key(tmp_path):
    from caitdeploy.testing.checkpoints import random_checkpoint

    ck = random_checkpoint(embed_dim=24, depth=2, num_heads=2, img_size=16, patch_size=8)
    ck["state_dict"]["norm_pre.weight"] = torch.ones(24)
    torch.save(ck, tmp_path / "pre.pth")
    res = CliRunner().invoke(main, ["fuse", str(tmp_path / "pre.pth")])
    assert res.exit_code == 2
    assert "key 'norm_pre.weight': a pre-norm (norm_pre, e.g. CLIP) is not supported" in res.stderr
    assert unsupported_feature("blocks.0.attn.q_norm.weight") == "qk-norm"
    assert unsupported_feature("blocks.0.attn.qkv.weight") is None
