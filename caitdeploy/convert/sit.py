"""SiT (Sense-X/SiT) and its dense LV-ViT teachers -> family "lvvit" fused models. Format: docs/formats/sit.md.

Folded: each stem BatchNorm into its conv, `skip_lam` into `proj`/`fc2` (the residual branches are divided by
it), each TSM's `scale` into its second Linear (it multiplies the softmax logits). Dropped: `rtsm.*` and
`aux_head.*` (training only). Slim positions are not stored in the file: they follow the variant (`--variant`)
or `--stages` (blocks per token stage).
"""

from __future__ import annotations

import math
import re
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from caitdeploy.core.errors import CaitError, OptionError
from caitdeploy.families import lvvit as L
from caitdeploy.families.vit.config import CaitConfig, ConfigError

TRAINING_ONLY = re.compile(r"(rtsm\..*|aux_head\.(weight|bias))")
HEAD_DIM = 64  # every release: embed_dim / num_heads


def _sizes(path: Path, sd: dict[str, torch.Tensor]) -> dict:
    """Sizes read from the keys: width, depth, stem, image size, classes, TSM output tokens."""

    def get(k, ndim):
        if k not in sd or sd[k].dim() != ndim:
            raise CaitError(f"{path}: missing key {k!r} or wrong rank (an LV-ViT/SiT checkpoint has it)")
        return sd[k]

    d = get("cls_token", 3).shape[-1]
    n = get("pos_embed", 3).shape[1] - 1
    g = math.isqrt(max(n, 0))
    if n < 1 or g * g != n:
        raise CaitError(f"{path}: pos_embed has {n} patch positions, not a square grid")
    convs = sum(1 for k in sd if re.fullmatch(r"patch_embed\.conv\d+\.weight", k))
    stem = {4: "4c", 6: "6c"}.get(convs)
    if stem is None:
        raise CaitError(f"{path}: the stem has {convs} convolutions; LV-ViT's have 4 or 6")
    depth = 1 + max((int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d{1,4})\.", k))), default=-1)
    tsm = sorted({int(m.group(1)) for k in sd if (m := re.match(r"tsm\.(\d{1,3})\.", k))})
    if tsm != list(range(len(tsm))):
        raise CaitError(f"{path}: tsm indices {tsm} are not 0..{len(tsm) - 1}")
    keep = [get(f"tsm.{j}.weight.3.weight", 2).shape[0] for j in tsm]
    return {
        "embed_dim": d,
        "grid": g,
        "img_size": 16 * g,
        "stem": stem,
        "depth": depth,
        "keep": keep,
        "num_classes": get("head.weight", 2).shape[0],
        "mlp_hidden": get("blocks.0.mlp.fc1.weight", 2).shape[0],
    }


def _choose(path: Path, s: dict, source: str, variant, stages, num_heads) -> tuple[tuple[int, ...] | None, int, float]:
    """(stages or None for a teacher, num_heads, skip_lam) from --variant / --stages / --num-heads, checked."""
    if variant is not None:
        if variant not in L.VARIANTS:
            raise OptionError("variant", f"must be one of {', '.join(L.VARIANTS)}, got {variant!r}")
        v = L.VARIANTS[variant]
        if source == "lvvit" and variant not in L.TEACHERS:
            raise OptionError(
                "variant", f"{variant!r} is a SiT student size; LV-ViT teachers are {', '.join(L.TEACHERS)}"
            )
        got = (s["embed_dim"], s["depth"], s["stem"])
        want = (v["embed_dim"], v["depth"], v["stem"])
        if got != want:
            match = [n for n, w in L.VARIANTS.items() if (w["embed_dim"], w["depth"], w["stem"]) == got]
            hint = f" (it matches --variant {' or '.join(match)})" if match else ""
            raise CaitError(
                f"{path}: has embed_dim {got[0]}, depth {got[1]}, stem {got[2]}, but --variant "
                f"{variant} is {want[0]}/{want[1]}/{want[2]}{hint}"
            )
        st = tuple(v["stages"]) if source == "sit" else None
        if stages is not None and st is not None and tuple(stages) != st:
            raise OptionError(
                "stages", f"{','.join(map(str, stages))} disagrees with --variant {variant} ({','.join(map(str, st))})"
            )
        heads, lam = v["num_heads"], v["skip_lam"]
    else:
        if source == "sit" and stages is None:
            raise OptionError(
                "variant",
                "a SiT file does not store where it slims tokens: give --variant "
                f"({'|'.join(L.VARIANTS)}) or --stages (blocks per token stage, e.g. 9,3,2,2)",
            )
        st = tuple(stages) if stages is not None and source == "sit" else None
        heads = num_heads or max(1, s["embed_dim"] // HEAD_DIM)
        lam = 2.0 if s["stem"] == "4c" else 3.0
    if num_heads is not None:
        heads = num_heads
    if st is not None:
        if sum(st) != s["depth"] or min(st) < 1:
            raise OptionError(
                "stages", f"{','.join(map(str, st))} must be >= 1 each and sum to the checkpoint's depth {s['depth']}"
            )
        if len(st) - 1 != len(s["keep"]):
            raise CaitError(
                f"{path}: has {len(s['keep'])} token slimming modules, the stages "
                f"{','.join(map(str, st))} need {len(st) - 1}"
            )
    if s["embed_dim"] % heads:
        raise OptionError("num_heads", f"{heads} does not divide embed_dim {s['embed_dim']}")
    return st, heads, lam


def convert(path: Path, sd: dict[str, torch.Tensor], source: str, variant, stages, num_heads):
    """(config, deploy tensors, float64 reference forward, notes)."""
    s = _sizes(path, sd)
    if source == "lvvit" and s["keep"]:
        raise CaitError(f"{path}: has token slimming modules: use --from sit")
    st, heads, lam = _choose(path, s, source, variant, stages, num_heads)
    d = s["embed_dim"]
    try:
        cfg = CaitConfig.dense(
            img_size=s["img_size"],
            patch_size=16,
            num_classes=s["num_classes"],
            embed_dim=d,
            depth=s["depth"],
            num_heads=heads,
            mlp_ratio=s["mlp_hidden"] / d,
            qkv_bias=False,
            ln_eps=1e-5,
            family="lvvit",
            stem=s["stem"],
        )
        if st is not None:
            plan = L.slim_plan(s["grid"] ** 2, st)
            if [plan[k] for k in sorted(plan)] != s["keep"]:
                raise CaitError(
                    f"{path}: its token slimming modules keep {s['keep']} tokens, stages "
                    f"{','.join(map(str, st))} at {s['img_size']}px keep {[plan[k] for k in sorted(plan)]}"
                )
            source_cfg = {
                **{
                    k: getattr(cfg, k)
                    for k in (
                        "img_size",
                        "patch_size",
                        "in_chans",
                        "num_classes",
                        "embed_dim",
                        "qkv_bias",
                        "ln_eps",
                        "family",
                        "stem",
                    )
                },
                "depth": cfg.depth,
                "num_heads": heads,
                "mlp_ratio": s["mlp_hidden"] / d,
                "merges": {},
            }
            cfg = replace(
                cfg, blocks=tuple(replace(b, slim=plan.get(i)) for i, b in enumerate(cfg.blocks)), source=source_cfg
            )
    except ConfigError as e:
        raise CaitError(f"{path}: {e}") from None
    required = {
        "cls_token": (1, 1, d),
        "pos_embed": (1, 1 + s["grid"] ** 2, d),
        **L.stem_shapes(cfg),
        "norm.weight": (d,),
        "norm.bias": (d,),
        "head.weight": (cfg.num_classes, d),
        "head.bias": (cfg.num_classes,),
    }
    f = s["mlp_hidden"]
    for i in range(cfg.depth):
        b = f"blocks.{i}."
        required.update(
            {
                b + "norm1.weight": (d,),
                b + "norm1.bias": (d,),
                b + "attn.qkv.weight": (3 * d, d),
                b + "attn.proj.weight": (d, d),
                b + "attn.proj.bias": (d,),
                b + "norm2.weight": (d,),
                b + "norm2.bias": (d,),
                b + "mlp.fc1.weight": (f, d),
                b + "mlp.fc1.bias": (f,),
                b + "mlp.fc2.weight": (d, f),
                b + "mlp.fc2.bias": (d,),
            }
        )
    t = int(d * L.TSM_RATIO)
    for j, m in enumerate(s["keep"]):
        p = f"tsm.{j}."
        required.update(
            {
                p + "scale": (1, 1, 1),
                p + "weight.0.weight": (d,),
                p + "weight.0.bias": (d,),
                p + "weight.1.weight": (t, d),
                p + "weight.1.bias": (t,),
                p + "weight.3.weight": (m, t),
                p + "weight.3.bias": (m,),
            }
        )
    from caitdeploy.convert.common import check_layout

    check_layout(path, sd, required, TRAINING_ONLY, f"{'SiT' if st else 'LV-ViT'} layout")

    out = dict(L.fuse_stem(cfg, sd.__getitem__))
    for k in ("cls_token", "pos_embed", "norm.weight", "norm.bias", "head.weight", "head.bias"):
        out[k] = sd[k]
    for i in range(cfg.depth):
        b = f"blocks.{i}."
        for k in (
            "norm1.weight",
            "norm1.bias",
            "norm2.weight",
            "norm2.bias",
            "attn.qkv.weight",
            "mlp.fc1.weight",
            "mlp.fc1.bias",
        ):
            out[b + k] = sd[b + k]
        for layer in ("attn.proj", "mlp.fc2"):  # residual branch / skip_lam
            out[b + layer + ".weight"] = sd[b + layer + ".weight"] / lam
            out[b + layer + ".bias"] = sd[b + layer + ".bias"] / lam
    positions = sorted(i for i, blk in enumerate(cfg.blocks) if blk.slim is not None)
    for j, i in enumerate(positions):
        p, q = f"tsm.{j}.", f"blocks.{i}.slim."
        scale = sd[p + "scale"].reshape(())
        out.update(
            {
                q + "norm.weight": sd[p + "weight.0.weight"],
                q + "norm.bias": sd[p + "weight.0.bias"],
                q + "fc1.weight": sd[p + "weight.1.weight"],
                q + "fc1.bias": sd[p + "weight.1.bias"],
                q + "fc2.weight": sd[p + "weight.3.weight"] * scale,
                q + "fc2.bias": sd[p + "weight.3.bias"] * scale,
            }
        )
    tensors = {k: v.float().contiguous() for k, v in out.items()}
    dropped = sorted({k.split(".")[0] for k in sd if TRAINING_ONLY.fullmatch(k)})
    notes = [f"dropped training-only {', '.join(x + '.*' for x in dropped)}"] if dropped else []
    notes.append(f"folded: stem BatchNorm, skip_lam {lam:g}" + (", TSM scale" if positions else ""))
    return cfg, tensors, lambda x: reference(sd, cfg, heads, lam, st, x), notes


def reference(sd: dict[str, torch.Tensor], cfg: CaitConfig, heads: int, lam: float, stages, images: torch.Tensor):
    """The upstream eval forward written literally from docs/formats/sit.md, float64, nothing folded."""

    def w(k):
        return sd[k].double()

    d = cfg.embed_dim
    hd = d // heads
    eps = 1e-5
    x = L.reference_stem(cfg, w, images)
    x = torch.cat([w("cls_token").expand(x.shape[0], -1, -1), x], dim=1) + w("pos_embed")
    slim_after = [sum(stages[:s]) for s in range(1, len(stages))] if stages else []
    for i in range(cfg.depth):
        b = f"blocks.{i}."
        bsz, n, _ = x.shape
        y = F.layer_norm(x, (d,), w(b + "norm1.weight"), w(b + "norm1.bias"), eps)
        q, k, v = (y @ w(b + "attn.qkv.weight").T).reshape(bsz, n, 3, heads, hd).permute(2, 0, 3, 1, 4)
        a = ((q @ k.transpose(-2, -1)) * hd**-0.5).softmax(-1)
        y = (a @ v).transpose(1, 2).reshape(bsz, n, d) @ w(b + "attn.proj.weight").T + w(b + "attn.proj.bias")
        x = x + y / lam
        y = F.layer_norm(x, (d,), w(b + "norm2.weight"), w(b + "norm2.bias"), eps)
        y = F.gelu(y @ w(b + "mlp.fc1.weight").T + w(b + "mlp.fc1.bias"))
        x = x + (y @ w(b + "mlp.fc2.weight").T + w(b + "mlp.fc2.bias")) / lam
        if i + 1 in slim_after:  # TSM after this block: softmax over the input tokens, logits times `scale`
            j = slim_after.index(i + 1)
            p = f"tsm.{j}.weight."
            patches = x[:, 1:]
            t = F.layer_norm(patches, (d,), w(p + "0.weight"), w(p + "0.bias"), eps)
            t = F.gelu(t @ w(p + "1.weight").T + w(p + "1.bias")) @ w(p + "3.weight").T + w(p + "3.bias")
            weights = (t * w(f"tsm.{j}.scale")).softmax(dim=1)  # [B, N_in, M]
            x = torch.cat([x[:, :1], weights.transpose(1, 2) @ patches], dim=1)
    x = F.layer_norm(x, (d,), w("norm.weight"), w("norm.bias"), eps)
    return x[:, 0] @ w("head.weight").T + w("head.bias")
