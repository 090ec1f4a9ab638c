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
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from caitdeploy.core.errors import CaitError, OptionError, atomic_output
from caitdeploy.families.flops import model_flops
from caitdeploy.families.vit.config import CaitConfig
from caitdeploy.formats.names import FORMAT, compactor_prefix, merge_prefix


@dataclass(frozen=True)
class Unit:
    block: int
    part: str   # "qk", "v" or "mlp"
    rank: int   # first sorted position this unit removes
    width: int  # channels removed per head (or in fc1)
    score: float
    flops: int  # FLOPs saved per image


def block_scores(sd: dict[str, torch.Tensor], prefix: str, num_heads: int, comps: dict | None = None
                 ) -> dict[str, torch.Tensor]:
    """Importance per channel of one block whose keys start with `prefix` (timm layout):
    {"qk": [H, d], "v": [H, d], "mlp": [F]} (Alg. 1); `comps` name -> compactor weight (None: identity)."""
    from caitdeploy.compress.surgery import fold_block, row_norms

    p = prefix
    f = fold_block(sd[p + "attn.qkv.weight"], sd.get(p + "attn.qkv.bias"), sd[p + "mlp.fc1.weight"],
                   sd[p + "mlp.fc1.bias"], num_heads, comps or {})
    nq, nk, nv, n1 = row_norms(f.wq, f.bq), row_norms(f.wk, f.bk), row_norms(f.wv, f.bv), row_norms(*f.fc1_folded())
    proj = sd[p + "attn.proj.weight"].double()           # [D, H*d]
    fc2 = sd[p + "mlp.fc2.weight"].double()              # [D, F]
    return {"qk": nq * nk, "v": nv * proj.pow(2).sum(0).sqrt().reshape(nv.shape), "mlp": n1 * fc2.pow(2).sum(0).sqrt()}


def channel_scores(sd: dict[str, torch.Tensor], cfg: CaitConfig) -> list[dict[str, torch.Tensor]]:
    """Importance per channel and block: {"qk": [H, d], "v": [H, d], "mlp": [F]} (Alg. 1)."""
    return [block_scores(sd, f"blocks.{i}.", b.num_heads,
                         {n: sd.get(compactor_prefix(i, n) + ".weight") for n in ("q", "k", "v", "fc1")})
            for i, b in enumerate(cfg.blocks)]


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
                best = max(best, float(ranked[r:r + align].mean()))  # monotone within a layer
                units.append(Unit(i, part, r, align, best, per_channel[part] * align))
    return units


def cdcp_select(cfg: CaitConfig, scores: list[dict[str, torch.Tensor]], flops_reduction: float,
                align: int = 1) -> tuple[list[dict[str, torch.Tensor]], dict[str, Any]]:
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
        raise OptionError("flops_reduction", f"{flops_reduction}: unreachable, pruning every layer to 1/8 of its "
                        f"width reaches only {1 - current / dense:.3f}")
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
    return masks, {"flops_dense": dense, "flops_target": target, "flops_pruned": current,
                   "flops_reduction": 1 - current / dense}


# ---- timm -> cait-compactor/1 -------------------------------------------------------------------
def timm_model(arch: str, num_classes: int | None = None, img_size: int | None = None):
    """A randomly initialised timm VisionTransformer in the layout the format supports (timm_compat)."""
    from caitdeploy.families.timm_compat import timm_model as make

    return make(arch, num_classes, img_size)


def format_config_of(model, merges: dict[int, str]) -> dict[str, Any]:
    from caitdeploy.families.timm_compat import format_config_of as of

    return of(model, merges)


def parse_merges(text: str) -> dict[int, str]:
    """'4:h,8:v' -> {4: 'h', 8: 'v'}; '' or 'none' -> {}."""
    out: dict[int, str] = {}
    if text.strip().lower() in ("", "none"):
        return out
    for item in text.split(","):
        try:
            k, v = item.split(":")
            block = int(k)
        except ValueError:
            raise OptionError("merges", f"{text!r}: expected BLOCK:h|v[,BLOCK:h|v...], e.g. 4:h,8:v") from None
        if v not in ("h", "v"):
            raise OptionError("merges", f"{text!r}: merge kind {v!r} must be 'h' or 'v'")
        if block in out:
            raise OptionError("merges", f"{text!r}: block {block} is named twice ({out[block]} and {v}); "
                            "a block has at most one merge")
        out[block] = v
    return out


TOKEN_SHARE = 0.75   # default share of the FLOPs reduction given to token merging (4:h,8:v on DeiT-S at 55%)


def merge_reduction(fmt: dict[str, Any], merges: dict[int, str], dense: int | None = None) -> float:
    """FLOPs reduction (vs the dense model, whose FLOPs `dense` may give) that `merges` alone give a model of
    format config `fmt`."""
    if dense is None:
        dense = model_flops(CaitConfig.from_format({**fmt, "merges": {}}))["total"]
    return 1 - model_flops(CaitConfig.from_format({**fmt, "merges": merges}))["total"] / dense


def auto_merges(fmt: dict[str, Any], flops_reduction: float, token_reduction: float | None = None
                ) -> tuple[dict[int, str], dict[str, Any]]:
    """The paper's rule for ATME blocks: divide the blocks uniformly (a horizontal merge after the first third,
    a vertical one after the second: 4:h,8:v for 12 blocks), then move them to the pair whose merge-only FLOPs
    reduction is closest to the token-FLOPs target (`token_reduction`, default TOKEN_SHARE x flops_reduction),
    never above `flops_reduction` (CDCP prunes channels for the rest). Ties go to the pair nearest the uniform
    one; each block moved costs 0.2 points of reduction, so the uniform pair wins when it is within reach.
    Returns (merges, info: uniform pair, chosen pair, token / channel / total reduction)."""
    depth = int(fmt["depth"])
    target = TOKEN_SHARE * flops_reduction if token_reduction is None else float(token_reduction)
    if not 0 <= target <= flops_reduction:
        raise OptionError("token_reduction", f"{target:.4f}: must be in 0..--flops-reduction ({flops_reduction})")
    u1, u2 = max(1, round(depth / 3)), max(2, round(2 * depth / 3))
    dense = model_flops(CaitConfig.from_format({**fmt, "merges": {}}))["total"]
    best = None
    for b1 in range(1, depth):
        for b2 in [*range(b1 + 1, depth), None]:
            merges = {b1: "h"} if b2 is None else {b1: "h", b2: "v"}
            try:
                r = merge_reduction(fmt, merges, dense)
            except ValueError:   # a merge on an odd grid side
                continue
            if r > flops_reduction + 1e-9:
                continue
            moved = abs(b1 - u1) + (abs(b2 - u2) if b2 is not None else depth)
            cost = abs(r - target) + 0.002 * moved
            if best is None or cost < best[0]:
                best = (cost, merges, r)
    if best is None:
        raise OptionError("merges", f"auto: no merge placement fits {depth} blocks, grid "
                                    f"{CaitConfig.from_format({**fmt, 'merges': {}}).grid} and --flops-reduction "
                                    f"{flops_reduction}; give --merges BLOCK:h|v,... or none")
    _, merges, r = best
    info = {"uniform": {u1: "h", u2: "v"}, "merges": merges, "token_target": target, "token_reduction": r,
            "channel_reduction": flops_reduction - r, "flops_reduction": flops_reduction}
    return merges, info


def check_merge_budget(r: float, flops_reduction: float, text: str) -> None:
    """OptionError naming --merges `text` when the merges alone cut more FLOPs (`r`, from `merge_reduction` or
    `swin_merge_reduction`) than the target: CDCP could not prune at all and the result would miss it."""
    if r > flops_reduction + 1e-9:
        raise OptionError("merges", f"{text}: the merges alone cut FLOPs by {r:.2%}, more than --flops-reduction "
                                    f"{flops_reduction}")


def merges_text(merges: dict[int, str]) -> str:
    return ",".join(f"{k}:{v}" for k, v in sorted(merges.items())) or "none"


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
            raise CaitError(f"{what}: key {k!r} has shape {tuple(sd[k].shape)}, --arch {arch} has "
                            f"{tuple(v.shape)}")
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
    from caitdeploy.families.swin.model import BUFFER_SUFFIXES

    sd = {k: v for k, v in _strip_prefixes(sd).items() if isinstance(v, torch.Tensor)
          and not k.endswith(BUFFER_SUFFIXES)}   # Swin's buffers, rebuilt by the model
    return check_tensors(Path(path), sd)[0]  # dense real storage, float weights (half upcast)


def is_swin_arch(arch: str) -> bool:
    return arch.startswith("swin_") and not arch.startswith("swinv2")


def parse_swin_merges(text: str) -> dict[tuple[int, int], str]:
    """'2.4:h,2.5:v' -> {(2, 4): 'h', (2, 5): 'v'}; '' or 'none' -> {}."""
    from caitdeploy.families.swin.model import parse_stage_merges
    from caitdeploy.families.vit.config import ConfigError

    if text.strip().lower() in ("", "none"):
        return {}
    pairs = [item.split(":") for item in text.split(",")]
    if any(len(p) != 2 for p in pairs):
        raise OptionError("merges", f"{text!r}: a Swin merge is STAGE.BLOCK:h|v, e.g. 2.4:h,2.5:v")
    keys = [k.strip() for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise OptionError("merges", f"{text!r}: a block is named twice; a block has at most one merge")
    try:
        return parse_stage_merges({k: v.strip() for k, v in zip(keys, (v for _, v in pairs))})
    except ConfigError as e:
        raise OptionError("merges", f"{text!r}: {e}") from None


SWIN_DEFAULT_REDUCTION = 0.354       # its ATME + CDCP setting (Tab. XII, CDCP only: --merges none, 0.267)


def swin_merge_reduction(fmt: dict[str, Any], merges: dict[tuple[int, int], str]) -> float:
    """FLOPs reduction that ATME `merges` {(stage, block): kind} alone give the Swin of format config `fmt`;
    ConfigError for a merge that does not fit (an odd grid side)."""
    from caitdeploy.families.swin import model as SW

    def flops(m):
        f = SW.check_format({**fmt, "merges": {f"{s}.{i}": k for (s, i), k in m.items()}})
        return model_flops(SW.swin_config_from_format(f))["total"]

    return 1 - flops(merges) / flops({})


def swin_auto_merges(fmt: dict[str, Any], flops_reduction: float) -> tuple[dict[tuple[int, int], str], dict]:
    """The paper's Swin placement (Tab. XIV): HTM and VTM at the last two blocks of the longest stage (stage 3
    of Swin-T/S/B: 2.4:h,2.5:v on Swin-T); when those merges alone would cut more than `flops_reduction`, or
    a grid side is odd, HTM alone at its last block, else none (CDCP prunes channels for the whole target).
    Returns (merges, info: token / channel / total reduction)."""
    from caitdeploy.families.vit.config import ConfigError

    depths = list(fmt["depths"])
    s = max(range(len(depths)), key=lambda k: (depths[k], -k))
    n = depths[s]
    tries = ([{(s, n - 2): "h", (s, n - 1): "v"}] if n >= 2 else []) + [{(s, n - 1): "h"}, {}]
    for merges in tries:
        try:
            r = swin_merge_reduction(fmt, merges)
        except ConfigError:
            continue
        if r <= flops_reduction + 1e-9:
            return merges, {"merges": merges, "token_reduction": r, "channel_reduction": flops_reduction - r,
                            "flops_reduction": flops_reduction}
    raise OptionError("merges", "auto: no Swin merge placement fits")   # unreachable: {} always fits


def swin_merges_text(merges: dict[tuple[int, int], str]) -> str:
    return ",".join(f"{s}.{i}:{k}" for (s, i), k in sorted(merges.items())) or "none"


def swin_timm_model(arch: str, num_classes: int | None = None, img_size: int | None = None,
                    model_args: dict | None = None):
    """A randomly initialised timm SwinTransformer (v1), one-line OptionError for other names; `model_args`
    override timm's (embed_dim, depths, num_heads, ...)."""
    import timm
    from timm.models.swin_transformer import SwinTransformer

    if arch not in timm.list_models("swin_*"):
        raise OptionError("arch", f"{arch!r} is not a timm Swin (v1) model; e.g. swin_tiny_patch4_window7_224")
    kwargs = {k: v for k, v in (("num_classes", num_classes), ("img_size", img_size)) if v is not None}
    kwargs.update(model_args or {})
    try:
        model = timm.create_model(arch, pretrained=False, **kwargs)
    except Exception as e:  # noqa: BLE001 - timm's own refusal of a size, in one line
        raise OptionError("arch", f"{arch}: timm cannot build it ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(model, SwinTransformer):
        raise OptionError("arch", f"{arch!r} is not a timm SwinTransformer (v1)")
    return model.eval()


def swin_weights(model, merges: dict[tuple[int, int], str], arch: str | None = None):
    """(format config, SwinConfig, checkpoint-keyed tensors without compactors) of a timm Swin `model` with ATME
    `merges` (mean-initialised); the relative position tables of blocks whose window the merges clip are
    resized from the dense ones as timm resizes them. OptionError naming --merges for a merge that does not fit."""
    from timm.layers import resize_rel_pos_bias_table

    from caitdeploy.families.swin import model as SW
    from caitdeploy.families.vit.config import ConfigError

    try:
        fmt = SW.check_format(SW.format_config_of(model, merges, arch))
    except ConfigError as e:
        raise OptionError("merges", f": {e}") from None
    cfg = SW.swin_config_from_format(fmt)
    req, _ = SW.checkpoint_shapes(cfg)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith(SW.BUFFER_SUFFIXES)}
    for k, shape in req.items():
        if k.endswith("relative_position_bias_table") and tuple(sd[k].shape) != shape:
            s, i = (int(x) for x in k.split(".")[1:4:2])
            win, _ = cfg.window_shift(s, i)
            with warnings.catch_warnings():   # timm's interpolation warns about torch internals
                warnings.simplefilter("ignore")
                sd[k] = resize_rel_pos_bias_table(sd[k], new_window_size=win, new_bias_shape=shape)
    for (s, i), kind in merges.items():
        eye = torch.eye(cfg.dims[s])
        sd[f"layers.{s}.blocks.{i}.{SW._MERGE_NAME[kind]}.fc.weight"] = torch.cat([eye, eye], dim=1) / 2
        sd[f"layers.{s}.blocks.{i}.{SW._MERGE_NAME[kind]}.fc.bias"] = torch.zeros(cfg.dims[s])
    return fmt, cfg, sd


def swin_scores(sd: dict[str, torch.Tensor], cfg) -> list[dict[str, torch.Tensor]]:
    """`channel_scores` for a Swin (checkpoint keys, flat block order), compactors folded in where present."""
    out = []
    for s, i, b in cfg.flat():
        p = f"layers.{s}.blocks.{i}."
        comps = {n: sd.get(p + (f"attn.{n}_compactor" if n != "fc1" else "mlp.fc1_compactor") + ".weight")
                 for n in ("q", "k", "v", "fc1")}
        out.append(block_scores(sd, p, b.num_heads, comps))
    return out


def make_swin_checkpoint(arch: str, flops_reduction: float, merges: dict[tuple[int, int], str] | None,
                         weights: str | None = None, seed: int = 0, align: int = 1, num_classes: int | None = None,
                         img_size: int | None = None, model_args: dict | None = None
                         ) -> tuple[dict[str, Any], dict[str, Any]]:
    """`make_checkpoint` for a timm Swin: CDCP selection over every block of every stage, ATME merges inside a
    stage (mean of the two tokens at start; None: `swin_auto_merges`, the paper's placement). A block whose
    window the merges clip (Tab. XIV: stage 4 runs on 4x4 tokens, window 4) gets its relative position table
    resized from the dense one, as timm resizes it. OptionError when the merges alone exceed the target."""
    from caitdeploy.families.swin import model as SW

    torch.manual_seed(seed)
    model = swin_timm_model(arch, num_classes, img_size, model_args)
    if weights:
        from caitdeploy.convert.dimap import timm_layout

        fit_state_dict(model, timm_layout(load_weights(weights))[0], weights, arch)   # Microsoft's layout too
    if merges is None:
        merges, _ = swin_auto_merges(SW.check_format(SW.format_config_of(model, {}, arch)), flops_reduction)
    fmt, cfg, sd = swin_weights(model, merges, arch)
    check_merge_budget(swin_merge_reduction(fmt, merges), flops_reduction, swin_merges_text(merges))
    req, _ = SW.checkpoint_shapes(cfg)
    flat = cfg.flat()
    masks, summary = cdcp_select(cfg, swin_scores(sd, cfg), flops_reduction, align)
    for (s, i, _), m in zip(flat, masks):
        p = f"layers.{s}.blocks.{i}."
        for name in ("q", "k", "v"):
            c = torch.eye(m[name].shape[-1]).repeat(m[name].shape[0], 1, 1) * m[name].unsqueeze(-1)
            sd[p + f"attn.{name}_compactor.weight"], sd[p + f"attn.{name}_compactor.mask"] = c, m[name]
        sd[p + "mlp.fc1_compactor.weight"], sd[p + "mlp.fc1_compactor.mask"] = torch.diag(m["fc1"]), m["fc1"]
    missing = sorted(set(req) - set(sd))
    if missing:   # a timm layout this version does not know
        raise CaitError(f"{arch}: timm's state dict lacks {missing[0]!r} (not a Swin v1 layout)")
    summary.update(arch=arch, merges={f"{s}.{i}": k for (s, i), k in merges.items()},
                   kept=[{k: int(v.sum()) for k, v in m.items()} for m in masks])
    return {"format": FORMAT, "config": fmt, "state_dict": sd}, summary


def make_checkpoint(arch: str, flops_reduction: float, merges: dict[int, str], weights: str | None = None,
                    seed: int = 0, align: int = 1, num_classes: int | None = None,
                    img_size: int | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """A valid `cait-compactor/1` checkpoint from a timm architecture, pruned one-shot by CDCP selection.

    Compactors are identity with the dropped rows set to zero, as converged CDCP training leaves them;
    ATME merges start as the mean of the two tokens. Returns (checkpoint dict, selection summary).
    """
    torch.manual_seed(seed)
    model = timm_model(arch, num_classes, img_size)
    if weights:
        fit_state_dict(model, load_weights(weights), weights, arch)
    fmt = {**format_config_of(model, merges), "arch": arch}
    try:
        cfg = CaitConfig.from_format(fmt)
    except ValueError as e:
        raise OptionError("merges", f": {e}") from None
    check_merge_budget(merge_reduction(fmt, merges), flops_reduction, merges_text(merges))
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    d = fmt["embed_dim"]
    for i, kind in merges.items():
        eye = torch.eye(d)
        sd[merge_prefix(i, kind) + ".weight"] = torch.cat([eye, eye], dim=1) / 2
        sd[merge_prefix(i, kind) + ".bias"] = torch.zeros(d)
    masks, summary = cdcp_select(cfg, channel_scores(sd, cfg), flops_reduction, align)
    for i, m in enumerate(masks):
        for name in ("q", "k", "v"):
            c = torch.eye(m[name].shape[-1]).repeat(m[name].shape[0], 1, 1) * m[name].unsqueeze(-1)
            sd[compactor_prefix(i, name) + ".weight"] = c
            sd[compactor_prefix(i, name) + ".mask"] = m[name]
        sd[compactor_prefix(i, "fc1") + ".weight"] = torch.diag(m["fc1"])
        sd[compactor_prefix(i, "fc1") + ".mask"] = m["fc1"]
    ckpt = {"format": FORMAT, "config": {**fmt, "merges": {str(k): v for k, v in merges.items()}}, "state_dict": sd}
    summary.update(arch=arch, merges=merges, kept=[{k: int(v.sum()) for k, v in m.items()} for m in masks])
    return ckpt, summary


def save_checkpoint_dict(ckpt: dict[str, Any], path: str | os.PathLike, staging=None) -> Path:
    """Write a `cait-compactor/1` dict atomically as .pth (torch.save) or .safetensors (staged in `staging`,
    when given, to appear when the caller commits). Serialised in memory first, so a failed write (a full
    disk) is one CaitError naming the file."""
    import io
    import json

    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import save

        data = save({k: v.contiguous() for k, v in ckpt["state_dict"].items()},
                    metadata={"format": ckpt["format"], "config": json.dumps(ckpt["config"])})
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
