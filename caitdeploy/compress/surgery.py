"""Pure tensor functions for weight surgery: fold, select, enforce consistency, align, slice.

No nn.Module is involved. Per-head tensors are laid out [H, d, ...]. A selection of channels is an index
tensor; the index -1 stands for a zero channel (exact zero padding).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from caitdeploy.core.errors import CaitError


# ---- fold ---------------------------------------------------------------------------------------
def fold(weight: torch.Tensor, bias: torch.Tensor | None, compactor: torch.Tensor | None):
    """Fold a compactor into the layer before it: W' = C W, b' = C b.

    weight: [..., d, D_in] (per head when it has a leading H), bias: [..., d] or None,
    compactor: [..., d, d] or None (identity). Returns (W', b').
    """
    if compactor is None:
        return weight, bias
    c = compactor.to(weight.dtype)
    w = c @ weight
    b = None if bias is None else (c @ bias.unsqueeze(-1)).squeeze(-1)
    return w, b


def scale_rows(weight: torch.Tensor, bias: torch.Tensor, gamma: torch.Tensor | None, factor: float = 1.0):
    """Fold an output scaling into a Linear: y * gamma * factor = (diag(gamma) * factor W) x + gamma * factor b.
    Layer scale (DeiT III's ls1/ls2, gamma [D_out]) and LV-ViT's residual 1/skip_lam (factor) fold this way."""
    if gamma is None and factor == 1.0:
        return weight, bias
    g = torch.full_like(bias, factor) if gamma is None else gamma.to(bias.dtype) * factor
    return weight * g[:, None], bias * g


def row_norms(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """L2 norm of each output row of a (folded) layer, bias included: [..., d]."""
    sq = weight.double().pow(2).sum(-1)
    if bias is not None:
        sq = sq + bias.double().pow(2)
    return sq.sqrt()


# ---- select -------------------------------------------------------------------------------------
def keep_from_mask(mask: torch.Tensor | None, shape: tuple[int, ...]) -> torch.Tensor:
    """Boolean keep-set from a 0/1 mask (None keeps everything)."""
    return torch.ones(shape, dtype=torch.bool) if mask is None else mask != 0


def keep_from_threshold(norms: torch.Tensor, threshold: float) -> torch.Tensor:
    """Keep rows whose folded row norm is above `threshold`."""
    return norms > threshold


@dataclass
class Repair:
    """What `repair_consistency` changed in one block."""

    block: int
    part: str  # "qk" or "v"
    head: int
    added: int
    reason: str


def check_consistency(block: int, keep_q: torch.Tensor, keep_k: torch.Tensor, keep_v: torch.Tensor) -> None:
    """Strict mode: raise naming block, head and counts when CDCP's guarantees do not hold.

    keep_*: [H, d] booleans. Attention level: q and k keep the same positions in every head.
    Head level: every head keeps the same count (q/k and v separately).
    """
    for h in range(keep_q.shape[0]):
        if not torch.equal(keep_q[h], keep_k[h]):
            nq, nk = int(keep_q[h].sum()), int(keep_k[h].sum())
            diff = int((keep_q[h] ^ keep_k[h]).sum())
            raise CaitError(
                f"block {block} head {h}: q keeps {nq} channels and k keeps {nk}, {diff} positions "
                "differ (attention-level consistency broken; try --consistency repair)"
            )
    for part, keep in (("q/k", keep_q), ("v", keep_v)):
        counts = keep.sum(-1).tolist()
        if len(set(counts)) > 1:
            h = next(i for i, c in enumerate(counts) if c != counts[0])
            raise CaitError(
                f"block {block} head {h}: keeps {counts[h]} {part} channels but head 0 keeps {counts[0]} "
                f"(head-level consistency broken: {counts}; try --consistency repair)"
            )


def readmit(keep: torch.Tensor, scores: torch.Tensor, count: int) -> tuple[torch.Tensor, list[int]]:
    """Raise every row of `keep` [H, d] to `count` kept channels by re-admitting its highest-score dropped ones.

    Returns (new keep, channels added per head). `count` may not exceed d.
    """
    keep = keep.clone()
    added = []
    for h in range(keep.shape[0]):
        need = count - int(keep[h].sum())
        if need > 0:
            s = scores[h].clone().double()
            s[keep[h]] = -float("inf")
            keep[h, torch.topk(s, need).indices] = True
        added.append(max(need, 0))
    return keep, added


def repair_consistency(
    block: int,
    keep_q: torch.Tensor,
    keep_k: torch.Tensor,
    keep_v: torch.Tensor,
    score_qk: torch.Tensor,
    score_v: torch.Tensor,
):
    """Repair mode: union of q and k positions, then every head raised to the block's largest kept count.

    Returns (keep_qk [H, d], keep_v [H, d], list[Repair]).
    """
    repairs: list[Repair] = []
    keep_qk = keep_q | keep_k
    for h in range(keep_qk.shape[0]):
        extra = int(keep_qk[h].sum()) - min(int(keep_q[h].sum()), int(keep_k[h].sum()))
        if not torch.equal(keep_q[h], keep_k[h]):
            repairs.append(Repair(block, "qk", h, extra, "union of q and k positions"))
    for part, keep, score in (("qk", keep_qk, score_qk), ("v", keep_v, score_v)):
        target = int(keep.sum(-1).max())
        new, added = readmit(keep, score, target)
        repairs += [Repair(block, part, h, a, f"raised to {target} per head") for h, a in enumerate(added) if a]
        if part == "qk":
            keep_qk = new
        else:
            keep_v = new
    return keep_qk, keep_v, repairs


def to_indices(keep: torch.Tensor) -> torch.Tensor:
    """[H, d] (equal counts) or [F] booleans -> sorted kept indices [H, n] or [n]."""
    if keep.dim() == 1:
        return keep.nonzero().squeeze(-1)
    return torch.stack([row.nonzero().squeeze(-1) for row in keep])


# ---- align --------------------------------------------------------------------------------------
def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def align_keep(keep: torch.Tensor, scores: torch.Tensor, multiple: int) -> tuple[torch.Tensor, int]:
    """Round the kept count per row of `keep` ([H, d] or [F]) up to a multiple of `multiple`.

    Re-admits the highest-score dropped channels first (they are the checkpoint's own, near-zero channels,
    so the fused model stays at least as close to the checkpoint) and returns how many zero channels must
    still be padded where the rounded width exceeds the original width.
    """
    squeeze = keep.dim() == 1
    k2, s2 = (keep[None], scores[None]) if squeeze else (keep, scores)
    n = int(k2.sum(-1).max())
    target = round_up(n, multiple)
    new, _ = readmit(k2, s2, min(target, k2.shape[-1]))
    pad = max(target - k2.shape[-1], 0)
    return (new[0] if squeeze else new), pad


def pad_indices(idx: torch.Tensor, width: int) -> torch.Tensor:
    """Append -1 (zero channel) entries along the last dim up to `width`."""
    extra = width - idx.shape[-1]
    if extra <= 0:
        return idx
    return torch.cat([idx, idx.new_full((*idx.shape[:-1], extra), -1)], dim=-1)


# ---- slice --------------------------------------------------------------------------------------
def take(t: torch.Tensor, idx: torch.Tensor, dim: int) -> torch.Tensor:
    """index_select along `dim` where idx == -1 gives a zero slice (exact zero padding).

    With a per-head idx [H, n], `t` has its head axis first and `dim` counts from it.
    """
    if idx.dim() == 1:
        out = t.index_select(dim, idx.clamp(min=0))
        zero = (idx < 0).view([-1 if i == dim else 1 for i in range(t.dim())])
        return out.masked_fill(zero, 0) if bool((idx < 0).any()) else out
    return torch.stack([take(t[h], idx[h], dim - 1) for h in range(idx.shape[0])])


@dataclass
class BlockPlan:
    """Kept channels of one block after selection, consistency and alignment (-1 = zero pad)."""

    qk: torch.Tensor  # [H, n_qk]
    v: torch.Tensor  # [H, n_v]
    mlp: torch.Tensor  # [n_mlp]
    repairs: list[Repair] = field(default_factory=list)
    pruned_qk: int = 0  # kept per head before alignment
    pruned_v: int = 0
    pruned_mlp: int = 0
    max_dropped_norm: float = 0.0


def fold_rows(weight: torch.Tensor, bias: torch.Tensor | None, compactor: torch.Tensor | None, idx: torch.Tensor):
    """Rows `idx` of the folded layer, (C W)[idx] = C[idx] W, without folding the rest (-1 = zero row)."""
    if compactor is None:
        return take(weight, idx, 0), None if bias is None else take(bias, idx, 0)
    return fold(weight, bias, take(compactor, idx, 0))


@dataclass
class FoldedBlock:
    """One block's per-head q/k/v weights with their compactors folded in, and fc1 with its compactor.

    fc1 stays unfolded (w1, b1, c1): its compactor is F x F, so `slice_block` folds only the kept rows.
    """

    wq: torch.Tensor
    bq: torch.Tensor | None
    wk: torch.Tensor
    bk: torch.Tensor | None
    wv: torch.Tensor
    bv: torch.Tensor | None
    w1: torch.Tensor
    b1: torch.Tensor
    c1: torch.Tensor | None

    def fc1_folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        return fold(self.w1, self.b1, self.c1)


def fold_block(qkv_w, qkv_b, fc1_w, fc1_b, num_heads: int, compactors: dict) -> FoldedBlock:
    """Fold q/k/v compactors per head. compactors: name ("q", "k", "v", "fc1") -> weight or None."""
    dim = qkv_w.shape[1]
    d = dim // num_heads
    ws = qkv_w.reshape(3, num_heads, d, dim)
    bs = None if qkv_b is None else qkv_b.reshape(3, num_heads, d)
    out = {}
    for j, name in enumerate("qkv"):
        out["w" + name], out["b" + name] = fold(ws[j], None if bs is None else bs[j], compactors.get(name))
    return FoldedBlock(w1=fc1_w, b1=fc1_b, c1=compactors.get("fc1"), **out)


def slice_block(f: FoldedBlock, proj_w: torch.Tensor, fc2_w: torch.Tensor, plan: BlockPlan) -> dict[str, torch.Tensor]:
    """Fused tensors of one block: qkv rows [q | k | v] kept per head, proj/fc2 input columns to match."""
    h = f.wq.shape[0]
    dim = proj_w.shape[0]
    rows = [take(f.wq, plan.qk, 1), take(f.wk, plan.qk, 1), take(f.wv, plan.v, 1)]
    out = {"attn.qkv.weight": torch.cat([r.reshape(-1, r.shape[-1]) for r in rows])}
    if f.bq is not None and f.bk is not None and f.bv is not None:  # qkv has a bias: all three or none
        out["attn.qkv.bias"] = torch.cat(
            [take(f.bq, plan.qk, 1).reshape(-1), take(f.bk, plan.qk, 1).reshape(-1), take(f.bv, plan.v, 1).reshape(-1)]
        )
    pw = proj_w.reshape(dim, h, -1).transpose(0, 1)  # [H, D, d]
    out["attn.proj.weight"] = take(pw, plan.v, 2).transpose(0, 1).reshape(dim, -1)
    out["mlp.fc1.weight"], out["mlp.fc1.bias"] = fold_rows(f.w1, f.b1, f.c1, plan.mlp)
    out["mlp.fc2.weight"] = take(fc2_w, plan.mlp, 1)
    return {k: v.contiguous() for k, v in out.items()}
