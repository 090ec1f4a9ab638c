"""Pure surgery functions on small hand-made tensors."""

from __future__ import annotations

import pytest
import torch

from caitdeploy.compress import surgery as S
from caitdeploy.core.errors import CaitError


def test_fold_is_compactor_times_weight():
    g = torch.Generator().manual_seed(0)
    w, b, c = torch.randn(2, 4, 6, generator=g), torch.randn(2, 4, generator=g), torch.randn(2, 4, 4, generator=g)
    wf, bf = S.fold(w, b, c)
    x = torch.randn(5, 6, generator=g)
    for h in range(2):  # (x W^T + b) C^T == x (C W)^T + C b
        assert torch.allclose((x @ w[h].T + b[h]) @ c[h].T, x @ wf[h].T + bf[h], atol=1e-5)
    assert S.fold(w, b, None) == (w, b)


def test_fold_rows_equals_rows_of_full_fold():
    g = torch.Generator().manual_seed(1)
    w, b, c = torch.randn(8, 5, generator=g), torch.randn(8, generator=g), torch.randn(8, 8, generator=g)
    idx = torch.tensor([6, 1, -1, 3])
    wf, bf = S.fold(w, b, c)
    wr, br = S.fold_rows(w, b, c, idx)
    assert torch.allclose(wr[[0, 1, 3]], wf[[6, 1, 3]], atol=1e-6) and torch.equal(wr[2], torch.zeros(5))
    assert torch.allclose(br[[0, 1, 3]], bf[[6, 1, 3]], atol=1e-6) and br[2] == 0


def test_take_pads_with_zeros_per_head():
    t = torch.arange(24.0).reshape(2, 3, 4)  # [H, d, D]
    idx = torch.tensor([[2, 0, -1], [1, -1, -1]])
    out = S.take(t, idx, 1)
    assert out.shape == (2, 3, 4)
    assert torch.equal(out[0, 0], t[0, 2]) and torch.equal(out[0, 1], t[0, 0]) and not out[0, 2].any()
    assert torch.equal(out[1, 0], t[1, 1]) and not out[1, 1:].any()


def test_readmit_and_align():
    keep = torch.tensor([[1, 0, 0, 1, 0, 0], [1, 1, 0, 0, 0, 1]], dtype=torch.bool)
    scores = torch.tensor([[0, 5, 1, 0, 3, 2], [0, 0, 9, 8, 1, 0]], dtype=torch.float64)
    new, added = S.readmit(keep, scores, 4)
    assert added == [2, 1]
    assert new[0].nonzero().flatten().tolist() == [0, 1, 3, 4]  # the two best dropped: 5 and 3
    assert new[1].nonzero().flatten().tolist() == [0, 1, 2, 5]
    aligned, pad = S.align_keep(keep, scores, 4)
    assert aligned.sum(-1).tolist() == [4, 4] and pad == 0
    aligned, pad = S.align_keep(keep, scores, 8)  # rounds 3 -> 8 > width 6: all kept + 2 zero channels
    assert aligned.all() and pad == 2
    assert S.pad_indices(torch.tensor([[0, 1]]), 4).tolist() == [[0, 1, -1, -1]]
    assert S.round_up(49, 8) == 56 and S.round_up(48, 8) == 48


def test_strict_consistency_messages_and_repair():
    q = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0]], dtype=torch.bool)
    k = q.clone()
    v = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    with pytest.raises(CaitError, match=r"block 7 head 1: keeps 2 v channels but head 0 keeps 3"):
        S.check_consistency(7, q, k, v)
    k[0] = torch.tensor([1, 0, 1, 0], dtype=torch.bool)
    with pytest.raises(CaitError, match=r"block 7 head 0: q keeps 2 channels and k keeps 2, 2 positions differ"):
        S.check_consistency(7, q, k, v)
    sq = torch.tensor([[0, 0, 0, 1.0], [0, 0, 0, 2.0]], dtype=torch.float64)
    qk, vv, repairs = S.repair_consistency(7, q, k, v, sq, torch.ones(2, 4, dtype=torch.float64))
    assert qk[0].tolist() == [True, True, True, False]  # union
    assert qk[1].tolist() == [True, False, True, True]  # raised to 3 with its best dropped channel
    assert vv.sum(-1).tolist() == [3, 3]
    parts = {(r.part, r.head) for r in repairs}
    assert parts == {("qk", 0), ("qk", 1), ("v", 1)}


def test_slice_block_widths():
    h, dim, hidden = 2, 8, 6  # head width dim // h = 4
    g = torch.Generator().manual_seed(0)
    f = S.fold_block(
        torch.randn(3 * dim, dim, generator=g),
        torch.randn(3 * dim, generator=g),
        torch.randn(hidden, dim, generator=g),
        torch.randn(hidden, generator=g),
        h,
        {},
    )
    plan = S.BlockPlan(qk=torch.tensor([[0, 2], [1, 3]]), v=torch.tensor([[3], [0]]), mlp=torch.tensor([5, 0, 1]))
    out = S.slice_block(f, torch.randn(dim, dim, generator=g), torch.randn(dim, hidden, generator=g), plan)
    assert out["attn.qkv.weight"].shape == (h * (2 + 2 + 1), dim)
    assert out["attn.qkv.bias"].shape == (10,)
    assert out["attn.proj.weight"].shape == (dim, 2)
    assert out["mlp.fc1.weight"].shape == (3, dim) and out["mlp.fc2.weight"].shape == (dim, 3)
    assert torch.equal(out["attn.qkv.weight"][0], f.wq[0, 0]) and torch.equal(out["attn.qkv.weight"][3], f.wq[1, 3])
