"""The numbers `eval` reports, as pure functions of logits and labels (numpy, float64 where it matters).

    top_k_correct(logits, labels, k)      -> bool per image
    wilson_interval(successes, n)         -> the 95% confidence interval of a proportion (Wilson score)
    agreement(logits, ref_logits)         -> top-1 agreement, per-image cosine min/mean, max |diff|, the images
                                             whose top-1 differs
    feature_cosines(maps, ref_maps)       -> per-image cosine of flattened feature maps (dense prediction)

The Wilson interval is used (not the normal approximation) because accuracies near 100% on a few hundred images
are exactly where the normal interval leaves [0, 1] and reports a zero width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

Z95 = 1.959963984540054  # the 97.5% quantile of the standard normal


def top_k_correct(logits: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """[N] bool: the label is among the k largest logits (ties broken by index, as argsort does). k larger
    than the class count counts every image correct."""
    logits = np.asarray(logits)
    k = min(k, logits.shape[1])
    # the k largest without a full sort: argpartition, then membership
    top = np.argpartition(-logits, k - 1, axis=1)[:, :k] if k < logits.shape[1] else np.argsort(-logits, axis=1)
    return (top == np.asarray(labels)[:, None]).any(axis=1)


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """(low, high) of the Wilson score interval for `successes` of `n` (nan, nan for n = 0)."""
    if n <= 0:
        return (math.nan, math.nan)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[N] cosine similarity of each row of a and b, flattened past the first axis, in float64. Two all-zero rows
    count as 1 (identical), one zero row against a non-zero one as 0."""
    a = np.asarray(a, np.float64).reshape(len(a), -1)
    b = np.asarray(b, np.float64).reshape(len(b), -1)
    dot = (a * b).sum(1)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    both_zero = (na == 0) & (nb == 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where(both_zero, 1.0, dot / np.maximum(na * nb, 1e-300))
    return np.clip(np.nan_to_num(cos, nan=0.0), -1.0, 1.0)


@dataclass(frozen=True)
class Agreement:
    top1: float  # share of images whose top-1 class equals the reference's
    cosine_min: float
    cosine_mean: float
    max_abs_diff: float
    disagree: np.ndarray  # indices of the images whose top-1 differs, in data order


def agreement(logits: np.ndarray, ref: np.ndarray) -> Agreement:
    """How closely `logits` follow the reference artifact's on the same images."""
    logits, ref = np.asarray(logits, np.float64), np.asarray(ref, np.float64)
    if logits.shape != ref.shape:
        raise ValueError(f"outputs of shape {logits.shape} cannot be compared with the reference's {ref.shape}")
    same = logits.argmax(1) == ref.argmax(1)
    cos = row_cosines(logits, ref)
    return Agreement(
        top1=float(same.mean()) if len(same) else math.nan,
        cosine_min=float(cos.min()) if len(cos) else math.nan,
        cosine_mean=float(cos.mean()) if len(cos) else math.nan,
        max_abs_diff=float(np.abs(logits - ref).max()) if logits.size else math.nan,
        disagree=np.flatnonzero(~same),
    )


def feature_cosines(maps: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """[N] cosine of each image's feature map against the reference's (the same output name)."""
    if np.shape(maps) != np.shape(ref):
        raise ValueError(f"feature maps of shape {np.shape(maps)} vs the reference's {np.shape(ref)}")
    return row_cosines(maps, ref)
