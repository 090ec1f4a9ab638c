"""`caitdeploy make-checkpoint`: a valid cait-compactor/1 checkpoint from a timm ViT, pruned one-shot."""
from __future__ import annotations

import click

from caitdeploy.cli.common import console, handle_errors, print_plain, write_json
from caitdeploy.cli.options import Int, StrictFloat  # --flops-reduction: range checked by limits.check_float


@click.command("make-checkpoint")
@click.option("--arch", default="deit_small_patch16_224", show_default=True,
              help="timm ViT architecture, or a timm Swin (v1), e.g. swin_tiny_patch4_window7_224.")
@click.option("--flops-reduction", type=StrictFloat(), default=None,
              help="Target FLOPs reduction vs the dense model, merges included [default: 0.55; Swin 0.354, "
                   "the paper's Tab. XIV].")
@click.option("--merges", default=None,
              help="ATME merges, BLOCK:h|v,... or 'none' [default: 4:h,8:v]; Swin: STAGE.BLOCK:h|v,..., 'none' or "
                   "'auto' [default: auto, the paper's Tab. XIV placement: HTM + VTM at the last two blocks of the "
                   "longest stage, 2.4:h,2.5:v on Swin-T].")
@click.option("--weights", type=click.Path(dir_okay=False), help="timm state dict (.safetensors or .pth); random init if absent.")
@click.option("--align", type=Int(1, 256), default=1, show_default=True,
              help="Prune in steps of N channels per head, so kept widths are multiples of N.")
@click.option("--num-classes", type=Int(1, 262144), default=None, help="Override the head size.")
@click.option("--img-size", type=Int(1, 8192), default=None, help="Override the input resolution.")
@click.option("--seed", type=Int(0, 2**32 - 1), default=0, show_default=True, help="Random seed, 0..2^32-1.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help=".pth or .safetensors")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), help="Write the selection summary as JSON.")
@handle_errors
def make_checkpoint_cmd(arch, flops_reduction, merges, weights, align, num_classes, img_size, seed, output, report_path):
    """Write a cait-compactor/1 checkpoint chosen by CDCP selection (Alg. 1-3) for a FLOPs target."""
    from caitdeploy.compress import cdcp
    from caitdeploy.core.budgets import check_float
    from caitdeploy.core.errors import Staging
    from caitdeploy.core.paths import CHECKPOINT_SUFFIXES, JSON_SUFFIXES, Out, check_paths

    swin = cdcp.is_swin_arch(arch)
    if flops_reduction is None:
        flops_reduction = cdcp.SWIN_DEFAULT_REDUCTION if swin else 0.55
    if merges is None:
        merges = "auto" if swin else "4:h,8:v"
    check_float(flops_reduction, "flops_reduction", 0.0, 0.95)
    if swin:   # auto: placed once the model's stages are known
        merge_map = None if merges.strip().lower() == "auto" else cdcp.parse_swin_merges(merges)
    else:
        merge_map = cdcp.parse_merges(merges)
    check_paths({"--weights": weights}, [Out(output, "--output", CHECKPOINT_SUFFIXES),
                                         Out(report_path, "--report", JSON_SUFFIXES)])
    make = cdcp.make_swin_checkpoint if swin else cdcp.make_checkpoint
    ckpt, summary = make(arch, flops_reduction, merge_map, weights=weights, seed=seed,
                         align=align, num_classes=num_classes, img_size=img_size)
    with Staging() as st:
        cdcp.save_checkpoint_dict(ckpt, output, staging=st)
        if report_path:
            write_json(report_path, summary, staging=st)
    con = console()
    shown = ",".join(f"{k}:{v}" for k, v in summary["merges"].items()) if swin else merges
    print_plain(con, f"{arch}: merges {shown or 'none'}{' (auto)' if merge_map is None else ''}, FLOPs/img {summary['flops_dense'] / 1e9:.3f}G -> "
              f"{summary['flops_pruned'] / 1e9:.3f}G (reduction {100 * summary['flops_reduction']:.2f}%, "
              f"target {100 * flops_reduction:.2f}%)")
    print_plain(con, f"wrote {output}")
