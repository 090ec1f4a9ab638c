#!/usr/bin/env python
"""Dense prediction: CAIT backbones as feature extractors at 512x512, against the dense backbone and ToMe-style
merging with its merges undone to the full grid (paper Sec. IV-B, Tab. IV: encoder speed-ups at 512x512, batch 32).

Every model returns the same four full-grid feature maps (`--features 3,5,7,11`, [B, D, 32, 32] each, what a
Semantic FPN / UperNet neck takes from a 12-block ViT); no head runs. CAIT settings are paper_settings.py's
(make_checkpoint at the paper's FLOPs reduction on 224 px, merges 4:h,8:v, fused with align 8; random weights:
speed only), run at 512 px with the position embedding resampled; grids 32x32 -> 32x16 -> 16x16, restored by
repetition. ToMe's r is matched to CAIT's encoder FLOPs at 512 px.

    .venv/bin/python benchmarks/dense_prediction.py [--models small] [--batch 32] [--backends ort] [--threads 2]

Writes benchmarks/results/dense_<machine>_<size>_b<batch>_<models>.{json,md,png}.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# the paper's Tab. IV reports encoder speed-ups of 1.46x-1.64x (Semantic FPN, UperNet, Mask2Former on ADE20K,
# 512x512, batch 32, GPU) with no mIoU loss; the per-row values are in the paper, not repeated here
PAPER_RANGE = (1.46, 1.64)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="small", help="comma list of tiny, small, base (paper_settings.py)")
    ap.add_argument("--img-size", default="512")
    ap.add_argument("--features", default="3,5,7,11")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--backends", default="ort")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--min-iters", type=int, default=3)
    ap.add_argument("--min-seconds", type=float, default=0.0)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument(
        "--work-dir",
        default=None,
        help="fused models and ONNX files (default: <tmp>/caitdeploy-paper-settings, shared with paper_settings.py)",
    )
    args = ap.parse_args(argv)

    from caitdeploy.bench import run_bench
    from caitdeploy.bench.report import print_table
    from caitdeploy.bench.runners import Timing
    from caitdeploy.cli.common import console
    from paper_settings import ARCHS, PAPER, build_setting, machine_name, write_results

    con = console()
    log = lambda s: con.print(s, markup=False)  # noqa: E731
    sizes = [s.strip() for s in args.models.split(",") if s.strip()]
    if any(s not in ARCHS for s in sizes):
        ap.error(f"--models: choose from {', '.join(ARCHS)}")
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.gettempdir()) / "caitdeploy-paper-settings"
    work.mkdir(parents=True, exist_ok=True)
    paths = [build_setting(s, PAPER[s], work, log) for s in sizes]
    timing = Timing(warmup=args.warmup, min_iters=args.min_iters, min_seconds=args.min_seconds, repeats=args.repeats)
    t0 = time.perf_counter()
    records = run_bench(
        paths,
        batches=[args.batch],
        backends=args.backends.split(","),
        dtype="fp32",
        timing=timing,
        threads=args.threads,
        work_dir=work / f"onnx-dense-{args.img_size}",
        log=log,
        img_size=args.img_size,
        features=args.features,
    )
    elapsed = time.perf_counter() - t0
    machine = machine_name()
    tag = f"dense_{machine}_{args.img_size}_b{args.batch}_{'-'.join(sizes)}"
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/dense_prediction.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    title = (
        f"CAIT backbones for dense prediction on {machine}: features {args.features} at {args.img_size} px, "
        f"batch {args.batch}"
    )
    write_results(
        out_dir / tag,
        records,
        title,
        command,
        {
            "models": sizes,
            "reductions_at_224": [PAPER[s] for s in sizes],
            "merges": "4:h,8:v",
            "img_size": args.img_size,
            "features": args.features,
            "restore": "repeat",
            "weights": "random (speed only)",
            "seconds": round(elapsed, 1),
            "paper_tab4_encoder_speedup_range": list(PAPER_RANGE),
        },
        f"paper Tab. IV (GPU, 512x512, batch 32): encoder speed-ups {PAPER_RANGE[0]}x-{PAPER_RANGE[1]}x "
        "over the dense backbone",
    )
    print_table(records, con, title=title)
    log(f"wrote {out_dir / tag}.json/.md/.png in {elapsed:.0f} s of benchmarking")
    return 0


if __name__ == "__main__":
    sys.exit(main())
