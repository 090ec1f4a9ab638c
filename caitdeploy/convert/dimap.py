"""`convert --from dimap`: DIMAP (ICLR 2024) checkpoints, unstructured weight masking of Swin (the file is a
plain Swin state dict, timm's or Microsoft's layout, with zeros scattered inside full tensors). What survives
deployment is only what whole zero rows or columns allow; this module reports the sparsity per layer, finds
those rows and removes them exactly.

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

import math
import re
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F

from caitdeploy.families.swin.keys import timm_layout
from caitdeploy.families.swin.model import SwinConfig


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
    n = min(int(r.sum(1).min()), r.shape[1] - 1)  # a head keeps at least one channel
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
def drop_zero_rows(
    cfg: SwinConfig, sd: dict[str, torch.Tensor]
) -> tuple[SwinConfig, dict[str, torch.Tensor], list[dict[str, Any]]]:
    """The smaller, exactly equivalent (config, state dict) of a CaitSwin with zero rows/columns; per block what
    was kept: {"stage", "block", "qk", "v", "mlp"} (per-head widths and the hidden width, before -> after)."""
    sd = {k: v.clone() for k, v in sd.items()}
    stages, report = [], []  # report: {"stage": int, "block": int, "qk"|"v"|"mlp": [before, after]}
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
            const = rows & ~dead_out  # constant GELU(b) units: fold into fc2's bias
            if bool(const.any()):
                b2 += w2[:, const] @ F.gelu(b1[const])
            keep = ~drop
            if not bool(keep.any()):  # keep one unit (zero in, zero out) so the layer stays a layer
                keep[0] = True
                w1[0].zero_()
                b1[0] = 0
                w2[:, 0].zero_()
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
            if bq is not None and bk is not None and bv is not None:  # qkv has a bias (bqkv split)
                sd[p + "attn.qkv.bias"] = torch.cat([bq[keep_qk], bk[keep_qk], bv[keep_v]]).contiguous()
            sd[p + "attn.proj.weight"] = sd[p + "attn.proj.weight"][:, keep_v].contiguous()
            nb = replace(
                b,
                qk_dim=int(keep_qk.sum()) // b.num_heads,
                v_dim=int(keep_v.sum()) // b.num_heads,
                mlp_hidden=int(keep.sum()),
            )
            report.append(
                {
                    "stage": s,
                    "block": i,
                    "qk": [b.qk_dim, nb.qk_dim],
                    "v": [b.v_dim, nb.v_dim],
                    "mlp": [b.mlp_hidden, nb.mlp_hidden],
                }
            )
            new_blocks.append(nb)
        stages.append(tuple(new_blocks))
    return replace(cfg, stages=tuple(stages)), sd, report


# ---- the file -----------------------------------------------------------------------------------------------
def infer_format(path, sd: dict[str, torch.Tensor], img_size: int = 224) -> dict[str, Any]:
    """The Swin format config a plain state dict's shapes tell: widths from the stem, stages and depths from the
    block keys, heads and window from the relative position tables, mlp ratio from fc1, classes from the head.
    The input size is not in the weights: `img_size` (the releases' 224)."""
    from caitdeploy.core.errors import CaitError

    pw = sd.get("patch_embed.proj.weight")
    head = sd.get("head.fc.weight")
    if pw is None or pw.dim() != 4 or head is None or head.dim() != 2:
        raise CaitError(f"{path}: not a Swin state dict (no patch_embed.proj.weight [C, 3, p, p] or head weight)")
    depths: dict[int, int] = {}
    for k in sd:
        if m := re.match(r"layers\.(\d+)\.blocks\.(\d+)\.", k):
            s, i = int(m.group(1)), int(m.group(2))
            if s > 16 or i > 256:
                raise CaitError(f"{path}: key {k!r}: stage or block index out of range")
            depths[s] = max(depths.get(s, 0), i + 1)
    if not depths or sorted(depths) != list(range(len(depths))):
        raise CaitError(f"{path}: no Swin blocks (layers.S.blocks.I.*) numbered from stage 0")
    heads, window = [], None
    for s in range(len(depths)):
        t = sd.get(f"layers.{s}.blocks.0.attn.relative_position_bias_table")
        fc1 = sd.get(f"layers.{s}.blocks.0.mlp.fc1.weight")
        if t is None or t.dim() != 2 or fc1 is None or fc1.dim() != 2:
            raise CaitError(f"{path}: stage {s} block 0 lacks attn.relative_position_bias_table or mlp.fc1.weight")
        heads.append(int(t.shape[1]))
        if s == 0:
            side = math.isqrt(int(t.shape[0]))
            if side * side != t.shape[0] or side % 2 == 0:
                raise CaitError(f"{path}: relative position table of {t.shape[0]} rows is not (2w-1)^2")
            window = (side + 1) // 2
    dim = int(pw.shape[0])
    return {
        "family": "swin",
        "arch": None,
        "img_size": img_size,
        "patch_size": int(pw.shape[-1]),
        "in_chans": int(pw.shape[1]),
        "num_classes": int(head.shape[0]),
        "embed_dim": dim,
        "depths": [depths[s] for s in range(len(depths))],
        "num_heads": heads,
        "window_size": window,
        "mlp_ratio": sd["layers.0.blocks.0.mlp.fc1.weight"].shape[0] / dim,
        "qkv_bias": "layers.0.blocks.0.attn.qkv.bias" in sd,
        "ln_eps": 1e-5,
        "merges": {},
    }


def convert(path, sd: dict[str, torch.Tensor], img_size: int = 224):
    """(config, deploy tensors, float64 reference forward, notes, extra report fields)."""
    from caitdeploy.core.errors import CaitError
    from caitdeploy.families.swin.model import (
        CaitSwin,
        check_format,
        checkpoint_shapes,
        from_checkpoint,
        swin_config_from_format,
    )
    from caitdeploy.families.vit.config import ConfigError
    from caitdeploy.formats.checkpoint import validate_state_dict

    sd, layout = timm_layout(sd)
    try:
        fmt = check_format(infer_format(path, sd, img_size))
        cfg = swin_config_from_format(fmt)
    except ConfigError as e:
        raise CaitError(f"{path}: {e}") from None
    req, _ = checkpoint_shapes(cfg)
    validate_state_dict(path, sd, req, {})
    dense = {k: v.float() for k, v in from_checkpoint(cfg, sd).items()}
    layers = sparsity({k: sd[k] for k in req})
    total = sum(math.prod(r["shape"]) for r in layers)
    zeros = sum(r["zeros"] * math.prod(r["shape"]) for r in layers)
    small, tensors, rows = drop_zero_rows(cfg, dense)
    small = replace(small, source=fmt)
    removed = {part: sum(r[part][0] - r[part][1] for r in rows) for part in ("qk", "v", "mlp")}

    ref_model = CaitSwin(cfg)
    ref_model.load_state_dict(dense)
    ref_model = ref_model.double().eval()
    notes = [
        (
            f"{layout} layout, {len(cfg.stages)} stages {[len(b) for b in cfg.stages]}, heads {fmt['num_heads']}, "
            f"window {cfg.window}; img_size {img_size} (not stored in the weights)"
        ),
        (
            f"sparsity: {100 * zeros / max(total, 1):.1f}% of the {total} weights in matrices are zero "
            f"(layers from {100 * min(r['zeros'] for r in layers):.1f}% to {100 * max(r['zeros'] for r in layers):.1f}%)"
        ),
        (
            f"exact row removal: {removed['mlp']} FFN units, {removed['qk']} q/k and {removed['v']} v channels per "
            "head summed over blocks (scattered zeros inside kept rows still cost their multiply-adds)"
        ),
    ]
    extra = {"sparsity": {"zeros": zeros / max(total, 1), "layers": layers}, "removed_rows": rows}
    return small, tensors, ref_model, notes, extra
