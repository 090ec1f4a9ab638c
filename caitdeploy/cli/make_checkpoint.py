"""`caitdeploy make-checkpoint`: a valid cait-compactor/1 checkpoint from a timm ViT, pruned one-shot."""

from __future__ import annotations

import click

from caitdeploy.cli.common import console, handle_errors, print_plain
from caitdeploy.cli.options import Int, StrictFloat  # --flops-reduction: range checked by limits.check_float


@click.command("make-checkpoint")
@click.option(
    "--arch",
    default="deit_small_patch16_224",
    show_default=True,
    help="timm ViT architecture, or a timm Swin (v1), e.g. swin_tiny_patch4_window7_224.",
)
@click.option(
    "--flops-reduction",
    type=StrictFloat(),
    default=None,
    help="Target FLOPs reduction vs the dense model, merges included [default: 0.55; Swin 0.354, "
    "the paper's Tab. XIV].",
)
@click.option(
    "--merges",
    default=None,
    help="ATME merges, BLOCK:h|v,... or 'none' [default: 4:h,8:v]; Swin: STAGE.BLOCK:h|v,..., 'none' or "
    "'auto' [default: auto, the paper's Tab. XIV placement: HTM + VTM at the last two blocks of the "
    "longest stage, 2.4:h,2.5:v on Swin-T].",
)
@click.option(
    "--weights", type=click.Path(dir_okay=False), help="timm state dict (.safetensors or .pth); random init if absent."
)
@click.option(
    "--align",
    type=Int(1, 256),
    default=1,
    show_default=True,
    help="Prune in steps of N channels per head, so kept widths are multiples of N.",
)
@click.option("--num-classes", type=Int(1, 262144), default=None, help="Override the head size.")
@click.option("--img-size", type=Int(1, 8192), default=None, help="Override the input resolution.")
@click.option("--seed", type=Int(0, 2**32 - 1), default=0, show_default=True, help="Random seed, 0..2^32-1.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help=".pth or .safetensors")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), help="Write the selection summary as JSON.")
@handle_errors
def make_checkpoint_cmd(
    arch, flops_reduction, merges, weights, align, num_classes, img_size, seed, output, report_path
):
    """Write a cait-compactor/1 checkpoint chosen by CDCP selection (Alg. 1-3) for a FLOPs target."""
    from caitdeploy.pipelines.make_checkpoint import MakeCheckpointOptions, make_checkpoint

    r = make_checkpoint(
        MakeCheckpointOptions(
            arch=arch,
            flops_reduction=flops_reduction,
            merges=merges,
            weights=weights,
            align=align,
            num_classes=num_classes,
            img_size=img_size,
            seed=seed,
            output=output,
            report_path=report_path,
        )
    )
    s = r.summary
    con = console()
    print_plain(
        con,
        f"{arch}: merges {r.merges_text}{' (auto)' if r.auto_merges else ''}, FLOPs/img "
        f"{s['flops_dense'] / 1e9:.3f}G -> {s['flops_pruned'] / 1e9:.3f}G (reduction "
        f"{100 * s['flops_reduction']:.2f}%, target {100 * r.flops_reduction:.2f}%)",
    )
    print_plain(con, f"wrote {output}")
