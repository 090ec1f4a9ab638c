"""`caitdeploy convert` as a library: a SiT / LV-ViT / SPViT-DeiT / DIMAP-Swin checkpoint -> a dense fused model
file (and its report), written together or not at all.

    from caitdeploy.pipelines.convert import ConvertOptions, convert

    result = convert(ConvertOptions("sit_s.pth", "sit", variant="s", report_path="sit_s.convert.json"))
    result.output, result.flops_reduction, result.verify["max_abs_diff"]

`caitdeploy.convert.convert_file` does the conversion (options and output paths checked before the file is read,
the upstream layout recognised, the result checked against a float64 forward of the upstream format); this gives
it the pipelines' shape. Heavy imports (torch) happen inside the functions, so `caitdeploy --help` stays fast.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from caitdeploy.core.errors import OptionError

Progress = Callable[[str], None]  # called with each step's name as it starts (see `STEPS`)
STEPS = ("convert", "write")
VARIANTS = ("t", "xs", "s", "m", "l")  # the SiT / LV-ViT release sizes
MAX_HEADS = 256
MAX_STAGES = 16


@dataclass(frozen=True)
class ConvertOptions:
    """Every option of `caitdeploy convert`, named as its flag (`--from` -> `source`, `--report` -> `report_path`),
    with the CLI's defaults. `checkpoint` and `source` are required."""

    checkpoint: str | Path  # the upstream training file (.pth / .pt or .safetensors)
    source: str  # sit | lvvit | spvit | dimap: the checkpoint's system
    variant: str | None = None  # t | xs | s | m | l: the SiT / LV-ViT release size (sit, lvvit)
    stages: str | Sequence[int] | None = None  # blocks per token stage of a SiT without variant: "9,3,2,2"
    num_heads: int | None = None  # override the head count (1..256)
    align: int = 1  # SPViT: zero-pad the pruned FFN widths to a multiple of N (1..256)
    output: str | Path | None = None  # the fused file [default: <stem>.fused.safetensors next to it]
    verify_batch: int = 2  # random images for the float64 check against the upstream forward (0..256)
    report_path: str | Path | None = None  # also write the report as JSON


@dataclass(frozen=True)
class ConvertResult:
    """What `convert` wrote. `report` is the dict `--report` writes: the conversion's figures and `blocks`, the
    per-block rows (`families.flops.block_rows`) the CLI's table shows."""

    report: dict[str, Any]
    config: Any  # the converted model's config (a CaitConfig, or a SwinConfig for dimap)
    output: Path
    report_path: Path | None = None

    @property
    def blocks(self) -> list[dict[str, Any]]:
        return self.report["blocks"]

    @property
    def notes(self) -> list[str]:
        return self.report["notes"]

    @property
    def flops(self) -> int:
        """FLOPs per image of the converted model (`flops_dense`: of its unpruned architecture)."""
        return self.report["flops"]

    @property
    def flops_dense(self) -> int:
        return self.report["flops_dense"]

    @property
    def flops_reduction(self) -> float:
        return self.report["flops_reduction"]

    @property
    def params(self) -> int:
        return self.report["params"]

    @property
    def params_dense(self) -> int:
        return self.report["params_dense"]

    @property
    def verify(self) -> dict[str, Any] | None:
        """The float64 check against the upstream forward (batch, max_abs_diff, logit_scale, top1_agree,
        torch_flops_per_img); None with verify_batch=0."""
        return self.report.get("verify")

    @property
    def seconds(self) -> float:
        return self.report["seconds"]

    @property
    def outputs(self) -> list[Path]:
        """Every file written."""
        return [p for p in (self.output, self.report_path) if p]


def parse_stages(value: str | Sequence[int] | None) -> tuple[int, ...] | None:
    """Blocks per token stage, "9,3,2,2" or a sequence of ints: 1..16 stages of >= 1 block each. OptionError
    ("stages") otherwise; `caitdeploy convert --stages` shows its wording as a usage error."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            out = tuple(int(v) for v in value.split(","))
        except ValueError:
            raise OptionError("stages", f"{value!r}: expected blocks per token stage, e.g. 9,3,2,2") from None
    else:
        out = tuple(value)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in out):
            raise OptionError("stages", f"{value!r}: expected blocks per token stage, e.g. 9,3,2,2")
    if not out or min(out) < 1 or len(out) > MAX_STAGES:
        raise OptionError("stages", f"{value!r}: 1..{MAX_STAGES} stages of >= 1 block each")
    return out


def _check(o: ConvertOptions) -> tuple[int, ...] | None:
    """What the CLI's option types check (the choices, the head count); `convert_file` checks the rest (source,
    align, verify_batch, which options apply to which source, the output paths) before reading the file."""
    if o.variant is not None and o.variant not in VARIANTS:
        raise OptionError("variant", f"must be one of {', '.join(VARIANTS)}, got {o.variant!r}")
    stages = parse_stages(o.stages)
    if o.num_heads is not None and (
        isinstance(o.num_heads, bool) or not isinstance(o.num_heads, int) or not 1 <= o.num_heads <= MAX_HEADS
    ):
        raise OptionError("num_heads", f"must be an integer in 1..{MAX_HEADS}, got {o.num_heads!r}")
    return stages


def convert(options: ConvertOptions, progress: Progress | None = None) -> ConvertResult:
    """Convert `options.checkpoint` as `caitdeploy convert` does: the options, the output paths and the memory
    rule are checked before the file is read; a checkpoint of another system is refused, naming what it is; the
    fused file and the report appear together, or neither does. `progress`, if given, is called with each step's
    name (`STEPS`) as it starts. Errors: `CaitError`, or `OptionError` naming the field."""
    from caitdeploy.convert import convert_file
    from caitdeploy.core.errors import Staging
    from caitdeploy.core.paths import JSON_SUFFIXES, Out
    from caitdeploy.families.flops import block_rows
    from caitdeploy.pipelines.common import write_json

    step = progress or (lambda name: None)
    o = options
    stages = _check(o)
    others = (Out(o.report_path, "--report", JSON_SUFFIXES),) if o.report_path else ()
    with Staging() as staging:
        step("convert")
        report = convert_file(
            o.checkpoint,
            o.source,
            o.output,
            variant=o.variant,
            stages=stages,
            num_heads=o.num_heads,
            align=o.align,
            verify_batch=o.verify_batch,
            staging=staging,
            other_outputs=others,
        )
        config = report.pop("config")
        report["blocks"] = block_rows(config)
        step("write")
        if o.report_path:
            write_json(o.report_path, report, staging=staging)
    return ConvertResult(report, config, Path(report["output"]), Path(o.report_path) if o.report_path else None)
