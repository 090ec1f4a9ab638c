"""Property-based fuzzing (hypothesis) of every reader of untrusted files: the only thing that may come out is the
one-line `CaitError`, within 2 s and a memory limit per call.

    .venv/bin/python benchmarks/fuzz_readers.py [--examples N] [--seconds S] [--seed 0] [--targets a,b]
                                                [--json OUT] [--md OUT] [--findings DIR]

The command line of the harness in caitdeploy/testing/fuzz.py (targets, readers, limits and what counts as a
finding are described there); tests/security/test_fuzz_readers.py runs a bounded version of it. The committed
long run: --json results/fuzz_readers.json --md results/fuzz_readers.md (benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from caitdeploy.testing import fuzz


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=None, help="cases per target (default 200 without --seconds)")
    ap.add_argument("--seconds", type=float, default=None, help="time budget per target (with --examples: first hit)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--targets", default=",".join(fuzz.TARGETS), help=f"comma-separated, from: {', '.join(fuzz.TARGETS)}"
    )
    ap.add_argument("--json", default=None, help="write the summary here")
    ap.add_argument("--md", default=None, help="write a short markdown report here")
    ap.add_argument("--findings", default=None, help="folder for failing files and repro.py (default: a temp folder)")
    ap.add_argument("--case-seconds", type=float, default=fuzz.CASE_SECONDS)
    ap.add_argument("--case-memory-mb", type=float, default=fuzz.CASE_MEMORY_MB)
    ap.add_argument(
        "--memory-mb", type=int, default=fuzz.MEMORY_MB, help="RLIMIT_AS headroom over the worker after setup"
    )
    args = ap.parse_args(argv)
    summary = fuzz.run_fuzz(
        args.examples,
        args.seconds,
        args.seed,
        tuple(t for t in args.targets.split(",") if t),
        args.findings,
        args.case_seconds,
        args.case_memory_mb,
        args.memory_mb,
        log=lambda s: print(s, file=sys.stderr, flush=True),
    )
    print(fuzz.format_summary(summary))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    if args.md:
        fuzz.write_markdown(summary, Path(args.md), args.json or "(not written)")
    return 1 if summary["findings"] else 0


if __name__ == "__main__":
    sys.exit(main())
