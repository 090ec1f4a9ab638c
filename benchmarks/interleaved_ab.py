#!/usr/bin/env python
"""CAIT vs dense on one CPU runtime, interleaved: a check of a sequential benchmark's ratio on a noisy machine.

`openvino_cpu.py` times each row on its own, one after the other; at batch 256 a row takes minutes, and a
neighbour's load during one row moves that row alone (its "spread" column shows it). Here the CAIT and dense ONNX
files `openvino_cpu.py` left in its work folder are compiled once and timed in alternation, round after round,
so that slow phases of the machine fall on both: the CAIT/dense ratio is the median of the per-round ratios.

    .venv/bin/python benchmarks/interleaved_ab.py --result benchmarks/results/openvino_<machine>_b256_small.json \\
        [--runtimes openvino,ort] [--rounds 5] [--calls 2]

Writes benchmarks/results/<result stem>_interleaved.json: per runtime, the per-round latencies and ratios,
their medians, the FLOPs ratio (from the result file) and the share of it reached.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _runner(runtime: str, path: Path, threads: int):
    from caitdeploy.runtime import OrtRunner, RuntimeSpec
    from caitdeploy.runtime.openvino_runner import OpenVinoRunner

    spec = RuntimeSpec(threads=threads)
    r = OpenVinoRunner(path, spec) if runtime == "openvino" else OrtRunner(path, spec)
    r.activate()
    return r


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--result", required=True, help="an openvino_cpu.py result JSON (batch, FLOPs, model)")
    ap.add_argument("--runtimes", default="openvino,ort")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=2, help="timed calls per model per round (after one warm-up)")
    ap.add_argument("--work-dir", default=None, help="openvino_cpu.py's work folder (default: its default)")
    args = ap.parse_args(argv)

    import numpy as np

    from caitdeploy.core.cpu import cpu_info, isa_text
    from caitdeploy.runtime.openvino_runner import openvino_version

    result = json.loads(Path(args.result).read_text())
    s = result["settings"]
    batch, threads = int(s["batch"]), int(s["threads"])
    recs = {r["model"]: r for r in result["records"] if r["backend"] == "ort" and r["dtype"] == "fp32"}
    flops_ratio = recs["dense"]["flops_per_img"] / recs["cait"]["flops_per_img"]
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.gettempdir()) / "caitdeploy-paper-settings"
    onnx_dir = work / "onnx-openvino"
    files = {
        "cait": onnx_dir / f"{recs['cait']['setting']}-cait-fp32.onnx",
        "dense": onnx_dir / f"{recs['dense']['setting']}-dense-fp32.onnx",
    }
    for k, p in files.items():
        if not p.is_file():
            print(f"error: no {k} fp32 ONNX file {p}: run openvino_cpu.py first", file=sys.stderr)
            return 2
    x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(np.float32)
    out: dict = {
        "result": str(Path(args.result).name),
        "batch": batch,
        "threads": threads,
        "flops_ratio": flops_ratio,
        "rounds": args.rounds,
        "calls": args.calls,
        "cpu": {"model": cpu_info()["model"], "isa": isa_text(cpu_info())},
        "openvino": openvino_version(),
        "files": {k: p.name for k, p in files.items()},
        "runtimes": {},
    }
    for runtime in args.runtimes.split(","):
        runners = {k: _runner(runtime, p, threads) for k, p in files.items()}
        feeds = {k: {n: x for n in (r.input_names if runtime == "openvino" else r.inputs)} for k, r in runners.items()}
        for k, r in runners.items():  # one warm-up call each
            r.infer(feeds[k])
        lat: dict[str, list[float]] = {"cait": [], "dense": []}
        for _ in range(args.rounds):
            for k, r in runners.items():
                ts = []
                for _ in range(args.calls):
                    t0 = time.perf_counter()
                    r.infer(feeds[k])
                    ts.append(time.perf_counter() - t0)
                lat[k].append(1000 * statistics.median(ts))
        ratios = [d / c for c, d in zip(lat["cait"], lat["dense"], strict=True)]
        ratio = statistics.median(ratios)
        out["runtimes"][runtime] = {
            "cait_ms": lat["cait"],
            "dense_ms": lat["dense"],
            "ratios": ratios,
            "cait_vs_dense": ratio,
            "share_of_flops_ratio": ratio / flops_ratio,
        }
        for r in runners.values():
            r.deactivate()
        print(
            f"{runtime}: CAIT/dense {ratio:.2f}x (rounds {min(ratios):.2f}-{max(ratios):.2f}) = "
            f"{ratio / flops_ratio:.0%} of the FLOPs ratio {flops_ratio:.2f}x; CAIT "
            f"{statistics.median(lat['cait']):.0f} ms, dense {statistics.median(lat['dense']):.0f} ms per batch of {batch}"
        )
    out["command"] = "python benchmarks/interleaved_ab.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    dest = Path(args.result).with_name(Path(args.result).stem + "_interleaved.json")
    dest.write_text(json.dumps(out, indent=2) + "\n")
    lines = [
        f"## CAIT vs dense, interleaved ({out['cpu']['model']}, batch {batch}, {threads} threads)",
        "",
        (
            "| runtime | CAIT ms (median) | dense ms (median) | CAIT/dense (median of rounds) | rounds | share of the "
            "FLOPs ratio |"
        ),
        "|---|---|---|---|---|---|",
    ]
    for runtime, r in out["runtimes"].items():
        lines.append(
            f"| {runtime} fp32 | {statistics.median(r['cait_ms']):.0f} | {statistics.median(r['dense_ms']):.0f} | "
            f"{r['cait_vs_dense']:.2f}x | {min(r['ratios']):.2f}-{max(r['ratios']):.2f}x | "
            f"{r['share_of_flops_ratio']:.0%} of {flops_ratio:.2f}x |"
        )
    lines += [
        "",
        (
            f"- {args.rounds} rounds, each timing CAIT then dense, {args.calls} calls each (median), after one warm-up "
            f"call per model; the files of {out['result']}"
        ),
        f"- cpu: {out['cpu']['model']}, isa: {out['cpu']['isa']}; openvino {out['openvino']}",
        f"- command: `{out['command']}`",
        "",
    ]
    dest.with_suffix(".md").write_text("\n".join(lines))
    print(f"wrote {dest} and {dest.with_suffix('.md').name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
