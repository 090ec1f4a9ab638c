"""CAIT end to end on CPU in a few minutes: timm ViT -> dense training -> CAIT fine-tuning (CDCP + ATME)
-> `cait-compactor/1` checkpoint -> `fuse` -> fused PyTorch model -> ONNX -> ONNX Runtime -> INT8 (static QDQ
and dynamic), for the dense model and the CAIT model, on real test data with real labels.

Data: scikit-learn's bundled digits (1797 8x8 grey images, 10 classes; no download), upsampled 2x to
16x16, patch 4 -> a 4x4 token grid. Model: a timm VisionTransformer (embed 64, depth 6, 4 heads).
CAIT: HTM at block 2 (4x4 -> 4x2), VTM at block 4 (4x2 -> 2x2), CDCP channel pruning to the FLOPs target.

    pip install scikit-learn
    python examples/train_digits.py [--out DIR] [--flops-reduction 0.55] [--threads 1]

It leaves in DIR what `caitdeploy eval` scores side by side: digits_cait.pth (checkpoint), .fused.safetensors,
.onnx, .fp16.onnx, .int8_static.onnx, .int8_dynamic.onnx, and the test images as an ImageFolder, digits_test/
(16x16 greyscale PNGs; the checkpoints record the transform, `data_config`).

Exits 1 if the fused or the ONNX Runtime accuracy differs from the checkpoint's, if an int8 model's test
accuracy is more than 1 point below its fp32 ONNX model's, or if `caitdeploy eval` on the written files and test
PNGs gives any other accuracy than this script computed on its tensors.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from caitdeploy.compress.fuse import FuseOptions, fuse_file
from caitdeploy.formats.checkpoint import load_checkpoint
from caitdeploy.formats.fused import load_model
from caitdeploy.training.wrappers import CDCPController, cait_wrap, save_checkpoint

MERGES = {2: "h", 4: "v"}
# the eval transform, recorded in the checkpoints (timm's keys): 16x16 in, no resize or crop (crop_pct 1), 0.5/0.5
DATA_CONFIG = {"mean": [0.5], "std": [0.5], "crop_pct": 1.0, "interpolation": "bicubic"}


def load_data(seed: int):
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        sys.exit("this example needs scikit-learn for its bundled digits data: pip install scikit-learn")
    d = load_digits()
    # the 8x8 images' values 0..16 as 8-bit pixels (x15: 0..240), upsampled 2x: exactly what a PNG of them holds,
    # so `caitdeploy eval` on the PNGs written by `write_test_images` sees the same tensors as this script
    pix = np.repeat(np.repeat((d.images * 15).astype(np.uint8), 2, axis=1), 2, axis=2)  # [N, 16, 16]
    x = normalise(torch.from_numpy(pix).unsqueeze(1))
    y = torch.tensor(d.target, dtype=torch.long)
    itr, ite = train_test_split(np.arange(len(y)), test_size=0.2, random_state=seed, stratify=d.target)
    return x[itr], y[itr], x[ite], y[ite], pix[ite]


def normalise(pix: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> model input, as DATA_CONFIG says (timm's eval transform: / 255, then (x - mean) / std)."""
    return (pix.float() / 255.0 - DATA_CONFIG["mean"][0]) / DATA_CONFIG["std"][0]


def write_test_images(root: Path, pix: np.ndarray, labels: torch.Tensor) -> Path:
    """The test split as an ImageFolder (root/CLASS/NNN.png, 16x16 greyscale), for `caitdeploy eval`."""
    from PIL import Image

    for i, (img, label) in enumerate(zip(pix, labels.tolist(), strict=True)):
        (root / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img, "L").save(root / str(label) / f"{i:03d}.png")
    return root


def batches(n: int, bs: int, g: torch.Generator):
    perm = torch.randperm(n, generator=g)
    for i in range(0, n - bs + 1, bs):  # drop the last partial batch: fixed shapes, fixed iteration count
        yield perm[i : i + bs]


@torch.no_grad()
def predict(model, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i : i + 256]).argmax(-1) for i in range(0, len(x), 256)])


def acc(pred: torch.Tensor, y: torch.Tensor) -> float:
    return float((pred == y).double().mean())


def cosine(step: int, total: int, base: float, warmup: int = 0) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def onnx_predict(fused_model, path: Path, x: torch.Tensor) -> tuple[torch.Tensor, str]:
    """Export the fused model to ONNX and classify `x` with ONNX Runtime (CPU)."""
    import onnxruntime as ort

    try:  # the project's exporter, when present
        from caitdeploy.export.onnx import export_onnx
    except ImportError:
        export_onnx = None
    if export_onnx is not None:
        export_onnx(fused_model, path, input_shape=tuple(x.shape[1:]), dtype="fp32")
        how = "caitdeploy.export.onnx.export_onnx"
    else:
        fused_model.set_impl("math")
        torch.onnx.export(
            fused_model.eval(),
            (x[:2],),
            str(path),
            input_names=["images"],
            output_names=["logits"],
            dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
        how = "torch.onnx.export (opset 17)"
    so = ort.SessionOptions()
    so.intra_op_num_threads = torch.get_num_threads()
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    bs = inp.shape[0] if isinstance(inp.shape[0], int) else 64  # a static batch is honoured, padded at the end
    preds = []
    for i in range(0, len(x), bs):
        chunk = x[i : i + bs].numpy()
        n = len(chunk)
        if n < bs and isinstance(inp.shape[0], int):
            chunk = np.concatenate([chunk, np.zeros((bs - n, *chunk.shape[1:]), chunk.dtype)])
        logits = sess.run(None, {inp.name: chunk})[0][:n]
        preds.append(torch.from_numpy(np.asarray(logits, dtype=np.float32)).argmax(-1))
    return torch.cat(preds), how


def int8_accuracies(fp32_path: Path, calib: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Test accuracy of the fp32 ONNX model and of its int8 versions (static QDQ calibrated on `calib`, training
    images; dynamic), all run by ONNX Runtime CPU. The int8 models are written beside the fp32 one
    (NAME.int8_static.onnx, NAME.int8_dynamic.onnx)."""
    import onnxruntime as ort

    from caitdeploy.export.quantize import quantize_onnx_bytes

    fp32 = fp32_path.read_bytes()
    models = {
        "fp32": fp32,
        "int8 static": quantize_onnx_bytes(fp32, "static", calib.numpy(), "minmax")[0],
        "int8 dynamic": quantize_onnx_bytes(fp32, "dynamic")[0],
    }
    for name in ("int8 static", "int8 dynamic"):
        fp32_path.with_suffix(f".{name.replace(' ', '_')}.onnx").write_bytes(models[name])
    so = ort.SessionOptions()
    so.intra_op_num_threads = torch.get_num_threads()
    out = {}
    for name, data in models.items():
        sess = ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
        pred = np.concatenate(
            [sess.run(None, {"images": x[i : i + 64].numpy()})[0].argmax(-1) for i in range(0, len(x), 64)]
        )
        out[name] = float((torch.from_numpy(pred) == y).double().mean())
    return out


def onnx_accuracy(path: Path, x: torch.Tensor, y: torch.Tensor) -> float:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = torch.get_num_threads()
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    pred = np.concatenate(
        [sess.run(None, {"images": x[i : i + 64].numpy()})[0].argmax(-1) for i in range(0, len(x), 64)]
    )
    return float((torch.from_numpy(pred) == y).double().mean())


def eval_mismatches(out: Path, own: dict[str, float]) -> list[str]:
    """Score the files with `caitdeploy eval` (the library form) on the test PNGs; the files whose top-1 is not the
    figure this script computed on its tensors."""
    from caitdeploy.pipelines.eval import EvalOptions, evaluate

    result = evaluate(
        EvalOptions(
            [out / name for name in own], data=out / "digits_test", onnx_runtimes="ort", json_path=out / "eval.json"
        )
    )
    got = {Path(r["artifact"]).name: r["top1"] for r in result.records}
    return [f"{name}: eval {got.get(name)} vs {acc:.4f}" for name, acc in own.items() if got.get(name) != acc]


def dense_onnx(vit, out: Path) -> Path:
    """The trained dense timm ViT as a caitdeploy fused model (no merges, nothing pruned) exported to ONNX, so
    the dense and CAIT int8 models go through the same exporter and quantizer."""
    from caitdeploy.export.onnx import export_onnx

    ck = save_checkpoint(cait_wrap(vit, {}), out / "digits_dense.pth", DATA_CONFIG)
    fuse_file(ck, out / "digits_dense.fused.safetensors", FuseOptions(), verify_batch=0)
    dense = load_model(out / "digits_dense.fused.safetensors")
    export_onnx(dense, out / "digits_dense.onnx", input_shape=dense.config.input_shape, dtype="fp32")
    return out / "digits_dense.onnx"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="output folder (default: a temporary folder)")
    ap.add_argument("--flops-reduction", type=float, default=0.55, help="CDCP target vs the dense model")
    ap.add_argument("--pretrain-epochs", type=int, default=12)
    ap.add_argument("--cait-epochs", type=int, default=10)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lam", type=float, default=5e-2, help="lasso strength (paper: 1e-5 for long ImageNet runs)")
    ap.add_argument("--step-ratio", type=float, default=0.01, help="FLOPs added per mask update (paper 0.00025)")
    ap.add_argument("--every", type=int, default=10, help="iterations between mask updates (paper 25)")
    ap.add_argument("--lasso-on-kept", action="store_true", help="lasso on kept rows too (the paper's form)")
    ap.add_argument("--finalize", action="store_true", help="zero the masked rows before saving even when small")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    out = args.out or Path(tempfile.mkdtemp(prefix="cait_digits_"))
    out.mkdir(parents=True, exist_ok=True)
    xtr, ytr, xte, yte, pix_te = load_data(args.seed)
    write_test_images(out / "digits_test", pix_te, yte)
    g = torch.Generator().manual_seed(args.seed)
    bs = args.batch
    its_per_epoch = len(xtr) // bs
    print(f"digits: {len(xtr)} train / {len(xte)} test, 16x16x1, 10 classes; output in {out}")

    from timm.models.vision_transformer import VisionTransformer

    vit = VisionTransformer(
        img_size=16,
        patch_size=4,
        in_chans=1,
        num_classes=10,
        embed_dim=64,
        depth=6,
        num_heads=4,
        mlp_ratio=4.0,
        qkv_bias=True,
    )

    # ---- 1. dense training -------------------------------------------------------------------
    t0 = time.perf_counter()
    opt = torch.optim.AdamW(vit.parameters(), lr=2e-3, weight_decay=0.05)
    total = args.pretrain_epochs * its_per_epoch
    step = 0
    for _ in range(args.pretrain_epochs):
        vit.train()
        for idx in batches(len(xtr), bs, g):
            for group in opt.param_groups:
                group["lr"] = cosine(step, total, 2e-3, warmup=its_per_epoch)
            loss = F.cross_entropy(vit(xtr[idx]), ytr[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    acc_dense = acc(predict(vit, xte), yte)
    dense_vit = copy.deepcopy(vit)  # cait_wrap shares the parameters: keep the dense model for the int8 step
    print(f"[1] dense ViT: test accuracy {acc_dense:.4f}  ({step} iterations, {time.perf_counter() - t0:.0f} s)")

    # ---- 2. CAIT fine-tuning -----------------------------------------------------------------
    t0 = time.perf_counter()
    model = cait_wrap(vit, MERGES)
    ctl = CDCPController(
        model,
        args.flops_reduction,
        lam=args.lam,
        step_ratio=args.step_ratio,
        every=args.every,
        lasso_on_kept=args.lasso_on_kept,
    )
    print(
        f"[2] wrapped: identity compactors, merges {MERGES} (token mean at start): test accuracy "
        f"{acc(predict(model, xte), yte):.4f}; merges alone cut FLOPs by {ctl.merge_reduction:.1%}"
    )
    # base weights: AdamW; compactors: plain SGD + momentum, no weight decay (keeps the lasso rate lr*lam)
    opt = torch.optim.AdamW(model.base_parameters(), lr=5e-4, weight_decay=0.05)
    opt_c = torch.optim.SGD(model.compactor_parameters(), lr=0.05, momentum=0.9)
    total = args.cait_epochs * its_per_epoch
    step, reached = 0, None
    for _ in range(args.cait_epochs):
        model.train()
        for idx in batches(len(xtr), bs, g):
            for o, base in ((opt, 5e-4), (opt_c, 0.05)):
                for group in o.param_groups:
                    group["lr"] = cosine(step, total, base)
            loss = F.cross_entropy(model(xtr[idx]), ytr[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            opt_c.zero_grad(set_to_none=True)
            loss.backward()
            ctl.step()  # mask schedule + Eq. 2 compactor gradients
            opt.step()
            opt_c.step()
            if ctl.done and reached is None:
                reached = step
                ctl.freeze()  # target reached: keep the masks, let the masked rows shrink
            step += 1
    if reached is None:
        print(f"FLOPs target not reached in {step} iterations (at {ctl.flops_reduction:.1%}): raise --cait-epochs")
        return 1
    acc_trained = acc(predict(model, xte), yte)
    masked_norm = ctl.max_masked_norm()
    print(
        f"    CDCP: {ctl.updates} mask updates, target reached at iteration {reached}/{step}; FLOPs "
        f"{ctl.flops / 1e6:.2f}M vs dense {ctl.flops_dense / 1e6:.2f}M ({ctl.flops_reduction:.1%} fewer)"
    )
    print(
        "    kept per block (q/k, v per head; fc1): "
        + " ".join(f"{int(m['q'][0].sum())}/{int(m['v'][0].sum())}/{int(m['fc1'].sum())}" for m in ctl.masks())
    )
    print(
        f"    after CAIT fine-tuning: test accuracy {acc_trained:.4f}; largest masked compactor row norm "
        f"{masked_norm:.2e} ({time.perf_counter() - t0:.0f} s)"
    )
    if masked_norm <= 1e-3 and not args.finalize:
        note = "saved as trained: masked rows <= fuse's --max-dropped-norm 1e-3"
    else:  # finite training leaves masked rows small, not 0: finalize() zeroes them, and says by how much
        ctl.finalize()
        note = f"finalize(): masked rows set to exactly 0 (largest was {masked_norm:.2e})"
    pred_ckpt = predict(model, xte)
    acc_ckpt = acc(pred_ckpt, yte)
    ckpt_path = save_checkpoint(model, out / "digits_cait.pth", DATA_CONFIG)
    load_checkpoint(ckpt_path)  # validates
    print(f"[3] checkpoint {ckpt_path.name} ({note}): test accuracy {acc_ckpt:.4f}")

    # ---- 3. fuse -------------------------------------------------------------------------------
    fused_path = out / "digits_cait.fused.safetensors"
    rep = fuse_file(ckpt_path, fused_path, FuseOptions(consistency="strict", align=1), verify_batch=8)
    fused = load_model(fused_path)
    pred_fused = predict(fused, xte)
    acc_fused = acc(pred_fused, yte)
    widths = " ".join(f"{b['qk_per_head']}/{b['v_per_head']}/{b['mlp']}" for b in rep["blocks"])
    print(
        f"[4] fused ({fused_path.name}): widths {widths}; params {rep['params_dense']} -> {rep['params_fused']}; "
        f"FLOPs {rep['flops_fused'] / 1e6:.2f}M ({rep['flops_reduction']:.1%} fewer)"
    )
    print(
        f"    fuse verify: max |logit diff| vs the checkpoint's float64 forward {rep['verify']['max_abs_diff']:.2e}; "
        f"test accuracy {acc_fused:.4f}, {int((pred_fused == pred_ckpt).sum())}/{len(yte)} predictions equal"
    )

    # ---- 4. ONNX Runtime ------------------------------------------------------------------------
    onnx_path = out / "digits_cait.onnx"
    pred_onnx, how = onnx_predict(fused, onnx_path, xte)
    acc_onnx = acc(pred_onnx, yte)
    print(
        f"[5] ONNX ({how}) + ONNX Runtime CPU: test accuracy {acc_onnx:.4f}, "
        f"{int((pred_onnx == pred_ckpt).sum())}/{len(yte)} predictions equal to the checkpoint's"
    )

    # ---- 4b. fp16 ONNX (float32 in and out, float16 inside) -----------------------------------------
    from caitdeploy.export.onnx import export_onnx

    fp16_path = out / "digits_cait.fp16.onnx"
    export_onnx(fused, fp16_path, input_shape=fused.config.input_shape, dtype="fp16")
    acc_fp16 = onnx_accuracy(fp16_path, xte, yte)
    print(f"    fp16 ONNX ({fp16_path.name}): test accuracy {acc_fp16:.4f}")

    # ---- 5. INT8 (ONNX Runtime): dense and CAIT, calibrated on 256 training images ----------------
    calib = xtr[:256]
    q = {
        "dense": int8_accuracies(dense_onnx(dense_vit, out), calib, xte, yte),
        "CAIT": int8_accuracies(onnx_path, calib, xte, yte),
    }
    worst = 0.0
    for name, r in q.items():
        print(
            f"[6] {name} ONNX Runtime CPU: test accuracy fp32 {r['fp32']:.4f} | int8 static (QDQ, minmax on 256 "
            f"training images) {r['int8 static']:.4f} | int8 dynamic {r['int8 dynamic']:.4f}"
        )
        worst = max(worst, r["fp32"] - r["int8 static"], r["fp32"] - r["int8 dynamic"])

    # ---- 6. `caitdeploy eval` on the files and the PNGs: the same six accuracies, or the example fails ------------
    own = {
        "digits_cait.pth": acc_ckpt,
        "digits_cait.fused.safetensors": acc_fused,
        "digits_cait.onnx": acc_onnx,
        "digits_cait.fp16.onnx": acc_fp16,
        "digits_cait.int8_static.onnx": q["CAIT"]["int8 static"],
        "digits_cait.int8_dynamic.onnx": q["CAIT"]["int8 dynamic"],
    }
    mismatch = eval_mismatches(out, own)
    print(
        f"[7] caitdeploy eval of the six files on {out.name}/digits_test (PNG): "
        + ("every top-1 equals the figure above" if not mismatch else "MISMATCH " + "; ".join(mismatch))
    )

    print(
        f"summary: dense {acc_dense:.4f} | CAIT {acc_trained:.4f} | checkpoint {acc_ckpt:.4f} | fused {acc_fused:.4f} "
        f"| onnxruntime {acc_onnx:.4f} fp16 {acc_fp16:.4f} | CAIT int8 static {q['CAIT']['int8 static']:.4f} dynamic "
        f"{q['CAIT']['int8 dynamic']:.4f} | FLOPs -{rep['flops_reduction']:.1%} | "
        f"{time.perf_counter() - t_start:.0f} s total"
    )
    if mismatch:
        print("!!! MISMATCH: caitdeploy eval's accuracy differs from this script's !!!", file=sys.stderr)
        return 1
    if not (acc_fused == acc_ckpt == acc_onnx):
        print("!!! MISMATCH: the fused / ONNX accuracy differs from the checkpoint's !!!", file=sys.stderr)
        return 1
    if worst > 0.01:
        print(f"!!! int8 test accuracy {100 * worst:.2f} points below fp32 (more than 1) !!!", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
