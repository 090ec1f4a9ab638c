"""The measurement: every artifact on the same images, chunk by chunk, and the records `eval` reports.

Images are decoded once per chunk (`core.preprocess.image_array`, the transform every artifact agreed on) and fed
to every runner in turn; the first chunk runs once untimed per runner (session warm-up), the rest are timed with
the runner's own `inference_time` (the model call alone: decoding is not counted). Logits are kept ([N, classes]
per artifact, its memory counted first); feature maps are compared with the reference's chunk by chunk and only
their per-image cosines kept."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from caitdeploy.core.errors import CaitError
from caitdeploy.evaluate.artifacts import Artifact
from caitdeploy.evaluate.data import Images
from caitdeploy.evaluate.metrics import agreement, feature_cosines, top_k_correct, wilson_interval

RECORD_KEYS = (
    "artifact",
    "kind",
    "precision",
    "runtime",
    "status",
    "reference",
    "images",
    "labelled",
    "top1",
    "top1_ci_low",
    "top1_ci_high",
    "top5",
    "top5_ci_low",
    "top5_ci_high",
    "agree_top1",
    "cosine_min",
    "cosine_mean",
    "max_abs_diff",
    "disagreements",
    "disagree_images",
    "feature_cosine_min",
    "feature_cosine_mean",
    "img_per_s",
    "seconds",
    "batch",
    "data",
    "skipped_images",
)


def _batches(n: int, size: int):
    for i in range(0, n, size):
        yield i, min(n, i + size)


def _feed(art: Artifact, x: np.ndarray) -> tuple[dict[str, np.ndarray], int]:
    """The feed for one chunk (padded with zero images to a static batch) and how many rows are real."""
    n = len(x)
    if art.static_batch and n != art.static_batch:
        if n > art.static_batch:
            raise CaitError(
                f"{art.path}: the graph's batch is fixed at {art.static_batch}: give --batch {art.static_batch}"
            )
        x = np.concatenate([x, np.zeros((art.static_batch - n, *x.shape[1:]), x.dtype)])
    return {art.input_name: x}, n


def measure(
    artifacts: Sequence[Artifact],
    images: Images,
    spec: dict[str, Any],
    reference: int,
    batch: int,
    progress: bool = False,
    log: Callable[[str], None] = lambda s: None,
) -> list[dict[str, Any]]:
    """Run every runnable artifact over `images`; one record per artifact (n/a rows included, `status` says why)."""
    from contextlib import ExitStack

    from tqdm import tqdm

    from caitdeploy.core.budgets import check_memory
    from caitdeploy.core.preprocess import image_array

    live = [i for i, a in enumerate(artifacts) if a.na is None]
    n = len(images)
    shape = artifacts[reference].input_shape or (3, 224, 224)
    channels = shape[0]
    logits_cols = sum(a.num_classes or 1000 for a in artifacts if a.logits)
    check_memory(
        8 * n * logits_cols + 4 * batch * math.prod(shape),
        "eval: logits of every artifact",
    )
    ref_logits = artifacts[reference].logits
    logits: dict[int, list[np.ndarray]] = {i: [] for i in live}
    feat_cos: dict[int, list[np.ndarray]] = {i: [] for i in live}
    max_diff: dict[int, float] = {i: 0.0 for i in live}
    seconds: dict[int, float] = {i: 0.0 for i in live}
    timed: dict[int, int] = {i: 0 for i in live}
    bar = tqdm(total=n, desc="eval", unit="img", disable=None if progress else True, leave=False)
    with ExitStack() as stack:
        runners = {}
        for i in live:
            try:
                runners[i] = stack.enter_context(artifacts[i].make_runner())  # type: ignore[misc]
            except CaitError:
                raise
            except Exception as e:  # noqa: BLE001 - a runtime that cannot load the artifact: one line
                first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                raise CaitError(f"{artifacts[i].path}: cannot be run ({type(e).__name__}: {first})") from None
        for start, stop in _batches(n, batch):
            x = np.stack([image_array(images.files[j], spec, channels) for j in range(start, stop)]).astype(np.float32)
            outs: dict[int, list[np.ndarray]] = {}
            for i in live:
                art, runner = artifacts[i], runners[i]
                feed, real = _feed(art, x)
                if start == 0:
                    runner.infer(feed)  # warm-up, untimed
                try:
                    y = runner.infer(feed)
                except CaitError:
                    raise
                except Exception as e:  # noqa: BLE001 - one line naming the artifact
                    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                    raise CaitError(f"{art.path}: inference failed ({type(e).__name__}: {first})") from None
                seconds[i] += runner.inference_time
                timed[i] += real
                outs[i] = [np.asarray(v, np.float32)[:real] for v in y.values()]
            for i in live:
                if artifacts[i].logits:
                    logits[i].append(outs[i][0])
                elif not ref_logits and reference in outs:
                    ref = outs[reference]
                    if len(ref) != len(outs[i]):
                        raise CaitError(
                            f"{artifacts[i].path}: {len(outs[i])} feature outputs, the reference has {len(ref)}"
                        )
                    cos = np.stack([feature_cosines(a, b) for a, b in zip(outs[i], ref, strict=True)]).min(0)
                    feat_cos[i].append(cos)
                    max_diff[i] = max(
                        max_diff[i], max(float(np.abs(a - b).max()) for a, b in zip(outs[i], ref, strict=True))
                    )
            bar.update(stop - start)
    bar.close()
    return _records(artifacts, images, reference, batch, logits, feat_cos, max_diff, seconds, timed)


def _records(artifacts, images, reference, batch, logits, feat_cos, max_diff, seconds, timed) -> list[dict[str, Any]]:
    labels = images.labels
    ref_art = artifacts[reference]
    ref_y = np.concatenate(logits[reference]) if ref_art.logits and logits.get(reference) else None
    out = []
    for i, art in enumerate(artifacts):
        r: dict[str, Any] = dict.fromkeys(RECORD_KEYS)
        r.update(
            artifact=art.path,
            kind=art.kind,
            precision=art.precision,
            runtime=art.runtime,
            status="ok" if art.na is None else f"n/a: {art.na}",
            reference=i == reference,
            images=len(images),
            labelled=labels is not None and ref_art.logits,  # feature maps are compared without labels
            batch=batch,
            data=images.given,
            skipped_images=len(images.skipped),
            disagree_images=[],
        )
        if art.na is not None:
            out.append(r)
            continue
        r["seconds"] = seconds[i]
        r["img_per_s"] = timed[i] / seconds[i] if seconds[i] > 0 else None
        if art.logits:
            y = np.concatenate(logits[i])
            r["_pred"] = y.argmax(1)  # for the disagreement list; the pipeline takes it out of the record
            if labels is not None:
                for k in (1, 5):
                    if k == 5 and y.shape[1] <= 5:
                        continue
                    hits = top_k_correct(y, labels, k)
                    lo, hi = wilson_interval(int(hits.sum()), len(hits))
                    r[f"top{k}"], r[f"top{k}_ci_low"], r[f"top{k}_ci_high"] = float(hits.mean()), lo, hi
            if ref_y is not None and i != reference:
                a = agreement(y, ref_y)
                r.update(
                    agree_top1=a.top1,
                    cosine_min=a.cosine_min,
                    cosine_mean=a.cosine_mean,
                    max_abs_diff=a.max_abs_diff,
                    disagreements=len(a.disagree),
                    disagree_images=[int(j) for j in a.disagree],
                )
        elif i != reference and feat_cos[i]:
            cos = np.concatenate(feat_cos[i])
            r.update(
                feature_cosine_min=float(cos.min()), feature_cosine_mean=float(cos.mean()), max_abs_diff=max_diff[i]
            )
        out.append(r)
    return out
