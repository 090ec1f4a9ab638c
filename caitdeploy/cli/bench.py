"""`caitdeploy bench`: latency/throughput of a fused model vs its dense architecture and ToMe."""

from __future__ import annotations

import click

from caitdeploy.cli.common import console, handle_errors, print_plain
from caitdeploy.cli.options import BlockList, ImageSize


@click.command("bench")
@click.argument("model", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=str))
@click.option(
    "--batch",
    "batches",
    multiple=True,
    default=("256",),
    show_default=True,
    help="Batch size; repeat or comma-separate for several (e.g. --batch 1 --batch 64,256).",
)
@click.option(
    "--backends",
    default="torch,ort",
    show_default=True,
    help="Comma list of torch, compile, ort, openvino, trt, torch-triton.",
)
@click.option(
    "--dtype",
    default="fp32",
    show_default=True,
    help="fp32, fp16, bf16, int8 or int8-dynamic; comma-separate for several (e.g. fp32,int8). fp16 on "
    "CPU runs fp32 (noted); bf16 is torch autocast; int8 is ONNX Runtime (static QDQ / dynamic).",
)
@click.option("--baselines", default="dense,tome", show_default=True, help="dense, tome, both or none.")
@click.option(
    "--tome-r",
    default="auto",
    show_default=True,
    help="ToMe tokens merged per block: 'auto' matches CAIT's FLOPs within 2%, or an integer.",
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option(
    "--img-size",
    type=ImageSize(),
    default=None,
    help="Run every model at this input size: 512 or HEIGHTxWIDTH (position embedding resampled).",
)
@click.option(
    "--features",
    type=BlockList(),
    default=None,
    help="Benchmark feature extraction (dense prediction): block indices, e.g. 3,5,7,11; every model "
    "gives those blocks' maps on the unmerged grid (a ViT's patch grid, a Swin's stage grid; "
    "ToMe's merges undone), no head.",
)
@click.option(
    "--restore",
    default="repeat",
    show_default=True,
    help="How CAIT's merged grid is restored for --features: repeat or bilinear.",
)
@click.option("--warmup", default="10", show_default=True, help="Untimed calls before timing.")
@click.option("--min-iters", default="20", show_default=True, help="Timed calls per repeat, at least.")
@click.option("--min-seconds", default="2.0", show_default=True, help="Seconds per repeat, at least.")
@click.option("--repeats", default="2", show_default=True, help="Timed repeats (their medians give the spread).")
@click.option("--threads", default=None, help="CPU threads for PyTorch and ONNX Runtime [default: all].")
@click.option(
    "--compile-mode",
    default=None,
    help="torch.compile mode [default: max-autotune-no-cudagraphs on CUDA, default on CPU].",
)
@click.option(
    "--work-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Keep ONNX files and engines here [default: a temporary folder].",
)
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the flat records as JSON.")
@click.option("--markdown", "md_path", type=click.Path(dir_okay=False), help="Write a Markdown table.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), help="Write a PNG plot.")
@click.option("-q", "--quiet", is_flag=True, help="No table, no progress bar.")
@handle_errors
def bench_cmd(quiet, **flags):
    """Benchmark fused MODEL(s) against the dense architecture and FLOPs-matched ToMe."""
    from caitdeploy.bench.report import print_table
    from caitdeploy.pipelines.bench import BenchOptions, bench

    options = BenchOptions(**flags)  # every flag but --quiet is a BenchOptions field of the same name
    con = console()
    result = bench(options, progress=None if quiet else (lambda s: print_plain(con, s)), progress_bar=not quiet)
    if not quiet:
        print_table(result.records, con)
        for p in (options.json_path, options.md_path, options.plot_path):
            if p:
                print_plain(con, f"wrote {p}")
