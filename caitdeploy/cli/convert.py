"""`caitdeploy convert`: SiT, LV-ViT, SPViT-DeiT and DIMAP (Swin) checkpoints -> fused models."""

from __future__ import annotations

import click

from caitdeploy.cli.common import block_table, console, handle_errors, human, print_plain
from caitdeploy.cli.options import Int


def _stages(ctx, param, value):
    from caitdeploy.core.errors import OptionError
    from caitdeploy.pipelines.convert import parse_stages

    try:
        return parse_stages(value)
    except OptionError as e:  # a usage error, as click's own option types give
        raise click.BadParameter(e.detail) from None


def print_convert_report(options, result) -> None:
    """The lines and table `caitdeploy convert` prints (the checkpoint and --from as given: the report's
    `source` says spvit-swin for an SPViT-Swin file given as --from spvit)."""
    rep = result.report
    con = console()
    print_plain(
        con, f"converted {options.checkpoint} ({options.source}, family {result.config.family})"
    )  # never cropped
    con.print(block_table(result.blocks))
    for note in rep["notes"]:
        print_plain(con, f"note: {note}")
    print_plain(
        con,
        f"params {human(rep['params'])} (dense {human(rep['params_dense'])})   FLOPs/img {human(rep['flops'])} "
        f"(dense {human(rep['flops_dense'])}: -{100 * rep['flops_reduction']:.1f}%)",
    )
    if "verify" in rep:
        v = rep["verify"]
        print_plain(
            con,
            f"max |logit diff| vs the upstream forward (float64, {v['batch']} random images): "
            f"{v['max_abs_diff']:.3g} (logit scale {v['logit_scale']:.3g}, top-1 agreement "
            f"{100 * v['top1_agree']:.0f}%); FLOPs equal torch.utils.flop_counter",
        )
    print_plain(con, f"wrote {rep['output']} in {rep['seconds']:.2f} s")


@click.command("convert")
@click.argument("checkpoint", type=click.Path(dir_okay=False, path_type=str))
@click.option(
    "--from",
    "source",
    type=click.Choice(["sit", "lvvit", "spvit", "dimap"]),
    required=True,
    help="The checkpoint's system: SiT (Sense-X/SiT), its dense LV-ViT teachers, SPViT-DeiT (ziplab/SPViT), "
    "DIMAP (a pruned Swin state dict, timm or Microsoft layout).",
)
@click.option(
    "--variant",
    type=click.Choice(["t", "xs", "s", "m", "l"]),
    default=None,
    help="SiT / LV-ViT release size (sets the slim positions and checks the sizes).",
)
@click.option(
    "--stages", callback=_stages, default=None, help="Blocks per token stage of a SiT without --variant, e.g. 9,3,2,2."
)
@click.option("--num-heads", type=Int(1, 256), default=None, help="Override the head count.")
@click.option(
    "--align",
    type=Int(1, 256),
    default=1,
    show_default=True,
    help="SPViT: zero-pad the pruned FFN widths to a multiple of N (exact).",
)
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Fused file [default: <stem>.fused.safetensors].")
@click.option(
    "--verify-batch",
    type=Int(0, 256),
    default=2,
    show_default=True,
    help="Random images for the float64 check against the upstream forward (0 = skip).",
)
@click.option("--report", "report_path", type=click.Path(dir_okay=False), help="Write the report as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No table.")
@handle_errors
def convert_cmd(quiet, **flags):
    """Convert a SiT / LV-ViT / SPViT-DeiT / DIMAP-Swin checkpoint into a dense fused model (then export, bench,
    serve)."""
    from caitdeploy.pipelines.convert import ConvertOptions, convert

    options = ConvertOptions(**flags)  # every flag but --quiet is a ConvertOptions field of the same name
    result = convert(options)
    if not quiet:
        print_convert_report(options, result)
