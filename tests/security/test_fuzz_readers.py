"""Property-based fuzzing of the readers of untrusted files (bounded CI run of benchmarks/fuzz_readers.py).

checkpoint (.pth and .safetensors), fused-file, ONNX-metadata and engine-sidecar readers get small valid files
mutated by hypothesis (header bytes, shapes, offsets, dtypes, pickle opcodes, metadata JSON); each call must return
or raise a one-line CaitError, within 2 s and 512 MiB of peak RSS growth, in a worker process under RLIMIT_AS.
The harness lives in caitdeploy/testing/fuzz.py (one copy; benchmarks/fuzz_readers.py is its command line); a
longer run's numbers are in benchmarks/results/fuzz_readers.{json,md}.

    CAITDEPLOY_FUZZ_EXAMPLES=500 CAITDEPLOY_FUZZ_SEED=3 .venv/bin/python -m pytest tests/security/test_fuzz_readers.py -s
"""

from __future__ import annotations

import os

import pytest

from caitdeploy.testing import fuzz as fz

pytest.importorskip("hypothesis")  # the harness imports it only when it runs


@pytest.mark.slow
def test_readers_only_raise_one_line_errors(tmp_path):
    examples = int(os.environ.get("CAITDEPLOY_FUZZ_EXAMPLES", fz.CI_EXAMPLES))
    seed = int(os.environ.get("CAITDEPLOY_FUZZ_SEED", "0"))
    summary = fz.run_fuzz(examples=examples, seed=seed, findings_dir=tmp_path / "findings")
    print(fz.format_summary(summary))
    # the run really exercised every reader, past the first check as well as at it
    for name in fz.TARGETS:
        t = summary["targets"][name]
        assert t["cases"] >= examples // 2 or t.get("incomplete"), (name, t)
        for reader, r in t.get("readers", {}).items():
            assert r["calls"] == t["cases"], (name, reader, r)
    assert sum(r["accepted"] for t in summary["targets"].values() for r in t.get("readers", {}).values()) > 0
    assert summary["findings"] == [], fz.format_findings(summary)
