"""Small input files the docs' examples and the tests make: `python -m caitdeploy.testing.files KIND PATH`.

The docs' examples run on these (tests/docs/test_examples.py), through `<!-- docs-test: setup -->` directives:

    sit PATH        a SiT checkpoint in the released layout ({"model": ..., "epoch": 1}), small: 64 px, width 48,
                    3 heads, stages 2,1,1,1, 10 classes, random weights
    evil PATH       a .pth whose pickle calls posix.system (caitdeploy refuses it before torch reads it)
    stride0 PATH    a cait-compactor/1 checkpoint whose cls_token is an expanded (stride-0) view
    badmask PATH    a cait-compactor/1 checkpoint with 0.5 in blocks.2.attn.k_compactor.mask
    spvit PATH      an SPViT-DeiT checkpoint in the released layout ({"model": ...}), DeiT-Tiny widths (192, 3 heads,
                    224 px), 12 blocks of every kind (attention, 1x1 and 3x3 conv, skipped), pruned FFN widths
    shapes DIR      an ImageFolder of generated 32x32 PNGs: DIR/train and DIR/val, classes circle/square/stripes
    digits DIR      scikit-learn's bundled digits (8x8, upsampled to 32x32 RGB PNGs) as an ImageFolder: the first
                    1437 images in DIR/train, the other 360 in DIR/val, classes 0..9
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

SMALL_SIT: dict[str, Any] = dict(img_size=64, embed_dim=48, num_heads=3, stage_blocks=(2, 1, 1, 1))


def write_sit(path: Path) -> Path:
    import torch

    from caitdeploy.testing.upstream_sit import sit_state_dict

    torch.save({"model": sit_state_dict("s", num_classes=10, **SMALL_SIT), "epoch": 1}, path)
    return path


SPVIT_KINDS = ["attn", "attn", "conv3", "attn", "conv1", "attn", "attn", "conv1", "attn", "skip", "attn", "attn"]
SPVIT_MLP = [768, 704, 352, 640, 288, 608, 576, 256, 512, 96, 448, 416]


def write_spvit(path: Path) -> Path:
    import torch

    from caitdeploy.testing.upstream_spvit import spvit_state_dict

    sd = spvit_state_dict(SPVIT_KINDS, SPVIT_MLP, embed_dim=192, num_heads=3)
    torch.save({"model": sd}, path)
    return path


def write_evil(path: Path) -> Path:
    import os

    import torch

    torch.save({"state_dict": {}, "hook": os.system}, path)  # pickles a reference to posix.system
    return path


def write_stride0(path: Path) -> Path:
    import torch

    from caitdeploy.testing.checkpoints import random_checkpoint

    ckpt = random_checkpoint()
    shape = ckpt["state_dict"]["cls_token"].shape
    ckpt["state_dict"]["cls_token"] = torch.zeros(1).expand(*shape)
    torch.save(ckpt, path)
    return path


def write_badmask(path: Path) -> Path:
    import torch

    from caitdeploy.testing.checkpoints import random_checkpoint

    ckpt = random_checkpoint()
    ckpt["state_dict"]["blocks.2.attn.k_compactor.mask"][0, 0] = 0.5
    torch.save(ckpt, path)
    return path


def write_shapes(root: Path, n_train: int = 8, n_val: int = 4, size: int = 32) -> Path:
    """Three classes of generated RGB images (circle, square, stripes) as PNG, train/ and val/."""
    import numpy as np
    from PIL import Image

    root = Path(root)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]
    for split, n in (("train", n_train), ("val", n_val)):
        for c, name in enumerate(("circle", "square", "stripes")):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = (rng.random((size, size, 3)) * 60).astype(np.uint8)
                cy, cx = rng.integers(10, size - 10, 2)
                r = int(rng.integers(5, 9))
                if c == 0:
                    m = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
                elif c == 1:
                    m = (abs(yy - cy) < r) & (abs(xx - cx) < r)
                else:
                    m = (xx // 4) % 2 == 0
                img[m] = rng.integers(150, 255, 3)
                Image.fromarray(img).save(d / f"{i}.png")
    return root


def write_digits(root: Path) -> Path:
    import importlib

    import numpy as np
    from PIL import Image

    load_digits = importlib.import_module("sklearn.datasets").load_digits  # the `examples` extra (scikit-learn)

    root = Path(root)
    data = load_digits()
    for i, (img, label) in enumerate(zip(data.images, data.target, strict=True)):
        d = root / ("train" if i < 1437 else "val") / str(label)
        d.mkdir(parents=True, exist_ok=True)
        gray = (img * (255 / 16)).astype(np.uint8).repeat(4, 0).repeat(4, 1)
        Image.fromarray(np.stack([gray] * 3, -1)).save(d / f"{i}.png")
    return root


KINDS: dict[str, Callable[[Path], Path]] = {
    "sit": write_sit,
    "evil": write_evil,
    "stride0": write_stride0,
    "badmask": write_badmask,
    "spvit": write_spvit,
    "shapes": write_shapes,
    "digits": write_digits,
}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] not in KINDS:
        print(f"usage: python -m caitdeploy.testing.files {{{','.join(KINDS)}}} PATH", file=sys.stderr)
        return 2
    KINDS[args[0]](Path(args[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
