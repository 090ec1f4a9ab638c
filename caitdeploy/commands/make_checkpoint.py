"""`caitdeploy make-checkpoint`: a valid cait-compactor/1 checkpoint from a timm ViT, pruned one-shot."""
from __future__ import annotations

import click

from .common import console, handle_errors, write_json


@click.command("make-checkpoint")
@click.option("--arch", default="deit_small_patch16_224", show_default=True, help="timm ViT architecture.")
@click.option("--flops-reduction", type=float, default=0.55, show_default=True,
              help="Target FLOPs reduction vs the dense model, merges included.")
@click.option("--merges", default="4:h,8:v", show_default=True, help="ATME merges, BLOCK:h|v,... or 'none'.")
@click.option("--weights", type=click.Path(dir_okay=False), help="timm state dict (.safetensors or .pth); random init if absent.")
@click.option("--align", type=click.IntRange(1, 256), default=1, show_default=True,
              help="Prune in steps of N channels per head, so kept widths are multiples of N.")
@click.option("--num-classes", type=click.IntRange(1, 262144), default=None, help="Override the head size.")
@click.option("--img-size", type=click.IntRange(1, 8192), default=None, help="Override the input resolution.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help=".pth or .safetensors")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), help="Write the selection summary as JSON.")
@handle_errors
def make_checkpoint_cmd(arch, flops_reduction, merges, weights, align, num_classes, img_size, seed, output, report_path):
    """Write a cait-compactor/1 checkpoint chosen by CDCP selection (Alg. 1-3) for a FLOPs target."""
    from ..cdcp import make_checkpoint, parse_merges, save_checkpoint_dict
    from ..errors import Staging
    from ..limits import check_float
    from ..paths import CHECKPOINT_SUFFIXES, JSON_SUFFIXES, Out, check_paths

    check_float(flops_reduction, "flops_reduction", 0.0, 0.95)
    merge_map = parse_merges(merges)
    check_paths({"--weights": weights}, [Out(output, "--output", CHECKPOINT_SUFFIXES),
                                         Out(report_path, "--report", JSON_SUFFIXES)])
    ckpt, summary = make_checkpoint(arch, flops_reduction, merge_map, weights=weights, seed=seed,
                                    align=align, num_classes=num_classes, img_size=img_size)
    with Staging() as st:
        save_checkpoint_dict(ckpt, output, staging=st)
        if report_path:
            write_json(report_path, summary, staging=st)
    con = console()
    con.print(f"{arch}: merges {merges}, FLOPs/img {summary['flops_dense'] / 1e9:.3f}G -> "
              f"{summary['flops_pruned'] / 1e9:.3f}G (reduction {100 * summary['flops_reduction']:.2f}%, "
              f"target {100 * flops_reduction:.2f}%)")
    con.print(f"wrote {output}")
