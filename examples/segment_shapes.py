"""CAIT for dense prediction end to end on CPU in a few minutes: semantic segmentation with a timm ViT backbone
and a light head on multi-block feature maps -> CAIT fine-tuning (CDCP + ATME) -> `cait-compactor/1`
checkpoint -> `fuse` -> fused PyTorch model -> `caitdeploy export --features` -> ONNX Runtime, plus the encoder
speed-up over the dense backbone in ONNX Runtime.

Data, generated (no download, numpy only): 64x64 RGB images, textured backgrounds (smooth waves, stripes or a
checker board in two random colours), 2-4 shapes each (filled circle, axis-aligned rectangle, roughly upright
triangle; random size, position and colour, overlapping a little) with per-pixel labels 0 background, 1 circle,
2 rectangle, 3 triangle; 1600 train / 300 test images.
Model: a timm VisionTransformer (patch 8 -> an 8x8 token grid, embed 96, depth 6, 4 heads; its classifier head
is unused) and a light head on the outputs of blocks 1, 3, 5 as [B, D, 8, 8] maps: a 1x1 conv per map, summed,
BN + GELU, one residual 3x3 conv on the token grid, then class logits upsampled bilinearly x8 plus a per-patch
refinement (1x1 conv to 4x8x8 channels, pixel shuffle). Weighted per-pixel cross-entropy.
CAIT: HTM at block 2 (8x8 -> 8x4), VTM at block 4 (8x4 -> 4x4), CDCP channel pruning to the FLOPs target, the
backbone and the head fine-tuned together; the maps of merged blocks are restored to the 8x8 grid by repetition.
Deployment: `fuse`, `caitdeploy export --features 1,3,5` (ONNX outputs feat1, feat3, feat5), ONNX Runtime; the
dense backbone goes the same way (cait_wrap with no merges) for the encoder speed comparison. Then INT8: both
encoders' ONNX quantized (static QDQ calibrated on 128 training images; dynamic), mIoU and encoder speed again.

    python examples/segment_shapes.py [--out DIR] [--flops-reduction 0.55] [--threads 1]

Reports mIoU (mean over the 4 classes of the per-class IoU, from one confusion matrix over all test pixels) and
pixel accuracy at every stage. Exits 1 if the fused or the ONNX Runtime mIoU differs from the checkpoint's (or
the dense ONNX Runtime mIoU from the dense model's) by more than 0.002, or if an int8 encoder's mIoU is more than
0.01 below its fp32 ONNX encoder's.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from caitdeploy.compress.fuse import FuseOptions, fuse_file
from caitdeploy.families.flops import encoder_flops
from caitdeploy.formats.checkpoint import load_checkpoint
from caitdeploy.formats.fused import load_model
from caitdeploy.training.wrappers import CDCPController, cait_wrap, save_checkpoint

MERGES = {2: "h", 4: "v"}
BLOCKS = (1, 3, 5)
CLASSES = ("background", "circle", "rectangle", "triangle")
SIZE, PATCH = 64, 8
MAX_OVERLAP = 0.15  # largest share of a new shape allowed to cover earlier shapes
TRIANGLE_TILT = 0.3  # triangles point roughly up: rotated by up to +-0.3 rad (17 degrees)
CLASS_WEIGHTS = (0.5, 1.5, 1.5, 2.0)  # cross-entropy weights: shape pixels are rare, mIoU weighs classes equally
TOLERANCE = 0.002  # largest mIoU difference allowed between the checkpoint, the fused model and ONNX Runtime
INT8_TOLERANCE = 0.01  # largest mIoU loss allowed from an fp32 ONNX encoder to its int8 versions


# ---- data ---------------------------------------------------------------------------------------
def background(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """[S, S, 3] in [0, 1]: two random colours mixed by smooth waves, stripes or a (rotated) checker board."""
    kind = rng.integers(3)
    theta = rng.uniform(0, np.pi)
    u = xx * np.cos(theta) + yy * np.sin(theta)
    v = -xx * np.sin(theta) + yy * np.cos(theta)
    if kind == 0:  # smooth noise: a few random low-frequency plane waves
        t = sum(
            rng.uniform(0.5, 1)
            * np.sin(
                2 * np.pi * rng.uniform(0.01, 0.08) * (xx * np.cos(a) + yy * np.sin(a)) + rng.uniform(0, 2 * np.pi)
            )
            for a in rng.uniform(0, np.pi, 4)
        )
        t = (t - t.min()) / (t.max() - t.min() + 1e-6)
    elif kind == 1:  # stripes
        t = (np.sin(2 * np.pi * u / rng.uniform(4, 14) + rng.uniform(0, 2 * np.pi)) > 0).astype(np.float32)
    else:  # checker board
        s = rng.uniform(4, 12)
        t = ((np.floor(u / s) + np.floor(v / s)) % 2).astype(np.float32)
    c1 = rng.uniform(0, 1, 3)
    c2 = np.clip(c1 + rng.uniform(-0.45, 0.45, 3), 0, 1)
    return (c1 + t[..., None] * (c2 - c1)).astype(np.float32)


def shape_mask(kind: int, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Boolean [S, S] mask of one random filled circle (1), axis-aligned rectangle (2) or triangle (3)."""
    cy, cx = rng.uniform(8, SIZE - 8, 2)
    if kind == 1:
        r = rng.uniform(6, 14)
        return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    if kind == 2:
        h, w = rng.uniform(10, 28, 2)
        return (np.abs(yy - cy) <= h / 2) & (np.abs(xx - cx) <= w / 2)
    r = rng.uniform(9, 17)  # triangle: three vertices on a circle, roughly evenly spread (no slivers)
    ang = (
        -np.pi / 2
        + rng.uniform(-TRIANGLE_TILT, TRIANGLE_TILT)
        + np.array([0, 2 * np.pi / 3, 4 * np.pi / 3])
        + rng.uniform(-0.35, 0.35, 3)
    )
    py, px = cy + r * np.sin(ang), cx + r * np.cos(ang)
    edges = [(px[j] - px[i]) * (yy - py[i]) - (py[j] - py[i]) * (xx - px[i]) for i, j in ((0, 1), (1, 2), (2, 0))]
    return ((edges[0] >= 0) & (edges[1] >= 0) & (edges[2] >= 0)) | ((edges[0] <= 0) & (edges[1] <= 0) & (edges[2] <= 0))


def make_data(n: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n images [n, 3, S, S] (normalised) and labels [n, S, S] (0 background, 1 circle, 2 rectangle, 3 triangle)."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5  # pixel centres
    images = np.empty((n, SIZE, SIZE, 3), np.float32)
    labels = np.zeros((n, SIZE, SIZE), np.int64)
    for i in range(n):
        img = background(rng, yy, xx)
        for _ in range(rng.integers(2, 5)):  # later shapes cover earlier ones (labels too), but not much
            kind = int(rng.integers(1, 4))
            for _ in range(30):  # a place where it covers little of the earlier shapes (else the last try)
                m = shape_mask(kind, rng, yy, xx)
                if (labels[i][m] > 0).mean() <= MAX_OVERLAP:
                    break
            under = img[m].mean(0) if m.any() else img.mean((0, 1))
            for _ in range(20):  # a colour that stands out from what it covers
                colour = rng.uniform(0, 1, 3)
                if np.abs(colour - under).sum() > 0.6:
                    break
            img[m] = colour * rng.uniform(0.9, 1.1)
            labels[i][m] = kind
        images[i] = np.clip(img + rng.normal(0, 0.03, img.shape), 0, 1)
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).contiguous() - 0.5) / 0.25
    return x, torch.from_numpy(labels)


def batches(n: int, bs: int, g: torch.Generator):
    perm = torch.randperm(n, generator=g)
    for i in range(0, n - bs + 1, bs):  # drop the last partial batch: fixed shapes, fixed iteration count
        yield perm[i : i + bs]


def augment(x: torch.Tensor, y: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A random horizontal flip of the whole batch (label-preserving; triangles keep pointing up)."""
    if bool(torch.rand(1, generator=g) < 0.5):
        return x.flip(-1), y.flip(-1)
    return x, y


# ---- model --------------------------------------------------------------------------------------
def dense_features(vit: nn.Module, x: torch.Tensor, blocks=BLOCKS) -> list[torch.Tensor]:
    """Outputs of the listed blocks of a timm VisionTransformer (no final norm, prefix tokens dropped) as
    [B, D, Gh, Gw] maps: the contract of CaitTrainViT / CaitViT.forward_features(x, blocks)."""
    gh, gw = vit.patch_embed.grid_size
    p = vit.num_prefix_tokens
    x = vit._pos_embed(vit.patch_embed(x))
    out = []
    for i, blk in enumerate(vit.blocks[: max(blocks) + 1]):
        x = blk(x)
        if i in blocks:
            out.append(x[:, p:].transpose(1, 2).reshape(x.shape[0], -1, gh, gw))
    return out


class SegHead(nn.Module):
    """Light head on [B, D, Gh, Gw] maps: 1x1 conv per map, summed, BN + GELU, a residual 3x3 conv (neighbouring
    tokens: a little spatial context); then class logits at the token grid upsampled bilinearly to the image plus
    a per-patch refinement (1x1 conv to classes*patch^2, pixel shuffle), so each token also predicts the labels
    inside its own patch."""

    def __init__(self, dim: int, n_maps: int, classes: int = len(CLASSES), width: int = 96, patch: int = PATCH):
        super().__init__()
        self.patch = patch
        self.proj = nn.ModuleList(nn.Conv2d(dim, width, 1) for _ in range(n_maps))
        self.norm = nn.BatchNorm2d(width)
        self.mix = nn.Conv2d(width, width, 3, padding=1, bias=False)  # a little spatial context on the token grid
        self.norm2 = nn.BatchNorm2d(width)
        self.coarse = nn.Conv2d(width, classes, 1)
        self.fine = nn.Conv2d(width, classes * patch * patch, 1)

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        h = F.gelu(self.norm(sum(proj(m) for proj, m in zip(self.proj, maps))))
        h = F.gelu(self.norm2(self.mix(h))) + h
        coarse = F.interpolate(self.coarse(h), scale_factor=self.patch, mode="bilinear", align_corners=False)
        return coarse + F.pixel_shuffle(self.fine(h), self.patch)


# ---- metrics ------------------------------------------------------------------------------------
def confusion(pred: torch.Tensor, y: torch.Tensor, k: int = len(CLASSES)) -> torch.Tensor:
    """[k, k] pixel counts, rows = truth, columns = prediction."""
    return torch.bincount((y.reshape(-1) * k + pred.reshape(-1)), minlength=k * k).reshape(k, k)


def scores(conf: torch.Tensor) -> tuple[float, float, list[float]]:
    """mIoU, pixel accuracy, per-class IoU of a confusion matrix."""
    conf = conf.double()
    tp = conf.diag()
    iou = tp / (conf.sum(0) + conf.sum(1) - tp).clamp_min(1)
    return float(iou.mean()), float(tp.sum() / conf.sum()), iou.tolist()


@torch.no_grad()
def predict(features, head: nn.Module, x: torch.Tensor, bs: int = 100) -> torch.Tensor:
    """Label maps [N, S, S] from `features(images) -> maps` and the head (eval mode)."""
    head.eval()
    return torch.cat([head(features(x[i : i + bs])).argmax(1) for i in range(0, len(x), bs)])


def cosine(step: int, total: int, base: float, warmup: int = 0) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


# ---- deployment ---------------------------------------------------------------------------------
def export_features(fused_path: Path, onnx_path: Path, threads: int) -> None:
    """`caitdeploy export FUSED --features 1,3,5`: ONNX with input "images" [batch, 3, 64, 64] and outputs feat1,
    feat3, feat5 [batch, D, 8, 8]. The CLI checks the ONNX against PyTorch itself; its JSON report says how well."""
    report = onnx_path.with_suffix(".export.json")
    features = ",".join(map(str, BLOCKS))
    cmd = [
        sys.executable,
        "-m",
        "caitdeploy",
        "export",
        str(fused_path),
        "--features",
        features,
        "-o",
        str(onnx_path),
        "-q",
        "--report",
        str(report),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    res = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        sys.exit(f"export failed ({' '.join(cmd)}):\n{res.stdout}{res.stderr}")
    r = json.loads(report.read_text())["onnx"]
    print(
        f"    caitdeploy export {fused_path.name} --features {features} -> {onnx_path.name} (opset {r['opset']}, "
        f"{r['bytes'] / 2**20:.1f} MiB, {r['nodes']} nodes); its check vs PyTorch: max |diff| "
        f"{r['verify']['max_abs_diff']:.1e}"
    )


def ort_session(path: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def ort_features(sess):
    """images -> [feat1, feat3, feat5] as torch tensors, from an ONNX Runtime session."""
    names = [f"feat{b}" for b in BLOCKS]

    def run(x: torch.Tensor) -> list[torch.Tensor]:
        return [torch.from_numpy(o) for o in sess.run(names, {"images": x.numpy()})]

    return run


def int8_sessions(onnx_path: Path, calib: torch.Tensor, threads: int) -> dict:
    """The fp32 feature ONNX quantized two ways (caitdeploy.export.quantize), as ONNX Runtime sessions."""
    import onnxruntime as ort

    from caitdeploy.export.quantize import quantize_onnx_bytes

    fp32 = onnx_path.read_bytes()
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    out = {}
    for mode in ("static", "dynamic"):
        data, _ = quantize_onnx_bytes(fp32, mode, calib.numpy() if mode == "static" else None)
        onnx_path.with_suffix(f".int8-{mode}.onnx").write_bytes(data)
        out[mode] = ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
    return out


def time_encoders(sessions: dict, x: torch.Tensor, runs: int) -> dict[str, float]:
    """Median seconds per batch of each session; runs interleaved so both see the same machine load."""
    feed = {"images": x.numpy()}
    for sess in sessions.values():  # warm-up
        for _ in range(2):
            sess.run(None, feed)
    times = {name: [] for name in sessions}
    for _ in range(runs):
        for name, sess in sessions.items():
            t0 = time.perf_counter()
            sess.run(None, feed)
            times[name].append(time.perf_counter() - t0)
    return {name: float(np.median(t)) for name, t in times.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="output folder (default: a temporary folder)")
    ap.add_argument("--flops-reduction", type=float, default=0.55, help="CDCP target vs the dense backbone")
    ap.add_argument("--train", type=int, default=1600, help="generated training images")
    ap.add_argument("--test", type=int, default=300, help="generated test images")
    ap.add_argument("--pretrain-epochs", type=int, default=14)
    ap.add_argument("--cait-epochs", type=int, default=7)
    ap.add_argument("--batch", type=int, default=8, help="small batches: more steps per second on a CPU")
    ap.add_argument("--lr", type=float, default=5e-4, help="AdamW peak learning rate, dense training")
    ap.add_argument("--cait-lr", type=float, default=2.5e-4, help="AdamW peak learning rate, CAIT fine-tuning")
    ap.add_argument("--lam", type=float, default=5e-2, help="lasso strength (paper: 1e-5 for long ImageNet runs)")
    ap.add_argument("--step-ratio", type=float, default=0.01, help="FLOPs added per mask update (paper 0.00025)")
    ap.add_argument("--every", type=int, default=10, help="iterations between mask updates (paper 25)")
    ap.add_argument("--lasso-on-kept", action="store_true", help="lasso on kept rows too (the paper's form)")
    ap.add_argument("--finalize", action="store_true", help="zero the masked rows before saving even when small")
    ap.add_argument("--bench-batch", type=int, default=64, help="batch for the ONNX Runtime encoder timing")
    ap.add_argument("--bench-runs", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    out = args.out or Path(tempfile.mkdtemp(prefix="cait_shapes_"))
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    xtr, ytr = make_data(args.train, np.random.default_rng([args.seed, 0]))
    xte, yte = make_data(args.test, np.random.default_rng([args.seed, 1]))
    share = torch.bincount(ytr.reshape(-1), minlength=len(CLASSES)).double() / ytr.numel()
    print(
        f"shapes: {len(xtr)} train / {len(xte)} test generated in {time.perf_counter() - t0:.1f} s, "
        f"{SIZE}x{SIZE}x3, pixels "
        + ", ".join(f"{c} {s:.0%}" for c, s in zip(CLASSES, share.tolist()))
        + f"; output in {out}"
    )
    g = torch.Generator().manual_seed(args.seed)
    bs = args.batch
    its_per_epoch = len(xtr) // bs
    weight = torch.tensor(CLASS_WEIGHTS)

    from timm.models.vision_transformer import VisionTransformer

    vit = VisionTransformer(
        img_size=SIZE,
        patch_size=PATCH,
        num_classes=len(CLASSES),
        embed_dim=96,
        depth=6,
        num_heads=4,
        mlp_ratio=4.0,
        qkv_bias=True,
    )
    head = SegHead(vit.embed_dim, len(BLOCKS))
    rows: list[tuple[str, float, float]] = []

    def report(stage: str, pred: torch.Tensor) -> tuple[float, float, str]:
        miou, pacc, iou = scores(confusion(pred, yte))
        rows.append((stage, miou, pacc))
        per_class = " ".join(f"{c} {v:.3f}" for c, v in zip(CLASSES, iou))
        return miou, pacc, f"mIoU {miou:.4f}, pixel acc {pacc:.4f} (IoU {per_class})"

    # ---- 1. dense training ---------------------------------------------------------------------
    t0 = time.perf_counter()
    params = [*vit.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.05)
    total = args.pretrain_epochs * its_per_epoch
    step = 0
    for _ in range(args.pretrain_epochs):
        vit.train()
        head.train()
        for idx in batches(len(xtr), bs, g):
            for group in opt.param_groups:
                group["lr"] = cosine(step, total, args.lr, warmup=its_per_epoch)
            x, y = augment(xtr[idx], ytr[idx], g)
            loss = F.cross_entropy(head(dense_features(vit, x)), y, weight=weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    vit.eval()
    miou_dense, _, line = report("dense (PyTorch)", predict(lambda x: dense_features(vit, x), head, xte))
    print(f"[1] dense ViT + head: test {line}  ({step} iterations, {time.perf_counter() - t0:.0f} s)")
    vit_dense, head_dense = copy.deepcopy(vit), copy.deepcopy(head)  # before cait_wrap, which shares vit's weights

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
    model.eval()
    _, _, line = report(
        "CAIT wrapped, before fine-tuning", predict(lambda x: model.forward_features(x, BLOCKS), head, xte)
    )
    print(
        f"[2] wrapped: identity compactors, merges {MERGES} (token mean at start): test {line}; merges alone cut "
        f"FLOPs by {ctl.merge_reduction:.1%}"
    )
    # base weights + head: AdamW; compactors: plain SGD + momentum, no weight decay (keeps the lasso rate lr*lam)
    opt = torch.optim.AdamW([*model.base_parameters(), *head.parameters()], lr=args.cait_lr, weight_decay=0.05)
    opt_c = torch.optim.SGD(model.compactor_parameters(), lr=0.05, momentum=0.9)
    total = args.cait_epochs * its_per_epoch
    step, reached = 0, None
    for _ in range(args.cait_epochs):
        model.train()
        head.train()
        for idx in batches(len(xtr), bs, g):
            for o, base in ((opt, args.cait_lr), (opt_c, 0.05)):
                for group in o.param_groups:
                    group["lr"] = cosine(step, total, base)
            x, y = augment(xtr[idx], ytr[idx], g)
            loss = F.cross_entropy(head(model.forward_features(x, BLOCKS)), y, weight=weight)
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
    model.eval()
    miou_cait, _, line = report("CAIT fine-tuned", predict(lambda x: model.forward_features(x, BLOCKS), head, xte))
    masked_norm = ctl.max_masked_norm()
    print(
        f"    CDCP: {ctl.updates} mask updates, target reached at iteration {reached}/{step}; FLOPs "
        f"{ctl.flops / 1e6:.1f}M vs dense {ctl.flops_dense / 1e6:.1f}M ({ctl.flops_reduction:.1%} fewer)"
    )
    print(
        "    kept per block (q/k, v per head; fc1): "
        + " ".join(f"{int(m['q'][0].sum())}/{int(m['v'][0].sum())}/{int(m['fc1'].sum())}" for m in ctl.masks())
    )
    print(
        f"    after CAIT fine-tuning: test {line}; largest masked compactor row norm {masked_norm:.2e} "
        f"({time.perf_counter() - t0:.0f} s)"
    )
    if masked_norm <= 1e-3 and not args.finalize:
        note = "saved as trained: masked rows <= fuse's --max-dropped-norm 1e-3"
    else:  # finite training leaves masked rows small, not 0: finalize() zeroes them, and says by how much
        ctl.finalize()
        note = f"finalize(): masked rows set to exactly 0 (largest was {masked_norm:.2e})"
    pred_ckpt = predict(lambda x: model.forward_features(x, BLOCKS), head, xte)
    miou_ckpt, _, line = report("CAIT checkpoint", pred_ckpt)
    ckpt_path = save_checkpoint(model, out / "shapes_cait.pth")
    load_checkpoint(ckpt_path)  # validates
    torch.save(head.state_dict(), out / "shapes_head.pth")
    print(f"[3] checkpoint {ckpt_path.name} ({note}): test {line}")

    # ---- 3. fuse -------------------------------------------------------------------------------
    fused_path = out / "shapes_cait.fused.safetensors"
    rep = fuse_file(ckpt_path, fused_path, FuseOptions(consistency="strict", align=1), verify_batch=8)
    fused = load_model(fused_path)
    with torch.no_grad():
        probe = xte[:64]
        diff = max(
            float((a - b).abs().max())
            for a, b in zip(model.forward_features(probe, BLOCKS), fused.forward_features(probe, BLOCKS))
        )
    pred_fused = predict(lambda x: fused.forward_features(x, BLOCKS), head, xte)
    miou_fused, _, line = report("CAIT fused (PyTorch)", pred_fused)
    widths = " ".join(f"{b['qk_per_head']}/{b['v_per_head']}/{b['mlp']}" for b in rep["blocks"])
    print(
        f"[4] fused ({fused_path.name}): widths {widths}; params {rep['params_dense']} -> {rep['params_fused']}; "
        f"FLOPs {rep['flops_fused'] / 1e6:.1f}M ({rep['flops_reduction']:.1%} fewer)"
    )
    print(
        f"    max |feature diff| vs the checkpoint model (64 test images, blocks {BLOCKS}) {diff:.2e}; test {line}, "
        f"{float((pred_fused == pred_ckpt).double().mean()):.4%} of pixels equal to the checkpoint's"
    )

    # ---- 4. ONNX export (caitdeploy CLI) + ONNX Runtime ----------------------------------------
    t0 = time.perf_counter()
    onnx_path = out / "shapes_cait.feat.onnx"
    export_features(fused_path, onnx_path, args.threads)
    sess = ort_session(onnx_path, args.threads)
    with torch.no_grad():
        diff = max(
            float((a - b).abs().max()) for a, b in zip(ort_features(sess)(probe), fused.forward_features(probe, BLOCKS))
        )
    pred_onnx = predict(ort_features(sess), head, xte)
    miou_onnx, _, line = report("CAIT ONNX Runtime", pred_onnx)
    print(
        f"[5] ONNX Runtime CPU ({args.threads} thread(s)): max |feature diff| vs the fused model {diff:.2e}; test "
        f"{line}, {float((pred_onnx == pred_ckpt).double().mean()):.4%} of pixels equal to the checkpoint's"
    )
    # the dense backbone through the same path: no merges, identity compactors -> checkpoint -> fuse -> export
    dense_ckpt = save_checkpoint(cait_wrap(vit_dense, {}), out / "shapes_dense.pth")
    dense_fused = out / "shapes_dense.fused.safetensors"
    fuse_file(dense_ckpt, dense_fused, FuseOptions(consistency="strict", align=1), verify_batch=8)
    dense_onnx = out / "shapes_dense.feat.onnx"
    export_features(dense_fused, dense_onnx, args.threads)
    sess_dense = ort_session(dense_onnx, args.threads)
    miou_dense_onnx, _, line = report("dense ONNX Runtime", predict(ort_features(sess_dense), head_dense, xte))
    print(
        f"    dense backbone, same path (cait_wrap(vit, {{}}) -> fuse -> export): test {line} "
        f"({time.perf_counter() - t0:.0f} s)"
    )

    # ---- 5. encoder speed in ONNX Runtime --------------------------------------------------------
    xb = xte[: args.bench_batch].contiguous()
    if len(xb) < args.bench_batch:
        xb = xb.repeat(math.ceil(args.bench_batch / len(xb)), 1, 1, 1)[: args.bench_batch].contiguous()
    sec = time_encoders({"dense": sess_dense, "cait": sess}, xb, args.bench_runs)
    flops = {
        "dense": encoder_flops(load_model(dense_fused).config, max(BLOCKS)),
        "cait": encoder_flops(fused.config, max(BLOCKS)),
    }
    print(
        f"[6] encoder (blocks 0..{max(BLOCKS)}, outputs feat{BLOCKS}) in ONNX Runtime CPU, {args.threads} thread(s), "
        f"batch {len(xb)}, median of {args.bench_runs} runs:"
    )
    for name in ("dense", "cait"):
        print(
            f"    {name:5s}: {sec[name] * 1e3:7.1f} ms/batch, {len(xb) / sec[name]:7.0f} img/s, "
            f"{flops[name] / 1e6:6.1f} MFLOPs/img"
        )
    print(f"    CAIT speed-up {sec['dense'] / sec['cait']:.2f}x (FLOPs ratio {flops['dense'] / flops['cait']:.2f}x)")

    # ---- 6. INT8 encoders (ONNX Runtime) ---------------------------------------------------------------
    t0 = time.perf_counter()
    q = {
        "dense": int8_sessions(dense_onnx, xtr[:128].contiguous(), args.threads),
        "cait": int8_sessions(onnx_path, xtr[:128].contiguous(), args.threads),
    }
    heads = {"dense": head_dense, "cait": head}
    fp32_miou = {"dense": miou_dense_onnx, "cait": miou_onnx}
    int8_bad = []
    print("[7] INT8 encoders in ONNX Runtime CPU (static: QDQ, minmax on 128 training images; dynamic):")
    for name in ("dense", "cait"):
        for mode, qs in q[name].items():
            miou_q, _, line = report(
                f"{'CAIT' if name == 'cait' else 'dense'} ONNX Runtime int8 {mode}",
                predict(ort_features(qs), heads[name], xte),
            )
            print(f"    {name:5s} int8 {mode:7s}: test {line} (fp32 {fp32_miou[name]:.4f})")
            if fp32_miou[name] - miou_q > INT8_TOLERANCE:
                int8_bad.append(f"{name} int8 {mode} {miou_q:.4f} vs fp32 {fp32_miou[name]:.4f}")
    sec_q = time_encoders(
        {"dense fp32": sess_dense, "cait fp32": sess, **{f"{n} int8 {m}": s for n in q for m, s in q[n].items()}},
        xb,
        args.bench_runs,
    )
    for name, t in sec_q.items():
        print(
            f"    {name:18s}: {t * 1e3:7.1f} ms/batch, {len(xb) / t:7.0f} img/s, "
            f"{sec_q['dense fp32'] / t:.2f}x dense fp32"
        )
    print(f"    ({time.perf_counter() - t0:.0f} s)")

    print(
        f"summary: CAIT mIoU {miou_cait - miou_dense:+.4f} vs dense at {rep['flops_reduction']:.1%} fewer FLOPs, "
        f"encoder {sec['dense'] / sec['cait']:.2f}x faster in ONNX Runtime; "
        f"{time.perf_counter() - t_start:.0f} s total"
    )
    print(f"    {'stage':34s} {'mIoU':>7s} {'pixel acc':>9s}")
    for stage, miou, pacc in rows:
        print(f"    {stage:34s} {miou:7.4f} {pacc:9.4f}")
    bad = [
        f"{name} {miou:.4f} vs {ref:.4f}"
        for name, miou, ref in (
            ("fused", miou_fused, miou_ckpt),
            ("CAIT onnxruntime", miou_onnx, miou_ckpt),
            ("dense onnxruntime", miou_dense_onnx, miou_dense),
        )
        if abs(miou - ref) > TOLERANCE
    ]
    if bad:
        print(
            f"!!! MISMATCH (mIoU differs by more than {TOLERANCE} from the PyTorch model it was exported from): "
            f"{'; '.join(bad)} !!!",
            file=sys.stderr,
        )
        return 1
    if int8_bad:
        print(f"!!! int8 mIoU more than {INT8_TOLERANCE} below fp32: {'; '.join(int8_bad)} !!!", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
