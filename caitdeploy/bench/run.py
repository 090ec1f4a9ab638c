"""`run_bench`: CAIT vs its dense architecture vs ToMe at the same FLOPs, over backends and batch sizes.

Models
  cait   the fused model (weights from the file)
  dense  `config.unpruned()`: same depth, width and heads, no merges, no pruning (random weights: speed only)
  tome   the dense model with ToMe merging; r chosen by `choose_r` so its FLOPs match CAIT's within 2%
         (random weights: the merge pattern is data-dependent, its cost is not)

Feature mode (`features`, with any `img_size`): every model returns the same full-grid feature maps of the listed
blocks (`CaitViT.forward_features(x, blocks)`; ToMe with its merges undone by index tracking) and no head runs;
FLOPs are encoder FLOPs (stem + blocks up to the last listed one), and ToMe's r matches CAIT's encoder FLOPs.

Precisions (`dtype`, one or several, e.g. "fp32,int8"): fp32; fp16 (on CPU the records run fp32 and say so
in `note`: CPUs have no fast fp16 path in PyTorch eager or the ONNX Runtime CPU EP); bf16 (torch and compile:
fp32 weights under torch.autocast; ONNX Runtime has no bf16 CPU kernels, so its rows are n/a with that reason);
int8 and int8-dynamic (ONNX Runtime and TensorRT: the fp32 export quantized by `export.quantize`, static QDQ
calibrated on synthetic images, or dynamic; torch rows n/a). Speed-ups compare rows of the same precision.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from caitdeploy.bench.runners import (
    BACKENDS,
    DTYPES,
    BenchModel,
    RunOptions,
    Timing,
    close_context,
    new_context,
    run_one,
)
from caitdeploy.core.budgets import check_memory
from caitdeploy.core.errors import CaitError, OptionError, safe_text
from caitdeploy.families import family_of
from caitdeploy.families.flops import activation_bytes, model_flops, model_params, param_bytes
from caitdeploy.families.layers import AttnImpl
from caitdeploy.families.vit.config import CaitConfig

BASELINES = ("dense", "tome")
MAX_BATCH = 65536


CONVERTED = {"sit": "SiT", "lvvit": "LV-ViT", "spvit": "SPViT", "spvit-swin": "SPViT-Swin", "dimap": "DIMAP"}


def arch_name(cfg) -> str:
    """A short name of a dense architecture, e.g. 'vit-d384-x12-h6-224px' ('swin-d96-x2.2.6.2-224px')."""
    return family_of(cfg).arch_name(cfg)


def setting_name(path: str | os.PathLike) -> str:
    name = Path(path).name
    for suffix in (".safetensors", ".fused"):
        name = name.removesuffix(suffix)
    return name


def _items(text: str | Sequence[str]) -> list[str]:
    """A comma list (or a sequence) of option values, stripped, empty ones dropped."""
    return [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]


def _choices(text: str | Sequence[str], allowed: Sequence[str], param: str, unknown: Callable[[str], str]) -> list[str]:
    """The distinct values of a comma-list option, each one of `allowed`; `unknown(value)` words the error."""
    items = _items(text)
    if not items:
        raise OptionError(param, f"is empty; choose from {','.join(allowed)}")
    bad = [t for t in items if t not in allowed]
    if bad:
        raise OptionError(param, unknown(bad[0]))
    return list(dict.fromkeys(items))


def parse_backends(text: str | Sequence[str]) -> list[str]:
    return _choices(
        text, BACKENDS, "backends", lambda b: f"has unknown backend {b!r}; choose from {','.join(BACKENDS)}"
    )


def parse_dtypes(text: str | Sequence[str]) -> list[str]:
    return _choices(
        text, DTYPES, "dtype", lambda d: f"{d!r}: choose from {', '.join(DTYPES)} (comma-separate for several)"
    )


def parse_baselines(text: str | Sequence[str]) -> list[str]:
    items = _items(text)
    if len(items) == 1 and items[0] == "none":
        return []
    bad = [b for b in items if b not in BASELINES]
    if bad:
        raise OptionError("baselines", f"has unknown baseline {bad[0]!r}; choose from {','.join(BASELINES)} or none")
    return list(dict.fromkeys(items))


_ASCII_INT = re.compile(r"[+-]?[0-9]{1,64}")
MAX_TOME_R = 1 << 20  # tokens merged per block; more than any input has (choose_r / tome check the model)


def parse_batches(values: Iterable[Any]) -> list[int]:
    out = []
    for v in values:
        for part in str(v).split(","):
            if not _ASCII_INT.fullmatch(part.strip()):  # int() also takes '٣' and '1_0'
                raise OptionError("batch", f"{safe_text(part, 40)!r}: not an integer")
            b = int(part)
            if not 1 <= b <= MAX_BATCH:
                raise OptionError("batch", f"{b}: must be in 1..{MAX_BATCH}")
            out.append(b)
    if not out:
        raise OptionError("batch", ": give at least one batch size")
    return list(dict.fromkeys(out))


def parse_tome_r(value: Any) -> str | int:
    if value in (None, "auto"):
        return "auto"
    if not _ASCII_INT.fullmatch(str(value).strip()):
        raise OptionError("tome_r", f"{safe_text(value, 40)!r}: 'auto' or a non-negative integer")
    r = int(value)
    if not 0 <= r <= MAX_TOME_R:
        raise OptionError("tome_r", f"{r}: must be in 0..{MAX_TOME_R}")
    return r


def _features(model: torch.nn.Module, features: tuple[int, ...] | None, restore: str) -> torch.nn.Module:
    if not features:
        return model
    from caitdeploy.families.vit.model import FeatureModel

    return FeatureModel(model, features, restore).eval()


def _dense_builder(
    cfg: CaitConfig, seed: int, features=None, restore: str = "repeat"
) -> Callable[[AttnImpl, str | None], torch.nn.Module]:
    def build(attn_impl: AttnImpl, kernels: str | None):
        from caitdeploy.families import build_model

        torch.manual_seed(seed)
        return _features(build_model(cfg, attn_impl=attn_impl, kernels=kernels).eval(), features, restore)

    return build


def _cait_builder(
    path: str, img_size=None, features=None, restore: str = "repeat"
) -> Callable[[AttnImpl, str | None], torch.nn.Module]:
    def build(attn_impl: AttnImpl, kernels: str | None):
        from caitdeploy.formats.fused import load_model

        model = load_model(path, attn_impl=attn_impl, kernels=kernels, img_size=img_size)
        return _features(model, features, restore)

    return build


def _tome_builder(cfg: CaitConfig, r, seed: int, features=None) -> Callable[[AttnImpl, str | None], torch.nn.Module]:
    def build(attn_impl: AttnImpl, kernels: str | None):
        from caitdeploy.baselines.tome import tome_model

        model = tome_model(cfg, r, attn_impl="math" if attn_impl == "math" else "sdpa", seed=seed)
        return _features(model, features, "repeat")

    return build


def _encoder(cfg: CaitConfig, features: tuple[int, ...] | None) -> CaitConfig:
    """The part of `cfg` a feature benchmark runs (blocks up to the last listed one), for FLOPs counts."""
    from dataclasses import replace

    return replace(cfg, blocks=cfg.blocks[: features[-1] + 1]) if features else cfg


def _flops(cfg: CaitConfig, features: tuple[int, ...] | None) -> int:
    from caitdeploy.families.flops import encoder_flops

    return encoder_flops(cfg, features[-1]) if features else model_flops(cfg)["total"]


def build_models(
    model_paths: Sequence[str | os.PathLike],
    baselines: Sequence[str] = BASELINES,
    tome_r: str | int = "auto",
    seed: int = 0,
    log: Callable[[str], None] = print,
    max_batch: int = 1,
    img_size=None,
    features=None,
    restore: str = "repeat",
) -> list[BenchModel]:
    """The models to benchmark: every fused CAIT model, one dense model per distinct architecture, one
    ToMe model per CAIT model (FLOPs-matched unless `tome_r` is an int). img_size: run every model at this
    input size; features: block indices, benchmark feature extraction (see the module docstring)."""
    from caitdeploy.baselines.tome import choose_r, describe_r, tome_flops
    from caitdeploy.families.vit.config import ConfigError
    from caitdeploy.families.vit.flops import head_flops
    from caitdeploy.formats.fused import load_fused

    models: list[BenchModel] = []
    dense_seen: set[str] = set()
    for path in model_paths:
        config, _, meta = load_fused(path)  # says what the file is instead, and to run `fuse`, when it is not
        from caitdeploy.formats.describe import fused_meta

        meta = fused_meta(meta, path)  # every metadata field read here checked: type and range
        system = CONVERTED.get(meta.get("converted_from") or "", "CAIT")  # `convert`ed files name their system
        try:
            if img_size is not None:
                config = config.at_size(img_size)
            blocks = config.feature_blocks(features) if features is not None else None
        except ConfigError as e:
            raise CaitError(f"{path}: {e}") from None
        dense_cfg = config.unpruned()
        check_memory(
            3 * param_bytes(dense_cfg) + activation_bytes(dense_cfg, max_batch),
            f"{path}: benchmarking its dense architecture at batch {max_batch}",
            hint="choose a smaller --batch",
        )
        arch = arch_name(dense_cfg)
        setting = setting_name(path)
        f_cait, f_dense = _flops(config, blocks), _flops(dense_cfg, blocks)
        outputs = [f"feat{b}" for b in blocks] if blocks else None
        common: dict[str, Any] = dict(
            input_shape=config.input_shape, num_classes=config.num_classes, flops_dense=f_dense, output_names=outputs
        )
        models.append(
            BenchModel(
                "cait",
                setting,
                arch,
                f"{system} -{100 * (1 - f_cait / f_dense):.1f}%",
                _cait_builder(str(path), img_size, blocks, restore),
                flops=f_cait,
                params=model_params(config),
                **common,
            )
        )
        log(
            f"{setting}: {system} {f_cait / 1e9:.3f} GFLOPs/img, dense {f_dense / 1e9:.3f} "
            f"({100 * (1 - f_cait / f_dense):.1f}% fewer)"
        )
        if "dense" in baselines and arch not in dense_seen:
            dense_seen.add(arch)
            models.append(
                BenchModel(
                    "dense",
                    arch,
                    arch,
                    "dense",
                    _dense_builder(dense_cfg, seed, blocks, restore),
                    flops=f_dense,
                    params=model_params(dense_cfg),
                    **common,
                )
            )
        if "tome" in baselines and family_of(config).tome_note:
            log(f"{setting}: ToMe n/a ({family_of(config).tome_note})")
        elif "tome" in baselines:
            enc = _encoder(dense_cfg, blocks)  # ToMe's r is matched on what runs (no head with features)
            extra = head_flops(enc) if blocks else 0
            if tome_r == "auto":
                try:
                    r = choose_r(enc, f_cait + extra)
                except ValueError as e:
                    raise CaitError(f"{path}: {e}") from None
            else:
                r = int(tome_r)
            if blocks and not isinstance(r, int):
                r = list(r) + [0] * (dense_cfg.depth - len(r))
            f_tome = tome_flops(enc, r if isinstance(r, int) else r[: enc.depth])["total"] - extra
            how = "constant r" if isinstance(r, int) else "schedule: r+1 in the first blocks, r after"
            log(
                f"{setting}: ToMe {describe_r(r)} ({how}) {f_tome / 1e9:.3f} GFLOPs/img vs CAIT "
                f"{f_cait / 1e9:.3f} ({100 * (f_tome / f_cait - 1):+.2f}%)"
            )
            detail = f"ToMe {describe_r(r)}" + (" unmerged" if blocks else "")
            models.append(
                BenchModel(
                    "tome",
                    setting,
                    arch,
                    detail,
                    _tome_builder(dense_cfg, r, seed, blocks),
                    flops=f_tome,
                    params=model_params(dense_cfg),
                    **common,
                )
            )
    return models


def add_speedups(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Fill speedup_vs_dense / speedup_vs_tome (p50 ratio, > 1 = faster) among records of the same backend,
    batch, dtype and device: dense by architecture, ToMe by CAIT setting (for a dense row: the ToMe of its
    architecture when there is exactly one)."""

    def key(r):
        return (r["backend"], r["batch"], r["dtype"], r["device"])

    ok = [r for r in records if r["status"] == "ok"]
    dense = {(key(r), r["arch"]): r for r in ok if r["model"] == "dense"}
    tome_by_setting = {(key(r), r["setting"]): r for r in ok if r["model"] == "tome"}
    tome_by_arch: dict[tuple, list] = {}
    for r in ok:
        if r["model"] == "tome":
            tome_by_arch.setdefault((key(r), r["arch"]), []).append(r)
    for r in ok:
        d = dense.get((key(r), r["arch"]))
        r["speedup_vs_dense"] = d["latency_ms_p50"] / r["latency_ms_p50"] if d else None
        if r["model"] == "dense":
            cands = tome_by_arch.get((key(r), r["arch"]), [])
            t = cands[0] if len(cands) == 1 else None
        else:
            t = tome_by_setting.get((key(r), r["setting"]))
        r["speedup_vs_tome"] = t["latency_ms_p50"] / r["latency_ms_p50"] if t else None
    return records


def resolve_device(device: str | None) -> str:
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise OptionError("device", f"{device!r}: auto, cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise OptionError("device", "cuda: no CUDA GPU is visible to PyTorch")
    return device


def run_bench(
    model_path: str | os.PathLike | Sequence[str | os.PathLike],
    batches: Sequence[int] = (256,),
    backends: Sequence[str] = ("torch",),
    dtype: str | Sequence[str] = "fp32",
    baselines: Sequence[str] = BASELINES,
    tome_r: str | int = "auto",
    device: str | None = "auto",
    timing: Timing | None = None,
    threads: int | None = None,
    work_dir: str | os.PathLike | None = None,
    compile_mode: str | None = None,
    seed: int = 0,
    progress: bool = True,
    log: Callable[[str], None] = print,
    img_size=None,
    features=None,
    restore: str = "repeat",
) -> list[dict[str, Any]]:
    """Benchmark fused model(s) against their dense architecture and ToMe; one flat record per
    (model, backend, batch). See runners.py for timing, memory and record keys."""
    paths = [model_path] if isinstance(model_path, (str, os.PathLike)) else list(model_path)
    if not paths:
        raise CaitError("no model given")
    backends = parse_backends(backends)
    baselines = parse_baselines(baselines)
    batches = parse_batches(batches)
    tome_r = parse_tome_r(tome_r)
    dtypes = parse_dtypes(dtype)
    if threads is not None:
        if threads < 1:
            raise OptionError("threads", f"{threads}: must be at least 1")
        torch.set_num_threads(threads)
    opts = RunOptions(
        device=resolve_device(device),
        dtype=dtypes[0],
        timing=timing or Timing(),
        threads=threads,
        work_dir=Path(work_dir) if work_dir else None,
        compile_mode=compile_mode,
        seed=seed,
    )
    from caitdeploy.families.vit.config import size_and_restore

    img_size = size_and_restore(img_size, restore)
    models = build_models(
        paths,
        baselines,
        tome_r,
        seed=seed,
        log=log,
        max_batch=max(batches),
        img_size=img_size,
        features=features,
        restore=restore,
    )
    if "fp16" in dtypes and opts.device == "cpu":
        if "fp32" in dtypes:
            dtypes.remove("fp16")
            log("fp16 on CPU runs fp32, which is already asked for: fp16 dropped")
        else:
            log("fp16 on CPU: running fp32 instead (see each record's note)")
    jobs = [
        (dataclasses.replace(opts, dtype=d), backend, batch, m)
        for d in dtypes
        for backend in backends
        for batch in batches
        for m in models
    ]
    ctx = new_context(opts)
    records: list[dict[str, Any]] = []
    bar = None
    if progress:
        from tqdm import tqdm

        # disable=None: no bar when stderr is not a terminal (a log, a pipe, CI)
        bar = tqdm(total=len(jobs), unit="run", dynamic_ncols=True, leave=False, disable=None)
    try:
        for o, backend, batch, m in jobs:
            what = f"{m.kind}/{backend}" + (f"/{o.dtype}" if len(dtypes) > 1 else "") + f"/b{batch}"
            if bar is not None:
                bar.set_description(what)
            rec = run_one(m, backend, batch, o, ctx)
            records.append(rec)
            if bar is not None:
                bar.update(1)
                if rec["status"] == "ok":
                    bar.set_postfix_str(f"{what}: {rec['throughput_img_s']:.1f} img/s")
    finally:
        if bar is not None:
            bar.close()
        close_context(ctx)
    return add_speedups(records)
