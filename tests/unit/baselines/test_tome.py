"""ToMe baseline: matching, size-weighted merging, r=0 == dense, analytic FLOPs, FLOPs matching."""

from __future__ import annotations

import pytest
import torch

from caitdeploy.baselines.tome import (
    ToMeViT,
    bipartite_soft_matching,
    choose_r,
    merge_wavg,
    r_schedule,
    tome_flops,
    tome_tokens,
)
from caitdeploy.families.flops import flop_counter, model_flops
from caitdeploy.families.vit.config import CaitConfig
from caitdeploy.families.vit.model import CaitViT


def small_dense(img_size=64, patch_size=8, depth=4, embed_dim=48, num_heads=3):
    cfg = CaitConfig.dense(
        img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads, num_classes=10
    )
    torch.manual_seed(0)
    vit = CaitViT(cfg).eval()
    with torch.no_grad():  # non-zero class/position embeddings so tokens differ
        vit.cls_token.normal_()
        vit.pos_embed.normal_(std=0.5)
    return cfg, vit


def hand_example():
    # tokens: 0 = cls, 1..4; set A = {0, 2, 4}, set B = {1, 3}
    metric = torch.tensor(
        [
            [
                [3.0, 0.0],  # cls: identical direction to token 1 (cos 1.0)
                [1.0, 0.0],  # t1
                [0.1, 2.0],  # t2: cos(t2, t3) = 0.9988
                [0.0, 1.0],  # t3
                [1.0, 0.5],
            ]
        ]
    )  # t4: cos(t4, t1) = 0.894
    x = torch.tensor([[[10.0], [1.0], [2.0], [4.0], [8.0]]])
    size = torch.tensor([[[1.0], [1.0], [2.0], [1.0], [1.0]]])
    return metric, x, size


def test_merge_wavg_hand_example():
    metric, x, size = hand_example()
    merge, _ = bipartite_soft_matching(metric, 1)
    y, s = merge_wavg(merge, x, size)
    # t2 (size 2) merges into t3: (2*2 + 4*1) / 3; order = [unmerged A in order | B]
    assert torch.allclose(y.flatten(), torch.tensor([10.0, 8.0, 1.0, 8.0 / 3]))
    assert torch.equal(s.flatten(), torch.tensor([1.0, 1.0, 1.0, 3.0]))
    merge, _ = bipartite_soft_matching(metric, 2)
    y, s = merge_wavg(merge, x, size)
    # then t4 into t1: (8 + 1) / 2
    assert torch.allclose(y.flatten(), torch.tensor([10.0, 4.5, 8.0 / 3]))
    assert torch.equal(s.flatten(), torch.tensor([1.0, 2.0, 3.0]))


def test_class_token_protected_only_when_asked():
    metric, x, size = hand_example()
    merge, _ = bipartite_soft_matching(metric, 1, protect_cls=False)
    y, s = merge_wavg(merge, x, size)
    # unprotected, the class token's edge (cos 1.0 to t1) is the strongest and it gets merged away
    assert torch.allclose(y.flatten(), torch.tensor([2.0, 8.0, 5.5, 4.0]))
    assert torch.equal(s.flatten(), torch.tensor([2.0, 1.0, 2.0, 1.0]))
    # protected, r is capped at |A| - 1 = 2 and the class token survives
    merge, _ = bipartite_soft_matching(metric, 10, protect_cls=True)
    y, s = merge_wavg(merge, x, size)
    assert y.shape[1] == 3 and y[0, 0, 0] == 10.0 and s[0, 0, 0] == 1.0


@pytest.mark.parametrize("n", [197, 64, 17, 2])
def test_repeated_merges_keep_cls_first_and_sizes_sum(n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(3, n, 16, generator=g)
    cls = x[:, 0].clone()
    size = None
    total = n
    for r in (5, 8, 100, 3):
        metric = torch.randn(3, x.shape[1], 8, generator=g)
        before = x.shape[1]
        merge, unmerge = bipartite_soft_matching(metric, r)
        x, size = merge_wavg(merge, x, size)
        assert x.shape[1] == before - min(r, (before - 1) // 2)
        assert torch.equal(x[:, 0], cls)  # class token first and untouched
        assert torch.all(size[:, 0] == 1)
        assert torch.allclose(size.sum(dim=1).flatten(), torch.full((3,), float(total)))
        if x.shape[1] < before:
            back = unmerge(x)
            assert back.shape[1] == before and torch.equal(back[:, 0], cls)


def test_unmerge_restores_unmerged_tokens():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 21, 4, generator=g)
    merge, unmerge = bipartite_soft_matching(torch.randn(2, 21, 6, generator=g), 6)
    back = unmerge(merge(x, mode="mean"))
    same = (back == x).all(dim=-1)
    assert int(same.sum()) >= 2 * (21 - 2 * 6)  # unmerged A tokens and B tokens with no partner keep values


def test_r0_equals_dense_exactly():
    cfg, vit = small_dense()
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ToMeViT(vit, 0)(x), vit(x))
        assert torch.equal(ToMeViT(vit, [0] * cfg.depth, attn_impl="math")(x), vit.set_impl("math")(x))
    assert tome_flops(cfg, 0)["total"] == model_flops(cfg)["total"]


def test_merging_changes_output_and_impls_agree():
    _cfg, vit = small_dense()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense = vit(x)
        a = ToMeViT(vit, 6)(x)
        b = ToMeViT(vit, 6, attn_impl="math")(x)
    assert a.shape == dense.shape
    assert not torch.allclose(a, dense)
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("r", [1, 6, 40, [9, 0, 3, 1]])
def test_flops_match_flop_counter_exactly(r):
    """Tolerance: exact. FlopCounterMode counts conv, linear, SDPA and the similarity bmm, as tome_flops does."""
    cfg, vit = small_dense()
    model = ToMeViT(vit, r)
    x = torch.randn(2, 3, 64, 64)
    with flop_counter() as fc, torch.no_grad():
        model(x)
    analytic = tome_flops(cfg, r)
    assert fc.get_total_flops() == 2 * analytic["total"]
    assert sum(b["match"] for b in analytic["blocks"]) > 0
    assert analytic["total"] < model_flops(cfg)["total"]


def test_tokens_and_schedule():
    cfg, _ = small_dense()
    assert tome_tokens(cfg, 10) == [(65, 55), (55, 45), (45, 35), (35, 25)]
    assert tome_tokens(cfg, 100) == [(65, 33), (33, 17), (17, 9), (9, 5)]
    with pytest.raises(ValueError):
        r_schedule([1, 2], 4)
    with pytest.raises(ValueError):
        r_schedule(-1, 4)


@pytest.mark.parametrize(
    "arch", [dict(embed_dim=192, num_heads=3), dict(embed_dim=384, num_heads=6), dict(embed_dim=768, num_heads=12)]
)
@pytest.mark.parametrize("reduction", [0.505, 0.55, 0.58])
def test_choose_r_within_2_percent(arch, reduction):
    cfg = CaitConfig.dense(**arch)
    target = model_flops(cfg)["total"] * (1 - reduction)
    r = choose_r(cfg, target)
    got = tome_flops(cfg, r)["total"]
    assert abs(got - target) <= 0.02 * target
    if isinstance(r, list):  # schedule only when no constant r is within 2%
        lo = min(r)
        assert r == [lo + 1] * r.count(lo + 1) + [lo] * r.count(lo)
        for c in range(99):
            assert abs(tome_flops(cfg, c)["total"] - target) > 0.02 * target


def test_choose_r_out_of_range():
    cfg, _ = small_dense()
    with pytest.raises(ValueError):
        choose_r(cfg, 1.0)
