"""A ToMe-style token-merging baseline (Bolya et al., "Token Merging: Your ViT but Faster", ICLR 2023).

Written from the paper, not from its code. In every block, between the attention and the MLP:

1. metric: the attention keys averaged over heads, one vector per token, L2-normalised (cosine similarity);
2. the tokens are split alternately into set A (even positions 0, 2, 4, ...) and set B (odd positions);
3. every A token keeps its most similar B token as its one edge; the class token (position 0, in A) gets no
   edge, so it is never merged and stays the first token;
4. the r most similar edges are merged: each chosen A token is averaged into its B token, weighted by the
   number of patches the tokens already stand for (their "size"); sizes add up;
5. proportional attention: log(size) is added to the attention logits of every key, so a token that stands
   for s patches gets the attention weight s patches would get.

The output token order is [unmerged A tokens in their original order (class token first) | all B tokens].
`r` is the number of tokens removed per block: one int for every block, or a per-block list (a schedule).
At most floor((N-1)/2) tokens can be removed from N tokens (every A token except the class token).

FLOPs (`tome_flops`) follow families/flops.py: 2 per multiply-accumulate, matmuls and convolutions only. ToMe's own
cost is counted: the similarity matmul of each merging block, 2 * |A| * |B| * head_dim per image. Its
normalisation, mean over heads, argmax, sort, gather and scatter are not matmuls and are not counted
(as LayerNorm/softmax are not counted for the dense model).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F
from torch import nn

from caitdeploy.families.layers import Attention, Block, restore_grid
from caitdeploy.families.vit.config import CaitConfig

if TYPE_CHECKING:
    from caitdeploy.families.vit.model import CaitViT

MergeFn = Callable[..., torch.Tensor]


def _identity(x: torch.Tensor, mode: str = "sum") -> torch.Tensor:
    return x


def _protected(protect_cls: bool | int) -> int:
    """Prefix tokens to protect: True = the class token only (ToMe's rule), an int = that many."""
    return int(protect_cls) if isinstance(protect_cls, bool) else max(0, int(protect_cls))


def max_r(n_tokens: int, protect_cls: bool | int = True) -> int:
    """The most tokens one matching step can remove from `n_tokens` tokens (|A| minus its protected tokens)."""
    p = _protected(protect_cls)
    return max(0, (n_tokens + 1) // 2 - (p + 1) // 2)


def bipartite_soft_matching(k: torch.Tensor, r: int, protect_cls: bool | int = True) -> tuple[MergeFn, MergeFn]:
    """Plan one ToMe merge step from a similarity metric.

    k: [B, N, C] per-token metric (ToMe: the keys averaged over heads). r: tokens to remove.
    Returns (merge, unmerge):
      merge(x [B, N, D], mode="sum"|"mean"|"amax"...) -> [B, N - r, D] (A tokens reduced into their B match);
      unmerge(y [B, N - r, D]) -> [B, N, D] (every token gets the value of the token it ended up in).
    With r <= 0 both are the identity. r is capped at `max_r(N)`. protect_cls: True protects token 0 (the
    class token, ToMe's rule); an int P protects the first P tokens (class, distillation, registers): they
    are never merged away (A side) and never absorb a token (B side).
    """
    n = k.shape[1]
    p = _protected(protect_cls)
    r = min(int(r), max_r(n, p))
    if r <= 0:
        return _identity, _identity
    with torch.no_grad():
        unit = F.normalize(k, dim=-1)
        sim = unit[:, ::2] @ unit[:, 1::2].transpose(-1, -2)  # [B, |A|, |B|] cosine similarity, A = even
        if p:
            sim[:, : (p + 1) // 2, :] = -math.inf  # prefix tokens in A (even indices) never leave
            sim[:, :, : p // 2] = -math.inf  # prefix tokens in B (odd indices) never absorb
        best_sim, partner = sim.max(dim=-1)  # each A token's most similar B token
        ranked = best_sim.argsort(dim=-1, descending=True)  # strongest edges first
        gone = ranked[:, :r, None]  # A tokens folded into their partner
        stay = ranked[:, r:].sort(dim=-1).values[..., None]  # A tokens kept, original order
        target = partner.gather(1, gone.squeeze(-1))[..., None]  # where each folded A token lands in B
    n_a = (n + 1) // 2
    n_stay = n_a - r

    def merge(x: torch.Tensor, mode: str = "sum") -> torch.Tensor:
        xa, xb = x[:, ::2], x[:, 1::2]
        width = x.shape[-1]
        kept = xa.gather(1, stay.expand(-1, -1, width))
        moved = xa.gather(1, gone.expand(-1, -1, width))
        xb = xb.scatter_reduce(1, target.expand(-1, -1, width), moved, reduce=mode)
        return torch.cat([kept, xb], dim=1)

    def unmerge(y: torch.Tensor) -> torch.Tensor:
        width = y.shape[-1]
        kept, yb = y[:, :n_stay], y[:, n_stay:]
        out = y.new_zeros(y.shape[0], n, width)
        out[:, 1::2] = yb
        out.scatter_(1, (2 * stay).expand(-1, -1, width), kept)
        out.scatter_(1, (2 * gone).expand(-1, -1, width), yb.gather(1, target.expand(-1, -1, width)))
        return out

    return merge, unmerge


def merge_wavg(merge: MergeFn, x: torch.Tensor, size: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted average merge. x: [B, N, D]; size: [B, N, 1] patches per token (None = all ones).

    Returns (merged x [B, N', D], merged size [B, N', 1]); merged sizes are the sums of the sizes merged.
    """
    if size is None:
        size = torch.ones_like(x[..., :1])
    x = merge(x * size, mode="sum")
    size = merge(size, mode="sum")
    return x / size, size


# ---- r schedules ------------------------------------------------------------------------------------
def r_schedule(r: int | Sequence[int], depth: int) -> list[int]:
    """Per-block r list from an int (same r in every block) or a list of length `depth`."""
    if isinstance(r, (int,)) and not isinstance(r, bool):
        if r < 0:
            raise ValueError(f"ToMe r must be >= 0, got {r}")
        return [r] * depth
    if isinstance(r, bool):  # neither a count nor a list (it is no more iterable than it ever was)
        raise TypeError(f"ToMe r must be an int or a list of ints, got {r!r}")
    sched = [int(v) for v in r]
    if len(sched) != depth:
        raise ValueError(f"ToMe r schedule has {len(sched)} entries for {depth} blocks")
    if any(v < 0 for v in sched):
        raise ValueError(f"ToMe r schedule entries must be >= 0, got {sched}")
    return sched


def tome_tokens(config: CaitConfig, r: int | Sequence[int]) -> list[tuple[int, int]]:
    """(tokens in attention, tokens in the MLP) of every block, prefix tokens included."""
    p = config.num_prefix_tokens
    n = p + config.grid[0] * config.grid[1]
    out = []
    for ri in r_schedule(r, config.depth):
        m = n - min(ri, max_r(n, p))
        out.append((n, m))
        n = m
    return out


def _check_dense(config: CaitConfig) -> None:
    if config.merges:
        raise ValueError("ToMe runs a dense ViT: the config has ATME merges (use config.unpruned())")
    for i, b in enumerate(config.blocks):
        if b.kind != "attn" or b.slim is not None:
            raise ValueError(
                f"ToMe runs a dense ViT: block {i} is a {b.kind!r} block"
                f"{' with token slimming' if b.slim is not None else ''}"
            )
        if b.qk_dim != b.v_dim or b.num_heads * b.qk_dim != config.embed_dim:
            raise ValueError(f"ToMe runs a dense ViT: block {i} has pruned attention widths")


def tome_flops(config: CaitConfig, r: int | Sequence[int]) -> dict:
    """Analytic FLOPs per image of ToMe on a dense config, by block and part (see the module docstring).

    {"total", "patch_embed", "head", "blocks": [{"tokens", "tokens_out", "qkv", "attn", "match", "proj",
    "mlp", "total"}]}. With r = 0 the total equals `flops.model_flops(config)["total"]`.
    """
    from caitdeploy.families.flops import transformer_parts
    from caitdeploy.families.vit.flops import head_flops, patch_embed_flops

    _check_dense(config)
    d = config.embed_dim
    patch = patch_embed_flops(config)
    head = head_flops(config)
    blocks = []
    for b, (n, m) in zip(config.blocks, tome_tokens(config, r)):
        na, nb = (n + 1) // 2, n // 2
        parts = {
            "tokens": n,
            "tokens_out": m,
            **transformer_parts(n, d, b.num_heads, b.qk_dim, b.v_dim, b.mlp_hidden, n_mlp=m),
            "match": 2 * na * nb * b.qk_dim if m < n else 0,
        }
        parts["total"] = sum(v for k, v in parts.items() if k not in ("tokens", "tokens_out"))
        blocks.append(parts)
    return {
        "total": patch + head + sum(p["total"] for p in blocks),
        "patch_embed": patch,
        "head": head,
        "blocks": blocks,
    }


def choose_r(config_dense: CaitConfig, target_flops: float, tol: float = 0.02) -> int | list[int]:
    """The ToMe r whose FLOPs per image match `target_flops` within `tol` (relative).

    First the constant r (same in every block, as in the paper) closest to the target. If no constant r is
    within `tol`, a schedule: r+1 in the first k blocks and r in the rest, with the k closest to the target
    (FLOPs fall monotonically in k). Raises ValueError when even the best schedule misses the target.
    """
    depth = config_dense.depth
    p = config_dense.num_prefix_tokens
    n0 = p + config_dense.grid[0] * config_dense.grid[1]
    cost = {r: tome_flops(config_dense, r)["total"] for r in range(max_r(n0, p) + 1)}
    best = min(cost, key=lambda r: abs(cost[r] - target_flops))
    if abs(cost[best] - target_flops) <= tol * target_flops:
        return best
    # bracket: cost[lo] > target > cost[lo + 1] (costs fall with r)
    lo = max([r for r in cost if cost[r] >= target_flops], default=None)
    if lo is None or lo + 1 not in cost:
        lim = "above" if lo is None else "below"
        raise ValueError(
            f"ToMe cannot reach {target_flops / 1e9:.3f} GFLOPs: target is {lim} its range "
            f"[{min(cost.values()) / 1e9:.3f}, {max(cost.values()) / 1e9:.3f}]"
        )
    cands = [[lo + 1] * k + [lo] * (depth - k) for k in range(depth + 1)]
    sched = min(cands, key=lambda s: abs(tome_flops(config_dense, s)["total"] - target_flops))
    got = tome_flops(config_dense, sched)["total"]
    if abs(got - target_flops) > tol * target_flops:
        raise ValueError(
            f"no ToMe r schedule within {100 * tol:g}% of {target_flops / 1e9:.3f} GFLOPs (closest {got / 1e9:.3f})"
        )
    return sched


def describe_r(r: int | Sequence[int]) -> str:
    """'r=13' for a constant r, else 'r=[14x3,13x9]' (run-length)."""
    if isinstance(r, int):
        return f"r={r}"
    runs: list[list[int]] = []
    for v in r:
        if runs and runs[-1][0] == v:
            runs[-1][1] += 1
        else:
            runs.append([v, 1])
    return "r=[" + ",".join(f"{v}x{c}" for v, c in runs) + "]"


# ---- the model ---------------------------------------------------------------------------------------
class ToMeViT(nn.Module):
    """A dense `CaitViT` run with ToMe merging; no timm or CaitViT class is patched.

    `vit` must be a dense CaitViT (no ATME merges, no pruned widths); its modules (patch embed, LayerNorms,
    qkv/proj Linears, MLPs, head) are used as they are, with this module's own forward. With r = 0 in every
    block the forward runs exactly the dense model's operations (no matching, no attention bias).
    attn_impl: "sdpa" (default) or "math" (explicit MatMul/Softmax/MatMul, for export).
    """

    def __init__(self, vit: CaitViT, r: int | Sequence[int], attn_impl: str = "sdpa", prop_attn: bool = True):
        super().__init__()
        config: CaitConfig = vit.config
        _check_dense(config)
        if attn_impl not in ("sdpa", "math"):
            raise ValueError(f"ToMe attn_impl must be 'sdpa' or 'math', got {attn_impl!r}")
        self.vit = vit
        self.config = config
        self.r = r
        self.schedule = r_schedule(r, config.depth)
        self.attn_impl = attn_impl
        self.prop_attn = prop_attn

    def _attention(self, blk: Block, x: torch.Tensor, size: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        at = cast(Attention, blk.attn)  # _check_dense: every block is an attention block
        b, n, _ = x.shape
        h, dv = at.num_heads, at.v_dim
        q, k, v = at.heads(x)
        bias = size.log().reshape(b, 1, 1, n) if (size is not None and self.prop_attn) else None
        if self.attn_impl == "sdpa":
            bias = bias.to(q.dtype) if bias is not None else None
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=at.scale)
        else:
            attn = (q * at.scale) @ k.transpose(-2, -1)
            if bias is not None:
                attn = attn + bias.to(attn.dtype)
            out = attn.softmax(dim=-1) @ v
        return at.proj(out.transpose(1, 2).reshape(b, n, h * dv)), k.mean(dim=1)

    def forward_features(self, images: torch.Tensor, blocks=None, restore: str = "repeat"):
        """Without `blocks`: every token after the last block and the final norm (the head's input).

        With `blocks`: a list of feature maps [B, D, Gh, Gw] on the full patch grid, one per listed block (its
        output), as `CaitViT.forward_features` gives them: ToMe's merges are undone by tracking where every
        original token went (one index map, updated at every merge by the step's unmerge) and gathering each
        patch's token, so every patch gets the value of the token it was merged into. `restore` is accepted
        for the same signature; ToMe's irregular merges have one inverse only (the copy)."""
        vit = self.vit
        x = vit.embed(images)
        size = None
        wanted = self.config.feature_blocks(blocks) if blocks is not None else ()
        source = None
        if wanted:  # source[b, t]: where original token t lives now
            source = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
        out, p, grid = [], vit.num_prefix_tokens, self.config.grid
        for i, (blk, r) in enumerate(zip(cast("Iterable[Block]", vit.blocks), self.schedule)):
            if wanted and i > wanted[-1]:
                break
            y, metric = self._attention(blk, blk.norm1(x), size)
            x = x + y
            if r > 0:
                merge, unmerge = bipartite_soft_matching(metric, r, protect_cls=vit.num_prefix_tokens)
                if merge is not _identity:
                    x, size = merge_wavg(merge, x, size)
                    if source is not None:
                        now = torch.arange(x.shape[1], device=x.device, dtype=x.dtype)
                        step = unmerge(now.reshape(1, -1, 1).expand(x.shape[0], -1, 1))[..., 0].long()
                        source = step.gather(1, source)
            x = x + blk.mlp(blk.norm2(x))
            if source is not None and i in wanted:  # source is set whenever blocks are wanted
                idx = source[:, p:, None].expand(-1, -1, x.shape[-1])
                out.append(restore_grid(x.gather(1, idx), grid, grid))
        return out if wanted else vit.norm(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.vit.forward_head(self.forward_features(images))


def tome_model(
    config: CaitConfig,
    r: int | Sequence[int],
    attn_impl: str = "sdpa",
    seed: int | None = 0,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> ToMeViT:
    """A `ToMeViT` over a fresh dense CaitViT of `config` (random weights unless `state_dict` is given)."""
    from caitdeploy.families.vit.model import CaitViT

    if seed is not None:
        torch.manual_seed(seed)
    vit = CaitViT(config, attn_impl="sdpa" if attn_impl == "sdpa" else "math")
    if state_dict is not None:
        vit.load_state_dict(state_dict)
    return ToMeViT(vit, r, attn_impl=attn_impl).eval()
