"""`caitdeploy train`: CAIT fine-tuning of a timm ViT or Swin (the paper's recipe), one process or under torchrun."""

from __future__ import annotations

import math

import click

from caitdeploy.cli.common import console, handle_errors
from caitdeploy.cli.options import Float, Int, StrictFloat, parse_float, parse_int

MAX_EPOCHS, MAX_BATCH, MAX_SEED = 100_000, 1 << 20, (1 << 32) - 1  # trainer.check_options' ranges
RATE = Float(0.0, 10.0)  # learning rates, weight decay, lasso strength


def _scalar(v: str, item: str | None = None):
    """'4' -> 4, '0.1' -> 0.1, 'false' -> False, anything else stays text (ASCII notation only: '٣', '1_000'
    stay text); 'nan' and 'inf' are refused (a model argument is a finite number or no number)."""
    from caitdeploy.core.errors import OptionError

    if v.lower() in ("true", "false"):
        return v.lower() == "true"
    if (i := parse_int(v)) is not None:
        return i
    if (f := parse_float(v, finite=False)) is not None:
        if not math.isfinite(f):
            raise OptionError("model_args", f"{(item or v)!r}: a value must be a finite number")
        return f
    return v


def _split_items(text: str) -> list[str] | None:
    """Split on the commas outside [...]: 'a=1,b=[2,3]' -> ['a=1', 'b=[2,3]']; None on unbalanced brackets."""
    items, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch == "[") - (ch == "]")
        if depth < 0 or depth > 1:
            return None
        if ch == "," and depth == 0:
            items.append(cur)
            cur = ""
        else:
            cur += ch
    return None if depth else [*items, cur]


def _model_args(text: str | None) -> dict:
    """'depth=4,embed_dim=64,qkv_bias=false,depths=[2,2,6,2]' -> {'depth': 4, 'embed_dim': 64, 'qkv_bias': False,
    'depths': (2, 2, 6, 2)} (a [...] list becomes a tuple, as timm's Swin takes depths and num_heads)."""
    from caitdeploy.core.errors import OptionError

    form = "expected KEY=VALUE[,KEY=VALUE...], a VALUE a number, true/false, text or [A,B,...]"
    items = _split_items(text or "")
    if items is None:
        raise OptionError("model_args", f"{text!r}: unbalanced [ ]; {form}")
    out: dict = {}
    for item in items:
        if not item.strip():
            continue
        k, sep, v = item.partition("=")
        k, v = k.strip(), v.strip()
        if not sep or not k.isidentifier():
            raise OptionError("model_args", f"{item!r}: {form}")
        if v.startswith("[") and v.endswith("]"):
            parts = [p.strip() for p in v[1:-1].split(",")]
            if not all(parts):
                raise OptionError("model_args", f"{item!r}: an empty list entry; {form}")
            out[k] = tuple(_scalar(p, item) for p in parts)
        else:
            out[k] = _scalar(v, item)
    return out


@click.command("train")
@click.option(
    "--arch",
    required=True,
    help="timm ViT architecture, e.g. deit_small_patch16_224, or a timm Swin (v1), e.g. swin_tiny_patch4_window7_224.",
)
@click.option(
    "--weights",
    type=click.Path(dir_okay=False),
    default=None,
    help="Pretrained timm state dict (.safetensors or .pth; weights_only); random init if absent.",
)
@click.option(
    "--model-args",
    default=None,
    help="Extra timm.create_model arguments, e.g. depth=4,embed_dim=64 or depths=[2,2,6,2],drop_path_rate=0.2.",
)
@click.option("--img-size", type=Int(8, 8192), default=None, help="Override the input resolution.")
@click.option(
    "--data",
    required=True,
    type=click.Path(file_okay=False),
    help="ImageFolder root: DATA/train/CLASS/*.png|jpg (and DATA/val/CLASS/... for evaluation).",
)
@click.option(
    "--output", "-o", required=True, type=click.Path(), help="Run folder: last.pt, log.jsonl, final checkpoint."
)
@click.option(
    "--flops-reduction",
    type=StrictFloat(),
    default=None,
    help="Target vs the dense model [default: 0.55; Swin 0.354, paper Tab. XIV].",
)
@click.option(
    "--merges",
    default="auto",
    show_default=True,
    help="auto (the paper's rule) | BLOCK:h|v,... | none; Swin: STAGE.BLOCK:h|v,... (auto: HTM + VTM "
    "at the last two blocks of the longest stage, 2.4:h,2.5:v on Swin-T).",
)
@click.option(
    "--token-reduction",
    type=Float(0.0, 1.0, hi_open=True),
    default=None,
    help="ViT --merges auto: FLOPs reduction the merges should give [default: 0.75 x --flops-reduction].",
)
@click.option("--epochs", type=Int(1, MAX_EPOCHS), default=300, show_default=True)
@click.option(
    "--batch-size",
    type=Int(1, MAX_BATCH),
    default=256,
    show_default=True,
    help="Global batch (micro batch x processes x accumulation steps).",
)
@click.option(
    "--micro-batch",
    type=Int(1, MAX_BATCH),
    default=None,
    help="Images per process per forward, 1..--batch-size [default: batch size / processes]; smaller "
    "means accumulation.",
)
@click.option("--lr", type=RATE, default=1e-4, show_default=True, help="AdamW peak learning rate.")
@click.option("--min-lr", type=RATE, default=1e-6, show_default=True)
@click.option("--warmup-epochs", type=Float(0.0, float(MAX_EPOCHS)), default=5.0, show_default=True)
@click.option("--weight-decay", type=RATE, default=0.05, show_default=True)
@click.option("--compactor-lr", type=RATE, default=None, help="Compactors' SGD learning rate [default: --lr].")
@click.option("--compactor-momentum", type=Float(0.0, 1.0, hi_open=True), default=0.99, show_default=True)
@click.option("--label-smoothing", type=Float(0.0, 1.0, hi_open=True), default=0.1, show_default=True)
@click.option("--mixup", type=Float(0.0, 100.0), default=0.8, show_default=True, help="Mixup alpha (0: off).")
@click.option("--cutmix", type=Float(0.0, 100.0), default=1.0, show_default=True, help="CutMix alpha (0: off).")
@click.option("--rand-augment", default="rand-m9-mstd0.5-inc1", show_default=True, help="timm RandAugment ('' off).")
@click.option("--reprob", type=Float(0.0, 1.0), default=0.25, show_default=True, help="Random erasing probability.")
@click.option(
    "--crop-scale",
    type=Float(0.01, 1.0),
    default=0.08,
    show_default=True,
    help="RandomResizedCrop's smallest area share (raise it for small or centred images).",
)
@click.option("--hflip", type=Float(0.0, 1.0), default=0.5, show_default=True, help="Horizontal flip probability.")
@click.option(
    "--teacher",
    default="dense",
    show_default=True,
    help="Hard distillation teacher: dense (the starting model), none, or a timm state dict of --arch.",
)
@click.option(
    "--distill-alpha",
    type=Float(0.0, 1.0),
    default=None,
    help="Weight of the teacher's hard labels [default: 0.1 for ViT Tiny widths (<= 192), else 0.25].",
)
@click.option("--lam", type=RATE, default=1e-5, show_default=True, help="CDCP lasso strength.")
@click.option(
    "--step-ratio",
    type=Float(1e-9, 1.0),
    default=0.00025,
    show_default=True,
    help="FLOPs reduction added per mask update.",
)
@click.option(
    "--every", type=Int(1, 1 << 30), default=25, show_default=True, help="Optimizer steps between mask updates."
)
@click.option(
    "--prune-start-epoch",
    type=Int(0, MAX_EPOCHS - 1),
    default=30,
    show_default=True,
    help="Epoch CDCP starts at (below --epochs).",
)
@click.option("--align", type=Int(1, 256), default=1, show_default=True, help="Kept widths multiple of this.")
@click.option("--amp", default="auto", show_default=True, help="auto (bf16 on GPU, off on CPU) | bf16 | fp16 | off")
@click.option("--workers", type=Int(0, 256), default=4, show_default=True, help="Data-loading processes per rank.")
@click.option("--seed", type=Int(0, MAX_SEED), default=0, show_default=True)
@click.option("--resume", is_flag=True, help="Continue the run in --output from its last.pt, bit for bit.")
@click.option(
    "--stop-after-epochs",
    type=Int(1, MAX_EPOCHS),
    default=None,
    help="Leave cleanly after N epochs of this invocation (time-limited jobs); continue with --resume.",
)
@click.option(
    "--skip-bad-images",
    is_flag=True,
    help="Leave out the images the check before the first step refuses (empty, corrupt, truncated, not "
    "PNG/JPEG, too large) and say how many; without it the first one is an error.",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@handle_errors
def train_cmd(
    arch,
    weights,
    model_args,
    img_size,
    data,
    output,
    flops_reduction,
    merges,
    token_reduction,
    epochs,
    batch_size,
    micro_batch,
    lr,
    min_lr,
    warmup_epochs,
    weight_decay,
    compactor_lr,
    compactor_momentum,
    label_smoothing,
    mixup,
    cutmix,
    rand_augment,
    reprob,
    crop_scale,
    hflip,
    teacher,
    distill_alpha,
    lam,
    step_ratio,
    every,
    prune_start_epoch,
    align,
    amp,
    workers,
    seed,
    resume,
    stop_after_epochs,
    skip_bad_images,
    quiet,
):
    """Fine-tune a timm ViT or Swin into a CAIT model (ATME merges + CDCP pruning) and write a cait-compactor/1
    checkpoint. Run as is, or under `torchrun --nproc_per_node K` for DDP (gloo on CPU, NCCL on GPU)."""
    from caitdeploy.training.loop import TrainOptions, train

    opts = TrainOptions(
        arch=arch,
        data=data,
        output=output,
        weights=weights,
        model_args=_model_args(model_args),
        img_size=img_size,
        flops_reduction=flops_reduction,
        merges=merges,
        token_reduction=token_reduction,
        epochs=epochs,
        batch_size=batch_size,
        micro_batch=micro_batch,
        lr=lr,
        min_lr=min_lr,
        warmup_epochs=warmup_epochs,
        weight_decay=weight_decay,
        compactor_lr=compactor_lr,
        compactor_momentum=compactor_momentum,
        label_smoothing=label_smoothing,
        mixup=mixup,
        cutmix=cutmix,
        rand_augment=rand_augment,
        reprob=reprob,
        crop_scale=crop_scale,
        hflip=hflip,
        distill_alpha=distill_alpha,
        teacher=teacher,
        lam=lam,
        step_ratio=step_ratio,
        every=every,
        prune_start_epoch=prune_start_epoch,
        align=align,
        amp=amp,
        workers=workers,
        seed=seed,
        resume=resume,
        stop_after_epochs=stop_after_epochs,
        skip_bad_images=skip_bad_images,
        progress=not quiet,
    )
    con = console()
    train(opts, log=lambda s: con.print(s, markup=False, highlight=False, soft_wrap=True))
