"""CAIT training API: the wrapper is the format's forward, the controller keeps CDCP's guarantees."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("timm")
import itertools

from timm.models.vision_transformer import VisionTransformer

from caitdeploy.compress.fuse import FuseOptions, fuse_file
from caitdeploy.core.errors import CaitError
from caitdeploy.families.vit.reference import reference_forward
from caitdeploy.formats.checkpoint import expected_shapes, load_checkpoint
from caitdeploy.training.wrappers import CDCPController, cait_wrap, checkpoint_dict, save_checkpoint


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_vit(seed=0, **kw):
    torch.manual_seed(seed)
    args = dict(
        img_size=16,
        patch_size=4,
        in_chans=3,
        num_classes=5,
        embed_dim=32,
        depth=3,
        num_heads=2,
        mlp_ratio=2.0,
        qkv_bias=True,
    )
    args.update(kw)
    return VisionTransformer(**args)


def check_cdcp_consistency(masks):
    for i, m in enumerate(masks):
        assert torch.equal(m["q"], m["k"]), f"block {i}: q/k masks differ (attention-level consistency)"
        for part in ("q", "v"):
            counts = m[part].sum(-1)
            assert bool((counts == counts[0]).all()), f"block {i}: {part} kept counts differ per head {counts}"
            assert counts[0] >= 1
        for t in m.values():
            assert bool(((t == 0) | (t == 1)).all())


def test_identity_wrap_equals_timm_and_shares_weights():
    vit = tiny_vit().eval()
    types_before = {n: type(m) for n, m in vit.named_modules()}
    x = torch.randn(3, 3, 16, 16)
    ref = vit(x)
    model = cait_wrap(vit, {}).eval()
    assert {n: type(m) for n, m in vit.named_modules()} == types_before  # no __class__ swapping
    assert (model(x) - ref).abs().max().item() <= 1e-6
    # weights are shared, not copied: training the wrapper trains the timm model
    assert model.blocks[1].attn.qkv.weight is vit.blocks[1].attn.qkv.weight
    assert model.cls_token is vit.cls_token
    with torch.no_grad():
        model.blocks[0].mlp.fc1.bias.add_(1.0)
    assert not torch.allclose(vit(x), ref)


def test_state_dict_is_the_format_and_loads(tmp_path):
    model = cait_wrap(tiny_vit(), {1: "h", 2: "v"})
    sd = model.state_dict()
    req, opt = expected_shapes(model.cait_config, model.format_config)
    assert set(sd) == set(req) | set(opt)  # exactly the format: timm keys + all compactors + merges
    for k, shape in {**req, **opt}.items():
        assert tuple(sd[k].shape) == shape, k
    d = 32
    eye = torch.eye(d)
    assert torch.equal(sd["blocks.1.htm.fc.weight"], torch.cat([eye, eye], 1) / 2)
    assert torch.equal(sd["blocks.2.vtm.fc.bias"], torch.zeros(d))
    assert torch.equal(sd["blocks.0.attn.q_compactor.weight"], torch.eye(16).repeat(2, 1, 1))
    assert torch.equal(sd["blocks.0.mlp.fc1_compactor.mask"], torch.ones(64))
    for suffix in (".pth", ".safetensors"):
        path = save_checkpoint(model, tmp_path / f"c{suffix}")
        ck = load_checkpoint(path)
        assert ck.format_config["merges"] == {1: "h", 2: "v"} and ck.format_config["num_heads"] == 2
        assert set(ck.state_dict) == set(sd)
        assert torch.equal(ck.state_dict["blocks.2.mlp.fc2.weight"], sd["blocks.2.mlp.fc2.weight"])


def _randomise(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "compactor" in name or ".htm." in name or ".vtm." in name:
                p.add_(0.3 * torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
            elif "norm" in name or "bias" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def test_forward_equals_reference_forward(tmp_path):
    model = cait_wrap(tiny_vit(), {1: "h", 2: "v"}).eval()
    x = torch.randn(2, 3, 16, 16)
    before = model(x)
    _randomise(model)
    assert (model(x) - before).abs().max() > 1e-2  # the compactors and merges really act
    model.double()
    ckpt = load_checkpoint(save_checkpoint(model, tmp_path / "c.pth"))
    ref = reference_forward(ckpt, x.double())
    got = model(x.double())
    assert ref.dtype == got.dtype == torch.float64
    assert (got - ref).abs().max().item() < 1e-10
    # float32 too
    model.float()
    assert (model(x).double() - ref).abs().max().item() < 1e-4


def test_rejects_what_the_format_cannot_express():
    with pytest.raises(CaitError, match="global_pool 'max'"):
        cait_wrap(tiny_vit(global_pool="max"))
    with pytest.raises(CaitError, match="qk_norm"):
        cait_wrap(tiny_vit(qk_norm=True))
    with pytest.raises(CaitError, match="odd grid"):
        cait_wrap(tiny_vit(), {0: "h", 1: "h", 2: "h"})  # 4 -> 2 -> 1 -> odd


def test_controller_keeps_consistency_at_every_update():
    torch.manual_seed(0)
    model = cait_wrap(tiny_vit(), {1: "h"})
    ctl = CDCPController(model, 0.5, lam=1e-2, step_ratio=0.05, every=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 5, (8,))
    seen, reductions = [], []
    for _ in range(16):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        n = ctl.updates
        ctl.step()
        if ctl.updates > n:  # a mask update happened at this step
            masks = ctl.masks()
            check_cdcp_consistency(masks)
            # the masks the model holds are what the controller reports and what the checkpoint stores
            sd = checkpoint_dict(model)["state_dict"]
            assert torch.equal(sd["blocks.0.attn.k_compactor.mask"], masks[0]["k"])
            seen.append(sum(float(m[p].sum()) for m in masks for p in m))
            reductions.append(ctl.ratio)
            assert ctl.flops_reduction >= ctl.ratio - 1e-9  # every update reaches its scheduled ratio
        opt.step()
    assert ctl.updates == 8
    assert all(b > a or a == b == 0.5 for a, b in itertools.pairwise(reductions))  # up until the target
    assert reductions[0] > ctl.merge_reduction  # the first update already prunes channels
    assert ctl.done and ctl.flops_reduction >= 0.5 - 1e-3
    assert seen[-1] < seen[0]  # fewer channels kept at the end
    assert ctl.history[-1]["ratio"] == 0.5


def test_eq2_gradient_and_masked_rows_shrink():
    torch.manual_seed(0)
    model = cait_wrap(tiny_vit(), {})
    ctl = CDCPController(model, 0.4, lam=0.05, lasso_on_kept=True)
    ctl.update_masks(0.4)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 5, (8,))
    comp = model.blocks[0].mlp.fc1_compactor
    F.cross_entropy(model(x), y).backward()
    task = comp.weight.grad.clone()
    ctl.modify_gradients()
    w = comp.weight.detach()
    lasso = 0.05 * w / w.norm(dim=-1, keepdim=True)
    masked = comp.mask == 0
    assert masked.any() and (~masked).any()
    assert torch.allclose(comp.weight.grad[masked], lasso[masked])  # lasso only
    assert torch.allclose(comp.weight.grad[~masked], task[~masked] + lasso[~masked])  # task + lasso
    # lasso_on_kept=False: kept rows get exactly their task gradient
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    CDCPController(model, 0.4, lam=0.05, lasso_on_kept=False).modify_gradients()
    assert torch.equal(comp.weight.grad[~masked], task[~masked])

    def masked_norms():
        return torch.cat([m.weight.detach().norm(dim=-1)[m.mask == 0] for _, _, m in model.compactors()])

    n0 = masked_norms()
    opt = torch.optim.SGD(model.compactor_parameters(), lr=0.5)
    for _ in range(5):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        ctl.modify_gradients()
        opt.step()
    n1 = masked_norms()
    assert bool((n1 < n0 - 0.1).all())  # every masked row shrank by lr * lam per step (5 * 0.025)
    assert torch.allclose(n1, n0 - 5 * 0.5 * 0.05, atol=1e-4)
    assert ctl.max_masked_norm() == pytest.approx(float(n1.max()), rel=1e-6)
    removed = ctl.finalize()
    assert removed == pytest.approx(float(n1.max()), rel=1e-6) and ctl.max_masked_norm() == 0.0


def test_short_training_run_fuses_in_strict_mode(tmp_path):
    torch.manual_seed(0)
    model = cait_wrap(tiny_vit(), {1: "h", 2: "v"})
    ctl = CDCPController(model, 0.55, lam=0.2, step_ratio=0.05, every=2, align=2)
    opt = torch.optim.AdamW(model.base_parameters(), lr=1e-3)
    opt_c = torch.optim.SGD(model.compactor_parameters(), lr=0.5)
    g = torch.Generator().manual_seed(0)
    protos = torch.randn(5, 3, 16, 16, generator=g)
    steps = 48
    for it in range(steps):
        y = torch.randint(0, 5, (16,), generator=g)
        x = protos[y] + 0.5 * torch.randn(16, 3, 16, 16, generator=g)
        for o, base in ((opt, 1e-3), (opt_c, 0.5)):
            for group in o.param_groups:
                group["lr"] = base * 0.5 * (1 + math.cos(math.pi * it / steps))
        opt.zero_grad()
        opt_c.zero_grad()
        F.cross_entropy(model(x), y).backward()
        ctl.step()
        opt.step()
        opt_c.step()
        if ctl.done:
            ctl.freeze()
    assert ctl.done and ctl.frozen
    check_cdcp_consistency(ctl.masks())
    assert ctl.max_masked_norm() < 1e-3  # trained, not finalized
    path = save_checkpoint(model, tmp_path / "trained.pth")
    report = fuse_file(
        path, tmp_path / "trained.fused.safetensors", FuseOptions(consistency="strict", align=2), verify_batch=2
    )
    assert report["max_dropped_norm"] < 1e-3
    assert report["verify"]["max_abs_diff"] < 1e-3
    assert report["flops_reduction"] == pytest.approx(ctl.flops_reduction, abs=1e-9)
    for b, m in zip(report["blocks"], ctl.masks()):
        assert b["qk_per_head"] == int(m["q"][0].sum()) and b["mlp"] == int(m["fc1"].sum())
        assert b["qk_per_head"] % 2 == 0 and b["v_per_head"] % 2 == 0


def test_fuse_refuses_untrained_masks(tmp_path):
    """The control for the test above: masks without the lasso training leave large dropped rows."""
    model = cait_wrap(tiny_vit(), {})
    CDCPController(model, 0.3).update_masks(0.3)
    path = save_checkpoint(model, tmp_path / "untrained.pth")
    with pytest.raises(CaitError, match="dropped compactor row has norm"):
        fuse_file(path, tmp_path / "u.fused.safetensors", FuseOptions(consistency="strict", align=1))
