"""`caitdeploy fuse` as a library: a CAIT checkpoint -> a fused model file (and its report), written together
or not at all.

    from caitdeploy.pipelines.fuse import FuseOptions, fuse

    result = fuse(FuseOptions(checkpoint="ck.pth", align=8, report_path="ck.fuse.json"))
    result.output, result.report["flops_reduction"]
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from caitdeploy.compress.fuse import FuseOptions as SurgeryOptions


@dataclass(frozen=True, kw_only=True)
class FuseOptions(SurgeryOptions):
    """Every option of `caitdeploy fuse`, named as its flag, with the CLI's defaults: the surgery's
    (`caitdeploy.compress.fuse.FuseOptions`: threshold, max_dropped_norm, force, consistency, align, equal_head_dims,
    checked when this is made) and the files'. Keyword arguments only; `checkpoint` is required."""

    checkpoint: str | Path  # a cait-compactor/1 checkpoint (.pth / .pt or .safetensors)
    output: str | Path | None = None  # the fused file [default: <stem>.fused.safetensors next to it]
    arch: str | None = None  # a timm model name for what a plain state dict's shapes cannot tell
    verify_batch: int = 2  # random images for the float64 check against the checkpoint (0 = skip)
    report_path: str | Path | None = None  # also write the report as JSON

    @property
    def surgery(self) -> SurgeryOptions:
        """The surgery's options alone: what the fused file's metadata and the report record."""
        return SurgeryOptions(**{f.name: getattr(self, f.name) for f in fields(SurgeryOptions)})


@dataclass(frozen=True)
class FuseResult:
    """What `fuse` wrote. `report` is the dict `caitdeploy fuse` prints and `--report` writes."""

    report: dict[str, Any]
    output: Path
    report_path: Path | None = None


def fuse(options: FuseOptions, progress: Callable[[int], None] | None = None) -> FuseResult:
    """Fuse `options.checkpoint` as `caitdeploy fuse` does: the options, the output paths, the checkpoint and the
    memory rule are checked before any work; the fused file and the report appear together, or neither does.
    `progress`, if given, is called with each block's index as it is fused."""
    from caitdeploy.compress.fuse import fuse_file
    from caitdeploy.core.errors import Staging
    from caitdeploy.core.paths import JSON_SUFFIXES, Out
    from caitdeploy.pipelines.common import write_json

    o = options
    with Staging() as staging:
        report = fuse_file(
            o.checkpoint,
            o.output,
            o.surgery,
            verify_batch=o.verify_batch,
            progress=progress,
            staging=staging,
            other_outputs=(Out(o.report_path, "--report", JSON_SUFFIXES),),
            arch=o.arch,
        )
        if o.report_path:
            write_json(o.report_path, report, staging=staging)
    return FuseResult(report, Path(report["output"]), Path(o.report_path) if o.report_path else None)
