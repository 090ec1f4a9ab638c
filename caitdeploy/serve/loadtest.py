"""Closed-loop load test of a model on a Triton Inference Server: requests per second and latency per concurrency.

Our own, with NVIDIA's `tritonclient`: `perf_analyzer` on PyPI is a 0.1.0 placeholder without the binary, and
the real one ships only in NVIDIA's SDK container. At each concurrency level C, C workers (threads, each with its
own client) send requests back to back for `duration` seconds (or until `max_requests`), after a warm-up;
every request carries `batch` random images shaped as the model's metadata says. Per level: requests, errors,
requests/s, images/s, p50/p90/p99/mean latency, and from Triton's statistics API the executions the server ran
(requests per execution = what the dynamic batcher merged).
"""

from __future__ import annotations

import math
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from caitdeploy.core.errors import CaitError, OptionError

PROTOCOLS = ("http", "grpc")
LOADTEST_KEYS = (
    "model",
    "protocol",
    "url",
    "concurrency",
    "batch",
    "duration_s",
    "requests",
    "errors",
    "throughput_req_s",
    "throughput_img_s",
    "latency_ms_p50",
    "latency_ms_p90",
    "latency_ms_p99",
    "latency_ms_mean",
    "server_executions",
    "requests_per_execution",
    "first_error",
    "env_cpu",  # the machine that ran the load test (the server's too when it is local)
    "env_cpu_count",
    "env_cpu_isa",
)


def _client_module(protocol: str):
    if protocol not in PROTOCOLS:
        raise OptionError("protocol", f"{protocol!r}: choose http or grpc")
    try:
        if protocol == "http":
            import tritonclient.http as mod
        else:
            import tritonclient.grpc as mod
    except ImportError as e:
        raise CaitError(f"tritonclient[{protocol}] is not installed ({e}): pip install 'tritonclient[all]'") from None
    return mod


def check_url(url: str, what: str = "URL") -> str:
    """`host:port` (the scheme dropped), the port, if given, in 1..65535: tritonclient would raise on a bad
    one from inside its constructor, and the half-built client then prints a traceback from `__del__`."""
    text = str(url).strip()
    for scheme in ("http://", "https://"):
        if text.lower().startswith(scheme):
            text = text[len(scheme) :]
    text = text.rstrip("/")
    host, port = text, None
    if text.startswith("["):  # [IPv6]:port
        close = text.find("]")
        host, rest = (text[: close + 1], text[close + 1 :]) if close > 1 else ("", "")
        if rest and not rest.startswith(":"):
            host = ""
        port = rest[1:] if rest else None
    elif ":" in text:
        host, port = text.rsplit(":", 1)
    bad_host = not host or "/" in host or (":" in host and not host.startswith("[")) or any(c.isspace() for c in text)
    bad_port = port is not None and not (
        port.isascii() and port.isdigit() and len(port) <= 5 and 1 <= int(port) <= 65535
    )
    if bad_host or bad_port:
        raise CaitError(f"{what} {str(url)[:80]!r}: give HOST:PORT with a port in 1..65535, e.g. localhost:8000")
    return text


def _close(client) -> None:
    """Close a tritonclient client now, not in its noisy `__del__`."""
    close = getattr(client, "close", None)
    if close is not None:
        try:
            close()
        except Exception:  # noqa: BLE001, S110 - closing a client that never connected
            pass


def _percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    k = (len(s) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def model_input(url: str, model: str, protocol: str = "http") -> tuple[str, list[int], str, str]:
    """(input name, dims without batch, Triton datatype, output name) from the server's model metadata."""
    mod = _client_module(protocol)
    url = check_url(url)
    c = None
    try:
        c = mod.InferenceServerClient(url)
        if not c.is_model_ready(model):
            raise CaitError(f"{url}: model {model!r} is not ready on this server")
        meta = c.get_model_metadata(model)
        cfg = c.get_model_config(model)
    except CaitError:
        raise
    except Exception as e:  # noqa: BLE001 - connection refused, unknown model, ...: one line
        first = (str(e).splitlines() or [""])[0][:200]
        raise CaitError(f"{url}: cannot reach model {model!r} ({type(e).__name__}: {first})") from None
    finally:
        if c is not None:
            _close(c)
    if protocol == "grpc":
        from google.protobuf.json_format import MessageToDict

        meta = MessageToDict(meta, preserving_proto_field_name=True)
        cfg = MessageToDict(cfg, preserving_proto_field_name=True).get("config", {})
    inp, out = meta["inputs"][0], meta["outputs"][0]
    dims = [int(d) for d in inp["shape"]]
    if int(cfg.get("max_batch_size", 0) or 0) > 0:
        dims = dims[1:]
    if any(d < 1 for d in dims):
        raise CaitError(f"{url}: model {model!r} input {inp['name']!r} has dynamic dims {dims}: give fixed shapes")
    return inp["name"], dims, inp["datatype"], out["name"]


def _stats(url: str, model: str) -> tuple[int, int] | None:
    import json
    import urllib.request

    try:
        body = urllib.request.urlopen(f"http://{url}/v2/models/{model}/stats", timeout=5).read()
        s = json.loads(body)["model_stats"][0]
        return int(s["inference_count"]), int(s["execution_count"])
    except Exception:  # noqa: BLE001 - statistics are optional (another protocol, a proxy)
        return None


def load_test(
    url: str,
    model: str,
    concurrency: Sequence[int] = (1, 8, 32),
    duration: float = 10.0,
    batch: int = 1,
    protocol: str = "http",
    warmup: float = 1.0,
    max_requests: int | None = None,
    stats_url: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """One record (LOADTEST_KEYS) per concurrency level."""
    mod = _client_module(protocol)
    for c in concurrency:
        if isinstance(c, bool) or not isinstance(c, int) or not 1 <= c <= 1024:
            raise OptionError("concurrency", f"{c!r}: must be in 1..1024")
    for key, value, lo, hi in (("duration", duration, 0.1, 3600.0), ("warmup", warmup, 0.0, 600.0)):
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
            or not lo <= value <= hi
        ):
            raise OptionError(key, f"{value!r}: must be a number in {lo:g}..{hi:g} seconds")
    if max_requests is not None and (
        isinstance(max_requests, bool) or not isinstance(max_requests, int) or max_requests < 1
    ):
        raise OptionError("max_requests", f"{max_requests!r}: must be a positive integer")
    url = check_url(url)
    if stats_url is not None:
        stats_url = check_url(stats_url, "--stats-url")
    if isinstance(batch, bool) or not isinstance(batch, int) or not 1 <= batch <= 4096:
        raise OptionError("batch", f"{batch!r}: must be in 1..4096")
    name, dims, dtype, out_name = model_input(url, model, protocol)
    np_dtype = {"FP32": np.float32, "FP16": np.float16}.get(dtype)
    if np_dtype is None:
        raise CaitError(f"{url}: model {model!r} input datatype {dtype} is not FP32/FP16")
    x = np.random.default_rng(0).standard_normal((batch, *dims)).astype(np_dtype)
    records = []
    for c in concurrency:
        if progress:
            progress(f"{model}: concurrency {c}, {duration:g} s")
        records.append(
            _run_level(
                mod,
                url,
                model,
                c,
                x,
                name,
                dtype,
                out_name,
                duration,
                warmup,
                max_requests,
                stats_url or (url if protocol == "http" else None),
            )
            | {"protocol": protocol}
        )
    if not any(r["requests"] for r in records):
        raise CaitError(f"{url}: no request to model {model!r} succeeded ({records[0]['first_error']})")
    return records


def _run_level(
    mod,
    url: str,
    model: str,
    clients: int,
    x: np.ndarray,
    name: str,
    dtype: str,
    out_name: str,
    duration: float,
    warmup: float,
    max_requests: int | None,
    stats_url: str | None,
) -> dict[str, Any]:
    """One concurrency level: `clients` threads send back to back; latencies count after `warmup`."""
    lat: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    measuring = threading.Event()
    stop_at = time.perf_counter() + warmup + duration

    def worker() -> None:
        client = mod.InferenceServerClient(url)
        try:
            _send(client)
        finally:
            _close(client)

    def _send(client) -> None:
        inp = mod.InferInput(name, list(x.shape), dtype)
        inp.set_data_from_numpy(x)
        outs = [mod.InferRequestedOutput(out_name)]
        while time.perf_counter() < stop_at and (max_requests is None or len(lat) < max_requests):
            t0 = time.perf_counter()
            try:
                client.infer(model, [inp], outputs=outs)
            except Exception as e:  # noqa: BLE001 - counted, the first one reported
                with lock:
                    errors.append(f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
                continue
            dt = time.perf_counter() - t0
            if measuring.is_set():
                with lock:
                    lat.append(dt)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    time.sleep(warmup)
    before = _stats(stats_url, model) if stats_url else None
    measuring.set()
    t_start = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t_start
    after = _stats(stats_url, model) if stats_url and before is not None else None
    n, batch = len(lat), x.shape[0]
    execs = (after[1] - before[1]) if before and after else None
    reqs_server = (after[0] - before[0]) if before and after else None
    return {
        "model": model,
        "protocol": None,
        "url": url,
        "concurrency": clients,
        "batch": batch,
        "duration_s": elapsed,
        "requests": n,
        "errors": len(errors),
        "throughput_req_s": n / elapsed if elapsed > 0 else 0.0,
        "throughput_img_s": n * batch / elapsed if elapsed > 0 else 0.0,
        "latency_ms_p50": _percentile(lat, 50) * 1e3 if lat else None,
        "latency_ms_p90": _percentile(lat, 90) * 1e3 if lat else None,
        "latency_ms_p99": _percentile(lat, 99) * 1e3 if lat else None,
        "latency_ms_mean": statistics.fmean(lat) * 1e3 if lat else None,
        "server_executions": execs,
        "requests_per_execution": (reqs_server / batch / execs) if execs and reqs_server is not None else None,
        "first_error": errors[0] if errors else None,
        **_machine(),
    }


def _machine() -> dict[str, Any]:
    from caitdeploy.core.cpu import cpu_info, isa_text

    info = cpu_info()
    return {"env_cpu": info["model"], "env_cpu_count": info["logical_cores"], "env_cpu_isa": isa_text(info)}


def to_markdown(records: list[dict[str, Any]], title: str = "caitdeploy loadtest") -> str:
    head = [
        "model",
        "protocol",
        "concurrency",
        "batch",
        "req/s",
        "img/s",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "req/execution",
        "errors",
    ]
    lines = [f"# {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    for r in records:
        lines.append(
            "| "
            + " | ".join(
                [
                    r["model"],
                    r["protocol"],
                    str(r["concurrency"]),
                    str(r["batch"]),
                    f(r["throughput_req_s"], ".1f"),
                    f(r["throughput_img_s"], ".1f"),
                    f(r["latency_ms_p50"], ".2f"),
                    f(r["latency_ms_p90"], ".2f"),
                    f(r["latency_ms_p99"], ".2f"),
                    f(r["requests_per_execution"], ".2f"),
                    str(r["errors"]),
                ]
            )
            + " |"
        )
    if records and records[0].get("env_cpu"):
        r = records[0]
        lines += [
            "",
            (
                f"Load generator (and local server) CPU: {r['env_cpu']}, {r['env_cpu_count']} logical cores; "
                f"ISA: {r['env_cpu_isa']}."
            ),
        ]
    return "\n".join(lines) + "\n"
