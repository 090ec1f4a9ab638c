"""`caitdeploy make-checkpoint` as a library: a timm architecture of any family timm builds (ViT, Swin v1) ->
a `cait-compactor/1` checkpoint pruned one-shot by CDCP selection for a FLOPs target (and its selection summary),
written together or not at all.

    from caitdeploy.pipelines.make_checkpoint import MakeCheckpointOptions, make_checkpoint

    result = make_checkpoint(MakeCheckpointOptions(arch="deit_small_patch16_224", output="ck.pth"))
    result.summary["flops_reduction"], result.merges_text
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True, kw_only=True)
class MakeCheckpointOptions:
    """Every option of `caitdeploy make-checkpoint`, named as its flag, with the CLI's defaults. `flops_reduction`
    and `merges` None: the family's defaults (ViT 0.55 and 4:h,8:v; Swin 0.354 and auto, the paper's settings)."""

    output: str | Path  # .pth or .safetensors
    arch: str = "deit_small_patch16_224"  # a timm ViT, or a timm Swin (v1)
    flops_reduction: float | None = None
    merges: str | None = None  # BLOCK:h|v,... (Swin: STAGE.BLOCK:h|v,...), 'none' or 'auto'
    weights: str | Path | None = None  # a timm state dict; random init when absent
    align: int = 1  # prune in steps of N channels per head
    num_classes: int | None = None
    img_size: int | None = None
    seed: int = 0
    report_path: str | Path | None = None  # also write the selection summary as JSON


@dataclass(frozen=True)
class MakeCheckpointResult:
    """What `make_checkpoint` wrote: the checkpoint, the CDCP selection summary (FLOPs before/after, merges, kept
    widths per block), the family, and whether the merges were placed automatically."""

    output: Path
    summary: dict[str, Any]
    family: str
    merges_text: str
    auto_merges: bool
    flops_reduction: float
    report_path: Path | None = None


def make_checkpoint(options: MakeCheckpointOptions) -> MakeCheckpointResult:
    """Build the checkpoint as `caitdeploy make-checkpoint` does: the options (family, target, merges spec) and the
    paths are checked before any model is built; the checkpoint and the report appear together, or neither does."""
    from caitdeploy.compress import cdcp
    from caitdeploy.core.budgets import check_float
    from caitdeploy.core.errors import Staging
    from caitdeploy.core.paths import CHECKPOINT_SUFFIXES, JSON_SUFFIXES, Out, check_paths
    from caitdeploy.families import family_for_arch
    from caitdeploy.pipelines.common import write_json

    o = options
    fam = family_for_arch(o.arch)
    reduction = fam.default_flops_reduction if o.flops_reduction is None else o.flops_reduction
    check_float(reduction, "flops_reduction", 0.0, 0.95)
    text = fam.default_merges if o.merges is None else o.merges
    merge_map = None if text.strip().lower() == "auto" else fam.parse_merges(text)  # auto: once the model is known
    check_paths(
        {"--weights": o.weights},
        [Out(o.output, "--output", CHECKPOINT_SUFFIXES), Out(o.report_path, "--report", JSON_SUFFIXES)],
    )
    ckpt, summary = cdcp.make_checkpoint(
        o.arch,
        reduction,
        merge_map if merge_map is not None else "auto",
        weights=None if o.weights is None else str(o.weights),
        seed=o.seed,
        align=o.align,
        num_classes=o.num_classes,
        img_size=o.img_size,
    )
    with Staging() as st:
        cdcp.save_checkpoint_dict(ckpt, o.output, staging=st)
        if o.report_path:
            write_json(o.report_path, summary, staging=st)
    return MakeCheckpointResult(
        Path(o.output),
        summary,
        fam.name,
        summary["merges_text"],
        merge_map is None,
        reduction,
        Path(o.report_path) if o.report_path else None,
    )
