"""DIMAP (ICLR 2024) checkpoints: unstructured weight masking of Swin. What survives deployment is only what
whole zero rows or columns allow; this module finds them and removes them exactly (issue 15, first part: pure
functions on a `CaitSwin` config and state dict; the `convert --from dimap` command comes with the Swin family's
fused-file support).

Exact removals, per block:
- FFN hidden unit r: fc1 row r and fc1 bias r both zero, so its output is the constant GELU(0) = 0, or just
  fc1 row r zero, so the output is the constant GELU(b_r), folded into fc2's bias (fc2.bias += fc2[:, r] *
  GELU(b_r)); or fc2 column r zero (the unit feeds nothing). The unit goes from fc1 and fc2.
- q/k channel c of a head: a zero q row with a zero q bias (q_c = 0, so it adds nothing to q.k), or the same
  for k. The position goes from q and k together (attention-level consistency).
- v channel c of a head: a zero v row and bias (v_c = 0), or a zero proj column. It goes from v and proj.
Every head of a block keeps the same widths (the deploy model's layout): a head drops as many channels as the
head with the fewest removable ones (the lowest-index removable ones; any choice is exact).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F

from ..models.swin import SwinConfig


def sparsity(sd: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    """Zero share of every weight matrix (2-D) and convolution (4-D) of a state dict, in key order."""
    out = []
    for k, v in sd.items():
        if k.endswith(".weight") and v.ndim in (2, 4) and v.is_floating_point():
            out.append({"key": k, "shape": list(v.shape), "zeros": float((v == 0).float().mean())})
    return out


def _keep_per_head(removable: torch.Tensor, heads: int) -> torch.Tensor:
    """[heads * width] bool removable -> [heads * width] bool keep, the same count kept in every head."""
    r = removable.view(heads, -1)
    n = int(r.sum(1).min())
    keep = torch.ones_like(r)
    for h in range(heads):
        idx = torch.nonzero(r[h]).flatten()[:n]
        keep[h, idx] = False
    return keep.flatten()


def _zero_rows(w: torch.Tensor, b: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(row all zero, row all zero and bias zero)."""
    rows = (w == 0).all(dim=1)
    return rows, rows & (b == 0 if b is not None else torch.ones_like(rows))


@torch.no_grad()
def drop_zero_rows(cfg: SwinConfig, sd: dict[str, torch.Tensor]) -> tuple[SwinConfig, dict[str, torch.Tensor],
                                                                           list[dict[str, int]]]:
    """The smaller, exactly equivalent (config, state dict) of a CaitSwin with zero rows/columns; per block what
    was kept: {"stage", "block", "qk", "v", "mlp"} (per-head widths and the hidden width, before -> after)."""
    sd = {k: v.clone() for k, v in sd.items()}
    stages, report = [], []
    for s, blocks in enumerate(cfg.stages):
        new_blocks = []
        for i, b in enumerate(blocks):
            p = f"layers.{s}.blocks.{i}."
            # FFN
            w1, b1 = sd[p + "fc1.weight"], sd[p + "fc1.bias"]
            w2, b2 = sd[p + "fc2.weight"], sd[p + "fc2.bias"]
            rows, _ = _zero_rows(w1, None)
            dead_out = (w2 == 0).all(dim=0)
            drop = rows | dead_out
            const = rows & ~dead_out      # constant GELU(b) units: fold into fc2's bias
            if bool(const.any()):
                b2 += w2[:, const] @ F.gelu(b1[const])
            keep = ~drop
            if not bool(keep.any()):      # keep one unit (zero in, zero out) so the layer stays a layer
                keep[0] = True
                w1[0].zero_(); b1[0] = 0; w2[:, 0].zero_()
            sd[p + "fc1.weight"], sd[p + "fc1.bias"] = w1[keep].contiguous(), b1[keep].contiguous()
            sd[p + "fc2.weight"], sd[p + "fc2.bias"] = w2[:, keep].contiguous(), b2
            # attention
            hq, hv = b.num_heads * b.qk_dim, b.num_heads * b.v_dim
            wqkv, bqkv = sd[p + "attn.qkv.weight"], sd.get(p + "attn.qkv.bias")
            wq, wk, wv = wqkv.split([hq, hq, hv])
            bq, bk, bv = bqkv.split([hq, hq, hv]) if bqkv is not None else (None, None, None)
            _, q0 = _zero_rows(wq, bq)
            _, k0 = _zero_rows(wk, bk)
            keep_qk = _keep_per_head(q0 | k0, b.num_heads)
            _, v0 = _zero_rows(wv, bv)
            proj_dead = (sd[p + "attn.proj.weight"] == 0).all(dim=0)
            keep_v = _keep_per_head(v0 | proj_dead, b.num_heads)
            sd[p + "attn.qkv.weight"] = torch.cat([wq[keep_qk], wk[keep_qk], wv[keep_v]]).contiguous()
            if bqkv is not None:
                sd[p + "attn.qkv.bias"] = torch.cat([bq[keep_qk], bk[keep_qk], bv[keep_v]]).contiguous()
            sd[p + "attn.proj.weight"] = sd[p + "attn.proj.weight"][:, keep_v].contiguous()
            nb = replace(b, qk_dim=int(keep_qk.sum()) // b.num_heads, v_dim=int(keep_v.sum()) // b.num_heads,
                         mlp_hidden=int(keep.sum()))
            report.append({"stage": s, "block": i, "qk": [b.qk_dim, nb.qk_dim], "v": [b.v_dim, nb.v_dim],
                           "mlp": [b.mlp_hidden, nb.mlp_hidden]})
            new_blocks.append(nb)
        stages.append(tuple(new_blocks))
    return replace(cfg, stages=tuple(stages)), sd, report
