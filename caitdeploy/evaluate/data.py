"""Labelled (or unlabelled) images for `eval`, listed and checked before the first model runs.

    ds = find_images("val/", resize_shorter=256)      # an ImageFolder: DIR/CLASS/*.png|jpg|jpeg
    ds = find_images("val.csv", resize_shorter=256)   # a CSV of path,label (paths relative to the CSV's folder)
    ds = find_images("imgs/", ...)                    # images directly in DIR: no labels (agreement only)

Class indices of an ImageFolder follow timm's folder reader (the class folders' names in natural order: 2 before
10), so a model trained by `caitdeploy train` (timm's reader) is scored against the labels it learned. A CSV gives
class indices directly. Every image is checked without decoding it (`core.images.check_image`: a regular file
within the size bound, a PNG or JPEG whose header, sides, area, area once resized, and whole structure are
sound); a bad one is one error naming it and how many more there are, or with `skip_bad` it is left out and
counted once.
"""

from __future__ import annotations

import csv
import io
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from caitdeploy.core.errors import CaitError, OptionError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
MAX_CSV_BYTES = 256 << 20
MAX_IMAGES = 10_000_000


def natural_key(text: str) -> list:
    """timm's sort key: digit runs compare as numbers, the rest case-insensitively."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text.lower())]


@dataclass
class Images:
    source: str  # "imagefolder", "csv" or "unlabelled"
    root: Path
    files: list[Path]
    labels: np.ndarray | None  # [N] int64 class indices, None when unlabelled
    classes: list[str] = field(default_factory=list)  # an ImageFolder's class names, by index
    skipped: list[str] = field(default_factory=list)  # the one-line reasons of the images left out
    given: str = ""  # the folder or CSV as the user named it

    def __len__(self) -> int:
        return len(self.files)

    def name(self, i: int) -> str:
        """Image i's path as the user gave it: relative to the folder or CSV when it lies inside."""
        try:
            return str(self.files[i].relative_to(self.root))
        except ValueError:
            return str(self.files[i])


def _imagefolder(root: Path) -> tuple[list[Path], list[int] | None, list[str]]:
    subdirs = sorted((d for d in root.iterdir() if d.is_dir()), key=lambda d: natural_key(d.name))
    top = [p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if subdirs and top:
        raise OptionError(
            "data",
            f"{root}: holds both images ({top[0].name}) and class folders ({subdirs[0].name}): "
            "give an ImageFolder (DIR/CLASS/*.png) or a folder of images",
        )
    if not subdirs:
        files = sorted(top, key=lambda p: natural_key(p.name))
        return files, None, []
    pairs: list[tuple[Path, int]] = []
    classes: list[str] = []
    for d in subdirs:
        found = [p for p in d.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir()]
        if not found:
            continue  # timm's reader makes classes from the folders that hold images
        classes.append(d.name)
        pairs += [(p, len(classes) - 1) for p in found]
        if len(pairs) > MAX_IMAGES:
            raise OptionError("data", f"{root}: more than {MAX_IMAGES} images")
    pairs.sort(key=lambda pc: natural_key(str(pc[0].relative_to(root))))
    return [p for p, _ in pairs], [c for _, c in pairs], classes


def _csv(path: Path) -> tuple[list[Path], list[int]]:
    size = path.stat().st_size
    if size > MAX_CSV_BYTES:
        raise OptionError("data", f"{path}: {size} bytes, more than the {MAX_CSV_BYTES} a label CSV may have")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError:
        raise OptionError("data", f"{path}: not UTF-8 text (expected a CSV of path,label)") from None
    files: list[Path] = []
    labels: list[int] = []
    for n, row in enumerate(csv.reader(io.StringIO(text)), 1):
        if not row or not "".join(row).strip():
            continue
        if len(row) != 2:
            raise OptionError("data", f"{path}:{n}: expected 2 fields (path,label), got {len(row)}")
        p, label = row[0].strip(), row[1].strip()
        if n == 1 and label.lower() in ("label", "class", "target"):
            continue  # a header row
        if not re.fullmatch(r"[0-9]{1,9}", label):
            raise OptionError("data", f"{path}:{n}: label {label[:40]!r} is not a class index (0, 1, ...)")
        if not p:
            raise OptionError("data", f"{path}:{n}: empty path")
        f = Path(p)
        files.append(f if f.is_absolute() else path.parent / f)
        labels.append(int(label))
        if len(files) > MAX_IMAGES:
            raise OptionError("data", f"{path}: more than {MAX_IMAGES} rows")
    return files, labels


def find_images(
    data: str | os.PathLike,
    resize_shorter: int | None = None,
    skip_bad: bool = False,
    limit: int | None = None,
    check: bool = True,
) -> Images:
    """The images of `data` (an ImageFolder, a folder of images or a CSV), each checked without decoding it
    (`resize_shorter`: the eval transform's, so an image too elongated to resize is refused now, not mid-run).
    `limit` keeps the first N (after sorting). Raises a one-line CaitError for a bad image unless `skip_bad`."""
    from caitdeploy.core.images import check_image

    root = Path(data)
    if root.is_dir():
        files, labels, classes = _imagefolder(root)
        source = "imagefolder" if labels is not None else "unlabelled"
    elif root.is_file() and root.suffix.lower() == ".csv":
        files, labels = _csv(root)
        classes, source, root = [], "csv", root.parent
    elif root.exists():
        raise OptionError("data", f"{data}: expected a folder of images (DIR/CLASS/*.png) or a .csv of path,label")
    else:
        raise OptionError("data", f"{data}: no such folder or file")
    if not files:
        raise OptionError("data", f"{data}: no PNG or JPEG images")
    if limit is not None:
        files, labels = files[:limit], (labels[:limit] if labels is not None else None)
    keep: list[int] = []
    bad: list[str] = []
    for i, f in enumerate(files):
        if check:
            try:
                check_image(f, "--data", resize_shorter)
            except CaitError as e:
                bad.append(str(e))
                continue
        keep.append(i)
    if bad and not skip_bad:
        more = f" (and {len(bad) - 1} more bad image{'s' * (len(bad) > 2)} of {len(files)})" if len(bad) > 1 else ""
        raise CaitError(f"{bad[0]}{more}; remove {'them' if len(bad) > 1 else 'it'} or add --skip-bad-images")
    if not keep:
        raise CaitError(f"--data {data}: none of the {len(files)} images can be used (first: {bad[0]})")
    lab = np.asarray([labels[i] for i in keep], np.int64) if labels is not None else None
    return Images(source, root, [files[i] for i in keep], lab, classes, bad, str(data))
