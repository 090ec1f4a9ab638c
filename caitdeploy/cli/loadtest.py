"""`caitdeploy loadtest URL --model NAME`: requests/s and latency per concurrency on a Triton server."""

from __future__ import annotations

import click

from caitdeploy.cli.common import console, handle_errors, json_text
from caitdeploy.cli.options import Float, Int


def _plot(records, path, staging) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for model in dict.fromkeys(r["model"] for r in records):
        rs = sorted((r for r in records if r["model"] == model), key=lambda r: r["concurrency"])
        cs = [r["concurrency"] for r in rs]
        a1.plot(cs, [r["throughput_img_s"] for r in rs], marker="o", label=model)
        a2.plot(cs, [r["latency_ms_p50"] or float("nan") for r in rs], marker="o", label=f"{model} p50")
        a2.plot(cs, [r["latency_ms_p99"] or float("nan") for r in rs], marker="x", ls="--", label=f"{model} p99")
    for ax, yl in ((a1, "images / s"), (a2, "latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(yl)
        ax.legend(fontsize=7)
    fig.suptitle(f"caitdeploy loadtest ({records[0]['protocol']}, batch {records[0]['batch']})", fontsize=10)
    fig.tight_layout()
    fmt = str(path).rsplit(".", 1)[-1].lower()
    tmp = staging.stage(path)
    fig.savefig(tmp, format=fmt, dpi=120)
    plt.close(fig)


@click.command("loadtest")
@click.argument("url")
@click.option("--model", "models", multiple=True, required=True, help="Model name; repeat to compare models.")
@click.option("--concurrency", default="1,8,32", show_default=True, help="Comma list of concurrent clients.")
@click.option(
    "--duration", type=Float(0.1, 3600), default=10.0, show_default=True, help="Seconds per level (after --warmup)."
)
@click.option("--warmup", type=Float(0, 600), default=1.0, show_default=True)
@click.option("--batch", type=Int(1, 4096), default=1, show_default=True, help="Images per request.")
@click.option("--max-requests", type=Int(1, 10**9), default=None, help="Stop a level after this many requests.")
@click.option("--protocol", type=click.Choice(["http", "grpc"]), default="http", show_default=True)
@click.option("--stats-url", default=None, help="HTTP host:port for Triton's statistics API with --protocol grpc.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the records as JSON.")
@click.option("--markdown", "md_path", type=click.Path(dir_okay=False), help="Write a Markdown table.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), help="Write a PNG (or SVG/PDF) plot.")
@click.option("-q", "--quiet", is_flag=True)
@handle_errors
def loadtest_cmd(
    url,
    models,
    concurrency,
    duration,
    warmup,
    batch,
    max_requests,
    protocol,
    stats_url,
    json_path,
    md_path,
    plot_path,
    quiet,
):
    """Load-test models on a running Triton server (e.g. `caitdeploy serve`): closed loop, per concurrency."""
    from rich.table import Table

    from caitdeploy.core.errors import CaitError, Staging
    from caitdeploy.core.paths import JSON_SUFFIXES, MARKDOWN_SUFFIXES, PLOT_SUFFIXES, Out, check_paths
    from caitdeploy.serve.loadtest import check_url, load_test, to_markdown

    parts = [c.strip() for c in concurrency.split(",") if c.strip()]
    if len(concurrency) > 4096 or not all(p.isascii() and p.isdigit() for p in parts):
        raise CaitError(f"--concurrency {concurrency[:40]!r}: a comma list of integers, e.g. 1,8,32")
    levels = [int(p) for p in parts]
    if not levels:
        raise CaitError("--concurrency: give at least one level")
    url = check_url(url)
    if stats_url is not None:
        check_url(stats_url, "--stats-url")
    check_paths(
        {},
        [
            Out(json_path, "--json", JSON_SUFFIXES),
            Out(md_path, "--markdown", MARKDOWN_SUFFIXES),
            Out(plot_path, "--plot", PLOT_SUFFIXES),
        ],
    )
    con = console()
    log = (lambda s: None) if quiet else (lambda s: con.print(s, markup=False))
    records = []
    for m in models:
        records += load_test(url, m, levels, duration, batch, protocol, warmup, max_requests, stats_url, log)
    with Staging() as st:
        if json_path:
            st.write_text(json_path, json_text(records))
        if md_path:
            st.write_text(md_path, to_markdown(records))
        if plot_path:
            _plot(records, plot_path, st)
    if quiet:
        return
    t = Table(title=f"loadtest {url} ({protocol}, batch {batch}, {duration:g} s per level)")
    for col in ("model", "clients", "requests", "req/s", "img/s", "p50 ms", "p90 ms", "p99 ms", "req/exec", "errors"):
        t.add_column(col, justify="left" if col == "model" else "right")

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    for r in records:
        t.add_row(
            r["model"],
            str(r["concurrency"]),
            str(r["requests"]),
            f(r["throughput_req_s"], ".1f"),
            f(r["throughput_img_s"], ".1f"),
            f(r["latency_ms_p50"], ".2f"),
            f(r["latency_ms_p90"], ".2f"),
            f(r["latency_ms_p99"], ".2f"),
            f(r["requests_per_execution"], ".2f"),
            str(r["errors"]),
        )
    con.print(t)
    for p in (json_path, md_path, plot_path):
        if p:
            con.print(f"wrote {p}", markup=False)
