#!/usr/bin/env python
"""The new families on one runtime: SiT-S vs LV-ViT-S vs CAIT-LV-ViT-S at matched FLOPs, and SPViT-DeiT-S vs
DeiT-S (ONNX Runtime, fp32, this machine's CPU).

    .venv/bin/python benchmarks/families_cpu.py [--batch 16] [--threads 2]

Random weights in the released layouts (caitdeploy/testing/upstream_sit.py and upstream_spvit.py: speed only,
no accuracy): SiT-S converted with `convert --from sit --variant s`; the dense LV-ViT-S teacher is SiT-S's dense
baseline (`bench --baselines dense`); CAIT-LV-ViT-S is `make-checkpoint --arch lvvit_s --merges 9:h,12:v` (where SiT-S slims) with
CDCP pruning to SiT-S's FLOPs reduction, then `fuse`; SPViT-DeiT-S is the released `spvit_deit_sm_l30_t32`
architecture converted with `--align 8`, its dense baseline DeiT-S. Writes benchmarks/results/
families_<machine>_b<batch>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "caitdeploy.cli.main"]


def sh(*args) -> None:
    subprocess.run([*CLI, *map(str, args)], check=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--min-iters", type=int, default=5)
    args = ap.parse_args(argv)

    import torch

    from caitdeploy.formats.fused import load_fused
    from caitdeploy.testing.upstream_sit import sit_state_dict
    from caitdeploy.testing.upstream_spvit import SPVIT_RELEASED, spvit_state_dict
    from paper_settings import machine_name

    out_dir = ROOT / "benchmarks" / "results"
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        torch.save({"model": sit_state_dict("s")}, t / "sit_s.pth")
        sh("convert", t / "sit_s.pth", "--from", "sit", "--variant", "s", "-o", t / "sit_s.fused.safetensors", "-q")
        _cfg, _, meta = load_fused(t / "sit_s.fused.safetensors")
        reduction = 1 - meta["flops"] / meta["flops_dense"]
        sh(
            "make-checkpoint",
            "--arch",
            "lvvit_s",
            "--merges",
            "9:h,12:v",
            "--flops-reduction",
            f"{reduction:.4f}",
            "--align",
            "8",
            "-o",
            t / "cait_lvvit_s.pth",
        )
        sh("fuse", t / "cait_lvvit_s.pth", "-q", "--verify-batch", "1")
        arch = SPVIT_RELEASED["spvit_deit_sm_l30_t32"]
        torch.save({"model": spvit_state_dict(arch["kinds"], arch["mlp_widths"])}, t / "spvit_s.pth")
        sh("convert", t / "spvit_s.pth", "--from", "spvit", "--align", "8", "-o", t / "spvit_s.fused.safetensors", "-q")
        records = []
        for name in ("sit_s", "cait_lvvit_s", "spvit_s"):
            js = t / f"{name}.json"
            baselines = "dense" if name != "cait_lvvit_s" else "none"
            sh(
                "bench",
                t / f"{name}.fused.safetensors",
                "--batch",
                args.batch,
                "--backends",
                "ort",
                "--dtype",
                "fp32",
                "--baselines",
                baselines,
                "--warmup",
                "2",
                "--min-iters",
                args.min_iters,
                "--min-seconds",
                "0",
                "--repeats",
                "2",
                "--threads",
                args.threads,
                "--json",
                js,
                "-q",
            )
            for r in json.loads(js.read_text()):
                r["setting"] = name if r["model"].startswith("CAIT") or name == "cait_lvvit_s" else r["setting"]
                records.append({**r, "source_model": name})
    tag = f"families_{machine_name()}_b{args.batch}"
    (out_dir / f"{tag}.json").write_text(json.dumps(records, indent=1))
    label = {"sit_s": "SiT-S (convert)", "cait_lvvit_s": "CAIT-LV-ViT-S (fuse)", "spvit_s": "SPViT-DeiT-S (convert)"}
    lines = [
        (
            f"# New families on ONNX Runtime CPU fp32, batch {args.batch} ({records[0]['env_cpu']}, "
            f"{args.threads} threads; random weights in the released layouts: speed only)"
        ),
        "",
        "| model | GFLOPs/img | params | p50 ms | img/s | speed-up vs its dense model |",
        "|---|---|---|---|---|---|",
    ]
    dense_speed = {}
    for r in records:
        if r["model"].startswith("dense"):
            dense_speed[r["source_model"]] = r["throughput_img_s"]
    for r in records:
        name = (
            label[r["source_model"]]
            if not r["model"].startswith("dense")
            else ("LV-ViT-S (dense)" if r["source_model"] != "spvit_s" else "DeiT-S (dense)")
        )
        if r["model"].startswith("dense") and r["source_model"] == "cait_lvvit_s":
            continue
        base = dense_speed.get("sit_s" if r["source_model"] != "spvit_s" else "spvit_s")
        sp = f"{r['throughput_img_s'] / base:.2f}x" if base and r["throughput_img_s"] else "-"
        lines.append(
            f"| {name} | {r['flops_per_img'] / 1e9:.3f} | {r['params'] / 1e6:.2f}M | {r['latency_ms_p50']:.1f} "
            f"| {r['throughput_img_s']:.1f} | {sp} |"
        )
    (out_dir / f"{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
