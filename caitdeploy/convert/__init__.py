"""`caitdeploy convert`: released pruned-ViT checkpoints of other systems -> dense deployable fused models.

One module per source (`sit.py`: SiT and its dense LV-ViT teachers; `spvit.py`: SPViT-DeiT; `dimap.py`: DIMAP's
unstructured-pruned Swin, whole zero rows removed). Each reads the
upstream state dict (untrusted: `weights_only`, every key and shape checked against the layout its docs/
describes), folds what deploys as plain weights (BatchNorm, skip_lam, the TSM scale, SPViT's head mixture),
checks the result against a float64 forward written literally from the upstream format, and writes a
`cait-fused/1` file that export, bench and serve take like any other.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any

import torch

from caitdeploy.convert.common import check_layout, verify  # noqa: F401
from caitdeploy.core.errors import CaitError, OptionError, Staging

SOURCES = ("sit", "lvvit", "spvit", "dimap")


def detect(sd: dict[str, torch.Tensor]) -> str:
    """Which upstream layout a state dict has, from its keys alone."""
    keys = set(sd)
    if any(k.startswith("tsm.") for k in keys):
        return "sit"
    if "patch_embed.conv1.weight" in keys and "patch_embed.bn1.weight" in keys:
        return "lvvit"
    if any(
        re.fullmatch(r"blocks\.\d+\.attn\.(qk\.weight|head_probs|bn_[13]x[13]\.weight|bconv\.0\.weight)", k)
        for k in keys
    ):
        return "spvit"
    if any(re.fullmatch(r"blocks\.\d+\.attn\.[qkv]_compactor\.weight", k) for k in keys):
        return "cait"
    if any(
        re.fullmatch(r"layers\.\d+\.blocks\.\d+\.attn\.(qk\.weight|head_probs|bn_[13]x[13]\.weight)", k) for k in keys
    ):
        return "spvit-swin"
    if any(re.fullmatch(r"layers\.\d+\.blocks\.\d+\.attn\.[qkv]_compactor\.weight", k) for k in keys):
        return "cait-swin"
    if "layers.0.blocks.0.attn.relative_position_bias_table" in keys:
        return "dimap"
    if "blocks.0.attn.qkv.weight" in keys:
        return "vit"
    return "unknown"


NAMES = {
    "sit": "a SiT checkpoint (tsm.* keys)",
    "lvvit": "an LV-ViT checkpoint (conv stem, no tsm.* keys)",
    "spvit": "an SPViT-DeiT checkpoint (attn.qk / head_probs / bn_1x1 / bn_3x3 keys)",
    "cait": "a CAIT checkpoint (compactor keys): use `caitdeploy fuse`",
    "cait-swin": "a CAIT-Swin checkpoint (compactor keys): use `caitdeploy fuse`",
    "spvit-swin": "an SPViT-Swin checkpoint (attn.qk / head_probs / bn_* keys under layers.*): use --from spvit",
    "dimap": "a Swin state dict (a DIMAP checkpoint is one)",
    "vit": "a plain timm ViT checkpoint: use `caitdeploy fuse --arch NAME` or `make-checkpoint --weights`",
    "unknown": "not a checkpoint layout convert knows",
}


def load_upstream(path: Path) -> dict[str, torch.Tensor]:
    """The state dict of an upstream training file (`{"model": ...}`, `{"state_dict": ...}` or bare), safely."""
    from caitdeploy.formats.checkpoint import _strip_prefixes, check_tensors, read_container

    raw = read_container(path)
    sd = raw.get("model", raw.get("state_dict", raw))
    if not isinstance(sd, dict) or not sd:
        raise CaitError(f"{path}: no 'model'/'state_dict' dict of tensors")
    from caitdeploy.families.swin.model import BUFFER_SUFFIXES

    # training-only counters and Swin's index/mask buffers (rebuilt from the config; int64 in upstream files)
    sd = {
        k: v
        for k, v in sd.items()
        if not (isinstance(k, str) and k.endswith((".num_batches_tracked", *BUFFER_SUFFIXES)))
    }
    sd, _ = check_tensors(path, _strip_prefixes(sd))
    return sd


def convert_file(
    path: str | os.PathLike,
    source: str,
    output: str | os.PathLike | None = None,
    *,
    variant: str | None = None,
    stages: tuple[int, ...] | None = None,
    num_heads: int | None = None,
    align: int = 1,
    verify_batch: int = 2,
    staging: Staging | None = None,
    other_outputs: tuple = (),
) -> dict[str, Any]:
    """Convert an upstream checkpoint to a fused file. Options and paths are checked before the file is read;
    the file's layout must be `source`'s (a mislabelled checkpoint names what it is)."""
    from caitdeploy.compress.fuse import torch_counted_flops
    from caitdeploy.core.budgets import MAX_ALIGN, MAX_VERIFY_BATCH, check_memory
    from caitdeploy.core.paths import FUSED_SUFFIXES, Out, check_paths
    from caitdeploy.families import build_model
    from caitdeploy.families.flops import model_flops, model_params
    from caitdeploy.formats.fused import save_fused

    t0 = time.perf_counter()
    path = Path(path)
    if source not in SOURCES:
        raise OptionError("source", f"must be one of {', '.join(SOURCES)}, got {source!r}")
    if isinstance(align, bool) or not isinstance(align, int) or not 1 <= align <= MAX_ALIGN:
        raise OptionError("align", f"must be an integer in 1..{MAX_ALIGN}, got {align!r}")
    if isinstance(verify_batch, bool) or not isinstance(verify_batch, int) or not 0 <= verify_batch <= MAX_VERIFY_BATCH:
        raise OptionError("verify_batch", f"must be an integer in 0..{MAX_VERIFY_BATCH}, got {verify_batch!r}")
    if source in ("spvit", "dimap") and (variant is not None or stages is not None):
        raise OptionError("variant", "SPViT's layout is read from its keys: --variant/--stages are for sit/lvvit")
    if source == "dimap" and num_heads is not None:
        raise OptionError("num_heads", "a Swin state dict tells its heads (relative position tables): leave it out")
    if source != "spvit" and align != 1:
        raise OptionError("align", "zero-pads SPViT's pruned FFN widths: it applies to --from spvit only")
    output = Path(output) if output else path.with_name(path.name.split(".")[0] + ".fused.safetensors")
    check_paths({"CHECKPOINT": path}, [Out(output, "--output", FUSED_SUFFIXES), *other_outputs])
    size = path.stat().st_size
    check_memory(6 * size + (256 << 20), f"{path}: converting a {size}-byte checkpoint")
    sd = load_upstream(path)
    found = detect(sd)
    if found == "spvit-swin" and source == "spvit":
        found = source = "spvit-swin"
    if found != source:
        raise CaitError(
            f"{path}: is {NAMES[found]}, not --from {source}" + (f": use --from {found}" if found in SOURCES else "")
        )
    if source in ("sit", "lvvit"):
        from caitdeploy.convert import sit

        config, tensors, reference, notes = sit.convert(path, sd, source, variant, stages, num_heads)
    elif source == "spvit-swin":
        from caitdeploy.convert import spvit_swin

        config, tensors, reference, notes = spvit_swin.convert(path, sd, num_heads, align)
    elif source == "spvit":
        from caitdeploy.convert import spvit

        config, tensors, reference, notes = spvit.convert(path, sd, num_heads, align)
    else:
        from caitdeploy.convert import dimap

        config, tensors, reference, notes, extra = dimap.convert(path, sd)
    model = build_model(config, attn_impl="math").eval()
    model.load_state_dict(tensors)
    report: dict[str, Any] = {
        "checkpoint": str(path),
        "source": source,
        "variant": variant,
        "family": config.family,
        "notes": notes,
        "flops": model_flops(config)["total"],
        "flops_dense": model_flops(config.unpruned())["total"],
        "params": model_params(config),
        "params_dense": model_params(config.unpruned()),
    }
    report["flops_reduction"] = 1 - report["flops"] / report["flops_dense"]
    if source == "dimap":
        report.update(extra)
    if verify_batch:
        report["verify"] = verify(model, reference, config, verify_batch)
        counted = torch_counted_flops(config)
        if counted != report["flops"]:  # a bug, never a user error
            raise RuntimeError(f"analytic FLOPs {report['flops']} != torch.utils.flop_counter {counted}")
        report["verify"]["torch_flops_per_img"] = counted
    meta = {k: report[k] for k in ("flops", "flops_dense", "params", "params_dense")}
    meta.update(
        source=path.name,
        converted_from=source,
        variant=variant,
        verify=report.get("verify"),
        flops_fused=report["flops"],
    )
    save_fused(output, config, tensors, meta, staging=staging)
    report.update(output=str(output), config=config, seconds=time.perf_counter() - t0)
    return report
