"""The "Benchmark results" page, generated at build time from benchmarks/results/ (docs/hooks.py): every committed
result, its table as the benchmark script wrote it (the machine is in each file's title), its plot, and its raw
JSON, so the page can never disagree with the committed files. `python docs/gen_results.py -` prints the page."""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PAGE = "benchmarks/results.md"  # its path under docs/
ASSETS = "benchmarks/results"  # where the plots and JSON files go in the site, beside the page


def _demote(markdown: str) -> str:
    """Headings two levels down (the page's own sections are level 2), relative links dropped to text."""
    out = []
    fence = False
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            fence = not fence
        if not fence and re.match(r"^#{1,4} ", line):
            line = "##" + line
        out.append(re.sub(r"\[([^\]]+)\]\((?!https?:)[^)]*\)", r"`\1`", line))
    return "\n".join(out)


def assets() -> list[Path]:
    """The files the page links to: every plot and raw JSON result."""
    return sorted(p for p in RESULTS.iterdir() if p.suffix in (".png", ".json"))


def markdown() -> str:
    stems = sorted(
        {
            p.name[: -len(p.suffix)].removesuffix(".summary")
            for p in RESULTS.iterdir()
            if p.suffix in (".md", ".json", ".png")
        }
    )
    parts = [
        "# Benchmark results",
        "",
        "Every result committed under `benchmarks/results/`, generated from those files when the site is built. Each",
        "title names the machine it ran on; the scripts that wrote them are in `benchmarks/` (see the",
        "[benchmarks overview](../benchmarks.md)).",
        "",
    ]
    for stem in stems:
        parts += [f"## {stem}", ""]
        for md in [RESULTS / f"{stem}.md", RESULTS / f"{stem}.summary.md"]:
            if not md.exists():
                continue
            parts += [_demote(md.read_text(encoding="utf-8")), ""]
        png = RESULTS / f"{stem}.png"
        if png.exists():
            parts += [f"![{stem}](results/{png.name})", ""]
        js = RESULTS / f"{stem}.json"
        if js.exists():
            parts += [f"Raw records: [{js.name}](results/{js.name})", ""]
    return "\n".join(parts)


if __name__ == "__main__":
    sys.stdout.write(markdown())
