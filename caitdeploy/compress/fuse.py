"""Checkpoint -> fused file: fold compactors, select kept channels, enforce consistency, align, slice, verify."""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from caitdeploy.compress import surgery as S
from caitdeploy.core.errors import CaitError, OptionError, Staging
from caitdeploy.core.paths import Out
from caitdeploy.families.flops import block_rows, flop_counter, model_flops, model_params
from caitdeploy.families.vit.config import CaitConfig
from caitdeploy.formats.checkpoint import Checkpoint, load_checkpoint

CONSISTENCY_MODES = ("strict", "repair")


@dataclass(frozen=True)
class FuseOptions:
    threshold: float | None = None  # keep rows whose folded norm > threshold instead of mask == 1
    max_dropped_norm: float = 1e-3  # largest compactor-row norm allowed among dropped rows
    force: bool = False  # fuse even above max_dropped_norm
    consistency: str = "strict"  # "strict" or "repair"
    align: int = 8  # round kept widths per head and the mlp width up to a multiple of this
    equal_head_dims: bool = False  # zero-pad q/k and v per head to one width

    def __post_init__(self) -> None:
        from caitdeploy.core.budgets import MAX_ALIGN, check_float

        if self.consistency not in CONSISTENCY_MODES:
            raise OptionError("consistency", f"must be one of {', '.join(CONSISTENCY_MODES)}, got {self.consistency!r}")
        if isinstance(self.align, bool) or not isinstance(self.align, int) or not 1 <= self.align <= MAX_ALIGN:
            raise OptionError("align", f"must be an integer in 1..{MAX_ALIGN}, got {self.align!r}")
        if self.threshold is not None:
            check_float(self.threshold, "threshold", 0.0, 1e30)
        check_float(self.max_dropped_norm, "max_dropped_norm", 0.0, 1e30)  # NaN would switch the check off
        if not isinstance(self.force, bool) or not isinstance(self.equal_head_dims, bool):
            raise CaitError("force and equal_head_dims must be true or false")


@dataclass
class FuseResult:
    config: CaitConfig
    state_dict: dict[str, torch.Tensor]
    plans: list[S.BlockPlan]


def _compactor_row_norms(c: torch.Tensor | None, shape) -> torch.Tensor:
    if c is None:
        return torch.ones(shape, dtype=torch.float64)
    return torch.linalg.vector_norm(c, dim=-1).double()


def plan_block(ckpt: Checkpoint, i: int, f: S.FoldedBlock, opts: FuseOptions) -> S.BlockPlan:
    """Choose the kept channels of block i (pure function of the folded weights and masks).

    Selection: mask == 1, or folded row norm > threshold. Re-admission (repair, alignment) ranks dropped
    channels by folded row norm in threshold mode and by compactor-row norm (CDCP's importance) in mask
    mode, which spares folding the dropped rows of the F x F fc1 compactor.
    """
    h, d = f.wq.shape[:2]
    hidden = f.w1.shape[0]
    comp = {n: ckpt.compactor(i, n) for n in ("q", "k", "v", "fc1")}
    shapes = {"q": (h, d), "k": (h, d), "v": (h, d), "fc1": (hidden,)}
    comp_norms = {n: _compactor_row_norms(None if (cn := comp[n]) is None else cn[0], shapes[n]) for n in shapes}
    if opts.threshold is not None:
        norms = {
            "q": S.row_norms(f.wq, f.bq),
            "k": S.row_norms(f.wk, f.bk),
            "v": S.row_norms(f.wv, f.bv),
            "fc1": S.row_norms(*f.fc1_folded()),
        }
    else:
        norms = comp_norms
    keep = {}
    for name, shape in shapes.items():
        if opts.threshold is not None:
            keep[name] = S.keep_from_threshold(norms[name], opts.threshold)
        else:
            cm = comp[name]
            keep[name] = S.keep_from_mask(None if cm is None else cm[1], shape)
        empty = (keep[name].sum(-1) == 0).reshape(-1)
        if bool(empty.any()):
            where = f" head {int(empty.nonzero()[0])}" if name != "fc1" else ""
            raise CaitError(f"block {i}: every {name} channel{where} would be dropped")
    score_qk = (norms["q"].pow(2) + norms["k"].pow(2)).sqrt()
    if opts.consistency == "strict":
        S.check_consistency(i, keep["q"], keep["k"], keep["v"])
        keep_qk, keep_v, repairs = keep["q"], keep["v"], []
    else:
        keep_qk, keep_v, repairs = S.repair_consistency(i, keep["q"], keep["k"], keep["v"], score_qk, norms["v"])
    keep_mlp = keep["fc1"]
    pruned = (int(keep_qk[0].sum()), int(keep_v[0].sum()), int(keep_mlp.sum()))

    keep_qk, pad_qk = S.align_keep(keep_qk, score_qk, opts.align)
    keep_v, pad_v = S.align_keep(keep_v, norms["v"], opts.align)
    keep_mlp, pad_mlp = S.align_keep(keep_mlp, norms["fc1"], opts.align)

    # largest compactor-row norm among the rows finally dropped
    dropped = 0.0
    for name, kp in (("q", keep_qk), ("k", keep_qk), ("v", keep_v), ("fc1", keep_mlp)):
        c = comp[name]
        if c is not None and bool((~kp).any()):
            dropped = max(dropped, float(comp_norms[name][~kp].max()))

    qk = S.to_indices(keep_qk)
    v = S.to_indices(keep_v)
    qk = S.pad_indices(qk, qk.shape[-1] + pad_qk)
    v = S.pad_indices(v, v.shape[-1] + pad_v)
    if opts.equal_head_dims:
        width = max(qk.shape[-1], v.shape[-1])
        qk, v = S.pad_indices(qk, width), S.pad_indices(v, width)
    mlp = S.pad_indices(S.to_indices(keep_mlp), int(keep_mlp.sum()) + pad_mlp)
    return S.BlockPlan(qk, v, mlp, repairs, *pruned, max_dropped_norm=dropped)


def fuse(ckpt: Any, opts: FuseOptions = FuseOptions(), progress=None) -> FuseResult:
    """Fold and slice every block of a validated checkpoint of any family (its `block_sites`, in flat order).
    Returns the fused config and the deploy model's tensors."""
    from caitdeploy.families import family_of

    sd, cfg = ckpt.state_dict, ckpt.config
    fam = family_of(cfg)
    out: dict[str, torch.Tensor] = fam.fuse_start(ckpt)
    blocks, plans = [], []
    for site, blk in zip(fam.block_sites(cfg), fam.blocks(cfg)):
        p, j = site.prefix, site.index
        comps = {n: (None if (c := ckpt.compactor(j, n)) is None else c[0]) for n in ("q", "k", "v", "fc1")}
        f = S.fold_block(
            sd[p + "attn.qkv.weight"],
            sd.get(p + "attn.qkv.bias"),
            sd[p + "mlp.fc1.weight"],
            sd[p + "mlp.fc1.bias"],
            site.num_heads,
            comps,
        )
        try:
            plan = plan_block(ckpt, j, f, opts)
        except CaitError as e:
            raise CaitError(f"{ckpt.path}: {str(e).replace(f'block {j}', site.label, 1)}") from None
        if plan.max_dropped_norm > opts.max_dropped_norm and not opts.force:
            raise CaitError(
                f"{ckpt.path}: {site.label}: a dropped compactor row has norm {plan.max_dropped_norm:.3g} "
                f"> max_dropped_norm (--max-dropped-norm) {opts.max_dropped_norm:g}; the fused model would "
                "differ from the checkpoint (force it with --force / force=True)"
            )
        fam.fuse_block(ckpt, site, S.slice_block(f, sd[p + "attn.proj.weight"], sd[p + "mlp.fc2.weight"], plan), out)
        blocks.append(replace(blk, qk_dim=plan.qk.shape[-1], v_dim=plan.v.shape[-1], mlp_hidden=plan.mlp.shape[0]))
        plans.append(plan)
        if progress is not None:
            progress(j)
    source = {**ckpt.format_config, "merges": {str(k): v for k, v in ckpt.format_config["merges"].items()}}
    fused_cfg = replace(fam.with_blocks(cfg, blocks), source=source)
    out = fam.fuse_finish(ckpt, fused_cfg, out)
    return FuseResult(fused_cfg, {k: v.float().contiguous() for k, v in out.items()}, plans)


@torch.no_grad()
def max_logit_diff(ckpt: Checkpoint, model: torch.nn.Module, batch: int = 2, seed: int = 0) -> dict[str, float]:
    """Max |logit difference| of `model` (float32) against the checkpoint's own forward in float64."""
    from caitdeploy.families import family_of

    cfg = ckpt.config
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *cfg.input_shape, generator=g)
    ref = family_of(cfg).reference(ckpt)(x.double())
    got = model(x).double()
    return {
        "max_abs_diff": float((got - ref).abs().max()),
        "logit_scale": float(ref.abs().max()),
        "top1_agree": float((got.argmax(-1) == ref.argmax(-1)).double().mean()),
        "batch": batch,
    }


def torch_counted_flops(config: CaitConfig) -> int:
    """FLOPs per image of `CaitViT(config)` by torch.utils.flop_counter, on the meta device (no compute)."""
    from caitdeploy.families import build_model

    with torch.device("meta"):
        model = build_model(config, attn_impl="math")
        x = torch.empty(1, *config.input_shape)
    with flop_counter() as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops()


def build_report(ckpt: Checkpoint, res: FuseResult, opts: FuseOptions) -> dict[str, Any]:
    before, after = ckpt.config, res.config
    fb, fa = model_flops(before.unpruned()), model_flops(after)
    pb, pa = model_params(before.unpruned()), model_params(after)
    dense_rows = block_rows(before.unpruned())
    blocks = []
    for row, plan, dense in zip(block_rows(after), res.plans, dense_rows):
        blocks.append(
            {
                **row,
                "qk_pruned": plan.pruned_qk,
                "v_pruned": plan.pruned_v,
                "mlp_pruned": plan.pruned_mlp,
                "flops_dense": dense["flops"],
                "params_dense": dense["params"],
                "max_dropped_norm": plan.max_dropped_norm,
            }
        )
    return {
        "checkpoint": str(ckpt.path),
        "inferred_config": ckpt.inferred,
        "notes": list(ckpt.notes),
        "options": asdict(opts),
        "blocks": blocks,
        "params_dense": pb,
        "params_fused": pa,
        "flops_dense": fb["total"],
        "flops_fused": fa["total"],
        "flops_reduction": 1 - fa["total"] / fb["total"],
        "max_dropped_norm": max((p.max_dropped_norm for p in res.plans), default=0.0),
        "repairs": [asdict(r) for p in res.plans for r in p.repairs],
    }


def default_output(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(path.stem + ".fused.safetensors")


def fuse_file(
    path: str | os.PathLike,
    output: str | os.PathLike | None = None,
    opts: FuseOptions = FuseOptions(),
    verify_batch: int = 2,
    progress=None,
    staging: Staging | None = None,
    other_outputs: tuple[Out, ...] = (),
    arch: str | None = None,
) -> dict[str, Any]:
    """`caitdeploy fuse`: checkpoint file -> fused safetensors file. Returns the report dict.

    Checked before any work: the options, the output (a .safetensors name, a writable folder, never the input;
    `other_outputs`, e.g. the report, against both), then the checkpoint, then the memory rule (limits.py).
    With `staging` the fused file is staged there and appears when the caller commits (all-or-nothing with the
    caller's other outputs). `arch`: a timm model name for what the checkpoint's shapes cannot tell (heads,
    pooling, LayerNorm eps)."""
    from caitdeploy.core.budgets import MAX_VERIFY_BATCH, WEIGHT_FACTOR, check_memory
    from caitdeploy.core.paths import FUSED_SUFFIXES, check_paths
    from caitdeploy.families import build_model
    from caitdeploy.families.flops import activation_bytes
    from caitdeploy.formats.fused import save_fused

    t0 = time.perf_counter()
    path = Path(path)
    if isinstance(verify_batch, bool) or not isinstance(verify_batch, int) or not 0 <= verify_batch <= MAX_VERIFY_BATCH:
        raise OptionError("verify_batch", f"must be an integer in 0..{MAX_VERIFY_BATCH}, got {verify_batch!r}")
    output = Path(output) if output else default_output(path)
    check_paths({"CHECKPOINT": path}, [Out(output, "--output", FUSED_SUFFIXES), *other_outputs])
    ckpt = load_checkpoint(path, arch=arch)
    n_params = sum(t.numel() for t in ckpt.state_dict.values())
    check_memory(
        WEIGHT_FACTOR * 4 * n_params + activation_bytes(ckpt.config, max(verify_batch, 1), 8),
        f"{path}: fusing {n_params} parameters (verify batch {verify_batch})",
    )
    res = fuse(ckpt, opts, progress=progress)
    t_fuse = time.perf_counter() - t0
    report = build_report(ckpt, res, opts)
    model = build_model(res.config, attn_impl="math").eval()
    model.load_state_dict(res.state_dict)
    if verify_batch > 0:
        report["verify"] = max_logit_diff(ckpt, model, batch=verify_batch)
        report["verify"]["torch_flops_per_img"] = torch_counted_flops(res.config)
        if report["verify"]["torch_flops_per_img"] != report["flops_fused"]:  # a bug, never a user error
            raise RuntimeError(
                f"analytic FLOPs {report['flops_fused']} != torch.utils.flop_counter "
                f"{report['verify']['torch_flops_per_img']}"
            )
    t_verify = time.perf_counter() - t0 - t_fuse
    meta = {k: report[k] for k in ("flops_dense", "flops_fused", "params_dense", "params_fused", "options")}
    meta.update(source=str(path.name), verify=report.get("verify"))
    if ckpt.data_config is not None:  # the eval transform the training used, kept for export and eval
        meta["data_config"] = ckpt.data_config
    save_fused(output, res.config, res.state_dict, meta, staging=staging)
    report.update(output=str(output), seconds={"fuse": t_fuse, "verify": t_verify, "total": time.perf_counter() - t0})
    return report
