"""`caitdeploy eval`: the accuracy of every artifact on the same labelled images, side by side, as a gate."""

from __future__ import annotations

import sys

import click

from caitdeploy.cli.common import console, handle_errors, print_plain
from caitdeploy.cli.options import BlockList


@click.command("eval")
@click.argument("artifacts", nargs=-1, type=click.Path(dir_okay=False, path_type=str))
@click.option(
    "--data",
    required=True,
    type=click.Path(path_type=str),
    help="Labelled images: an ImageFolder (DIR/CLASS/*.png|jpg), a CSV of path,label, or a folder of images "
    "(no labels: agreement only).",
)
@click.option("--reference", default=None, help="The artifact the others are compared with [default: the first].")
@click.option("--batch", default="32", show_default=True, help="Images per model call.")
@click.option("--threads", default=None, help="CPU threads for PyTorch and ONNX Runtime [default: all].")
@click.option(
    "--torch-dtype",
    default="fp32",
    show_default=True,
    help="Fused files run in fp32, bf16 (torch autocast) or both: fp32,bf16.",
)
@click.option(
    "--onnx-runtimes",
    default="auto",
    show_default=True,
    help="ONNX files run on ort, openvino or both (ort,openvino); auto: both when openvino is installed.",
)
@click.option("--url", default=None, help="A live Triton server, HOST:PORT (with --model).")
@click.option(
    "--model", "triton_models", multiple=True, help="A model on the --url server to evaluate; repeat for several."
)
@click.option("--protocol", default="http", show_default=True, help="http or grpc, for --url.")
@click.option(
    "--features",
    type=BlockList(),
    default=None,
    help="Compare feature maps of these blocks (dense prediction exports; no labels needed), e.g. 3,5,7,11.",
)
@click.option("--restore", default="repeat", show_default=True, help="Merged-grid restore for --features.")
@click.option("--limit", default=None, help="Evaluate the first N images only.")
@click.option("--skip-bad-images", is_flag=True, help="Leave out images that cannot be used (counted once).")
@click.option("--show-disagreements", default="10", show_default=True, help="List up to N images where top-1 differs.")
@click.option("--min-top1", default=None, help="Gate: exit 1 when an artifact's top-1 is below this fraction.")
@click.option(
    "--min-agreement", default=None, help="Gate: exit 1 when top-1 agreement with the reference is below this."
)
@click.option("--min-cosine", default=None, help="Gate: exit 1 when the smallest per-image cosine is below this.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write one flat record per artifact.")
@click.option("--markdown", "md_path", type=click.Path(dir_okay=False), help="Write a Markdown table.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), help="Write a PNG: accuracy vs img/s.")
@click.option("-q", "--quiet", is_flag=True, help="No table, no progress bar (gate failures still print).")
@handle_errors
def eval_cmd(quiet, **flags):
    """Accuracy of every ARTIFACT (checkpoint, fused file, ONNX, engine) and --url models on the same images."""
    from caitdeploy.evaluate.report import print_table
    from caitdeploy.pipelines.eval import EvalOptions, evaluate

    options = EvalOptions(**flags)
    con = console()
    result = evaluate(options, progress=None if quiet else (lambda s: print_plain(con, s)), progress_bar=not quiet)
    if not quiet:
        print_plain(con, result.summary)
        print_table(result.records, con)
        for line in result.disagreements:
            print_plain(con, line)
        for p in result.outputs:
            print_plain(con, f"wrote {p}")
    if result.failures:
        more = f" (and {len(result.failures) - 1} more failed gates)" if len(result.failures) > 1 else ""
        click.echo(f"eval failed: {result.failures[0]}{more}", err=True)
        sys.exit(1)
