"""CDCP channel selection (the paper's Alg. 1-3) and `make-checkpoint`.

Selection, as implemented here:
1. Importance of a channel (Alg. 1): the norm of its folded output row times the norm of the input column
   that consumes it (proj for v, fc2 for fc1). For q/k the pair is scored jointly, |q_c| * |k_c|, because
   attention-level consistency removes a position from q and k together (Alg. 3).
2. Scores are normalised by their layer's mean, so layers of different scale rank together globally.
3. Head-level consistency (Alg. 2): a pruning unit of a block's q/k (or v) removes the r-th least important
   channel of EVERY head at once; its score is the mean over heads. mlp units are single fc1 channels.
   With `align` > 1 a unit removes `align` ranks, so kept widths stay multiples of `align`.
4. Units from all blocks are ranked globally and removed, least important first, until the FLOPs of the
   pruned model (merges included) reach the target. Each layer keeps at least 1/8 of its width.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from caitdeploy.core.errors import CaitError, OptionError, atomic_output
from caitdeploy.core.names import FORMAT
from caitdeploy.families.base import check_merge_budget
from caitdeploy.families.flops import model_flops
from caitdeploy.families.vit.config import CaitConfig


@dataclass(frozen=True)
class Unit:
    block: int
    part: str  # "qk", "v" or "mlp"
    rank: int  # first sorted position this unit removes
    width: int  # channels removed per head (or in fc1)
    score: float
    flops: int  # FLOPs saved per image


def block_scores(
    sd: dict[str, torch.Tensor], prefix: str, num_heads: int, comps: dict | None = None
) -> dict[str, torch.Tensor]:
    """Importance per channel of one block whose keys start with `prefix` (timm layout):
    {"qk": [H, d], "v": [H, d], "mlp": [F]} (Alg. 1); `comps` name -> compactor weight (None: identity)."""
    from caitdeploy.compress.surgery import fold_block, row_norms

    p = prefix
    f = fold_block(
        sd[p + "attn.qkv.weight"],
        sd.get(p + "attn.qkv.bias"),
        sd[p + "mlp.fc1.weight"],
        sd[p + "mlp.fc1.bias"],
        num_heads,
        comps or {},
    )
    nq, nk, nv, n1 = row_norms(f.wq, f.bq), row_norms(f.wk, f.bk), row_norms(f.wv, f.bv), row_norms(*f.fc1_folded())
    proj = sd[p + "attn.proj.weight"].double()  # [D, H*d]
    fc2 = sd[p + "mlp.fc2.weight"].double()  # [D, F]
    return {"qk": nq * nk, "v": nv * proj.pow(2).sum(0).sqrt().reshape(nv.shape), "mlp": n1 * fc2.pow(2).sum(0).sqrt()}


def channel_scores(sd: dict[str, torch.Tensor], cfg: Any) -> list[dict[str, torch.Tensor]]:
    """Importance per channel and block, in the family's flat block order: {"qk": [H, d], "v": [H, d], "mlp": [F]}
    (Alg. 1), compactors folded in where `sd` has them."""
    from caitdeploy.families.registry import family_of

    fam = family_of(cfg)
    return [
        block_scores(
            sd,
            site.prefix,
            site.num_heads,
            {n: sd.get(fam.compactor_key(cfg, site.index, n) + ".weight") for n in ("q", "k", "v", "fc1")},
        )
        for site in fam.block_sites(cfg)
    ]


def _units(cfg: CaitConfig, scores: list[dict[str, torch.Tensor]], align: int) -> list[Unit]:
    from caitdeploy.families.flops import channel_savings

    units = []
    for i in range(cfg.depth):
        per_channel = channel_savings(cfg, i)
        for part, s in scores[i].items():
            s = s / s.mean().clamp_min(1e-30)
            ranked = s.sort(dim=-1).values.reshape(-1, s.shape[-1]).mean(0)  # mean over heads, per rank
            width = s.shape[-1]
            removable = width - max(align, math.ceil(width / 8))
            removable -= removable % align
            best = -math.inf
            for r in range(0, removable, align):
                best = max(best, float(ranked[r : r + align].mean()))  # monotone within a layer
                units.append(Unit(i, part, r, align, best, per_channel[part] * align))
    return units


def cdcp_select(
    cfg: CaitConfig, scores: list[dict[str, torch.Tensor]], flops_reduction: float, align: int = 1
) -> tuple[list[dict[str, torch.Tensor]], dict[str, Any]]:
    """Masks (1 = kept) per block, {"q","k","v": [H, d], "fc1": [F]}, reaching the FLOPs target.

    cfg: the unpruned model WITH its merges; the target is relative to the same model without merges.
    """
    if not 0 <= flops_reduction < 1:
        raise OptionError("flops_reduction", f"must be in [0, 1), got {flops_reduction}")
    dense = model_flops(cfg.unpruned())["total"]
    target = (1 - flops_reduction) * dense
    current = model_flops(cfg)["total"]
    removed: dict[tuple[int, str], int] = {}
    for u in sorted(_units(cfg, scores, align), key=lambda u: (u.score, u.block, u.part, u.rank)):
        if current <= target:
            break
        removed[(u.block, u.part)] = removed.get((u.block, u.part), 0) + u.width
        current -= u.flops
    if current > target * 1.0005:
        raise OptionError(
            "flops_reduction",
            f"{flops_reduction}: unreachable, pruning every layer to 1/8 of its "
            f"width reaches only {1 - current / dense:.3f}",
        )
    masks = []
    for i, s in enumerate(scores):
        m = {}
        for part, key in (("qk", "q"), ("v", "v"), ("mlp", "fc1")):
            order = s[part].argsort(dim=-1)
            keep = torch.ones_like(s[part], dtype=torch.float32)
            keep.scatter_(-1, order[..., : removed.get((i, part), 0)], 0.0)
            m[key] = keep
        m["k"] = m["q"].clone()
        masks.append(m)
    return masks, {
        "flops_dense": dense,
        "flops_target": target,
        "flops_pruned": current,
        "flops_reduction": 1 - current / dense,
    }


# ---- timm -> cait-compactor/1 -------------------------------------------------------------------
def fit_state_dict(model, sd: dict[str, torch.Tensor], what: str, arch: str, new_head: bool = False) -> set[str]:
    """Load a timm state dict into `model` after checking every key, shape and value (one-line CaitError naming
    `what`, the file). `new_head`: a head of another size stays at the model's init (the data decide the
    classes); returns the keys so left out."""
    own = model.state_dict()
    head = {k for k in own if new_head and k.startswith("head.") and k in sd and sd[k].shape != own[k].shape}
    missing = [k for k in own if k not in sd and k not in head]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        bad = f"missing key {missing[0]!r}" if missing else f"unexpected key {unexpected[0]!r}"
        raise CaitError(f"{what}: does not fit --arch {arch}: {bad}")
    for k, v in own.items():
        if k in head:
            continue
        if tuple(sd[k].shape) != tuple(v.shape):
            raise CaitError(f"{what}: key {k!r} has shape {tuple(sd[k].shape)}, --arch {arch} has {tuple(v.shape)}")
        if not bool(torch.isfinite(sd[k]).all()):
            raise CaitError(f"{what}: key {k!r} contains NaN or Inf")
    model.load_state_dict({k: v for k, v in sd.items() if k not in head}, strict=not head)
    return head


def load_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A plain timm state dict from .safetensors or .pth (weights_only), `model`/`state_dict` unwrapped."""
    from caitdeploy.formats.checkpoint import _strip_prefixes, check_tensors, read_container

    raw = read_container(Path(path))
    sd = raw.get("model", raw.get("state_dict", raw))
    if not isinstance(sd, dict):
        raise CaitError(f"{path}: no state dict found")
    from caitdeploy.families.registry import buffer_suffixes

    sd = {
        k: v
        for k, v in _strip_prefixes(sd).items()
        if isinstance(v, torch.Tensor) and not k.endswith(buffer_suffixes())
    }  # buffers the models rebuild (Swin's masks and indices)
    return check_tensors(Path(path), sd)[0]  # dense real storage, float weights (half upcast)


def make_checkpoint(
    arch: str,
    flops_reduction: float | None = None,
    merges: dict | str | None = None,
    weights: str | None = None,
    seed: int = 0,
    align: int = 1,
    num_classes: int | None = None,
    img_size: int | None = None,
    model_args: dict | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A valid `cait-compactor/1` checkpoint from a timm architecture of any family that timm builds, pruned
    one-shot by CDCP selection. `merges`: a parsed merge map, a --merges spec, "auto" (the family's placement
    for the target) or None (the family's default); `flops_reduction` None: the family's default.

    Compactors are identity with the dropped rows set to zero, as converged CDCP training leaves them;
    ATME merges start as the mean of the two tokens. OptionError when the merges alone exceed the target.
    Returns (checkpoint dict, selection summary)."""
    from caitdeploy.core.budgets import check_float
    from caitdeploy.families.registry import family_for_arch

    fam = family_for_arch(arch)
    flops_reduction = fam.default_flops_reduction if flops_reduction is None else flops_reduction
    check_float(flops_reduction, "flops_reduction", 0.0, 0.95)
    if isinstance(merges, str) or merges is None:
        text = fam.default_merges if merges is None else merges
        merge_map = None if text.strip().lower() == "auto" else fam.parse_merges(text)
    else:
        merge_map = dict(merges)
    torch.manual_seed(seed)
    model = fam.timm_model(arch, num_classes, img_size, model_args)
    if weights:
        fit_state_dict(model, fam.timm_keys(load_weights(weights)), weights, arch)
    auto = merge_map is None
    if merge_map is None:
        merge_map, _ = fam.auto_merges(fam.format_config_of(model, arch), flops_reduction)
    fmt, cfg, sd = fam.initial_weights(model, merge_map, arch)
    check_merge_budget(fam.merge_reduction(fmt, merge_map), flops_reduction, fam.merges_text(merge_map))
    masks, summary = cdcp_select(cfg, channel_scores(sd, cfg), flops_reduction, align)
    for site, m in zip(fam.block_sites(cfg), masks):
        for name in ("q", "k", "v"):
            c = torch.eye(m[name].shape[-1]).repeat(m[name].shape[0], 1, 1) * m[name].unsqueeze(-1)
            sd[fam.compactor_key(cfg, site.index, name) + ".weight"] = c
            sd[fam.compactor_key(cfg, site.index, name) + ".mask"] = m[name]
        sd[fam.compactor_key(cfg, site.index, "fc1") + ".weight"] = torch.diag(m["fc1"])
        sd[fam.compactor_key(cfg, site.index, "fc1") + ".mask"] = m["fc1"]
    config = {**fmt, "merges": fam.merges_summary(merge_map)}
    summary.update(
        arch=arch,
        family=fam.name,
        merges=fam.merges_summary(merge_map),
        merges_text=fam.merges_text(merge_map),
        auto=auto,
        kept=[{k: int(v.sum()) for k, v in m.items()} for m in masks],
    )
    return {"format": FORMAT, "config": config, "state_dict": sd}, summary


def save_checkpoint_dict(ckpt: dict[str, Any], path: str | os.PathLike, staging=None) -> Path:
    """Write a `cait-compactor/1` dict atomically as .pth (torch.save) or .safetensors (staged in `staging`,
    when given, to appear when the caller commits). Serialised in memory first, so a failed write (a full
    disk) is one CaitError naming the file."""
    import io
    import json

    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import save

        meta = {"format": ckpt["format"], "config": json.dumps(ckpt["config"])}
        if ckpt.get("data_config") is not None:
            meta["data_config"] = json.dumps(ckpt["data_config"])
        data = save({k: v.contiguous() for k, v in ckpt["state_dict"].items()}, metadata=meta)
    else:
        buf = io.BytesIO()
        torch.save(ckpt, buf)
        data = buf.getvalue()
    if staging is not None:
        staging.write_bytes(path, data)
    else:
        with atomic_output(path) as tmp:
            tmp.write_bytes(data)
    return path
