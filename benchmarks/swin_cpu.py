#!/usr/bin/env python
"""Swin-T on one runtime (issue 15): CAIT-Swin-T at the paper's two settings, SPViT-Swin-T, a DIMAP-style
unstructured-pruned Swin-T and the dense Swin-T, ONNX Runtime fp32 on this machine's CPU, FLOPs and speed-ups
side by side.

    .venv/bin/python benchmarks/swin_cpu.py [--batch 8] [--threads 2]

Random weights (no hub here; speed does not depend on them):
- CAIT-Swin-T, Tab. XII: CDCP only, `make-checkpoint --arch swin_tiny_patch4_window7_224 --merges none
  --flops-reduction 0.267 --align 8`, then `fuse`;
- CAIT-Swin-T, Tab. XIV: HTM + VTM at the last two blocks of stage 3 (`--merges 2.4:h,2.5:v`) and CDCP to 35.4%;
- SPViT-Swin-T: the released spvit_swin_tn_l28_t32 architecture (caitdeploy/testing/upstream_swin.py) in
  upstream's key layout, `convert --from spvit --align 8`;
- DIMAP-style Swin-T: 50% of every block matrix zeroed by magnitude (unstructured, as DIMAP's masks are), no
  whole rows: `convert --from dimap` finds none to remove, so the fused model has the dense widths;
- dense Swin-T: `bench`'s dense baseline.
Writes benchmarks/results/swin_<machine>_b<batch>.{json,md,png} and a summary (.summary.md).
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
ARCH = "swin_tiny_patch4_window7_224"


def sh(*args) -> None:
    subprocess.run([*CLI, *map(str, args)], check=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--min-iters", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    import timm
    import torch

    from caitdeploy.formats.fused import load_fused
    from caitdeploy.testing.upstream_swin import SPVIT_SWIN_RELEASED, dimap_state_dict, spvit_swin_state_dict
    from paper_settings import machine_name

    out_dir = ROOT / "benchmarks" / "results"
    tag = f"swin_{machine_name()}_b{args.batch}"
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        sh(
            "make-checkpoint",
            "--arch",
            ARCH,
            "--merges",
            "none",
            "--flops-reduction",
            "0.267",
            "--align",
            "8",
            "-o",
            t / "cait_swin_t_tab12.pth",
        )
        sh(
            "make-checkpoint",
            "--arch",
            ARCH,
            "--merges",
            "2.4:h,2.5:v",
            "--flops-reduction",
            "0.354",
            "--align",
            "8",
            "-o",
            t / "cait_swin_t_tab14.pth",
        )
        for name in ("cait_swin_t_tab12", "cait_swin_t_tab14"):
            sh("fuse", t / f"{name}.pth", "-q", "--verify-batch", "1")
        torch.manual_seed(0)
        arch = SPVIT_SWIN_RELEASED["spvit_swin_tn_l28_t32"]
        torch.save(
            {"model": spvit_swin_state_dict(timm.create_model(ARCH), arch["kinds"], arch["mlp_widths"])},
            t / "spvit_swin_t.pth",
        )
        sh(
            "convert",
            t / "spvit_swin_t.pth",
            "--from",
            "spvit",
            "--align",
            "8",
            "-o",
            t / "spvit_swin_t.fused.safetensors",
            "-q",
            "--verify-batch",
            "1",
        )
        torch.save(
            {"model": dimap_state_dict(timm.create_model(ARCH), 0.5, whole_rows=False)}, t / "dimap_swin_t_50.pth"
        )
        sh(
            "convert",
            t / "dimap_swin_t_50.pth",
            "--from",
            "dimap",
            "-o",
            t / "dimap_swin_t_50.fused.safetensors",
            "--report",
            t / "dimap.json",
            "-q",
            "--verify-batch",
            "1",
        )
        dimap = json.loads((t / "dimap.json").read_text())
        files = [
            t / f"{n}.fused.safetensors"
            for n in ("cait_swin_t_tab12", "cait_swin_t_tab14", "spvit_swin_t", "dimap_swin_t_50")
        ]
        sh(
            "bench",
            *files,
            "--batch",
            args.batch,
            "--backends",
            "ort",
            "--dtype",
            "fp32",
            "--baselines",
            "dense",
            "--warmup",
            "3",
            "--min-iters",
            args.min_iters,
            "--min-seconds",
            "0",
            "--repeats",
            args.repeats,
            "--threads",
            args.threads,
            "--json",
            out_dir / f"{tag}.json",
            "--markdown",
            out_dir / f"{tag}.md",
            "--plot",
            out_dir / f"{tag}.png",
            "-q",
        )
        metas = {f.name.removesuffix(".fused.safetensors"): load_fused(f)[2] for f in files}
    records = json.loads((out_dir / f"{tag}.json").read_text())
    label = {
        "cait_swin_t_tab12": "CAIT-Swin-T, Tab. XII (CDCP only)",
        "cait_swin_t_tab14": "CAIT-Swin-T, Tab. XIV (ATME 2.4:h,2.5:v + CDCP)",
        "spvit_swin_t": "SPViT-Swin-T (released architecture)",
        "dimap_swin_t_50": "DIMAP-style Swin-T (50% unstructured zeros)",
    }
    dense = next(r for r in records if r["model"] == "dense")
    lines = [
        (
            f"# Swin-T on ONNX Runtime CPU fp32, batch {args.batch} ({dense['env_cpu']}, {args.threads} threads; "
            "random weights in the released layouts: speed only)"
        ),
        "",
        "| model | GFLOPs/img | FLOPs vs dense | params | p50 ms | img/s | speed-up vs dense Swin-T |",
        "|---|---|---|---|---|---|---|",
        (
            f"| Swin-T (dense) | {dense['flops_per_img'] / 1e9:.3f} | - | {dense['params'] / 1e6:.2f}M | "
            f"{dense['latency_ms_p50']:.1f} | {dense['throughput_img_s']:.1f} | 1.00x |"
        ),
    ]
    for r in records:
        if r["model"] == "dense":
            continue
        lines.append(
            f"| {label.get(r['setting'], r['setting'])} | {r['flops_per_img'] / 1e9:.3f} | "
            f"-{100 * (1 - r['flops_per_img'] / dense['flops_per_img']):.1f}% | {r['params'] / 1e6:.2f}M | "
            f"{r['latency_ms_p50']:.1f} | {r['throughput_img_s']:.1f} | {r['speedup_vs_dense']:.2f}x |"
        )
    zeros = dimap["sparsity"]["zeros"]
    removed = sum(b["mlp"][0] - b["mlp"][1] for b in dimap["removed_rows"])
    lines += [
        "",
        (
            f"DIMAP-style file: {100 * zeros:.1f}% of the weights in its matrices are zero; exact row removal "
            f"found {removed} removable FFN units (scattered zeros leave whole rows intact), so the deployed model "
            "has the dense widths and the dense speed: unstructured sparsity buys nothing on a dense runtime."
        ),
        "",
        "Fuse/convert checks (max |logit diff| vs the checkpoint's float64 forward, 1 image): "
        + ", ".join(f"{n} {m['verify']['max_abs_diff']:.1e}" for n, m in metas.items()),
    ]
    (out_dir / f"{tag}.summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
