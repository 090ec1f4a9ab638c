"""`caitdeploy bench`: latency/throughput of a fused model vs its dense architecture and ToMe."""
from __future__ import annotations

from pathlib import Path

import click

from caitdeploy.cli.common import console, handle_errors, print_plain
from caitdeploy.cli.options import BlockList, ImageSize, parse_float, parse_int
from caitdeploy.core.errors import safe_text


@click.command("bench")
@click.argument("model", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=str))
@click.option("--batch", "batches", multiple=True, default=("256",), show_default=True,
              help="Batch size; repeat or comma-separate for several (e.g. --batch 1 --batch 64,256).")
@click.option("--backends", default="torch,ort", show_default=True,
              help="Comma list of torch, compile, ort, trt, torch-triton.")
@click.option("--dtype", default="fp32", show_default=True,
              help="fp32, fp16, bf16, int8 or int8-dynamic; comma-separate for several (e.g. fp32,int8). fp16 on "
                   "CPU runs fp32 (noted); bf16 is torch autocast; int8 is ONNX Runtime (static QDQ / dynamic).")
@click.option("--baselines", default="dense,tome", show_default=True, help="dense, tome, both or none.")
@click.option("--tome-r", default="auto", show_default=True,
              help="ToMe tokens merged per block: 'auto' matches CAIT's FLOPs within 2%, or an integer.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--img-size", type=ImageSize(), default=None,
              help="Run every model at this input size: 512 or HEIGHTxWIDTH (position embedding resampled).")
@click.option("--features", type=BlockList(), default=None,
              help="Benchmark feature extraction (dense prediction): block indices, e.g. 3,5,7,11; every model "
                   "gives those blocks' maps on the unmerged grid (a ViT's patch grid, a Swin's stage grid; "
                   "ToMe's merges undone), no head.")
@click.option("--restore", default="repeat", show_default=True,
              help="How CAIT's merged grid is restored for --features: repeat or bilinear.")
@click.option("--warmup", default="10", show_default=True, help="Untimed calls before timing.")
@click.option("--min-iters", default="20", show_default=True, help="Timed calls per repeat, at least.")
@click.option("--min-seconds", default="2.0", show_default=True, help="Seconds per repeat, at least.")
@click.option("--repeats", default="2", show_default=True, help="Timed repeats (their medians give the spread).")
@click.option("--threads", default=None, help="CPU threads for PyTorch and ONNX Runtime [default: all].")
@click.option("--compile-mode", default=None,
              help="torch.compile mode [default: max-autotune-no-cudagraphs on CUDA, default on CPU].")
@click.option("--work-dir", type=click.Path(file_okay=False), default=None,
              help="Keep ONNX files and engines here [default: a temporary folder].")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the flat records as JSON.")
@click.option("--markdown", "md_path", type=click.Path(dir_okay=False), help="Write a Markdown table.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), help="Write a PNG plot.")
@click.option("-q", "--quiet", is_flag=True, help="No table, no progress bar.")
@handle_errors
def bench_cmd(model, batches, backends, dtype, baselines, tome_r, device, img_size, features, restore, warmup, min_iters, min_seconds, repeats,
              threads, compile_mode, work_dir, json_path, md_path, plot_path, quiet):
    """Benchmark fused MODEL(s) against the dense architecture and FLOPs-matched ToMe."""
    from caitdeploy.bench.report import print_table, write_markdown, write_plot, write_records_json
    from caitdeploy.bench.run import (
        parse_backends,
        parse_baselines,
        parse_batches,
        parse_dtypes,
        parse_tome_r,
        run_bench,
    )
    from caitdeploy.bench.runners import Timing
    from caitdeploy.core.budgets import MAX_ITERS, MAX_SECONDS
    from caitdeploy.core.errors import CaitError, Staging
    from caitdeploy.core.paths import JSON_SUFFIXES, MARKDOWN_SUFFIXES, PLOT_SUFFIXES, Out, check_paths

    def num(name, value, kind=int, lo=0, hi=MAX_ITERS):
        # the rules of options.parse_int / parse_float: plain ASCII notation (no '²', '٣', '1_0'); nan and inf
        # are read so that the range check names them
        v = parse_int(value) if kind is int else parse_float(value, finite=False)
        if v is None:
            raise CaitError(f"--{name} {safe_text(value, 40)!r}: not {'an integer' if kind is int else 'a number'}")
        if not lo <= v <= hi:  # NaN fails too
            raise CaitError(f"--{name} {v}: must be in {lo}..{hi:g}")
        return v

    timing = Timing(warmup=num("warmup", warmup), min_iters=num("min-iters", min_iters, lo=1),
                    min_seconds=num("min-seconds", min_seconds, float, hi=MAX_SECONDS),
                    repeats=num("repeats", repeats, lo=1))
    nthreads = num("threads", threads, lo=1, hi=1024) if threads is not None else None
    dtypes = parse_dtypes(dtype)
    # validate everything before loading models: options, then every output path
    from caitdeploy.cli.common import check_dense_options

    check_dense_options(img_size, features, restore)
    backends_l, baselines_l = parse_backends(backends), parse_baselines(baselines)
    batches_l, tome = parse_batches(batches), parse_tome_r(tome_r)
    check_paths({"MODEL": list(model)}, [Out(json_path, "--json", JSON_SUFFIXES),
                                         Out(md_path, "--markdown", MARKDOWN_SUFFIXES),
                                         Out(plot_path, "--plot", PLOT_SUFFIXES)])
    if work_dir is not None and Path(work_dir).exists() and not Path(work_dir).is_dir():
        raise CaitError(f"--work-dir {work_dir}: exists and is not a folder")
    con = console()
    log = (lambda s: None) if quiet else (lambda s: print_plain(con, s))
    records = run_bench(list(model), batches=batches_l, backends=backends_l, dtype=dtypes, baselines=baselines_l,
                        tome_r=tome, device=device, timing=timing, threads=nthreads, work_dir=work_dir,
                        compile_mode=compile_mode, progress=not quiet, log=log, img_size=img_size,
                        features=features, restore=restore)
    if not any(r["status"] == "ok" for r in records):
        why = "; ".join(dict.fromkeys(f"{r['backend']}: {r['status']}" for r in records))
        raise CaitError(f"no measurement succeeded ({why[:600]}); nothing written")
    with Staging() as st:
        if json_path:
            write_records_json(records, json_path, staging=st)
        if md_path:
            write_markdown(records, md_path, title="caitdeploy bench", staging=st)
        if plot_path:
            write_plot(records, plot_path, staging=st)
    if not quiet:
        print_table(records, con)
        for p in (json_path, md_path, plot_path):
            if p:
                print_plain(con, f"wrote {p}")
