"""`caitdeploy serve DIR`: a real Triton Inference Server on a model repository, until Ctrl-C / SIGTERM."""
from __future__ import annotations

import click

from .common import console, handle_errors


@click.command("serve")
@click.argument("repo", type=click.Path(path_type=str))
@click.option("--http-port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--grpc-port", type=click.IntRange(1, 65535), default=8001, show_default=True)
@click.option("--metrics-port", type=click.IntRange(1, 65535), default=8002, show_default=True)
@click.option("--timeout", type=click.FloatRange(1, 3600), default=120, show_default=True,
              help="Seconds to wait until every model is ready.")
@handle_errors
def serve_cmd(repo, http_port, grpc_port, metrics_port, timeout):
    """Serve a Triton model repository (written by `caitdeploy export --triton-repo`) until interrupted."""
    import time
    from pathlib import Path

    from ..serve.server import TritonServer

    server = TritonServer(Path(repo), http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port)
    con = console()
    t0 = time.perf_counter()
    with server:
        con.print(f"tritonserver ({server.source}) ready in {time.perf_counter() - t0:.1f} s on {repo}", markup=False)
        con.print(f"  HTTP    http://localhost:{http_port}/v2/models/<name>/infer", markup=False)
        con.print(f"  gRPC    localhost:{grpc_port}", markup=False)
        con.print(f"  metrics http://localhost:{metrics_port}/metrics", markup=False)
        for m in server.repository_index():
            con.print(f"  model {m.get('name')} version {m.get('version')}: {m.get('state')}", markup=False)
        con.print("Ctrl-C or SIGTERM stops it", markup=False)
        try:
            while server.proc.poll() is None:   # SIGTERM arrives as SystemExit(143): `with` stops the server too
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
        if server.proc.poll() is not None:
            from ..errors import CaitError

            raise CaitError(f"tritonserver exited with code {server.proc.returncode}: {server.log_tail()}")
    con.print("stopped; shared memory removed", markup=False)
