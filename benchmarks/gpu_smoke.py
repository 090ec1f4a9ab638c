#!/usr/bin/env python
"""Bench smoke on every CUDA backend (step 2 of `make gpu-check`): a small CAIT model, batch 8, fp16.

    python benchmarks/gpu_smoke.py --out DIR [--device cuda]

Every row must be "ok" or "n/a: <reason>" for a runtime this machine lacks (TensorRT, onnxruntime-gpu); a
row that "failed" is a bug and makes the exit status 1. The torch rows must be ok. On a CPU machine
(`--device cpu`) the same script checks the CPU backends, which is how it is tested without a GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--backends", default=None, help="default: all five on cuda, torch,ort on cpu")
    return ap


def main(argv=None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    import torch

    from caitdeploy.bench.report import write_records_json
    from caitdeploy.bench.run import run_bench
    from caitdeploy.bench.runners import Timing
    from caitdeploy.compress.cdcp import make_checkpoint, save_checkpoint_dict
    from caitdeploy.compress.fuse import FuseOptions, fuse_file

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # 60%: the merges 2:h,4:v alone remove 52.8% at 64 px (make_checkpoint refuses a target below that)
    ck, _ = make_checkpoint("deit_tiny_patch16_224", 0.6, {2: "h", 4: "v"}, num_classes=10, img_size=64)
    save_checkpoint_dict(ck, out / "smoke.pth")
    fuse_file(out / "smoke.pth", out / "smoke.fused.safetensors", FuseOptions(align=8), verify_batch=1)
    backends = args.backends or ("torch,compile,ort,trt,torch-triton" if args.device == "cuda" else "torch,ort")
    recs = run_bench(
        [str(out / "smoke.fused.safetensors")],
        batches=[8],
        backends=backends.split(","),
        dtype="fp16" if args.device == "cuda" else "fp32",
        baselines=["dense", "tome"],
        tome_r=4,
        device=args.device,
        timing=Timing(warmup=1, min_iters=3, min_seconds=0.0, repeats=1),
        work_dir=out / "work",
        progress=False,
        log=lambda s: None,
    )
    write_records_json(recs, out / "smoke.json")
    bad = [r for r in recs if r["status"] != "ok" and "failed" in r["status"]]
    torch_bad = [r for r in recs if r["backend"] == "torch" and r["status"] != "ok"]
    for r in recs:
        print(f"{r['model']:6} {r['backend']:13} {r['status']}")
    print(
        json.dumps(
            {
                "rows": len(recs),
                "ok": sum(r["status"] == "ok" for r in recs),
                "failed": len(bad),
                "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
            }
        )
    )
    return 1 if bad or torch_bad else 0


if __name__ == "__main__":
    sys.exit(main())
