#!/usr/bin/env python
"""CAIT-DeiT-Small (55% FLOPs reduction) and its dense DeiT-Small served side by side by one Triton server.

    .venv/bin/python benchmarks/serve_cait_vs_dense.py [--concurrency 1,8,32] [--duration 10] [--batch 1]

Builds the paper setting with `make_checkpoint` + `fuse` (random weights: speed only), exports both models to
ONNX (fp32, the same exporter), writes ONE repository with both as Python-backend models (model.py runs the
ONNX with ONNX Runtime; the bundled nvidia-pytriton server has no onnxruntime backend), starts the server with
`caitdeploy.serve.TritonServer`, and load-tests both with `caitdeploy.serve.loadtest.load_test` at every
concurrency level. Writes benchmarks/results/serve_<machine>_b<batch>.{json,md,png}.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--max-batch", type=int, default=32, help="Triton max_batch_size (dynamic batching)")
    ap.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    import torch

    from benchmarks.paper_settings import machine_name
    from caitdeploy.compress.cdcp import make_checkpoint, save_checkpoint_dict
    from caitdeploy.compress.fuse import FuseOptions, fuse_file
    from caitdeploy.core.errors import Staging
    from caitdeploy.export.onnx import export_onnx_bytes
    from caitdeploy.export.triton_repo import plan_triton_repo, stage_triton_repo
    from caitdeploy.families.vit.model import CaitViT
    from caitdeploy.formats.fused import load_model
    from caitdeploy.serve.loadtest import load_test, to_markdown
    from caitdeploy.serve.server import TritonServer, free_port

    levels = [int(c) for c in args.concurrency.split(",")]
    with tempfile.TemporaryDirectory(prefix="caitdeploy-serve-bench-") as tmp:
        tmp = Path(tmp)
        ck, summary = make_checkpoint("deit_small_patch16_224", 0.55, {4: "h", 8: "v"})
        save_checkpoint_dict(ck, tmp / "cait.pth")
        fuse_file(tmp / "cait.pth", tmp / "cait.fused.safetensors", FuseOptions(align=8), verify_batch=1)
        cait = load_model(tmp / "cait.fused.safetensors", attn_impl="math")
        torch.manual_seed(0)
        dense = CaitViT(cait.config.unpruned(), attn_impl="math").eval()
        repo = tmp / "repo"
        with Staging() as st:
            for name, model in (("cait_deit_small", cait), ("deit_small_dense", dense)):
                data, _ = export_onnx_bytes(model, tmp / f"{name}.onnx", verify=False)
                entry = plan_triton_repo(
                    repo,
                    name,
                    ".onnx",
                    backend="python",
                    max_batch_size=args.max_batch,
                    input_dims=(3, 224, 224),
                    output_dims=(1000,),
                    preferred_batch_sizes=[args.max_batch],
                    instance_kind="cpu",
                    max_queue_delay_us=2000,
                )
                stage_triton_repo(st, entry, data)
        server = TritonServer(repo, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port())
        with server:
            records = []
            for name in ("cait_deit_small", "deit_small_dense"):
                records += load_test(server.http_url, name, levels, args.duration, args.batch, progress=print)
    dense_by = {r["concurrency"]: r for r in records if r["model"] == "deit_small_dense"}
    for r in records:
        d = dense_by[r["concurrency"]]
        r["speedup_vs_dense"] = r["throughput_req_s"] / d["throughput_req_s"] if d["throughput_req_s"] else None
    machine = machine_name()
    out = Path(args.out_dir)
    stem = out / f"serve_{machine}_b{args.batch}"
    doc = {
        "machine": machine,
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "command": "python benchmarks/serve_cait_vs_dense.py " + " ".join(sys.argv[1:]),
        "server": f"tritonserver ({server.source}), Python backend, ONNX Runtime CPU, dynamic batching "
        f"max_batch_size {args.max_batch}, 2 ms queue delay",
        "flops": {"cait": summary["flops_pruned"], "dense": summary["flops_dense"]},
        "records": records,
    }
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
    md = to_markdown(records, title=f"CAIT-DeiT-Small (55%) vs dense DeiT-Small on Triton, {machine}")
    md += "\n| concurrency | CAIT req/s | dense req/s | CAIT / dense |\n|---|---|---|---|\n"
    for c in levels:
        cr = next(r for r in records if r["model"] == "cait_deit_small" and r["concurrency"] == c)
        md += f"| {c} | {cr['throughput_req_s']:.1f} | {dense_by[c]['throughput_req_s']:.1f} | {cr['speedup_vs_dense']:.2f}x |\n"
    md += f"\n{doc['server']}. Random weights (speed only). Command: `{doc['command']}`\n"
    stem.with_suffix(".md").write_text(md)
    from caitdeploy.cli.loadtest import _plot

    with Staging() as st:
        _plot(records, stem.with_suffix(".png"), st)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
