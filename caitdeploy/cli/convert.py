"""`caitdeploy convert`: SiT, LV-ViT, SPViT-DeiT and DIMAP (Swin) checkpoints -> fused models."""
from __future__ import annotations

import click

from caitdeploy.cli.common import block_table, console, handle_errors, human, print_plain, write_json
from caitdeploy.cli.options import Int


def _stages(ctx, param, value):
    if value is None:
        return None
    try:
        out = tuple(int(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected blocks per token stage, e.g. 9,3,2,2") from None
    if not out or min(out) < 1 or len(out) > 16:
        raise click.BadParameter(f"{value!r}: 1..16 stages of >= 1 block each")
    return out


@click.command("convert")
@click.argument("checkpoint", type=click.Path(dir_okay=False, path_type=str))
@click.option("--from", "source", type=click.Choice(["sit", "lvvit", "spvit", "dimap"]), required=True,
              help="The checkpoint's system: SiT (Sense-X/SiT), its dense LV-ViT teachers, SPViT-DeiT (ziplab/SPViT), "
                   "DIMAP (a pruned Swin state dict, timm or Microsoft layout).")
@click.option("--variant", type=click.Choice(["t", "xs", "s", "m", "l"]), default=None,
              help="SiT / LV-ViT release size (sets the slim positions and checks the sizes).")
@click.option("--stages", callback=_stages, default=None,
              help="Blocks per token stage of a SiT without --variant, e.g. 9,3,2,2.")
@click.option("--num-heads", type=Int(1, 256), default=None, help="Override the head count.")
@click.option("--align", type=Int(1, 256), default=1, show_default=True,
              help="SPViT: zero-pad the pruned FFN widths to a multiple of N (exact).")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Fused file [default: <stem>.fused.safetensors].")
@click.option("--verify-batch", type=Int(0, 256), default=2, show_default=True,
              help="Random images for the float64 check against the upstream forward (0 = skip).")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), help="Write the report as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No table.")
@handle_errors
def convert_cmd(checkpoint, source, variant, stages, num_heads, align, output, verify_batch, report_path, quiet):
    """Convert a SiT / LV-ViT / SPViT-DeiT / DIMAP-Swin checkpoint into a dense fused model (then export, bench,
    serve)."""
    from caitdeploy.convert import convert_file
    from caitdeploy.core.errors import Staging
    from caitdeploy.core.paths import JSON_SUFFIXES, Out
    from caitdeploy.families.flops import block_rows

    others = (Out(report_path, "--report", JSON_SUFFIXES),) if report_path else ()
    with Staging() as staging:
        rep = convert_file(checkpoint, source, output, variant=variant, stages=stages, num_heads=num_heads,
                           align=align, verify_batch=verify_batch, staging=staging, other_outputs=others)
        cfg = rep.pop("config")
        if report_path:
            write_json(report_path, {**rep, "blocks": block_rows(cfg)}, staging=staging)
    if quiet:
        return
    con = console()
    print_plain(con, f"converted {checkpoint} ({source}, family {cfg.family})")   # never cropped
    con.print(block_table(block_rows(cfg)))
    for note in rep["notes"]:
        print_plain(con, f"note: {note}")
    print_plain(con, f"params {human(rep['params'])} (dense {human(rep['params_dense'])})   FLOPs/img {human(rep['flops'])} "
              f"(dense {human(rep['flops_dense'])}: -{100 * rep['flops_reduction']:.1f}%)")
    if "verify" in rep:
        v = rep["verify"]
        print_plain(con, f"max |logit diff| vs the upstream forward (float64, {v['batch']} random images): "
                  f"{v['max_abs_diff']:.3g} (logit scale {v['logit_scale']:.3g}, top-1 agreement "
                  f"{100 * v['top1_agree']:.0f}%); FLOPs equal torch.utils.flop_counter")
    print_plain(con, f"wrote {rep['output']} in {rep['seconds']:.2f} s")
