"""Every command block of README.md and the docs site runs, and prints what the page says it prints, within the
tolerance caitdeploy.testing.docs states. Pages marked slow run in CI's docs leg (CAITDEPLOY_DOCS_SLOW=1)."""

from __future__ import annotations

import os

import pytest

from caitdeploy.testing import docs

PAGES = docs.pages()
RUNNABLE = [p for p in PAGES if any(b.runnable and not b.skip for b in docs.parse(p))]


def _id(path) -> str:
    return path.relative_to(docs.ROOT).as_posix()


def test_pages_follow_the_conventions():
    problems = [p for page in PAGES for p in docs.check_conventions(docs.parse(page))]
    assert not problems, "\n".join(problems)


def test_skipped_blocks_name_what_ci_runs():
    """A block skipped as `ci` holds only commands CI itself runs (a line of .ci/run or a make target it reaches)."""
    ci = docs.ci_commands()
    for page in PAGES:
        for b in docs.parse(page):
            if b.skip and b.skip[0] == "ci":
                for c in b.commands():
                    cmd = c.text.split("#")[0].strip()
                    assert cmd in ci, f"{b.page}:{c.line}: `{cmd}` is marked as run by CI, but .ci/run never runs it"


def test_enough_is_executed():
    """The docs are mostly executed examples, not prose about commands: count what runs."""
    blocks = [b for p in PAGES for b in docs.parse(p)]
    runnable = [b for b in blocks if b.runnable and not b.skip]
    commands = sum(len(b.commands()) for b in runnable if b.lang != "python")
    assert len(RUNNABLE) >= 8 and commands >= 30, (len(RUNNABLE), commands)


@pytest.mark.parametrize("page", RUNNABLE, ids=_id)
def test_page_examples(page, tmp_path):
    """The quick leg runs every page without its slow blocks; the docs leg ({SLOW_ENV}=1) runs the pages that have
    slow blocks, whole."""
    if os.environ.get("CAITDEPLOY_DOCS_STACK") == "floor":
        pytest.skip("the docs show the latest stack's output: the latest and docs legs run them (not the floor leg)")
    blocks = docs.parse(page)
    slow = os.environ.get(docs.SLOW_ENV) == "1"
    if slow and not any(b.slow for b in blocks):
        pytest.skip("no slow block: the quick leg ran this page")
    if not slow and all(b.slow or b.skip or not b.runnable for b in blocks):
        pytest.skip(f"only slow blocks: CI's docs leg runs them ({docs.SLOW_ENV}=1, make docs-examples)")
    failures, _, ran = docs.run_page(blocks, tmp_path, slow=slow)
    assert ran > 0
    assert not failures, "\n".join(map(str, failures))


@pytest.mark.parametrize(
    ("doc", "got", "ok"),
    [
        ("params  22.05M -> 17.80M", "params  22.05M -> 17.81M", True),
        ("params  22.05M -> 17.80M", "params  22.05M -> 18.80M", False),
        ("wrote x in 2.18 s (fuse 0.41 s)", "wrote x in 9.99 s (fuse 3.00 s)", True),
        ("max |diff| 9.07e-07", "max |diff| 4.00e-06", True),
        ("max |diff| 9.07e-07", "max |diff| 1.00e-04", False),
        ("│     0 │ 1152 (1151) │", "│     0 │ 1152 (1151) │", True),
        ("│     0 │   48 │", "│     0 │  480 │", False),
        ("source sha256 223171b17b93f8fc", "source sha256 0be01c2ad3e4f5a6", True),
        ("onnxruntime 1.32.0", "onnxruntime 1.33.1", True),
        ("fused model.pth", "fused other.pth", False),
        ("top-1 agreement 100%", "top-1 agreement 50%", False),
        ("cpu: AMD EPYC (2 logical cores, 2 torch threads)", "cpu: AMD EPYC (16 logical cores, 1 torch threads)", True),
        ("cpu: AMD EPYC (2 logical cores)", "cpu: Intel Xeon (2 logical cores)", False),
        ("3 blocks pruned", "4 blocks pruned", False),
    ],
)
def test_line_tolerance(doc, got, ok):
    assert (docs.line_mismatch(doc, got) is None) is ok


def test_wildcard_lines_match_any_run():
    doc = ["head", "│   ... │", "tail"]
    assert docs.output_mismatch(doc, ["head", "a", "b", "tail"]) is None
    assert docs.output_mismatch(doc, ["head", "tail"]) is None
    assert docs.output_mismatch(doc, ["head", "a", "tail", "extra"]) is not None
    assert docs.output_mismatch(["only"], ["only", "more"]) is not None
