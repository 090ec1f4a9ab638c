"""Benchmark reports: rich table, Markdown, JSON (flat records) and a PNG plot."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from caitdeploy.core.errors import CaitError, Staging, atomic_output, safe_text

COLUMNS = (
    "model",
    "backend",
    "batch",
    "GFLOPs",
    "params",
    "p50 ms",
    "p90 ms",
    "p99 ms",
    "img/s",
    "vs dense",
    "vs ToMe",
    "spread",
    "mem MB",
    "status",
)
ENV_KEYS = (
    "env_cpu",
    "env_cpu_count",
    "env_cpu_isa",
    "env_threads",
    "env_gpu",
    "env_driver",
    "env_cuda",
    "env_torch",
    "env_onnxruntime",
    "env_tensorrt",
    "env_python",
    "env_os",
)
FLOPS_NOTE = "GFLOPs per image, 2 x multiply-accumulates (matmuls and convolutions); ToMe includes its matching matmul"


def _f(v: Any, fmt: str, suffix: str = "") -> str:
    return "-" if v is None else format(v, fmt) + suffix


def _params(n: int) -> str:
    return f"{n / 1e6:.2f}M"


def backend_label(r: dict[str, Any], records: Sequence[dict[str, Any]]) -> str:
    """The backend, with the precision when the records mix several (e.g. 'ort int8')."""
    mixed = len({x["dtype"] for x in records}) > 1
    return f"{r['backend']} {r['dtype']}" if mixed else r["backend"]


def rows(records: Sequence[dict[str, Any]]) -> tuple[list[list[str]], list[str]]:
    """Table rows and footnotes; a status or note longer than a word becomes a numbered footnote."""
    out, notes = [], []

    def ref(text: str) -> str:
        text = safe_text(text, 1000)  # statuses quote errors, which quote file names and library messages
        if text not in notes:
            notes.append(text)
        return f"[{notes.index(text) + 1}]"

    for r in records:
        if r["status"] == "ok":
            status = "ok" + (" " + ref(r["note"]) if r.get("note") else "")
        else:
            status = "n/a " + ref(r["status"].removeprefix("n/a: "))
        out.append(
            [
                safe_text(r["model_detail"] if r["model"] != "dense" else f"dense {r['arch']}", 200),
                backend_label(r, records),
                str(r["batch"]),
                f"{r['flops_per_img'] / 1e9:.3f}",
                _params(r["params"]),
                _f(r["latency_ms_p50"], ".2f"),
                _f(r["latency_ms_p90"], ".2f"),
                _f(r["latency_ms_p99"], ".2f"),
                _f(r["throughput_img_s"], ".1f"),
                _f(r["speedup_vs_dense"], ".2f", "x"),
                _f(r["speedup_vs_tome"], ".2f", "x"),
                _f(r["repeat_spread_pct"], ".1f", "%"),
                _f(r["peak_mem_mb"], ".0f"),
                status,
            ]
        )
    return out, [f"[{i + 1}] {n}" for i, n in enumerate(notes)]


def io_lines(records: Sequence[dict[str, Any]]) -> list[str]:
    """What the models took and gave: 'input 3x512x512 -> feature maps feat3, ... (encoder GFLOPs, no head)'."""
    out = []
    for inp, outs in dict.fromkeys((r.get("input"), r.get("outputs")) for r in records):
        if inp is None:
            continue
        if outs and outs != "logits":
            out.append(
                f"input {inp} -> feature maps {outs.replace(',', ', ')} on the unmerged grid "
                "(GFLOPs: encoder up to the last of them, no head)"
            )
        else:
            out.append(f"input {inp} -> logits")
    return out


def environment_lines(records: Sequence[dict[str, Any]]) -> list[str]:
    if not records:
        return []
    r = records[0]
    lines = [
        *io_lines(records),
        f"cpu: {r['env_cpu']} ({r['env_cpu_count']} logical cores, {r['env_threads']} torch threads)",
    ]
    if r.get("env_cpu_isa"):
        lines.append(f"isa: {r['env_cpu_isa']}")
    if r["env_gpu"]:
        lines.append(f"gpu: {r['env_gpu']} (driver {r['env_driver'] or '?'}, CUDA {r['env_cuda'] or '?'})")
    else:
        lines.append("gpu: none")
    lines.append(
        f"torch {r['env_torch']}, onnxruntime {r['env_onnxruntime'] or '-'}, "
        f"tensorrt {r['env_tensorrt'] or '-'}, python {r['env_python']}, {r['env_os']}"
    )
    kinds = sorted({x["peak_mem_kind"] for x in records if x.get("peak_mem_kind")})
    if kinds:
        lines.append(f"memory: {', '.join(kinds)} (see caitdeploy/bench/runners.py)")
    ok = [x for x in records if x["status"] == "ok"]
    if ok:
        lines.append(
            f"timing: {ok[0]['warmup']} warm-up calls, {ok[0]['repeats']} repeats, "
            f"{min(x['iters'] for x in ok)}-{max(x['iters'] for x in ok)} timed calls per row; "
            "latency per batch; spread = max-min of the repeat medians"
        )
    return lines


def print_table(records: Sequence[dict[str, Any]], console=None, title: str = "caitdeploy bench") -> None:
    from rich.table import Table

    if console is None:
        from rich.console import Console

        console = Console(highlight=False)
    if not console.is_terminal:
        console.width = max(console.width, 160)  # a piped table keeps one line per row
    from rich.markup import escape

    # model names come from file names, statuses from error messages: every cell is `safe_text` (rows) and its
    # rich markup escaped; the lines below are printed with markup, emoji codes and wrapping off
    t = Table(title=escape(safe_text(title)))
    for c in COLUMNS:
        t.add_column(c, justify="left" if c in ("model", "backend", "status") else "right", overflow="fold")
    body, notes = rows(records)
    for row in body:
        t.add_row(*(escape(safe_text(c, 1000)) for c in row))
    console.print(t)
    for line in [*notes, FLOPS_NOTE, *environment_lines(records)]:
        console.print(safe_text(line, 2000), markup=False, highlight=False, emoji=False, soft_wrap=True)


def to_markdown(records: Sequence[dict[str, Any]], title: str | None = None) -> str:
    lines = [f"## {title}", ""] if title else []
    lines += ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    body, notes = rows(records)
    for row in body:
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |")
    lines += [""] + [n + "  " for n in notes] + ["", FLOPS_NOTE + ".", ""]
    lines += [f"- {safe_text(line, 2000)}" for line in environment_lines(records)]
    return "\n".join(lines) + "\n"


def write_markdown(
    records: Sequence[dict[str, Any]], path: str | os.PathLike, title: str | None = None, staging: Staging | None = None
) -> None:
    with _target(path, staging) as tmp:
        tmp.write_text(to_markdown(records, title))


def records_json(records: Sequence[dict[str, Any]]) -> str:
    """The flat records as JSON text (non-finite floats become null)."""
    import json
    import math

    def clean(v):
        return None if isinstance(v, float) and not math.isfinite(v) else v

    return json.dumps([{k: clean(v) for k, v in r.items()} for r in records], indent=2) + "\n"


def write_records_json(
    records: Sequence[dict[str, Any]], path: str | os.PathLike, staging: Staging | None = None
) -> None:
    with _target(path, staging) as tmp:
        tmp.write_text(records_json(records))


@contextlib.contextmanager
def _target(path: str | os.PathLike, staging: Staging | None) -> Iterator[Path]:
    """A temporary path for `path`: staged in `staging` (written when it commits) or atomic on its own."""
    if staging is not None:
        yield staging.stage(path)
        return
    with atomic_output(path) as tmp:
        yield tmp


def _label(r: dict[str, Any]) -> str:
    return "dense" if r["model"] == "dense" else r["model_detail"]


def write_plot(
    records: Sequence[dict[str, Any]], path: str | os.PathLike, title: str | None = None, staging: Staging | None = None
) -> None:
    """PNG: throughput by backend (groups) and model (bars) at the largest batch; with several batch sizes a
    second panel of p50 latency vs batch, one line per (model, backend)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    ok = [r for r in records if r["status"] == "ok"]
    if not ok:
        raise CaitError(f"{path}: nothing to plot: no benchmark row ran")
    batches = sorted({r["batch"] for r in ok})
    backends = list(dict.fromkeys(backend_label(r, ok) for r in ok))
    labels = list(dict.fromkeys(_label(r) for r in ok))
    multi = len(batches) > 1
    fig, axes = plt.subplots(1, 2 if multi else 1, figsize=(13 if multi else 8, 4.8), squeeze=False)
    ax = axes[0][0]
    top = batches[-1]
    width = 0.8 / max(1, len(labels))
    for j, lab in enumerate(labels):
        vals = []
        for be in backends:
            hit = [r for r in ok if r["batch"] == top and backend_label(r, ok) == be and _label(r) == lab]
            vals.append(hit[0]["throughput_img_s"] if hit else 0.0)
        xs = [i + (j - (len(labels) - 1) / 2) * width for i in range(len(backends))]
        bars = ax.bar(xs, vals, width, label=lab)
        # a pair that did not run (n/a, failed) is labelled so, not drawn as 0 images/s
        ax.bar_label(bars, labels=[f"{v:.0f}" if v else "n/a" for v in vals], fontsize=7)
    ax.set_xticks(range(len(backends)), backends)
    ax.set_ylabel("images / s")
    dts = ",".join(dict.fromkeys(r["dtype"] for r in ok))
    ax.set_title(f"throughput, batch {top}, {dts}, {ok[0]['device']}")
    ax.legend(fontsize=8)
    if multi:
        ax2 = axes[0][1]
        for lab in labels:
            for be in backends:
                pts = sorted(
                    (r["batch"], r["latency_ms_p50"]) for r in ok if backend_label(r, ok) == be and _label(r) == lab
                )
                if pts:
                    ax2.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{lab} / {be}")
        ax2.set_xscale("log", base=2)
        ax2.set_yscale("log")
        ax2.set_xlabel("batch")
        ax2.set_ylabel("p50 latency per batch (ms)")
        ax2.set_title("latency vs batch")
        ax2.legend(fontsize=7)
    env = ok[0]["env_gpu"] or ok[0]["env_cpu"]
    fig.suptitle(title or f"caitdeploy bench on {env}", fontsize=10)
    fig.tight_layout()
    fmt = Path(path).suffix.lower().lstrip(".") or "png"
    with _target(path, staging) as tmp:
        fig.savefig(tmp, format=fmt, dpi=120)
    plt.close(fig)
