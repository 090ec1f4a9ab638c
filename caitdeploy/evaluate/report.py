"""`eval`'s reports: the rich table, Markdown, JSON (one flat record per artifact) and the PNG (accuracy, or
agreement without labels, against images per second)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from caitdeploy.core.errors import Staging


def _pct(v: Any, digits: int = 2) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.{digits}f}"


def _ci(r: dict[str, Any], k: str) -> str:
    if r.get(k) is None:
        return "-"
    return f"{_pct(r[k + '_ci_low'], 1)}-{_pct(r[k + '_ci_high'], 1)}"


def _num(v: Any, fmt: str) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


RUNTIME_SHORT = {"onnxruntime": "ort", "tensorrt": "trt"}


def label(r: dict[str, Any]) -> str:
    """A record's name in lines and plots: the file (or URL/model) and how it ran, e.g. `m.onnx [ort int8 static]`."""
    name = Path(r["artifact"]).name if r["kind"] != "triton" else r["artifact"]
    return f"{name} [{RUNTIME_SHORT.get(r['runtime'], r['runtime'])} {r['precision']}]"


def columns(records: Sequence[dict[str, Any]]) -> list[str]:
    """The table's columns: top-1 (and its 95% interval) and top-5 with labels; agreement with the reference on
    logits, or the feature maps' cosines; the largest |difference|; images per second."""
    labelled = any(r["labelled"] for r in records)
    features = any(r["feature_cosine_min"] is not None for r in records)
    cols = ["artifact", "runs as"]
    if labelled:
        cols += ["top-1 %", "95% CI"]
        if any(r["top5"] is not None for r in records):
            cols += ["top-5 %"]
    cols += ["feat cos min", "feat cos mean"] if features else ["agree %", "cos min"]
    return [*cols, "max |diff|", "img/s"]


def rows(records: Sequence[dict[str, Any]]) -> list[list[str]]:
    cols = columns(records)
    out = []
    for r in records:
        name = Path(r["artifact"]).name if r["kind"] != "triton" else r["artifact"]
        runtime = RUNTIME_SHORT.get(r["runtime"], r["runtime"])
        if r["status"] != "ok":
            out.append([name, f"{runtime} {r['precision']}", "n/a"] + [""] * (len(cols) - 3))
            continue
        ref = r["reference"]
        cells = {
            "artifact": name,
            "runs as": f"{runtime} {r['precision']}",
            "top-1 %": _pct(r["top1"]),
            "95% CI": _ci(r, "top1"),
            "top-5 %": _pct(r["top5"]),
            "agree %": "ref" if ref else _pct(r["agree_top1"]),
            "cos min": "ref" if ref else _num(r["cosine_min"], ".5f"),
            "feat cos min": "ref" if ref else _num(r["feature_cosine_min"], ".6f"),
            "feat cos mean": "ref" if ref else _num(r["feature_cosine_mean"], ".6f"),
            "max |diff|": "ref" if ref else _num(r["max_abs_diff"], ".0e"),
            "img/s": _num(r["img_per_s"], ".0f"),
        }
        out.append([cells[c] for c in cols])
    return out


def summary_line(records: Sequence[dict[str, Any]], data: str) -> str:
    r = records[0]
    skipped = f", {r['skipped_images']} skipped (--skip-bad-images)" if r["skipped_images"] else ""
    if any(x["feature_cosine_min"] is not None for x in records):
        what = "images (feature maps compared; labels not used)"
    else:
        what = "labelled images" if r["labelled"] else "images without labels (agreement only)"
    return f"{r['images']} {what} from {data}{skipped}; batch {r['batch']}"


def disagreement_lines(records: Sequence[dict[str, Any]], show: int) -> list[str]:
    lines = []
    for r in records:
        if r["status"] != "ok" or r["reference"] or not r["disagreements"]:
            continue
        items = r["disagree_images"][:show]
        shown = ", ".join(
            f"#{d['index']} {d['file']} ({'label ' + str(d['label']) + ': ' if d['label'] is not None else ''}"
            f"{d['reference']} -> {d['predicted']})"
            for d in items
        )
        more = f" (+{r['disagreements'] - len(items)} more)" if r["disagreements"] > len(items) else ""
        lines.append(f"{label(r)}: {r['disagreements']} top-1 disagreements" + (f": {shown}{more}" if show else ""))
    return lines


def print_table(records: Sequence[dict[str, Any]], console, title: str = "caitdeploy eval") -> None:
    from rich.table import Table

    t = Table(title=title)
    cols = columns(records)
    for c in cols:
        t.add_column(
            c,
            justify="left" if c in ("artifact", "runs as") else "right",
            no_wrap=c != "artifact",  # only the name may give way (shortened with an ellipsis)
            overflow="ellipsis",
            min_width=min(len(c), 10),
        )
    for row in rows(records):
        t.add_row(*row)
    console.print(t)
    for r in records:  # why a row was not run, in full (the table has no room for it)
        if r["status"] != "ok":
            console.print(f"{label(r)}: {r['status']}", soft_wrap=True)


def to_markdown(records: Sequence[dict[str, Any]], title: str | None = "caitdeploy eval") -> str:
    cols = columns(records)
    lines = [f"# {title}", ""] if title else []
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows(records)]
    lines += [f"\n{label(r)}: {r['status']}" for r in records if r["status"] != "ok"]
    return "\n".join(lines) + "\n"


def records_json(records: Sequence[dict[str, Any]]) -> str:
    """The records as JSON text: one object per artifact, keys in `RECORD_KEYS` order then the env_* keys; NaN and
    Inf as null."""
    import json

    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, list):
            return [clean(x) for x in v]
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        return v

    return json.dumps([clean(dict(r)) for r in records], indent=2) + "\n"


def plot_png(records: Sequence[dict[str, Any]], path: Path, title: str = "caitdeploy eval") -> None:
    """One row per artifact: top-1 accuracy with its 95% interval (without labels: agreement with the reference; for
    feature maps: the smallest cosine) on the left, images per second on the right."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    ok = [r for r in records if r["status"] == "ok"]
    names = [label(r) for r in ok]
    labelled = any(r["top1"] is not None for r in ok)
    features = any(r["feature_cosine_min"] is not None for r in ok)
    ys = list(range(len(ok)))[::-1]
    fig, (ax, bx) = plt.subplots(
        1, 2, figsize=(9, 1.2 + 0.42 * len(ok)), dpi=120, sharey=True, gridspec_kw={"width_ratios": [3, 2]}
    )
    for y, r in zip(ys, ok, strict=True):
        if labelled:
            v = 100 * r["top1"]
            err = [[v - 100 * r["top1_ci_low"]], [100 * r["top1_ci_high"] - v]]
            ax.errorbar([v], [y], xerr=err, fmt="o", capsize=4, color="tab:blue" if not r["reference"] else "black")
            ax.annotate(f"{v:.2f}", (v, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7)
        else:
            key = "feature_cosine_min" if features else "agree_top1"
            v = 1.0 if r["reference"] else r[key]
            if v is not None:
                ax.plot([v if features else 100 * v], [y], "o", color="black" if r["reference"] else "tab:blue")
        if r["img_per_s"]:
            bx.barh([y], [r["img_per_s"]], color="tab:gray")
            bx.annotate(
                f"{r['img_per_s']:.0f}", (r["img_per_s"], y), textcoords="offset points", xytext=(3, -3), fontsize=7
            )
    ax.set_yticks(ys, names, fontsize=8)
    ax.set_xlabel(
        "top-1 accuracy % (95% CI; black: the reference)"
        if labelled
        else ("smallest feature-map cosine vs the reference" if features else "top-1 agreement with the reference %")
    )
    bx.set_xlabel("images / s (model call only)")
    for a in (ax, bx):
        a.grid(True, axis="x", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def write_reports(
    records: Sequence[dict[str, Any]],
    json_path: str | os.PathLike | None,
    md_path: str | os.PathLike | None,
    plot_path: str | os.PathLike | None,
    staging: Staging,
) -> None:
    if json_path:
        staging.write_text(json_path, records_json(records))
    if md_path:
        staging.write_text(md_path, to_markdown(records))
    if plot_path:
        plot_png(records, staging.stage(plot_path, ".png"))


__all__ = [
    "disagreement_lines",
    "plot_png",
    "print_table",
    "records_json",
    "summary_line",
    "to_markdown",
    "write_reports",
]
