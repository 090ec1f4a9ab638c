"""The family protocol (families/base.py): every registered family implements it, the rest of the package asks it
and never a family's name or config type, and Swin's fuse is checked against an independent float64 reference."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from caitdeploy.core.errors import OptionError
from caitdeploy.families import family, family_for_arch, family_of
from caitdeploy.families.base import Family
from caitdeploy.families.registry import FAMILY_MODULES, families

PKG = Path(__file__).resolve().parents[3] / "caitdeploy"
SWIN = "swin_tiny_patch4_window7_224"
SMALL_SWIN = dict(embed_dim=16, depths=(2, 4), num_heads=(1, 2), window_size=3)


def test_every_family_is_a_complete_family_object():
    for name, fam in families().items():
        assert isinstance(fam, Family) and fam.name == name, name
        assert fam.description and 0 < fam.default_flops_reduction < 1 and fam.default_merges
        assert not getattr(type(fam), "__abstractmethods__", None), f"{name}: abstract methods left"
    assert set(families()) == set(FAMILY_MODULES) == {"vit", "lvvit", "spvit", "swin"}


def test_arch_picks_the_family_and_its_defaults():
    vit, swin = family_for_arch("deit_small_patch16_224"), family_for_arch(SWIN)
    assert (vit.name, vit.default_flops_reduction, vit.default_merges) == ("vit", 0.55, "4:h,8:v")
    assert (swin.name, swin.default_flops_reduction, swin.default_merges) == ("swin", 0.354, "auto")
    assert family_for_arch("swinv2_tiny_window8_256").name == "vit"  # v2 is not supported as a Swin
    assert swin.tome_note and swin.attention_op_note and swin.token_reduction_note
    assert vit.tome_note is None and vit.attention_op_note is None and vit.token_reduction_note is None


def test_merge_specs_one_parser_per_family():
    vit, swin = family("vit"), family("swin")
    assert vit.parse_merges("4:h,8:v") == {4: "h", 8: "v"} and vit.merges_text({8: "v", 4: "h"}) == "4:h,8:v"
    assert swin.parse_merges("2.4:h,2.5:v") == {(2, 4): "h", (2, 5): "v"}
    assert swin.merges_text({(2, 5): "v", (2, 4): "h"}) == "2.4:h,2.5:v" and swin.merges_text({}) == "none"
    for fam, bad in ((vit, "4:x"), (vit, "4:h,4:v"), (swin, "4:h"), (swin, "2.4:h,2.4:v")):
        with pytest.raises(OptionError) as e:
            fam.parse_merges(bad)
        assert e.value.as_flag().startswith("--merges")


def test_plan_merges_checks_the_budget_for_every_family():
    from caitdeploy.families.timm_compat import timm_model

    with torch.device("meta"):
        vit_model = timm_model("deit_tiny_patch16_224", 10, 64)
    vit = family("vit")
    fmt = vit.format_config_of(vit_model)
    merges, info = vit.plan_merges(fmt, "2:h,4:v", 0.9)
    assert merges == {2: "h", 4: "v"} and 0 < info["token_reduction"] < 0.9
    with pytest.raises(OptionError, match="the merges alone cut FLOPs by"):
        vit.plan_merges(fmt, "1:h,2:v", 0.05)
    auto, info = vit.plan_merges(fmt, "auto", 0.55)
    assert auto and info["token_reduction"] <= 0.55

    swin = family("swin")
    model = swin.timm_model(SWIN, 10, 64, SMALL_SWIN)
    sfmt = swin.format_config_of(model, SWIN)
    merges, info = swin.plan_merges(sfmt, None, 0.354)  # the default: auto, the paper's placement
    assert merges == {(1, 2): "h", (1, 3): "v"}
    with pytest.raises(OptionError, match="token_reduction"):
        swin.plan_merges(sfmt, "auto", 0.354, token_reduction=0.2)


def _family_name_tests(tree: ast.AST) -> list[int]:
    """Lines of `tree` that compare with a family's name or test a family's config/model type."""
    names = set(FAMILY_MODULES)
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            for side in [node.left, *node.comparators]:
                if isinstance(side, ast.Constant) and side.value in names:
                    bad.append(node.lineno)
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("isinstance", "issubclass"):
            text = ast.unparse(node.args[1]) if len(node.args) > 1 else ""
            if any(t in text for t in ("Swin", "CaitConfig", "CaitViT", "VisionTransformer")):
                bad.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("caitdeploy.families.swin"):
            bad.append(node.lineno)
    return sorted(bad)


def test_nothing_outside_families_and_convert_asks_a_family_name():
    """The 'done when' of the redesign: fuse, make-checkpoint, train, export, bench, serve and inspect ask the
    protocol. (The ViT training wrapper, which wraps timm's VisionTransformer in place, checks its input type
    through timm_compat.check_supported, inside families/.)"""
    offenders = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG).as_posix()
        if rel.startswith(("families/", "convert/", "testing/")):
            continue
        offenders += [f"{rel}:{line}" for line in _family_name_tests(ast.parse(path.read_text()))]
    assert not offenders, "family names or types tested outside families/ and convert/:\n" + "\n".join(offenders)


def test_the_family_name_checker_finds_what_it_looks_for():
    src = (
        'if cfg.family == "swin": pass\nif isinstance(c, SwinConfig): pass\n'
        "from caitdeploy.families.swin.model import CaitSwin\nx = fam.name\n"
    )
    assert _family_name_tests(ast.parse(src)) == [1, 2, 3]


@pytest.fixture(scope="module")
def swin_checkpoint(tmp_path_factory):
    """A small CAIT-Swin checkpoint with merges inside a stage, padded and shifted windows, and random compactors
    whose dropped rows are zero (so fusing folds something)."""
    from caitdeploy.compress.cdcp import make_checkpoint, save_checkpoint_dict
    from caitdeploy.formats.checkpoint import load_checkpoint

    ck, _ = make_checkpoint(SWIN, 0.5, {(1, 2): "h", (1, 3): "v"}, num_classes=5, img_size=64, model_args=SMALL_SWIN)
    g = torch.Generator().manual_seed(0)
    sd = ck["state_dict"]
    for k in list(sd):
        if k.endswith("_compactor.weight"):
            mask = sd[k[: -len("weight")] + "mask"]
            sd[k] = (sd[k] + 0.1 * torch.randn(sd[k].shape, generator=g)) * mask.unsqueeze(-1)
    path = tmp_path_factory.mktemp("swin") / "ck.pth"
    save_checkpoint_dict(ck, path)
    return load_checkpoint(path)


def test_swin_reference_is_independent_and_agrees_with_the_compactor_model(swin_checkpoint):
    """The float64 reference (families/swin/reference.py: its own windows, shift mask, relative index, patch merging)
    computes what CaitSwin with compactors computes, on grids that pad windows (16 % 3) and shift them."""
    from caitdeploy.families.swin import reference
    from caitdeploy.families.swin.model import CaitSwin, from_checkpoint

    src = Path(reference.__file__).read_text()
    assert "CaitSwin" not in src.split('"""', 2)[2] and "families.swin.model" not in src
    ck = swin_checkpoint
    cfg = ck.config
    assert any(sum(cfg.window_shift(s, i)[1]) for s, i, _ in cfg.flat()), "no shifted window: a weak check"
    assert any(g[0] % cfg.window_shift(s, i)[0][0] for s, row in enumerate(cfg.grids()) for i, g in enumerate(row))
    model = CaitSwin(cfg, compactors=True)
    model.load_state_dict(from_checkpoint(cfg, ck.state_dict, model.state_dict()))
    x = torch.randn(2, *cfg.input_shape, dtype=torch.float64)
    with torch.no_grad():
        want = model.double().eval()(x)
    got = family_of(cfg).reference(ck)(x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_swin_fuse_is_verified_against_the_reference_and_a_wrong_weight_is_caught(swin_checkpoint):
    from caitdeploy.compress.fuse import fuse, max_logit_diff
    from caitdeploy.families import build_model

    res = fuse(swin_checkpoint)
    model = build_model(res.config, attn_impl="math").eval()
    model.load_state_dict(res.state_dict)
    good = max_logit_diff(swin_checkpoint, model)
    assert good["max_abs_diff"] < 1e-4 * max(1.0, good["logit_scale"])
    key = next(k for k in res.state_dict if k.endswith("attn.proj.weight"))
    with torch.no_grad():
        model.state_dict()[key][0] += 1.0  # one output channel of one block off
    bad = max_logit_diff(swin_checkpoint, model)
    assert bad["max_abs_diff"] > 1000 * good["max_abs_diff"] and bad["max_abs_diff"] > 1e-4 * good["logit_scale"]


def test_params_are_counted_from_the_config_for_every_family(swin_checkpoint):
    """One FLOPs-and-params source per family, analytic: the counts equal the built deploy model's parameters
    (Swin: merged, pruned, and with SPViT-Swin's conv / skip blocks; ViT: a DeiT with merges)."""
    import dataclasses

    from caitdeploy.families.timm_compat import timm_model

    cfg = swin_checkpoint.config
    st = [list(x) for x in cfg.stages]
    st[0][0] = dataclasses.replace(st[0][0], kind="conv3", v_dim=5)
    st[0][1] = dataclasses.replace(st[0][1], kind="conv1", v_dim=7, mlp_hidden=11)
    st[1][0] = dataclasses.replace(st[1][0], kind="skip")
    st[1][1] = dataclasses.replace(st[1][1], qk_dim=3, v_dim=6)
    mixed = dataclasses.replace(cfg, stages=tuple(tuple(x) for x in st))
    with torch.device("meta"):
        vit_model = timm_model("deit_tiny_patch16_224", 10, 64)
    vit = family("vit")
    vit_cfg = vit.config_from_format({**vit.format_config_of(vit_model), "merges": {2: "h", 4: "v"}})
    for c in (cfg, mixed, vit_cfg):
        fam = family_of(c)
        with torch.device("meta"):
            model = fam.build(c, attn_impl="math")
        assert fam.params(c) == sum(p.numel() for p in model.parameters()), fam.name
        assert sum(r["params"] for r in fam.block_rows(c)) < fam.params(c)
