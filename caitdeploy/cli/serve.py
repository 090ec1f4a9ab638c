"""`caitdeploy serve DIR`: a real Triton Inference Server on a model repository, until Ctrl-C / SIGTERM.

Binds 127.0.0.1 unless --host widens it; restarts tritonserver if it dies while serving; the server never
outlives the CLI (see `serve.server`). Ctrl-C exits 130, SIGTERM 143, each with one line, the server stopped."""

from __future__ import annotations

import click

from caitdeploy.cli.common import console, handle_errors
from caitdeploy.cli.options import PORT, Float


@click.command("serve")
@click.argument("repo", type=click.Path(path_type=str))
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="IPv4 address to bind HTTP, gRPC and metrics to; 0.0.0.0 for every interface, which makes the "
    "server (no authentication) reachable from the network.",
)
@click.option("--http-port", type=PORT, default=8000, show_default=True)
@click.option("--grpc-port", type=PORT, default=8001, show_default=True)
@click.option("--metrics-port", type=PORT, default=8002, show_default=True)
@click.option(
    "--timeout",
    type=Float(1, 3600),
    default=120.0,
    show_default=True,
    help="Seconds to wait until every model is ready (also after a restart).",
)
@handle_errors
def serve_cmd(repo, host, http_port, grpc_port, metrics_port, timeout):
    """Serve a Triton model repository (written by `caitdeploy export --triton-repo`) until interrupted."""
    import time
    from pathlib import Path

    from caitdeploy.core.errors import one_line
    from caitdeploy.serve.server import TritonServer, is_loopback

    server = TritonServer(Path(repo), http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port, host=host)
    con = console()
    say = lambda s: con.print(s, markup=False, emoji=False, soft_wrap=True)  # noqa: E731 - a log: a line each
    t0 = time.perf_counter()
    server.start(timeout=timeout)
    try:
        at = server.host
        say(f"tritonserver ({server.source}) ready in {time.perf_counter() - t0:.1f} s on {one_line(repo)}")
        say(f"  HTTP    http://{at}:{http_port}/v2/models/<name>/infer")
        say(f"  gRPC    {at}:{grpc_port}")
        say(f"  metrics http://{at}:{metrics_port}/metrics")
        for m in server.repository_index():
            say(one_line(f"  model {m.get('name')} version {m.get('version')}: {m.get('state')}"))
        if not is_loopback(server.host):
            click.echo(
                f"warning: --host {server.host} is not a loopback address: HTTP, gRPC and metrics are "
                "reachable from the network, without authentication",
                err=True,
            )
        say("Ctrl-C or SIGTERM stops it")
        server.serve_forever(timeout, say)  # returns only by exception: Ctrl-C, SIGTERM, no restart
    finally:
        server.stop()
