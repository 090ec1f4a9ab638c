"""Time `caitdeploy export` steps for DeiT-Small / DeiT-Base CAIT models on this machine.

For each architecture: a CAIT checkpoint (one-shot CDCP selection at the given FLOPs reduction, ATME merges
4:h,8:v, random weights), fused with align 8, then:
  - ONNX export fp32 and fp16 (torch.onnx dynamo exporter + graph-surgeon cleanup + checker), timed apart from
    the ONNX Runtime verification (fp32: batches 1 and 7; fp16: the same plus --fp16-samples images),
  - a TensorRT-RTX engine build from each ONNX (profile 1/256/256, CPU ahead-of-time build) if installed.
Writes benchmarks/results/export_times_<machine>.json and .md.

    python benchmarks/bench_export.py [--fp16-samples 64] [--archs small,base]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

ARCHS = {"small": ("deit_small_patch16_224", 0.55), "base": ("deit_base_patch16_224", 0.58)}
MERGES = {4: "h", 8: "v"}
HEAD_SCALE = 50.0  # timing does not depend on weight values


def machine() -> dict:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "gpu": gpu,
        "load_avg_start": os.getloadavg(),
        "python": platform.python_version(),
        "host": platform.node(),
    }


def slug(m: dict) -> str:
    base = re.sub(r"[^a-z0-9]+", "-", m["cpu"].lower()).strip("-") or "cpu"
    return f"{base}-{m['cores']}c" + ("-" + re.sub(r"[^a-z0-9]+", "-", m["gpu"].lower()).strip("-") if m["gpu"] else "")


def bench_arch(key: str, work: Path, fp16_samples: int, trt_ok: bool) -> dict:
    from caitdeploy.compress.cdcp import make_checkpoint, save_checkpoint_dict
    from caitdeploy.compress.fuse import FuseOptions, fuse_file
    from caitdeploy.export.onnx import export_onnx
    from caitdeploy.formats.fused import load_model

    arch, fr = ARCHS[key]
    out: dict = {"arch": arch, "flops_reduction_target": fr, "merges": MERGES}
    t = time.perf_counter()
    ckpt, _summary = make_checkpoint(arch, fr, MERGES)
    save_checkpoint_dict(ckpt, work / f"{key}.pth")
    out["make_checkpoint_s"] = time.perf_counter() - t
    t = time.perf_counter()
    fuse_rep = fuse_file(work / f"{key}.pth", work / f"{key}.fused.safetensors", FuseOptions(align=8), verify_batch=0)
    out["fuse_s"] = time.perf_counter() - t
    out.update(
        flops_fused=fuse_rep["flops_fused"],
        flops_dense=fuse_rep["flops_dense"],
        flops_reduction=fuse_rep["flops_reduction"],
        params_fused=fuse_rep["params_fused"],
    )
    model = load_model(work / f"{key}.fused.safetensors", attn_impl="math")
    import torch

    with torch.no_grad():  # random-init logits are near-ties; spread them so fp16 top-1 agreement means something
        model.head.weight.mul_(HEAD_SCALE)
    for dtype in ("fp32", "fp16"):
        p = work / f"{key}.{dtype}.onnx"
        rep = export_onnx(model, p, dtype=dtype, fp16_samples=fp16_samples)
        v = rep["verify"]
        row = {
            "export_s": rep["seconds"]["export"],
            "clean_check_s": rep["seconds"]["clean_check"],
            "verify_s": rep["seconds"]["verify"],
            "total_s": rep["seconds"]["total"],
            "onnx_bytes": rep["bytes"],
            "nodes": rep["nodes"],
            "verify_samples": v["samples"],
            "max_abs_diff": v["max_abs_diff"],
            "logit_scale": v["logit_scale"],
            "top1_agree": v["top1_agree"],
        }
        print(
            f"{arch} {dtype}: export {row['export_s']:.1f} s, verify {row['verify_s']:.1f} s, "
            f"max|diff| {v['max_abs_diff']:.3g} (scale {v['logit_scale']:.3g})",
            flush=True,
        )
        if trt_ok:
            from caitdeploy.export.tensorrt import build_engine

            e = build_engine(p, work / f"{key}.{dtype}.plan", min_batch=1, opt_batch=256, max_batch=256)
            row.update(
                engine_build_s=e["build_seconds"],
                engine_bytes=e["engine_bytes"],
                trt=f"{e['flavour']} {e['trt_version']}",
            )
            print(f"{arch} {dtype}: {e['flavour']} engine build {e['build_seconds']:.1f} s", flush=True)
        out[dtype] = row
    return out


def write_md(path: Path, res: dict) -> None:
    m = res["machine"]
    lines = [
        f"# caitdeploy export timings: {m['cpu']} ({m['cores']} cores)",
        "",
        f"Measured {res['date']} with torch {res['versions']['torch']}, onnx {res['versions']['onnx']}, "
        f"onnxruntime {res['versions']['onnxruntime']}, {res['versions'].get('trt', 'no TensorRT')}. "
        f"GPU: {m['gpu'] or 'none'}. Load average at start {', '.join(f'{x:.1f}' for x in m['load_avg_start'])}"
        + (
            " (above the core count: the machine was shared, absolute times are noisy)."
            if m["load_avg_start"][0] > m["cores"]
            else " (a quiet machine)."
        ),
        "",
        (
            "CAIT checkpoints: one-shot CDCP selection on random weights, merges 4:h,8:v, fused with align 8. "
            "Export = torch.onnx dynamo export + onnxscript optimizer; check = graph-surgeon fold/cleanup/toposort, "
            "shape inference, onnx.checker; verify = ONNX Runtime CPU vs PyTorch (fp32: batches 1+7; fp16: + "
            f"{res['fp16_samples']} images). Engine = TensorRT-RTX ahead-of-time build on the CPU, profile 1/256/256."
        ),
        "",
        (
            "| model | FLOPs/img (fused) | reduction | dtype | export s | check s | verify s | max abs diff "
            "| logit scale | top-1 agree | engine build s | engine MB |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["results"]:
        for dt in ("fp32", "fp16"):
            x = r[dt]
            eng = f"{x['engine_build_s']:.1f}" if "engine_build_s" in x else "-"
            mb = f"{x['engine_bytes'] / 1e6:.1f}" if "engine_bytes" in x else "-"
            lines.append(
                f"| {r['arch']} | {r['flops_fused'] / 1e9:.2f} G | {100 * r['flops_reduction']:.1f}% | {dt} "
                f"| {x['export_s']:.1f} | {x['clean_check_s']:.1f} | {x['verify_s']:.1f} "
                f"| {x['max_abs_diff']:.3g} | {x['logit_scale']:.3g} | {100 * x['top1_agree']:.1f}% "
                f"| {eng} | {mb} |"
            )
    lines += [
        "",
        (
            f"Random-init timm heads give near-tie logits; the head weights were multiplied by {HEAD_SCALE:g} "
            "before export so the fp16 top-1 agreement measures the graph (export and build times do not depend "
            "on weight values)."
        ),
    ]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fp16-samples", type=int, default=64)
    ap.add_argument("--archs", default="small,base")
    ap.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    import onnx
    import onnxruntime
    import torch

    from caitdeploy.core.errors import CaitError

    versions = {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
    try:
        from caitdeploy.runtime.tensorrt import import_trt

        mod = import_trt()
        versions["trt"] = f"{mod.__name__} {mod.__version__}"
        trt_ok = True
    except CaitError as e:
        print(f"no engine builds: {e}")
        trt_ok = False
    m = machine()
    res = {
        "machine": m,
        "versions": versions,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "fp16_samples": args.fp16_samples,
        "results": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        for key in args.archs.split(","):
            res["results"].append(bench_arch(key.strip(), Path(tmp), args.fp16_samples, trt_ok))
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"export_times_{slug(m)}"
    (out_dir / f"{name}.json").write_text(json.dumps(res, indent=2) + "\n")
    write_md(out_dir / f"{name}.md", res)
    print(f"wrote {out_dir / name}.json and .md")


if __name__ == "__main__":
    main()
