"""`caitdeploy train`: CAIT fine-tuning of a timm ViT or Swin with the paper's recipe, on one process or under torchrun.

Recipe (paper Tab. II; every value is an option): AdamW lr 1e-4, weight decay 0.05 (not on biases, norms,
position embedding and class token), cosine schedule with linear warm-up, global batch 256, label smoothing 0.1,
mixup 0.8 / cutmix 1.0 (timm.data.Mixup), RandAugment rand-m9-mstd0.5-inc1 (timm.data.create_transform), hard
distillation from the dense model (alpha 0.1 for Tiny-width models, 0.25 otherwise), compactors on SGD with
momentum 0.99, CDCP lambda 1e-5, +0.025% FLOPs every 25 optimizer steps from epoch 30.

Distributed: under torchrun (WORLD_SIZE > 1) every process joins a process group (NCCL on GPU, gloo on CPU),
the model is wrapped in DistributedDataParallel, each rank reads its DistributedSampler share. Gradients are
all-reduced by DDP's backward; CDCP's Eq. 2 compactor gradient is applied after it (`CDCPController.step`
runs between the last micro-batch's backward and the optimizer steps). Masks: every rank selects from the same
(synchronised) weights, then rank 0's masks are broadcast, and a digest of every rank's masks is compared at
each epoch's end (a mismatch stops the run). Gradient accumulation reaches the global batch:
accumulation steps = global batch / (micro batch x world size); DDP syncs only the last micro-batch.

State: `<output>/last.pt` after every epoch (model, both optimizers, grad scaler, CDCP schedule, step, every
rank's RNG states, the teacher); `--resume` continues from it bit for bit (same world size, same options),
reading it as every .pth is read (`checkpoint.read_container`) and checking its structure (`read_state`). Logs:
one JSON line per epoch in `<output>/log.jsonl` (rank 0), a progress bar on rank 0. The final file,
`<output>/cait-compactor.safetensors`, is a `cait-compactor/1` checkpoint for `caitdeploy fuse`. Every write
goes through `errors.Staging` (last.pt and log.jsonl together, all or nothing; the run folder appears with the
first epoch's files), so an error or a full disk leaves the previous epoch's state as it was, or no folder.

Before any work: every option, the model (built on the meta device: timm's checks, the config bounds, the memory
a step needs against the budget), the output folder, the state to resume, and every image of --data
(`imagefile.check_image`: size, format, pixel bounds, structure; `--skip-bad-images` leaves them out instead).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from caitdeploy.core.errors import CaitError, OptionError

STATE_FORMAT = "caitdeploy-train-state/1"
MAX_EPOCHS = 100_000
MAX_BATCH = 1 << 20
MAX_SEED = (1 << 32) - 1  # numpy's seed range
MAX_STATE_OPTIONS = 64 << 10  # the options JSON a training state carries (~1.5 KB)
FINAL_NAME = "cait-compactor.safetensors"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")  # what timm's folder reader loads
# options that must match between a run and its --resume (the others may change, e.g. --workers)
RESUME_KEYS = (
    "arch",
    "weights",
    "model_args",
    "img_size",
    "flops_reduction",
    "merges",
    "token_reduction",
    "epochs",
    "batch_size",
    "micro_batch",
    "lr",
    "min_lr",
    "warmup_epochs",
    "weight_decay",
    "compactor_lr",
    "compactor_momentum",
    "label_smoothing",
    "mixup",
    "cutmix",
    "rand_augment",
    "reprob",
    "crop_scale",
    "hflip",
    "distill_alpha",
    "teacher",
    "lam",
    "step_ratio",
    "every",
    "prune_start_epoch",
    "align",
    "amp",
    "seed",
)


@dataclass
class TrainOptions:
    arch: str
    data: str
    output: str
    weights: str | None = None
    model_args: dict = field(default_factory=dict)
    img_size: int | None = None
    flops_reduction: float | None = None  # default: 0.55 for a ViT, 0.354 for a Swin (paper Tab. XIV)
    merges: str = "auto"
    token_reduction: float | None = None
    epochs: int = 300
    batch_size: int = 256  # global: micro_batch x world size x accumulation steps
    micro_batch: int | None = None  # per rank per step; default batch_size / world size
    lr: float = 1e-4
    min_lr: float = 1e-6
    warmup_epochs: float = 5.0
    weight_decay: float = 0.05
    compactor_lr: float | None = None  # default: lr
    compactor_momentum: float = 0.99
    label_smoothing: float = 0.1
    mixup: float = 0.8
    cutmix: float = 1.0
    rand_augment: str = "rand-m9-mstd0.5-inc1"
    reprob: float = 0.25
    crop_scale: float = 0.08  # RandomResizedCrop's smallest area share (ImageNet recipe)
    hflip: float = 0.5
    distill_alpha: float | None = None  # default: 0.1 for a ViT of embed_dim <= 192 (Tiny), else 0.25
    teacher: str = "dense"  # dense | none | FILE (timm state dict of --arch)
    lam: float = 1e-5
    step_ratio: float = 0.00025
    every: int = 25
    prune_start_epoch: int = 30
    align: int = 1
    max_dropped_norm: float = 1e-3
    amp: str = "auto"  # auto (bf16 on GPU, off on CPU) | bf16 | fp16 | off
    workers: int = 4
    seed: int = 0
    resume: bool = False
    stop_after_epochs: int | None = None  # leave after this many epochs of this invocation (time-limited jobs)
    skip_bad_images: bool = False  # leave out the images the check before the first step refuses (and say so)
    progress: bool = True


# ---- distributed --------------------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")  # noqa: RUF009 - a torch.device is immutable
    backend: str | None = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def on(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.on:
            torch.distributed.barrier()

    def all_sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.on:
            torch.distributed.all_reduce(t)
        return t.tolist()

    def gather(self, obj: Any) -> list[Any]:
        if not self.on:
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def broadcast_masks(self, model) -> None:
        if self.on:
            for _, _, m in model.compactors():
                torch.distributed.broadcast(m.mask, 0)


def init_distributed() -> Dist:
    """A process group when launched by torchrun (WORLD_SIZE > 1): NCCL with a GPU per process, else gloo."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        dev = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        return Dist(device=dev)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available() and torch.cuda.device_count() > local:
        torch.cuda.set_device(local)
        dev, backend = torch.device("cuda", local), "nccl"
    else:
        dev, backend = torch.device("cpu"), "gloo"
    torch.distributed.init_process_group(backend)
    return Dist(rank, world, local, dev, backend)


# ---- options ------------------------------------------------------------------------------------------
def image_folder_classes(root: Path, what: str) -> tuple[list[str], int]:
    """Class folder names (sorted) and the image count of an ImageFolder root; one-line errors. Every entry with
    an image suffix that is not a folder counts (as timm's folder reader lists it): a FIFO, a device or a broken
    link named like an image is then refused by the image check, naming it."""
    if not root.is_dir():
        raise OptionError("data", f"{root}: no such folder (expected {what}/CLASS/IMAGE files)")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise OptionError("data", f"{root}: no class folders (expected {what}/CLASS/IMAGE files)")
    n = 0
    for c in classes:
        k = sum(1 for p in (root / c).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir())
        if k == 0:
            raise OptionError("data", f"{root / c}: class folder without images ({', '.join(IMAGE_SUFFIXES)})")
        n += k
    return classes, n


def family(o: TrainOptions):
    """The family of --arch (families/registry.py: a timm Swin v1 name is Swin, any other a ViT)."""
    from caitdeploy.families import family_for_arch

    return family_for_arch(o.arch)


def with_defaults(o: TrainOptions) -> TrainOptions:
    """The options with the family's defaults filled in (--flops-reduction: 0.55 for a ViT, the paper's Swin
    setting 0.354 for a Swin), as a run records them and a --resume compares them."""
    if o.flops_reduction is None:
        o = dataclasses.replace(o, flops_reduction=family(o).default_flops_reduction)
    return o


def check_options(o: TrainOptions, world: int = 1) -> dict[str, Any]:
    """Every option and the data layout, before any work; returns derived facts (classes, accumulation)."""
    o = with_defaults(o)

    def rng(name, v, lo, hi, open_hi=False):
        if v is None or not (lo <= v < hi if open_hi else lo <= v <= hi) or (isinstance(v, float) and math.isnan(v)):
            raise OptionError(name, f"{v}: must be in {lo}..{hi}" + (" (exclusive)" if open_hi else ""))

    rng("flops_reduction", o.flops_reduction, 0.0, 1.0, open_hi=True)
    if o.token_reduction is not None:
        rng("token_reduction", o.token_reduction, 0.0, 1.0, open_hi=True)
    rng("epochs", o.epochs, 1, MAX_EPOCHS)
    rng("batch_size", o.batch_size, 1, MAX_BATCH)
    if o.micro_batch is not None:  # None: the default, batch size / processes (0 is no sentinel: refused)
        rng("micro_batch", o.micro_batch, 1, o.batch_size)
    rng("seed", o.seed, 0, MAX_SEED)
    if o.img_size is not None:
        rng("img_size", o.img_size, 8, 8192)
    for name in ("lr", "min_lr", "compactor_lr", "weight_decay", "lam"):
        v = getattr(o, name)
        if v is not None:
            rng(name, v, 0.0, 10.0)
    rng("warmup_epochs", o.warmup_epochs, 0.0, float(MAX_EPOCHS))  # longer than the run: the lr only warms up
    rng("compactor_momentum", o.compactor_momentum, 0.0, 1.0, open_hi=True)
    rng("label_smoothing", o.label_smoothing, 0.0, 1.0, open_hi=True)
    rng("mixup", o.mixup, 0.0, 100.0)
    rng("cutmix", o.cutmix, 0.0, 100.0)
    rng("reprob", o.reprob, 0.0, 1.0)
    rng("crop_scale", o.crop_scale, 0.01, 1.0)
    rng("hflip", o.hflip, 0.0, 1.0)
    if o.distill_alpha is not None:
        rng("distill_alpha", o.distill_alpha, 0.0, 1.0)
    rng("step_ratio", o.step_ratio, 1e-9, 1.0)
    rng("every", o.every, 1, 1 << 30)
    rng("align", o.align, 1, 256)
    rng("workers", o.workers, 0, 256)
    rng("max_dropped_norm", o.max_dropped_norm, 0.0, 1e3)
    if not isinstance(o.prune_start_epoch, int) or o.prune_start_epoch < 0 or o.prune_start_epoch >= o.epochs:
        raise OptionError(
            "prune_start_epoch",
            f"{o.prune_start_epoch}: must be in 0..{o.epochs - 1} (--epochs {o.epochs}), or CDCP never prunes",
        )
    if family(o).token_reduction_note and o.token_reduction is not None:
        raise OptionError("token_reduction", family(o).token_reduction_note or "")
    if o.amp not in ("auto", "bf16", "fp16", "off"):
        raise OptionError("amp", f"{o.amp!r}: choose auto, bf16, fp16 or off")
    if o.stop_after_epochs is not None:
        rng("stop_after_epochs", o.stop_after_epochs, 1, o.epochs)
    micro = o.micro_batch if o.micro_batch is not None else o.batch_size // world
    if micro < 1 or o.batch_size % (micro * world):
        raise OptionError(
            "batch_size",
            f"{o.batch_size} is not a multiple of --micro-batch {micro} x {world} process{'es' * (world > 1)}",
        )
    if (o.mixup > 0 or o.cutmix > 0) and micro % 2:
        raise OptionError(
            "micro_batch",
            f"{micro}: mixup/cutmix pair images within a batch, so it must be even (or --mixup 0 --cutmix 0)",
        )
    if o.teacher not in ("dense", "none") and not Path(o.teacher).is_file():
        raise OptionError("teacher", f"{o.teacher}: no such file (dense, none or a timm state dict of --arch)")
    if o.weights is not None and not Path(o.weights).is_file():
        raise OptionError("weights", f"{o.weights}: no such file")
    data = Path(o.data)
    classes, n_train = image_folder_classes(data / "train", "DATA/train")
    if n_train < micro * world:
        raise OptionError(
            "data", f"{data / 'train'}: {n_train} images, fewer than one global micro-batch ({micro} x {world})"
        )
    val = data / "val"
    n_val = 0
    if val.exists():
        vclasses, n_val = image_folder_classes(val, "DATA/val")
        if vclasses != classes:
            extra = sorted(set(vclasses) ^ set(classes))
            raise OptionError("data", f"{val}: class folders differ from {data / 'train'}'s (e.g. {extra[0]!r})")
    out = Path(o.output)
    state = out / "last.pt"
    if out.exists() and not out.is_dir():
        raise OptionError("output", f"{out}: exists and is not a folder")
    if o.resume and not state.is_file():
        raise OptionError(
            "resume", f"{state}: " + ("not a regular file" if state.exists() else "no training state to resume from")
        )
    if not o.resume and (state.exists() or (out / FINAL_NAME).exists()):
        raise OptionError(
            "output",
            f"{out}: holds a previous run ({'last.pt' if state.exists() else FINAL_NAME}); "
            "add --resume to continue it or choose another folder",
        )
    return {
        "classes": classes,
        "train_images": n_train,
        "val_images": n_val,
        "micro_batch": micro,
        "accum": o.batch_size // (micro * world),
    }


# ---- schedule -----------------------------------------------------------------------------------------
def lr_at(step: int, total: int, warmup: int, base: float, floor: float) -> float:
    """Linear warm-up over `warmup` steps, then cosine from `base` to `floor` at `total`."""
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return floor + (base - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


# ---- RNG ----------------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    np_state: Any = np.random.get_state()  # the legacy tuple (numpy's stubs type the default call as a dict)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [
            np_state[0],
            torch.from_numpy(np_state[1].astype(np.int64)),
            *(float(v) if isinstance(v, float) else int(v) for v in np_state[2:]),
        ],
        "python": random.getstate(),
    }


def set_rng_state(s: dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    n = s["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), int(n[2]), int(n[3]), float(n[4])))
    v, internal, gauss = s["python"]
    random.setstate((v, tuple(internal), gauss))


def mask_digest(model) -> str:
    h = hashlib.sha256()
    for i, n, m in model.compactors():
        h.update(f"{i}{n}".encode())
        h.update(m.mask.detach().to("cpu", torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


# ---- data ---------------------------------------------------------------------------------------------
def eval_resize(size: int) -> int:
    """The shorter side timm's eval transform resizes a validation image to (crop_pct 0.875)."""
    return math.floor(size / 0.875)


def image_lists(
    o: TrainOptions, facts: dict, size: int, log: Callable[[str], None] = print
) -> dict[str, list[tuple[str, int]]]:
    """{"train": [(path, class)], "val": [...]} in timm's folder reader's order, every image checked before
    the first step without decoding it (`imagefile.check_image`: a regular file within the size bound, a PNG or
    JPEG header, each side and the area within the pixel bounds, validation images also once resized for the
    eval transform, the whole file's structure intact). A bad image is one CaitError naming it (and how many more
    there are); with `skip_bad_images` they are left out and one line says how many. Updates `facts`' counts."""
    from timm.data.readers.reader_image_folder import find_images_and_targets

    from caitdeploy.core.images import check_image

    data = Path(o.data)
    splits = ("train", "val") if facts["val_images"] else ("train",)
    out: dict[str, list[tuple[str, int]]] = {}
    bad: list[str] = []
    total = 0
    for split in splits:
        samples, _ = find_images_and_targets(str(data / split), types=IMAGE_SUFFIXES)
        expected = facts[f"{split}_images"]
        if len(samples) != expected:
            raise CaitError(
                f"{data / split}: timm's folder reader found {len(samples)} images, expected {expected} "
                "(images outside the class folders?)"
            )
        resize = eval_resize(size) if split == "val" else None
        good = []
        for path, target in samples:
            try:
                check_image(path, "--data", resize)
            except CaitError as e:
                bad.append(str(e))
                continue
            good.append((path, target))
        out[split] = good
        total += len(samples)
    if bad and not o.skip_bad_images:
        more = f" (and {len(bad) - 1} more bad image{'s' * (len(bad) > 2)} of {total})" if len(bad) > 1 else ""
        raise CaitError(f"{bad[0]}{more}; remove {'them' if len(bad) > 1 else 'it'} or add --skip-bad-images")
    if bad:
        log(f"--skip-bad-images: skipped {len(bad)} of {total} images that cannot be used (first: {bad[0]})")
    micro, world = facts["micro_batch"], facts.get("world", 1)
    facts["train_images"], facts["val_images"] = len(out["train"]), len(out.get("val", []))
    if facts["train_images"] < micro * world:
        raise OptionError(
            "data",
            f"{data / 'train'}: {facts['train_images']} usable images, fewer than one global "
            f"micro-batch ({micro} x {world})",
        )
    facts["skipped_images"] = len(bad)
    return out


class ImageList(torch.utils.data.Dataset):
    """Checked (path, class) pairs, each decoded as timm's folder reader decodes it (RGB) but within the image
    bounds (`imagefile.load_rgb`), then transformed. An image that still fails to decode (it changed since the
    check, or its data is damaged past what the check sees) comes back as class -1 - index with a zero image, so
    that the training process, not a data-loading worker, raises `failure(index)`: one line naming the file."""

    def __init__(
        self, samples: list[tuple[str, int]], transform, shape: tuple[int, ...], resize_shorter: int | None = None
    ):
        self.samples, self.transform, self.shape, self.resize_shorter = samples, transform, shape, resize_shorter

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        from caitdeploy.core.images import load_rgb

        path, target = self.samples[i]
        try:
            img = load_rgb(path, "--data", self.resize_shorter)
        except CaitError:
            return torch.zeros(self.shape), -1 - i
        return self.transform(img), target

    def failure(self, i: int) -> CaitError:
        from caitdeploy.core.images import load_rgb

        path = self.samples[i][0]
        try:
            load_rgb(path, "--data", self.resize_shorter)
        except CaitError as e:
            return CaitError(f"{e} (it passed the check before the first step)")
        return CaitError(f"--data {path}: could not be decoded in a data-loading process")


def check_batch(loader, y: torch.Tensor) -> None:
    """Raise the one-line error of the first image of the batch that failed to decode (`ImageList`)."""
    if y.dtype.is_floating_point or not bool((y < 0).any()):
        return
    ds = loader.dataset
    ds = getattr(ds, "dataset", ds)  # a Subset (validation share of a rank)
    if isinstance(ds, ImageList):
        raise ds.failure(int(-1 - y[y < 0][0]))


def eval_data_config(fmt: dict) -> dict[str, Any]:
    """The eval transform of the validation loader, in timm's keys: recorded in the checkpoint (`data_config`) so
    that `export` and `eval` repeat it."""
    from timm.data import resolve_data_config

    size = fmt["img_size"] if isinstance(fmt["img_size"], int) else fmt["img_size"][0]
    dc = resolve_data_config(
        {"input_size": (fmt["in_chans"], size, size), "interpolation": "bicubic", "crop_pct": 0.875}
    )
    return {"mean": list(dc["mean"]), "std": list(dc["std"]), "crop_pct": dc["crop_pct"], "interpolation": "bicubic"}


def _loaders(o: TrainOptions, facts: dict, fmt: dict, dist: Dist, lists: dict[str, list[tuple[str, int]]]):
    from timm.data import create_transform, resolve_data_config
    from torch.utils.data import DataLoader, DistributedSampler, Subset

    size = fmt["img_size"] if isinstance(fmt["img_size"], int) else fmt["img_size"][0]
    dc = {**resolve_data_config({"input_size": (fmt["in_chans"], size, size)}), **eval_data_config(fmt)}
    t_train = create_transform(
        dc["input_size"],
        is_training=True,
        auto_augment=o.rand_augment or None,
        re_prob=o.reprob,
        interpolation="bicubic",
        mean=dc["mean"],
        std=dc["std"],
        scale=(o.crop_scale, 1.0),
        hflip=o.hflip,
    )
    t_val = create_transform(
        dc["input_size"],
        is_training=False,
        interpolation="bicubic",
        mean=dc["mean"],
        std=dc["std"],
        crop_pct=dc["crop_pct"],
    )
    shape = (3, size, size)  # the folder reader gives RGB, as timm's does
    train = ImageList(lists["train"], t_train, shape)
    sampler: DistributedSampler[Any] = DistributedSampler(
        train, num_replicas=dist.world, rank=dist.rank, shuffle=True, seed=o.seed, drop_last=True
    )
    train_loader = DataLoader(
        train,
        batch_size=facts["micro_batch"],
        sampler=sampler,
        num_workers=o.workers,
        drop_last=True,
        pin_memory=dist.device.type == "cuda",
        persistent_workers=False,
    )
    val_loader = None
    if facts["val_images"]:
        val = ImageList(lists["val"], t_val, shape, eval_resize(size))
        mine = list(range(dist.rank, len(val), dist.world))  # every image exactly once over the ranks
        val_loader = DataLoader(Subset(val, mine), batch_size=facts["micro_batch"], num_workers=o.workers)
    return train_loader, sampler, val_loader, {"preprocess": {k: v for k, v in dc.items()}}


# ---- the run ------------------------------------------------------------------------------------------
def _flagged(fn, flag: str, path: str):
    """fn(path), its one-line error prefixed with the option that named the file."""
    try:
        return fn(path)
    except CaitError as e:
        raise CaitError(f"{flag} {e}" if not str(e).startswith(flag) else str(e)) from None


def _timm_model(o: TrainOptions, n_classes: int):
    """The timm model of --arch (a ViT or a Swin v1) with --img-size and --model-args."""
    try:
        return family(o).timm_model(o.arch, n_classes, o.img_size, o.model_args)
    except CaitError as e:  # an OptionError names its flag as the CLI shows it
        text = e.as_flag() if isinstance(e, OptionError) else str(e)
        raise CaitError(text + (f" (with --model-args {o.model_args})" if o.model_args else "")) from None


# --model-args keys whose values are structural sizes: the config bound they must meet (config.BOUNDS)
MODEL_ARG_BOUNDS = {
    "embed_dim": "embed_dim",
    "depth": "depth",
    "num_heads": "num_heads",
    "depths": "depth",
    "patch_size": "patch_size",
    "in_chans": "in_chans",
    "num_classes": "num_classes",
    "img_size": "img_size",
    "reg_tokens": "reg_tokens",
    "window_size": "patch_size",
}
MAX_MODEL_ARG_INT = 1 << 31


def check_model_args(args: dict) -> None:
    """Every --model-args value before timm sees it: numbers finite, structural sizes within the config bounds
    (depth, width, heads, patch, ...; a list such as Swin's depths element by element and in total), rates in
    [0, 1), text short. OptionError naming --model-args and the key."""
    from caitdeploy.families.vit.config import BOUNDS, MLP_RATIO_MAX, short

    def bad(k, v, why):
        text = "[" + ",".join(map(str, v)) + "]" if isinstance(v, tuple) else str(v)
        return OptionError("model_args", f"{k}={short(text).strip(chr(39))}: {why}")

    for k, v in args.items():
        items = v if isinstance(v, tuple) else (v,)
        if isinstance(v, tuple) and not 1 <= len(v) <= 16:
            raise bad(k, v, "a list of 1 to 16 values")
        for x in items:
            if isinstance(x, bool) or x is None:
                continue
            if isinstance(x, float) and not math.isfinite(x):
                raise bad(k, v, "must be a finite number")
            if isinstance(x, str) and (len(x) > 64 or not x.isprintable()):
                raise bad(k, v, "text of at most 64 printable characters")
            if isinstance(x, int) and not -MAX_MODEL_ARG_INT <= x <= MAX_MODEL_ARG_INT:
                raise bad(k, v, f"outside -{MAX_MODEL_ARG_INT}..{MAX_MODEL_ARG_INT}")
            if k in MODEL_ARG_BOUNDS:
                lo, hi = BOUNDS[MODEL_ARG_BOUNDS[k]]
                if not isinstance(x, int):
                    raise bad(
                        k,
                        v,
                        "must be an integer" + (" (or a list of integers)" if k in ("depths", "num_heads") else ""),
                    )
                if not lo <= x <= hi:
                    raise bad(k, v, f"{x} is outside {lo}..{hi} (the bound for real ViTs)")
            elif k == "mlp_ratio" and not (isinstance(x, (int, float)) and 0 < x <= MLP_RATIO_MAX):
                raise bad(k, v, f"must be a number in (0, {MLP_RATIO_MAX:g}]")
            elif "drop" in k and not (isinstance(x, (int, float)) and 0 <= x < 1):
                raise bad(k, v, "a rate in [0, 1)")
        if k == "depths" and isinstance(v, tuple) and sum(v) > BOUNDS["depth"][1]:
            raise bad(k, v, f"{sum(v)} blocks in all, more than {BOUNDS['depth'][1]}")


def _structure(model) -> tuple[int, int]:
    """(parameters, compactor elements) of a timm model built on the meta device: CAIT adds per block q, k, v
    compactors [heads, head_dim, head_dim] and an fc1 compactor [hidden, hidden]."""
    params = sum(p.numel() for p in model.parameters())
    comp = 0
    for m in model.modules():
        if hasattr(m, "qkv") and hasattr(m, "num_heads"):
            h = int(m.num_heads)
            hd = int(m.qkv.out_features) // (3 * h)
            comp += 3 * h * hd * hd
        fc1 = getattr(m, "fc1", None)
        if fc1 is not None and hasattr(fc1, "out_features"):
            comp += int(fc1.out_features) ** 2
    return params, comp


def check_model(o: TrainOptions, n_classes: int, micro: int) -> int | None:
    """The model of --arch / --img-size / --model-args checked before a byte of it is allocated: the values
    (`check_model_args`), timm's own checks on a model built on the meta device (no storage), the CAIT config's
    bounds and divisibility, and the memory a training step needs (weights, gradients, AdamW / SGD states of
    the model and its compactors, the teacher, one block's activations at the micro batch: an estimate that does
    not overestimate) against the budget (`limits.check_memory`). One-line errors naming the option. Returns the input side (None when the model
    cannot be built on the meta device: then only the bounds were checked)."""
    from caitdeploy.core.budgets import check_memory
    from caitdeploy.families.vit.config import ConfigError

    check_model_args(o.model_args)
    flag = "model_args" if o.model_args else "arch"
    try:
        with torch.device("meta"):
            meta = _timm_model(o, n_classes)
    except CaitError:
        raise
    except Exception as e:  # noqa: BLE001 - timm's own refusal of a size (AssertionError, ZeroDivisionError, ...)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        if "meta" in first.lower():  # a model whose constructor reads its own values: the bounds above hold
            return None
        raise OptionError(
            flag,
            f"{_args_text(o) if o.model_args else o.arch}: timm cannot build --arch {o.arch} "
            f"with it ({type(e).__name__}: {first})",
        ) from None
    try:
        fam = family(o)
        cfg = fam.config_from_format(fam.format_config_of(meta, o.arch))
        act = fam.activation_bytes(cfg, micro)
    except (ConfigError, ValueError) as e:
        raise OptionError(flag, f"{_args_text(o) if o.model_args else o.arch}: {e}") from None
    params, comp = _structure(meta)
    del meta
    # float32: the model's weights, gradients and AdamW's two moments; the compactors' weights, gradients and SGD
    # momentum; the teacher's weights; one block's activations (a lower bound: backward keeps every block's)
    need = 4 * (4 * params + 3 * comp + (params if o.teacher != "none" else 0)) + act
    check_memory(
        need,
        f"train --arch {o.arch}"
        + (f" --model-args {_args_text(o)}" if o.model_args else "")
        + f" ({_count(params)} parameters, {_count(comp)} compactor weights, micro batch {micro})",
        "a smaller model (--model-args), --micro-batch or --img-size",
    )
    return cfg.img_size if isinstance(cfg.img_size, int) else cfg.img_size[0]


def _count(n: int) -> str:
    return next(f"{n / d:.1f} {u}" for d, u in ((1e9, "G"), (1e6, "M"), (1e3, "k"), (1, "")) if n >= d or d == 1)


def _args_text(o: TrainOptions) -> str:
    return ",".join(
        f"{k}={'[' + ','.join(map(str, v)) + ']' if isinstance(v, tuple) else v}" for k, v in o.model_args.items()
    )


def _load_start_weights(o: TrainOptions, model, n_classes: int, log) -> None:
    """--weights into the timm model (a Swin's also in Microsoft's layout); a head of another size stays at its
    init (the data set decides the classes), which a dense teacher then cannot be."""
    from caitdeploy.compress.cdcp import fit_state_dict, load_weights

    if o.weights:
        sd = _flagged(load_weights, "--weights", o.weights)
        sd = family(o).timm_keys(sd)  # a Swin's also in Microsoft's layout
        head = fit_state_dict(model, sd, f"--weights {o.weights}", o.arch, new_head=True)
        if head:
            classes = sd[next(k for k in sorted(head) if k.endswith("weight"))].shape[0]
            if o.teacher == "dense" and o.distill_alpha != 0:
                raise OptionError(
                    "teacher",
                    f"dense: the starting model's head is untrained for {n_classes} "
                    f"classes (--weights has {classes}); give --teacher FILE (a dense model "
                    "fine-tuned on this data) or --teacher none",
                )
            log(f"--weights: head left at random init ({n_classes} classes; the file's head has {classes})")
    if not o.weights and o.teacher == "dense" and o.distill_alpha != 0:
        raise OptionError(
            "teacher",
            "dense distils from the starting model, and without --weights that is a random "
            "one: give --weights, --teacher FILE or --teacher none",
        )


def _build(o: TrainOptions, n_classes: int, log):
    """(timm model with --weights, format config, merges, merge info: --merges auto or a spec, checked against
    --flops-reduction)."""
    fam = family(o)
    model = _timm_model(o, n_classes)
    _load_start_weights(o, model, n_classes, log)
    fmt = fam.format_config_of(model, o.arch)
    merges, info = fam.plan_merges(fmt, o.merges, o.flops_reduction, o.token_reduction)
    return model, fmt, merges, info


def _teacher(o: TrainOptions, model, dist: Dist, state: dict | None = None, state_path: Path | None = None):
    """The frozen hard-distillation teacher: a copy of the starting model (`dense`), of it loaded from --teacher
    FILE, or from a resumed run's state (read from `state_path`); None for `none`."""
    import copy

    if o.teacher == "none":
        return None
    t = copy.deepcopy(model)
    if state is not None:
        _load_part(state_path or Path("last.pt"), "teacher", t.load_state_dict, state)
    elif o.teacher != "dense":
        from caitdeploy.compress.cdcp import load_weights

        sd = _flagged(load_weights, "--teacher", o.teacher)
        try:
            t.load_state_dict(sd)
        except RuntimeError as e:
            raise CaitError(
                f"--teacher {o.teacher}: does not fit --arch {o.arch}: "
                f"{str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e}"
            ) from None
    return t.requires_grad_(False).to(dist.device).eval()


def _param_groups(model, wd: float):
    """AdamW groups of the base parameters: weight decay on matrices, none on biases, norms, position embedding,
    class/register tokens and Swin's relative position tables (compactors have their own SGD)."""
    base = {id(p) for p in model.base_parameters()}
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) not in base:
            continue
        (
            no_decay
            if p.ndim <= 1
            or name in ("pos_embed", "cls_token", "dist_token", "reg_token")
            or name.endswith((".pos_embed", ".cls_token", "relative_position_bias_table", "absolute_pos_embed"))
            else decay
        ).append(p)
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]


def _amp(o: TrainOptions, dist: Dist) -> torch.dtype | None:
    if o.amp == "off" or (o.amp == "auto" and dist.device.type != "cuda"):
        return None
    if o.amp == "fp16" and dist.device.type != "cuda":
        raise OptionError("amp", "fp16 needs a CUDA GPU (on CPU use bf16 or off)")
    return torch.float16 if o.amp == "fp16" else torch.bfloat16


# ---- training state (--resume) and outputs ------------------------------------------------------------
STATE_KEYS = {
    "options": str,
    "epoch": int,
    "step": int,
    "world": int,
    "model": dict,
    "opt": dict,
    "opt_c": dict,
    "scaler": dict,
    "ctl": dict,
    "rng": list,
    "history": list,
    "merges": str,
}
MAX_STATE_NODES = 1_000_000  # objects in the plain (non-tensor) parts of a state, shared references each time
MAX_STATE_DEPTH = 12
MAX_STATE_TEXT = 1 << 16


class _Malformed(Exception):
    pass


def _check_plain(value: Any, what: str, tensors: list | None = None, budget: list | None = None) -> None:
    """`value` is plain data (dict, list, tuple, str, int, float, bool, None; tensors only where `tensors` collects
    them) within MAX_STATE_DEPTH levels and MAX_STATE_NODES objects, shared references counted each time they are
    reached (a pickle-memo bomb runs out of budget, never of time); iterative, so deep nesting is no
    RecursionError. _Malformed naming `what` otherwise."""
    budget = budget if budget is not None else [MAX_STATE_NODES]
    stack = [(value, 0)]
    while stack:
        v, depth = stack.pop()
        budget[0] -= 1
        if budget[0] < 0:
            raise _Malformed(f"{what} holds more than {MAX_STATE_NODES} objects")
        if depth > MAX_STATE_DEPTH:
            raise _Malformed(f"{what} is nested more than {MAX_STATE_DEPTH} levels deep")
        if v is None or isinstance(v, (bool, int, float)):
            continue
        if isinstance(v, str):
            if len(v) > MAX_STATE_TEXT:
                raise _Malformed(f"{what} holds a text of {len(v)} characters")
            continue
        if isinstance(v, torch.Tensor) and tensors is not None:
            tensors.append(v)
            continue
        if isinstance(v, dict):
            for k, x in v.items():
                if not (k is None or isinstance(k, (str, int, float, bool))) or (isinstance(k, str) and len(k) > 256):
                    raise _Malformed(f"{what} has a key that is a {type(k).__name__}")
                stack.append((x, depth + 1))
            continue
        if isinstance(v, (list, tuple)):
            stack.extend((x, depth + 1) for x in v)
            continue
        raise _Malformed(f"{what} holds a {type(v).__name__}")


def _rng_problem(r: Any, rank: int) -> str | None:
    """Why `r` cannot be one rank's RNG states as `rng_state` records them, or None."""
    want = torch.get_rng_state()
    if not isinstance(r, dict) or set(r) != {"torch", "cuda", "numpy", "python"}:
        return f"rng[{rank}] is not a dict of torch, cuda, numpy and python states"
    t = r["torch"]
    if not (isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and t.shape == want.shape):
        return f"rng[{rank}]['torch'] is not a torch RNG state"
    cuda = r["cuda"]
    if not (
        isinstance(cuda, list)
        and len(cuda) <= 4096
        and all(
            isinstance(c, torch.Tensor) and c.dtype == torch.uint8 and c.dim() == 1 and c.numel() <= 1 << 16
            for c in cuda
        )
    ):
        return f"rng[{rank}]['cuda'] is not a list of CUDA RNG states"
    n = r["numpy"]
    if not (
        isinstance(n, (list, tuple))
        and len(n) == 5
        and n[0] == "MT19937"
        and isinstance(n[1], torch.Tensor)
        and n[1].dtype == torch.int64
        and tuple(n[1].shape) == (624,)
        and bool((n[1] >= 0).all())
        and bool((n[1] < (1 << 32)).all())
        and all(isinstance(x, int) and not isinstance(x, bool) for x in n[2:4])
        and 0 <= n[2] <= 624
        and isinstance(n[4], (int, float))
        and math.isfinite(n[4])
    ):
        return f"rng[{rank}]['numpy'] is not a numpy MT19937 state"
    p = r["python"]
    if not (
        isinstance(p, (list, tuple))
        and len(p) == 3
        and p[0] == 3
        and isinstance(p[1], (list, tuple))
        and len(p[1]) == 625
        and all(type(x) is int and 0 <= x < (1 << 32) for x in p[1][:624])
        and type(p[1][624]) is int
        and 0 <= p[1][624] <= 624
        and (p[2] is None or (isinstance(p[2], float) and math.isfinite(p[2])))
    ):
        return f"rng[{rank}]['python'] is not a Python random state"
    return None


def read_state(path: str | os.PathLike, o: TrainOptions | None = None) -> dict[str, Any]:
    """The training state `last.pt` read as every other .pth is read (`checkpoint.read_container`: zip checks,
    pickles that need code refused, the pickle's work and allocations bounded), then its structure checked: the
    keys and their types, `options` a bounded JSON object (`config.strict_json`), every tensor a dense,
    file-backed one (`limits.tensor_problem`), the plain parts bounded in size and depth, the CDCP schedule and
    RNG states of the right form. One CaitError line naming the file otherwise."""
    from caitdeploy.core.budgets import tensor_problem
    from caitdeploy.families.vit.config import ConfigError, short, strict_json
    from caitdeploy.formats.checkpoint import read_container

    path = Path(path)
    raw = read_container(path)
    fmt = raw.get("format")
    if not (isinstance(fmt, str) and fmt == STATE_FORMAT):
        raise CaitError(f"{path}: not a caitdeploy training state (format {short(fmt)}, expected {STATE_FORMAT!r})")

    def bad(why: str) -> CaitError:
        return CaitError(f"{path}: malformed training state: {why}")

    for key, kind in STATE_KEYS.items():
        if key not in raw:
            raise bad(f"missing key {key!r}")
        v = raw[key]
        if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
            raise bad(f"key {key!r} is a {type(v).__name__}, expected {kind.__name__}")
    if len(raw["options"]) > MAX_STATE_OPTIONS:
        raise bad(f"'options' is {len(raw['options'])} characters, more than the {MAX_STATE_OPTIONS} allowed")
    try:
        saved = strict_json(raw["options"], "'options'")
    except ConfigError as e:
        raise bad(str(e)) from None
    if not isinstance(saved, dict):
        raise bad(f"'options' is a JSON {type(saved).__name__}, expected an object")
    if not 1 <= raw["epoch"] <= MAX_EPOCHS or not 0 <= raw["step"] <= 1 << 48 or not 1 <= raw["world"] <= 1 << 16:
        raise bad(f"epoch {raw['epoch']}, step {raw['step']} or world {raw['world']} out of range")
    if len(raw["merges"]) > 4096:
        raise bad("'merges' is too long")
    try:
        budget = [MAX_STATE_NODES]
        for key in ("history", "scaler"):
            _check_plain(raw[key], repr(key), budget=budget)
        if len(raw["history"]) > raw["epoch"] or not all(isinstance(r, dict) for r in raw["history"]):
            raise _Malformed("'history' is not one record per epoch done")
        ctl = raw["ctl"]
        _check_plain(ctl, "'ctl'", budget=budget)
        tensors: dict[str, list] = {}
        for key in ("opt", "opt_c"):
            found: list = []
            _check_plain(raw[key], repr(key), tensors=found, budget=budget)
            if not (isinstance(raw[key].get("state"), dict) and isinstance(raw[key].get("param_groups"), list)):
                raise _Malformed(f"{key!r} is not an optimizer state (state, param_groups)")
            tensors[key] = found
    except _Malformed as e:
        raise bad(str(e)) from None
    from caitdeploy.training.wrappers import CDCPController

    missing = [k for k in CDCPController.STATE_KEYS if k not in ctl]
    if missing:
        raise bad(f"'ctl' lacks {missing[0]!r}")
    ratio = ctl["ratio"]
    if not (isinstance(ratio, (int, float)) and not isinstance(ratio, bool) and 0 <= ratio <= 1):
        raise bad(f"'ctl' ratio {short(ratio)} is not in [0, 1]")
    for k in ("iteration", "updates"):
        if not (type(ctl[k]) is int and 0 <= ctl[k] <= 1 << 48):
            raise bad(f"'ctl' {k} {short(ctl[k])} is not a count")
    if not (isinstance(ctl["summary"], dict) and isinstance(ctl["history"], list) and isinstance(ctl["frozen"], bool)):
        raise bad("'ctl' summary, history or frozen has the wrong type")
    if not all(
        isinstance(ctl["summary"].get(k), (int, float))
        and not isinstance(ctl["summary"].get(k), bool)
        and math.isfinite(ctl["summary"][k])
        for k in ("flops_dense", "flops_pruned", "flops_reduction")
    ):
        raise bad("'ctl' summary lacks its FLOPs numbers")
    if len(raw["rng"]) != raw["world"]:
        raise bad(f"{len(raw['rng'])} RNG states for {raw['world']} process(es)")
    for rank, r in enumerate(raw["rng"]):
        if (why := _rng_problem(r, rank)) is not None:
            raise bad(why)
    sds = ["model"] + (["teacher"] if "teacher" in raw else [])
    for key in sds:
        sd = raw[key]
        if not isinstance(sd, dict):
            raise bad(f"key {key!r} is a {type(sd).__name__}, expected a state dict")
        if len(sd) > 1 << 16:
            raise bad(f"{key!r} has {len(sd)} entries")
        for k, v in sd.items():
            if not isinstance(k, str):
                raise bad(f"{key!r} has a key that is a {type(k).__name__}")
            if (why := tensor_problem(k, v)) is not None:
                raise bad(f"{key!r}: {why}")
    for key, found in tensors.items():
        for t in found:
            if (why := tensor_problem("(optimizer state)", t)) is not None:
                raise bad(f"{key!r}: {why}")
    if o is not None and (o.teacher != "none") != ("teacher" in raw):
        raise bad(
            "it has no teacher state though the run distils"
            if "teacher" not in raw
            else "it has a teacher state though the run does not distil"
        )
    return raw


def _first_error_line(e: BaseException) -> str:
    """The informative line of a torch error: load_state_dict's first line only says which module."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):
        return lines[1][:200]
    return (lines[0] if lines else type(e).__name__)[:200]


def _load_part(path: Path, what: str, fn: Callable[[Any], Any], value: Any) -> None:
    """fn(value), any error one line naming the state file and the part that does not fit."""
    try:
        fn(value)
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        raise CaitError(f"{path}: its {what} does not fit this run ({_first_error_line(e)})") from None


def _check_optimizer_state(path: Path, what: str, opt: torch.optim.Optimizer) -> None:
    """After load_state_dict: every state tensor of a parameter has that parameter's shape (or is a scalar, the
    step count), so a lying state fails here, not in the first step."""
    for p, st in opt.state.items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor) and v.dim() > 0 and (v.shape != p.shape or not v.is_floating_point()):
                raise CaitError(
                    f"{path}: its {what} state {k!r} has shape {tuple(v.shape)} ({v.dtype}) for a "
                    f"parameter of shape {tuple(p.shape)}"
                )


def _save_torch(obj: Any, tmp: Path) -> None:
    """torch.save through a Python file, so a failed write (a full disk) arrives as the OSError it is (torch's
    writer wraps it in a RuntimeError)."""
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
    except RuntimeError as e:
        ctx = e.__context__
        while ctx is not None and not isinstance(ctx, OSError):
            ctx = ctx.__context__
        if ctx is None:
            raise
        raise ctx from None


def _log_text(history: list[dict], final: dict | None = None) -> str:
    lines = [json.dumps(r) for r in history] + ([json.dumps({"final": final})] if final is not None else [])
    return "".join(line + "\n" for line in lines)


def _write_outputs(out: Path, stage: Callable[[Any], None], epoch_kept: int | None) -> None:
    """The run's files written all or nothing: `stage(staging)` stages each of them in an `errors.Staging`
    (`create_dirs`: the run folder itself appears only when the first files are committed, so a run that fails
    before its first epoch ends leaves no folder); a failed write (a full disk) removes every temporary file and
    is one line naming the file, saying which epoch's state is kept."""
    from caitdeploy.core.errors import Staging, _os_error

    staged: list[Path] = []

    class _Named(Staging):  # remembers which file was being written when a write fails
        def stage(self, path, *args, **kwargs):
            staged.append(Path(path))
            return super().stage(path, *args, **kwargs)

    try:
        with _Named() as st:
            stage(st)
    except OSError as e:
        err: CaitError = _os_error(staged[-1] if staged else out, e, "write")
    except CaitError as e:
        err = e
    else:
        return
    text = str(err)
    if epoch_kept and text.endswith("; nothing was written"):
        err = CaitError(
            f"{text.removesuffix('; nothing was written')}; the state of epoch {epoch_kept} is kept: "
            "continue with --resume"
        )
    raise err from None


def train(o: TrainOptions, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume) a CAIT training; returns the final summary (also the last line of log.jsonl)."""
    o = with_defaults(o)
    dist = init_distributed()
    try:
        return _train(o, dist, log if dist.main else (lambda s: None))
    finally:
        if dist.on and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


@dataclass
class Run:
    """One training run's state, handed from step to step of `_train`. The first fields are what was checked
    before any work (`_check_run`); the others are filled in by the step named above them, in that order."""

    o: TrainOptions
    dist: Dist
    log: Callable[[str], None]
    facts: dict[str, Any]  # check_options' facts: classes, micro_batch, accum, image counts, world
    out: Path  # the run folder (--output)
    size: int | None  # check_model's input side (None: known once the model is built)
    state: dict[str, Any] | None  # the checked state to resume (--resume), else None
    state_path: Path  # <output>/last.pt
    # _set_up_model
    lists: dict[str, list[tuple[str, int]]] = field(init=False)  # the checked images of each split
    fmt: dict[str, Any] = field(init=False)  # the model's format config
    merges: Any = field(init=False)  # the token merges (--merges auto or the spec)
    minfo: dict[str, Any] = field(init=False)  # the merges' share of the FLOPs reduction
    wrap: Any = field(init=False)  # the CAIT-wrapped timm model (compactors, masks)
    teacher: Any = field(init=False)  # the frozen distillation teacher, or None
    alpha: float = field(init=False)  # the distillation weight (0 without a teacher)
    ctl: Any = field(init=False)  # the CDCPController (mask schedule, Eq. 2)
    ddp: Any = field(init=False)  # DistributedDataParallel(wrap) when distributed, else wrap
    # _set_up_training
    opt: torch.optim.AdamW = field(init=False)  # the base parameters
    opt_c: torch.optim.SGD = field(init=False)  # the compactors
    amp: torch.dtype | None = field(init=False)
    scaler: torch.amp.GradScaler = field(init=False)
    autocast: Callable[[], Any] = field(init=False)
    train_loader: Any = field(init=False)
    sampler: Any = field(init=False)
    val_loader: Any = field(init=False)  # None without validation images
    dinfo: dict[str, Any] = field(init=False)  # the preprocessing (timm data config)
    steps_per_epoch: int = field(init=False)
    total: int = field(init=False)  # optimizer steps of the whole run
    warmup: int = field(init=False)  # of them, warm-up steps
    mixup: Any = field(init=False)  # timm's Mixup, or None
    # _resume, _log_plan; then advanced by every epoch
    start_epoch: int = 0
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)  # the records of log.jsonl
    kept_epoch: int | None = None  # the epoch whose state is on disk (what a failed write leaves in place)
    mtext: str = ""  # the merges as text (Swin: STAGE.BLOCK:kind)


def _train(o: TrainOptions, dist: Dist, log: Callable[[str], None]) -> dict[str, Any]:
    """A training run, top to bottom: everything checked before any work (options, model, output folder, the
    state to resume); the seeded model with its teacher and CDCP controller; optimizers, grad scaler and data;
    the resumed state; then each epoch's optimizer steps, its validation and mask check, its staged last.pt and
    log.jsonl; finally the fuse-ready checkpoint. Returns the final summary."""
    run = _check_run(o, dist, log)
    _set_up_model(run)
    _set_up_training(run)
    _resume(run)
    _log_plan(run)
    stop_at = o.epochs if o.stop_after_epochs is None else min(o.epochs, run.start_epoch + o.stop_after_epochs)
    for epoch in range(run.start_epoch, stop_at):
        rec = _train_epoch(run, epoch)
        _evaluate_epoch(run, epoch, rec)
        _save_epoch(run, epoch, rec)
        dist.barrier()
    return _finish(run, stop_at)


def _check_run(o: TrainOptions, dist: Dist, log: Callable[[str], None]) -> Run:
    """Everything checked before any work: the options, the model (on the meta device, memory budgeted), the
    output folder, the state to resume (the images follow in `_set_up_model`); only then is anything built or
    written. Returns the Run that carries them."""
    facts = check_options(o, dist.world)
    facts["world"] = dist.world
    out = Path(o.output)
    size = check_model(o, len(facts["classes"]), facts["micro_batch"])
    if dist.main:
        _check_output_folder(out)
    state_path = out / "last.pt"
    state = _read_resume(o, dist, state_path) if o.resume else None
    return Run(o=o, dist=dist, log=log, facts=facts, out=out, size=size, state=state, state_path=state_path)


def _check_output_folder(out: Path) -> None:
    """Where the run folder will be made must take files (a probe file, removed at once)."""
    from caitdeploy.core.errors import check_output_dir, nearest_existing

    base = nearest_existing(out)
    if not base.is_dir():
        raise OptionError("output", f"{out}: {base} is not a folder")
    try:
        check_output_dir(base / ".caitdeploy-probe")
    except CaitError:
        raise OptionError("output", f"{out}: the folder {base} is not writable") from None


def _read_resume(o: TrainOptions, dist: Dist, state_path: Path) -> dict[str, Any]:
    """The state to resume (`read_state`), checked against this run: the same RESUME_KEYS options, the same world
    size, an epoch not past --epochs."""
    from caitdeploy.families.vit.config import short

    state = read_state(state_path, o)
    saved = json.loads(state["options"])  # checked by read_state (strict_json, bounded)
    mine = json.loads(json.dumps(dataclasses.asdict(o)))
    diff = [k for k in RESUME_KEYS if saved.get(k) != mine[k]]
    if diff:
        raise OptionError(
            diff[0],
            f"{short(getattr(o, diff[0]))} differs from the run being resumed "
            f"({short(saved.get(diff[0]))}); resume with the same options",
        )
    if state["world"] != dist.world:
        raise CaitError(
            f"{state_path}: the run used {state['world']} process(es), this one {dist.world}; "
            "a bit-exact resume needs the same world size"
        )
    if state["epoch"] > o.epochs:
        raise CaitError(f"{state_path}: epoch {state['epoch']} is past --epochs {o.epochs}")
    return state


def _set_up_model(run: Run) -> None:
    """The checked image lists, the seeds (torch, numpy, random), the model with --weights and its merges, the
    teacher and distillation weight, the CDCP controller, DDP when distributed."""
    from caitdeploy.training.wrappers import CDCPController, cait_wrap

    o, dist, log, n_classes = run.o, run.dist, run.log, len(run.facts["classes"])
    lists = image_lists(o, run.facts, run.size, log) if run.size is not None else None
    torch.manual_seed(o.seed)
    np.random.seed(o.seed)
    random.seed(o.seed)
    model, run.fmt, run.merges, run.minfo = _build(o, n_classes, log)
    if lists is None:
        img_size = run.fmt["img_size"]
        lists = image_lists(o, run.facts, img_size if isinstance(img_size, int) else img_size[0], log)
    run.lists = lists
    run.wrap = cait_wrap(model, run.merges, o.arch)
    state = run.state
    run.teacher = _teacher(
        o,
        model,
        dist,
        state.get("teacher") if state is not None else None,
        run.state_path if state is not None else None,
    )
    alpha = o.distill_alpha if o.distill_alpha is not None else family(o).default_distill_alpha(run.fmt)
    run.alpha = 0.0 if run.teacher is None else alpha
    run.wrap.to(dist.device)
    assert o.flops_reduction is not None  # with_defaults filled it in
    run.ctl = CDCPController(
        run.wrap,
        o.flops_reduction,
        lam=o.lam,
        step_ratio=o.step_ratio,
        every=o.every,
        align=o.align,
        sync=dist.broadcast_masks,
    )
    run.ddp = _ddp(run.wrap, dist)


def _ddp(wrap, dist: Dist) -> Any:
    """DistributedDataParallel(wrap) when distributed (masks are broadcast at each update, by
    CDCPController.sync, not at every forward), else `wrap` itself."""
    if not dist.on:
        return wrap
    import inspect

    from torch.nn.parallel import DistributedDataParallel as DDP

    quiet = (
        "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters else "broadcast_buffers"
    )
    ddp_options: dict[str, Any] = {quiet: False}
    return DDP(wrap, device_ids=[dist.local_rank] if dist.device.type == "cuda" else None, **ddp_options)


def _set_up_training(run: Run) -> None:
    """The optimizers (AdamW for the base parameters, SGD for the compactors), amp and the grad scaler, the data
    loaders, the step counts of the schedule, mixup/cutmix."""
    o, dist = run.o, run.dist
    run.opt = torch.optim.AdamW(_param_groups(run.wrap, o.weight_decay), lr=o.lr, weight_decay=o.weight_decay)
    run.opt_c = torch.optim.SGD(
        run.wrap.compactor_parameters(), lr=o.compactor_lr or o.lr, momentum=o.compactor_momentum, weight_decay=0.0
    )
    amp = run.amp = _amp(o, dist)
    run.scaler = torch.amp.GradScaler(dist.device.type, enabled=amp == torch.float16)
    run.autocast = (lambda: torch.autocast(dist.device.type, dtype=amp)) if amp else contextlib.nullcontext
    run.train_loader, run.sampler, run.val_loader, run.dinfo = _loaders(o, run.facts, run.fmt, dist, run.lists)
    run.steps_per_epoch = len(run.train_loader) // run.facts["accum"]
    if run.steps_per_epoch < 1:
        raise OptionError("batch_size", f"{o.batch_size}: larger than one epoch of {run.facts['train_images']} images")
    run.total, run.warmup = run.steps_per_epoch * o.epochs, round(o.warmup_epochs * run.steps_per_epoch)
    run.mixup = None
    if o.mixup > 0 or o.cutmix > 0:
        from timm.data import Mixup

        run.mixup = Mixup(
            mixup_alpha=o.mixup,
            cutmix_alpha=o.cutmix,
            label_smoothing=o.label_smoothing,
            num_classes=len(run.facts["classes"]),
        )


def _resume(run: Run) -> None:
    """--resume: the model, both optimizers, the grad scaler, the CDCP schedule, the progress and this rank's RNG
    states from the checked state (a part that does not fit is one line naming the file)."""
    state, path = run.state, run.state_path
    if state is None:
        return
    _load_part(path, "model", run.wrap.load_state_dict, state["model"])
    _load_part(path, "optimizer", run.opt.load_state_dict, state["opt"])
    _check_optimizer_state(path, "optimizer", run.opt)
    _load_part(path, "compactor optimizer", run.opt_c.load_state_dict, state["opt_c"])
    _check_optimizer_state(path, "compactor optimizer", run.opt_c)
    _load_part(path, "grad scaler", run.scaler.load_state_dict, state["scaler"])
    _load_part(path, "CDCP schedule", run.ctl.load_state_dict, state["ctl"])
    run.start_epoch, run.step, run.history = state["epoch"], state["step"], list(state["history"])
    _load_part(path, "RNG state", set_rng_state, state["rng"][run.dist.rank])
    run.log(f"resumed {path}: epoch {run.start_epoch}/{run.o.epochs}, step {run.step}")
    run.kept_epoch = run.start_epoch


def _log_plan(run: Run) -> None:
    """The run's plan in two lines: data, processes and batch; merges, FLOPs shares, distillation, amp, CDCP."""
    o, dist, facts, minfo, amp = run.o, run.dist, run.facts, run.minfo, run.amp
    run.mtext = family(o).merges_text(run.merges)  # Swin: STAGE.BLOCK:kind
    run.log(
        f"{o.arch}: {len(facts['classes'])} classes, {facts['train_images']} train / {facts['val_images']} val "
        f"images; {dist.world} process(es) ({dist.backend or dist.device.type}), global batch {o.batch_size} = "
        f"micro {facts['micro_batch']} x {dist.world} x {facts['accum']} accumulation; "
        f"{run.steps_per_epoch} steps/epoch"
    )
    run.log(
        f"merges {run.mtext}{' (auto)' if o.merges == 'auto' else ''}: tokens cut "
        f"{minfo['token_reduction']:.2%} of the dense FLOPs, channels (CDCP) {minfo['channel_reduction']:.2%}, "
        f"total {o.flops_reduction:.2%}; distillation alpha {run.alpha:g} ({o.teacher}); amp "
        f"{'off' if amp is None else str(amp).removeprefix('torch.')}; CDCP from epoch {o.prune_start_epoch}"
    )


def _train_epoch(run: Run, epoch: int) -> dict[str, Any]:
    """One epoch of optimizer steps, each over `accum` micro-batches; its record for log.jsonl (step, lr, train
    loss over every rank's images, speed)."""
    t0 = time.perf_counter()
    run.wrap.train()
    run.sampler.set_epoch(epoch)
    it = iter(run.train_loader)
    bar = _progress_bar(run, epoch)
    loss_sum, seen = 0.0, 0
    for _ in range(run.steps_per_epoch):
        _start_step(run)
        for micro in range(run.facts["accum"]):
            loss, n = _micro_step(run, it, micro)
            loss_sum += loss * n
            seen += n
        _optimizer_step(run, epoch)
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"loss {loss_sum / max(1, seen):.3f} FLOPs -{run.ctl.flops_reduction:.1%}")
    if bar is not None:
        bar.close()
    train_loss, train_seen = run.dist.all_sum([loss_sum, seen])
    rec = {
        "epoch": epoch + 1,
        "step": run.step,
        "lr": run.opt.param_groups[0]["lr"],
        "train_loss": train_loss / max(1, train_seen),
        "images": int(train_seen),
        "seconds": time.perf_counter() - t0,
    }
    rec["img_s"] = rec["images"] / rec["seconds"]
    return rec


def _progress_bar(run: Run, epoch: int):
    """The epoch's progress bar (tqdm) on rank 0 with --progress, else None."""
    if not (run.dist.main and run.o.progress):
        return None
    from tqdm import tqdm

    return tqdm(
        total=run.steps_per_epoch,
        desc=f"epoch {epoch + 1}/{run.o.epochs}",
        unit="step",
        leave=False,
        dynamic_ncols=True,
        disable=None,  # no bar when stderr is not a terminal (a log, a pipe, CI)
    )


def _start_step(run: Run) -> None:
    """This optimizer step's learning rates (linear warm-up, then cosine) and cleared gradients."""
    o = run.o
    for g in run.opt.param_groups:
        g["lr"] = lr_at(run.step, run.total, run.warmup, o.lr, o.min_lr)
    for g in run.opt_c.param_groups:
        g["lr"] = lr_at(run.step, run.total, run.warmup, o.compactor_lr or o.lr, o.min_lr)
    run.opt.zero_grad(set_to_none=True)
    run.opt_c.zero_grad(set_to_none=True)


def _micro_step(run: Run, it, micro: int) -> tuple[float, int]:
    """Forward and backward of the next micro-batch (mixup/cutmix, distillation from the teacher's hard labels);
    DDP syncs only the step's last one. Returns (its loss, its images)."""
    dist = run.dist
    x, y = next(it)
    check_batch(run.train_loader, y)
    x, y = x.to(dist.device, non_blocking=True), y.to(dist.device, non_blocking=True)
    target = y
    if run.mixup is not None:
        x, target = run.mixup(x, y)
    sync = micro == run.facts["accum"] - 1 or not dist.on
    with contextlib.nullcontext() if sync else run.ddp.no_sync():
        with run.autocast():
            logits = run.ddp(x)
            loss = _loss(run, logits, target)
            if run.alpha > 0:
                with torch.no_grad():
                    hard = run.teacher(x).argmax(-1)
                loss = (1 - run.alpha) * loss + run.alpha * F.cross_entropy(logits.float(), hard)
        run.scaler.scale(loss / run.facts["accum"]).backward()
    return float(loss.detach()), len(x)


def _loss(run: Run, logits, target):
    """Soft-target cross-entropy under mixup/cutmix (the targets carry the smoothing), else label-smoothed."""
    if run.mixup is not None:
        return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
    return F.cross_entropy(logits.float(), target, label_smoothing=run.o.label_smoothing)


def _optimizer_step(run: Run, epoch: int) -> None:
    """After the step's last backward (gradients all-reduced): CDCP's mask schedule and Eq. 2 from
    --prune-start-epoch (masks frozen once the target is reached), then both optimizers and the scaler."""
    ctl, scaler = run.ctl, run.scaler
    scaler.unscale_(run.opt)
    scaler.unscale_(run.opt_c)
    if epoch >= run.o.prune_start_epoch:
        ctl.step()  # mask schedule + Eq. 2, on the all-reduced gradients
        if ctl.done and not ctl.frozen:
            ctl.freeze()  # target reached: keep the masks, let the masked rows shrink
    scaler.step(run.opt)
    scaler.step(run.opt_c)
    scaler.update()
    run.step += 1


def _evaluate_epoch(run: Run, epoch: int, rec: dict[str, Any]) -> None:
    """The epoch's validation, the check that every rank holds the same CDCP masks (a mismatch stops the run),
    the CDCP schedule's figures; `rec` completed and added to the history."""
    ctl = run.ctl
    if run.val_loader is not None:
        rec.update(evaluate(run.wrap, run.val_loader, run.dist, run.autocast))
    digests = run.dist.gather(mask_digest(run.wrap))
    if len(set(digests)) != 1:
        raise CaitError(f"epoch {epoch + 1}: ranks hold different CDCP masks ({digests}); stopping")
    rec.update(
        flops=ctl.flops,
        flops_reduction=ctl.flops_reduction,
        mask_updates=ctl.updates,
        kept=ctl.history[-1]["kept"] if ctl.history else None,
        pruning=epoch >= run.o.prune_start_epoch,
        target_reached=ctl.done,
        mask_digests=digests,
        max_masked_norm=ctl.max_masked_norm(),
    )
    run.history.append(rec)


def _save_epoch(run: Run, epoch: int, rec: dict[str, Any]) -> None:
    """The epoch's state (every rank's RNG states gathered) staged as last.pt with log.jsonl, all or nothing, by
    rank 0, and its log line."""
    o, dist, ctl = run.o, run.dist, run.ctl
    rngs = dist.gather(rng_state())
    if not dist.main:
        return
    snap = {
        "format": STATE_FORMAT,
        "options": json.dumps(dataclasses.asdict(o)),
        "epoch": epoch + 1,
        "step": run.step,
        "world": dist.world,
        "model": run.wrap.state_dict(),
        "opt": run.opt.state_dict(),
        "opt_c": run.opt_c.state_dict(),
        "scaler": run.scaler.state_dict(),
        "ctl": ctl.state_dict(),
        "rng": rngs,
        "history": run.history,
        "merges": run.mtext,
    }
    if run.teacher is not None:
        snap["teacher"] = run.teacher.state_dict()
    text = _log_text(run.history)
    out = run.out

    def stage_epoch(st, snap=snap, text=text):  # this epoch's state, bound now
        _save_torch(snap, st.stage(out / "last.pt", create_dirs=True))
        st.write_text(out / "log.jsonl", text, create_dirs=True)

    _write_outputs(out, stage_epoch, run.kept_epoch)
    run.kept_epoch = epoch + 1
    run.log(
        f"epoch {epoch + 1}/{o.epochs}: loss {rec['train_loss']:.4f}"
        + (f", val top-1 {rec['val_top1']:.2%}" if "val_top1" in rec else "")
        + f", FLOPs -{ctl.flops_reduction:.2%} ({ctl.updates} mask updates), {rec['img_s']:.1f} img/s, "
        f"masks identical on {dist.world} rank(s)"
    )


def _finish(run: Run, stop_at: int) -> dict[str, Any]:
    """The run's summary; after the last epoch also the masked rows settled (`_finalize_masks`), the saved
    checkpoint's validation and the final file written (`_write_final`)."""
    o, dist, ctl = run.o, run.dist, run.ctl
    summary = {
        "epochs_done": stop_at,
        "epochs": o.epochs,
        "step": run.step,
        "merges": run.mtext,
        "flops_reduction": ctl.flops_reduction,
        "target": o.flops_reduction,
        "target_reached": ctl.done,
        "world": dist.world,
        "final": None,
        "preprocess": run.dinfo["preprocess"],
    }
    if stop_at < o.epochs:
        run.log(f"stopped after epoch {stop_at} (--stop-after-epochs); continue with --resume")
        return summary
    note = _finalize_masks(run)
    if run.val_loader is not None:  # what the saved checkpoint (masked rows exactly 0) scores
        summary.update({f"final_{k}": v for k, v in evaluate(run.wrap, run.val_loader, dist, run.autocast).items()})
    if dist.main:
        _write_final(run, summary, note)
    dist.barrier()
    return summary


def _finalize_masks(run: Run) -> str:
    """Masked rows to exactly zero when training left them above fuse's limit (--max-dropped-norm); the note
    saying which."""
    o, ctl = run.o, run.ctl
    norm = ctl.max_masked_norm()
    if norm > o.max_dropped_norm:
        ctl.finalize()
        return f"masked rows set to 0 (largest was {norm:.2e} > {o.max_dropped_norm:g})"
    return f"saved as trained (largest masked row {norm:.2e} <= {o.max_dropped_norm:g})"


def _write_final(run: Run, summary: dict[str, Any], note: str) -> None:
    """Rank 0: the `cait-compactor/1` checkpoint and log.jsonl with its final line, all or nothing; the last log
    lines (a warning when the FLOPs target was not reached)."""
    from caitdeploy.compress.cdcp import save_checkpoint_dict
    from caitdeploy.training.wrappers import checkpoint_dict

    o, out, ctl = run.o, run.out, run.ctl
    final = out / FINAL_NAME
    ckpt = checkpoint_dict(run.wrap.cpu(), eval_data_config(run.wrap.format_config))
    summary.update(final=str(final), note=note)
    text = _log_text(run.history, summary)

    def stage_final(st):
        save_checkpoint_dict(ckpt, final, staging=st)
        st.write_text(out / "log.jsonl", text, create_dirs=True)

    _write_outputs(out, stage_final, run.kept_epoch)
    if not ctl.done:
        run.log(
            f"warning: FLOPs target not reached: -{ctl.flops_reduction:.2%} of -{o.flops_reduction:.2%} "
            "(raise --epochs or --step-ratio, or lower --every / --prune-start-epoch)"
        )
    run.log(
        f"wrote {final} ({note})"
        + (f"; val top-1 {summary['final_val_top1']:.2%}" if run.val_loader else "")
        + f"; next: caitdeploy fuse {final}"
    )


@torch.no_grad()
def evaluate(model, loader, dist: Dist, autocast) -> dict[str, float]:
    """Top-1 and loss over the validation images, every image counted once over all ranks."""
    model.eval()
    correct = loss = n = 0.0
    for x, y in loader:
        check_batch(loader, y)
        x, y = x.to(dist.device), y.to(dist.device)
        with autocast():
            logits = model(x).float()
        correct += float((logits.argmax(-1) == y).sum())
        loss += float(F.cross_entropy(logits, y, reduction="sum"))
        n += len(y)
    correct, loss, n = dist.all_sum([correct, loss, n])
    model.train()
    return {"val_top1": correct / max(1, n), "val_loss": loss / max(1, n), "val_images": int(n)}
