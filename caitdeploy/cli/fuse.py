"""`caitdeploy fuse`: fold compactors and slice pruned channels away."""

from __future__ import annotations

import click

from caitdeploy.cli.common import block_table, console, handle_errors, human, print_plain, rich_safe
from caitdeploy.cli.options import Int, StrictFloat  # --threshold, --max-dropped-norm: range checked by FuseOptions


def print_fuse_report(report: dict) -> None:
    con = console()
    for note in report.get("notes", []):
        con.print(f"[yellow]note:[/] {rich_safe(note, 1000)}")
    if report.get("inferred_config"):
        inferred = ", ".join(f"{k}={v}" for k, v in report["inferred_config"].items())
        con.print(f"[yellow]config inferred from shapes:[/] {rich_safe(inferred, 1000)}")
    print_plain(con, f"fused {report['checkpoint']}")  # a file name: a line of its own, never cropped
    con.print(block_table(report["blocks"]))
    print_plain(con, "widths in parentheses: kept before alignment")
    print_plain(
        con,
        f"params  {human(report['params_dense'])} -> {human(report['params_fused'])}   "
        f"FLOPs/img {human(report['flops_dense'])} -> {human(report['flops_fused'])} "
        f"(-{100 * report['flops_reduction']:.1f}%)",
    )
    print_plain(con, f"largest dropped compactor-row norm: {report['max_dropped_norm']:.3g}")
    for r in report["repairs"]:
        print_plain(
            con, f"repaired block {r['block']} {r['part']} head {r['head']}: +{r['added']} channels ({r['reason']})"
        )
    if "verify" in report:
        v = report["verify"]
        print_plain(
            con,
            f"max |logit diff| vs checkpoint (float64 forward, {v['batch']} random images): "
            f"{v['max_abs_diff']:.3g} (logit scale {v['logit_scale']:.3g}, top-1 agreement "
            f"{100 * v['top1_agree']:.0f}%)",
        )
        print_plain(
            con, f"FLOPs check: analytic count equals torch.utils.flop_counter ({human(v['torch_flops_per_img'])}/img)"
        )
    s = report["seconds"]
    print_plain(
        con, f"wrote {report['output']} in {s['total']:.2f} s (fuse {s['fuse']:.2f} s, verify {s['verify']:.2f} s)"
    )


@click.command("fuse")
@click.argument("checkpoint", type=click.Path(dir_okay=False, path_type=str))
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Fused file [default: <stem>.fused.safetensors].")
@click.option(
    "--arch", default=None, help="timm model name giving what a plain state dict's shapes cannot (heads, pooling, eps)."
)
@click.option(
    "--threshold", type=StrictFloat(), default=None, help="Keep rows whose folded row norm > T instead of mask == 1."
)
@click.option(
    "--max-dropped-norm",
    type=StrictFloat(),
    default=1e-3,
    show_default=True,
    help="Refuse to fuse when a dropped compactor row is larger than this.",
)
@click.option("--force", is_flag=True, help="Fuse even above --max-dropped-norm.")
@click.option(
    "--consistency",
    type=click.Choice(["strict", "repair"]),
    default="strict",
    show_default=True,
    help="strict: error on inconsistent masks; repair: union q/k and equalise heads.",
)
@click.option(
    "--align",
    type=Int(1, 256),
    default=8,
    show_default=True,
    help="Round kept channels per head and the mlp width up to a multiple of N (1 = minimal).",
)
@click.option("--equal-head-dims", is_flag=True, help="Zero-pad q/k and v to one width per head.")
@click.option(
    "--verify-batch",
    type=Int(0, 256),
    default=2,
    show_default=True,
    help="Random images for the float64 check against the checkpoint (0 = skip).",
)
@click.option("--report", "report_path", type=click.Path(dir_okay=False), help="Write the report as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No table.")
@handle_errors
def fuse_cmd(quiet, **flags):
    """Fold CAIT compactors into the weights and slice the pruned channels away."""
    from caitdeploy.pipelines.fuse import FuseOptions, fuse

    result = fuse(FuseOptions(**flags))  # every flag but --quiet is a FuseOptions field of the same name
    if not quiet:
        print_fuse_report(result.report)
