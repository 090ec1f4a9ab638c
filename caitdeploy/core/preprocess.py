"""How an image becomes a model input: timm's eval transform, recorded with the model and repeated exactly.

A checkpoint may carry a `data_config` (timm's names: `mean`, `std`, `crop_pct`, `interpolation`); `fuse` keeps it
in the fused file, `export` writes the resolved transform into every ONNX file as `caitdeploy.preprocess`, and
`eval` and int8 calibration apply it. Without one the ImageNet default applies (3 channels: ImageNet mean/std,
otherwise 0.5/0.5; crop_pct 0.875, bicubic), as timm's `resolve_data_config` gives for a ViT.

    dc = check_data_config(raw, channels=3, what="ck.pth: data_config")   # validated, defaults filled in
    spec = preprocess_spec((3, 224, 224), dc)   # {"resize_shorter": 256, "crop": [224, 224], ...}
    x = image_array(path, spec, channels=3, what="--data")                 # [C, H, W] float32

The arithmetic is torchvision's, which timm's eval transform calls: the shorter side resized to
floor(size / crop_pct) (the longer one to int(new_short * long / short)), with PIL's resampling filter, a centre
crop at round((side - crop) / 2), pixels / 255, then (x - mean) / std per channel.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from caitdeploy.core.errors import CaitError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = ("bicubic", "bilinear", "nearest")
DATA_CONFIG_KEYS = ("mean", "std", "crop_pct", "interpolation")
SPEC_KEYS = ("resize_shorter", "crop", "interpolation", "scale", "mean", "std", "crop_pct")


def default_data_config(channels: int) -> dict[str, Any]:
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else ((0.5,) * channels, (0.5,) * channels)
    return {"mean": list(mean), "std": list(std), "crop_pct": 0.875, "interpolation": "bicubic"}


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_data_config(raw: Any, channels: int, what: str = "data_config") -> dict[str, Any]:
    """`raw` (a dict with timm's keys, each optional) validated against the model's channel count, the missing
    keys filled from `default_data_config`; one-line CaitError naming `what` and the key otherwise."""
    if raw is None:
        return default_data_config(channels)
    if not isinstance(raw, dict):
        raise CaitError(f"{what}: expected a JSON object with {', '.join(DATA_CONFIG_KEYS)}")
    unknown = [k for k in raw if k not in DATA_CONFIG_KEYS]
    if unknown:
        raise CaitError(f"{what}: unknown key {str(unknown[0])[:40]!r} (known: {', '.join(DATA_CONFIG_KEYS)})")
    out = {**default_data_config(channels), **raw}
    for key in ("mean", "std"):
        v = out[key]
        if not (isinstance(v, (list, tuple)) and len(v) == channels and all(_number(x) for x in v)):
            raise CaitError(f"{what}: {key!r} must be a list of {channels} finite numbers (one per channel)")
        out[key] = [float(x) for x in v]
    if not all(0.0 < s <= 1e3 for s in out["std"]) or not all(abs(m) <= 1e3 for m in out["mean"]):
        raise CaitError(f"{what}: 'std' values must be in (0, 1000] and 'mean' values in [-1000, 1000]")
    if not (_number(out["crop_pct"]) and 0.05 <= out["crop_pct"] <= 1.0):
        raise CaitError(f"{what}: 'crop_pct' must be a number in [0.05, 1]")
    out["crop_pct"] = float(out["crop_pct"])
    if out["interpolation"] not in INTERPOLATIONS:
        raise CaitError(f"{what}: 'interpolation' must be one of {', '.join(INTERPOLATIONS)}")
    return out


def preprocess_spec(input_shape: tuple[int, int, int], data_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """The eval transform for a model input (C, H, W): resize the shorter side to floor(min(H, W) / crop_pct),
    centre crop to (H, W), scale to [0, 1], normalise."""
    c, h, w = (int(s) for s in input_shape)
    dc = check_data_config(data_config, c)
    return {
        "resize_shorter": math.floor(min(h, w) / dc["crop_pct"]),
        "crop": [h, w],
        "interpolation": dc["interpolation"],
        "scale": "1/255",
        "mean": dc["mean"],
        "std": dc["std"],
        "crop_pct": dc["crop_pct"],
    }


def spec_from_json(text: str, what: str) -> dict[str, Any]:
    """A `caitdeploy.preprocess` value read back (an ONNX file's metadata); one line when malformed."""
    try:
        d = json.loads(text)
    except ValueError:
        raise CaitError(f"{what}: 'caitdeploy.preprocess' is not JSON") from None
    ok = (
        isinstance(d, dict)
        and isinstance(d.get("resize_shorter"), int)
        and 1 <= d["resize_shorter"] <= 65536
        and isinstance(d.get("crop"), list)
        and len(d["crop"]) == 2
        and all(isinstance(s, int) and 1 <= s <= 65536 for s in d["crop"])
        and d.get("interpolation") in INTERPOLATIONS
        and isinstance(d.get("mean"), list)
        and isinstance(d.get("std"), list)
        and len(d["mean"]) == len(d["std"]) >= 1
        and all(_number(x) for x in [*d["mean"], *d["std"]])
        and all(s > 0 for s in d["std"])
    )
    if not ok:
        raise CaitError(f"{what}: 'caitdeploy.preprocess' does not describe a transform (resize_shorter, crop, ...)")
    d.setdefault("scale", "1/255")
    d.setdefault("crop_pct", None)
    return {k: d[k] for k in SPEC_KEYS}


def spec_difference(a: dict[str, Any], b: dict[str, Any]) -> str | None:
    """The first key on which two transforms differ, as 'key: a vs b' (None when they are the same)."""
    for k in ("crop", "resize_shorter", "interpolation", "mean", "std"):
        va, vb = a.get(k), b.get(k)
        if k in ("mean", "std") and isinstance(va, list) and isinstance(vb, list):
            same = len(va) == len(vb) and all(abs(x - y) <= 1e-6 for x, y in zip(va, vb, strict=False))
        else:
            same = va == vb
        if not same:
            return f"{k} {va} vs {vb}"
    return None


def _resampling(name: str):
    from PIL import Image

    return {
        "bicubic": Image.Resampling.BICUBIC,
        "bilinear": Image.Resampling.BILINEAR,
        "nearest": Image.Resampling.NEAREST,
    }[name]


def image_array(path: str | Path, spec: dict[str, Any], channels: int, what: str = "--data") -> np.ndarray:
    """[C, H, W] float32 of one PNG/JPEG image, transformed as `spec` says. Every bound (file size, sides, area,
    the resized area) is checked from the header before a pixel is decoded; a one-line CaitError names `what`
    and the file for anything wrong (unreadable, wrong channel count, a mode that is not RGB or greyscale)."""
    from PIL import Image

    from caitdeploy.core.images import open_image

    path = Path(path)
    s = int(spec["resize_shorter"])
    try:
        im = open_image(path, what, resize_shorter=s)
        with im:
            mode = im.mode
            if mode == "P":
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
                mode = im.mode
            have = {"1": 1, "L": 1, "I;16": 1, "I": 1, "F": 1, "LA": 2, "RGB": 3, "YCbCr": 3, "RGBA": 4, "CMYK": 4}.get(
                mode
            )
            if have is None:
                raise CaitError(f"{what} {path}: image mode {mode} is not supported (use RGB or greyscale)")
            if have != channels and not (have == 1 and channels == 3):  # timm's reader makes greyscale RGB
                raise CaitError(
                    f"{what} {path}: has {have} channel{'s' * (have != 1)} ({mode}), the model takes {channels}"
                )
            im = im.convert("RGB" if channels == 3 else "L")
            w, h = im.size
            # torchvision.transforms.Resize(s): the shorter side to s, the longer to int(s * long / short)
            size = (s, int(s * h / w)) if w <= h else (int(s * w / h), s)
            if size != im.size:
                im = im.resize(size, _resampling(spec["interpolation"]))
            ch, cw = (int(v) for v in spec["crop"])
            if im.size[0] < cw or im.size[1] < ch:  # torchvision's CenterCrop pads a too-small image with 0
                canvas = Image.new(im.mode, (max(cw, im.size[0]), max(ch, im.size[1])))
                canvas.paste(im, ((canvas.size[0] - im.size[0]) // 2, (canvas.size[1] - im.size[1]) // 2))
                im = canvas
            top = round((im.size[1] - ch) / 2.0)
            left = round((im.size[0] - cw) / 2.0)
            im = im.crop((left, top, left + cw, top + ch))
            a = np.asarray(im, dtype=np.float32) / 255.0
    except CaitError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise CaitError(f"{what} {path}: not a readable PNG/JPEG image ({first})") from None
    a = a[..., None] if a.ndim == 2 else a
    a = (a - np.asarray(spec["mean"], np.float32)) / np.asarray(spec["std"], np.float32)
    return np.ascontiguousarray(a.transpose(2, 0, 1))
