"""Independent reference for SiT (Self-slimmed ViT, ECCV 2022) and its dense LV-ViT teachers.

Written from ``docs/formats/sit.md`` (which describes ``Sense-X/SiT`` @ f5778084, ``models/lvvit.py``), not
from upstream code. It gives tests three things:

* the released hyperparameters (:data:`SIT_VARIANTS`, :data:`LVVIT_VARIANTS`) and resolved specs
  (:func:`sit_spec`, :func:`lvvit_spec`; overrides build small models of the same layout);
* random state dicts with exactly the upstream key names, order and shapes, training-only keys included
  (:func:`sit_state_dict`, :func:`lvvit_state_dict`, :func:`state_dict_layout`);
* a float64 functional forward returning the logits upstream's eval forward puts first in its output tuple
  (:func:`sit_forward`, :func:`lvvit_forward`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

Spec = dict[str, Any]

# Shared by every variant (upstream defaults, never overridden by the released models or scripts).
_COMMON: Spec = {
    "patch_size": 16,  # only enters num_patches; the conv stem always downsamples by 16
    "in_chans": 3,
    "qkv_bias": False,
    "ln_eps": 1e-5,  # nn.LayerNorm default, everywhere (blocks, final norm, TSM, RTSM)
    "bn_eps": 1e-5,  # nn.BatchNorm2d default, stem
    "keeping_ratio": 0.5,  # main.py never passes another value
    "tsm_ratio": 0.5,  # TSM hidden width = int(embed_dim * 0.5)
    "rtsm_ratio": 4.0,  # training-only reverse TSM hidden ratio
    "num_classes": 1000,
}

SIT_VARIANTS: dict[str, Spec] = {
    "t": {
        **_COMMON,
        "upstream": "sit_lvvit_tiny",
        "teacher": "t",
        "img_size": 224,
        "embed_dim": 320,
        "depth": 14,
        "num_heads": 5,
        "mlp_ratio": 3.0,
        "skip_lam": 2.0,
        "stem": "4c",
        "stage_blocks": (1, 1, 1, 11),
    },
    "xs": {
        **_COMMON,
        "upstream": "sit_lvvit_xsmall",
        "teacher": "s",
        "img_size": 224,
        "embed_dim": 384,
        "depth": 16,
        "num_heads": 6,
        "mlp_ratio": 3.0,
        "skip_lam": 2.0,
        "stem": "4c",
        "stage_blocks": (1, 1, 1, 13),
    },
    "s": {
        **_COMMON,
        "upstream": "sit_lvvit_small",
        "teacher": "s",
        "img_size": 224,
        "embed_dim": 384,
        "depth": 16,
        "num_heads": 6,
        "mlp_ratio": 3.0,
        "skip_lam": 2.0,
        "stem": "4c",
        "stage_blocks": (9, 3, 2, 2),
    },
    "m": {
        **_COMMON,
        "upstream": "sit_lvvit_medium",
        "teacher": "m",
        "img_size": 224,
        "embed_dim": 512,
        "depth": 20,
        "num_heads": 8,
        "mlp_ratio": 3.0,
        "skip_lam": 2.0,
        "stem": "4c",
        "stage_blocks": (10, 4, 3, 3),
    },
    "l": {
        **_COMMON,
        "upstream": "sit_lvvit_large",
        "teacher": "l",
        "img_size": 288,
        "embed_dim": 768,
        "depth": 24,
        "num_heads": 12,
        "mlp_ratio": 3.0,
        "skip_lam": 3.0,
        "stem": "6c",
        "stage_blocks": (10, 4, 3, 7),
    },
}

# Dense teachers: the same LVViT class built with distillation_type=None (no tsm/rtsm keys, no slimming).
# LV-ViT-S is the dense form of both sit_lvvit_xsmall and sit_lvvit_small.
LVVIT_VARIANTS: dict[str, Spec] = {
    name: {
        k: v
        for k, v in SIT_VARIANTS[sit].items()
        if k not in ("teacher", "stage_blocks", "keeping_ratio", "tsm_ratio", "rtsm_ratio")
    }
    for name, sit in (("t", "t"), ("s", "s"), ("m", "m"), ("l", "l"))
}

# conv k3/p1, no bias, each followed by BN; GELU (erf) after every BN except the last.
# Entries: (out-channel divisor of embed_dim, stride); input of the first is in_chans.
_STEMS: dict[str, tuple[tuple[int, int], ...]] = {
    "4c": ((8, 2), (4, 2), (2, 2), (1, 2)),
    "6c": ((8, 2), (8, 1), (8, 1), (4, 2), (2, 2), (1, 2)),
}


def _resolve(base: Spec, overrides: dict[str, Any], slimmed: bool) -> Spec:
    unknown = set(overrides) - set(base)
    if unknown:
        raise ValueError(f"unknown overrides {sorted(unknown)}")
    spec = {**base, **overrides}
    if slimmed:
        blocks = tuple(int(b) for b in spec["stage_blocks"])
        if "stage_blocks" in overrides and "depth" not in overrides:
            spec["depth"] = sum(blocks)
        if sum(blocks) != spec["depth"] or min(blocks) < 1:
            raise ValueError(f"stage_blocks {blocks} must be >= 1 each and sum to depth {spec['depth']}")
        spec["stage_blocks"] = blocks
    d, h = spec["embed_dim"], spec["num_heads"]
    if spec["patch_size"] != 16 or spec["img_size"] % 16:
        raise ValueError("the conv stem downsamples by exactly 16: patch_size must be 16, img_size a multiple of 16")
    if d % 8 or d % h:
        raise ValueError("embed_dim must be divisible by 8 (stem) and by num_heads")
    grid = spec["img_size"] // 16
    spec.update(grid=grid, num_patches=grid * grid, head_dim=d // h, mlp_hidden=int(d * spec["mlp_ratio"]))
    stem, cin = [], spec["in_chans"]
    for i, (div, stride) in enumerate(_STEMS[spec["stem"]]):
        stem.append((cin, d // div, stride, i < len(_STEMS[spec["stem"]]) - 1))  # (in, out, stride, gelu after)
        cin = d // div
    spec["stem_layers"] = tuple(stem)
    if slimmed:
        n, blocks = spec["num_patches"], spec["stage_blocks"]
        keep = tuple(int(n * spec["keeping_ratio"] ** i) for i in range(len(blocks)))  # tokens per stage
        spec["keep"] = keep
        spec["slim_after"] = tuple(sum(blocks[:i]) for i in range(1, len(blocks)))  # 1-based block counts
        spec["tsm_hidden"] = int(d * spec["tsm_ratio"])
        per_layer = [k for k, b in zip(keep, blocks) for _ in range(b)] + [keep[-1]] * blocks[-1]
        # training-only ReverseTSM after block i (0-based) whenever fewer than num_patches tokens leave it
        spec["rtsm"] = tuple((i, per_layer[i + 1]) for i in range(spec["depth"]) if per_layer[i + 1] < n)
    return spec


def sit_spec(variant: str, **overrides: Any) -> Spec:
    """Resolved SiT hyperparameters (variant table plus overrides plus derived sizes).

    Overridable: any key of :data:`SIT_VARIANTS` (e.g. ``img_size``, ``embed_dim``, ``num_heads``,
    ``stage_blocks`` -- which sets the slim positions and, unless given, ``depth`` -- ``num_classes``).
    Derived: ``grid``, ``num_patches``, ``head_dim``, ``mlp_hidden``, ``stem_layers``, ``keep`` (patch tokens
    per stage), ``slim_after`` (a TSM runs right after this many blocks), ``tsm_hidden``, ``rtsm``.
    """
    return _resolve(SIT_VARIANTS[variant], overrides, slimmed=True)


def lvvit_spec(variant: str, **overrides: Any) -> Spec:
    """Resolved hyperparameters of a dense LV-ViT teacher (``t``, ``s``, ``m``, ``l``)."""
    return _resolve(LVVIT_VARIANTS[variant], overrides, slimmed=False)


def state_dict_layout(spec: Spec) -> dict[str, tuple[tuple[int, ...], str]]:
    """Every upstream state-dict key in upstream order -> (shape, role).

    role: ``eval`` (read by the eval forward), ``train`` (ReverseTSM, only used in training mode) or
    ``unused`` (``aux_head.*`` and BN ``num_batches_tracked``: present, never read at eval).
    """
    d, c, n = spec["embed_dim"], spec["num_classes"], spec["num_patches"]
    out: dict[str, tuple[tuple[int, ...], str]] = {
        "cls_token": ((1, 1, d), "eval"),
        "pos_embed": ((1, n + 1, d), "eval"),
    }

    def linear(p: str, o: int, i: int, role: str = "eval", bias: bool = True) -> None:
        out[f"{p}.weight"] = ((o, i), role)
        if bias:
            out[f"{p}.bias"] = ((o,), role)

    def norm(p: str, role: str = "eval") -> None:
        out[f"{p}.weight"] = ((d,), role)
        out[f"{p}.bias"] = ((d,), role)

    for j, (cin, cout, _, _) in enumerate(spec["stem_layers"], 1):
        out[f"patch_embed.conv{j}.weight"] = ((cout, cin, 3, 3), "eval")
        for s in ("weight", "bias", "running_mean", "running_var"):
            out[f"patch_embed.bn{j}.{s}"] = ((cout,), "eval")
        out[f"patch_embed.bn{j}.num_batches_tracked"] = ((), "unused")
    for i in range(spec["depth"]):
        p = f"blocks.{i}"
        norm(f"{p}.norm1")
        linear(f"{p}.attn.qkv", 3 * d, d, bias=spec["qkv_bias"])
        linear(f"{p}.attn.proj", d, d)
        norm(f"{p}.norm2")
        linear(f"{p}.mlp.fc1", spec["mlp_hidden"], d)
        linear(f"{p}.mlp.fc2", d, spec["mlp_hidden"])
    norm("norm")
    linear("head", c, d)
    linear("aux_head", c, d, role="unused")
    if "keep" in spec:
        r = spec["rtsm_ratio"]
        for i, kept in spec["rtsm"]:
            p = f"rtsm.{i}"
            norm(f"{p}.norm1", "train")
            linear(f"{p}.mlp1.fc1", int(n * r), kept, "train")
            linear(f"{p}.mlp1.fc2", n, int(n * r), "train")
            norm(f"{p}.norm2", "train")
            linear(f"{p}.mlp2.fc1", int(d * r), d, "train")
            linear(f"{p}.mlp2.fc2", d, int(d * r), "train")
        for j, m in enumerate(spec["keep"][1:]):
            out[f"tsm.{j}.scale"] = ((1, 1, 1), "eval")
            norm(f"tsm.{j}.weight.0")
            linear(f"tsm.{j}.weight.1", spec["tsm_hidden"], d)
            linear(f"tsm.{j}.weight.3", m, spec["tsm_hidden"])
    return out


def _random_state_dict(spec: Spec, seed: int) -> dict[str, torch.Tensor]:
    """float32 random weights scaled so activations stay O(1); BN/LN/scale values far from identity."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for key, (shape, _) in state_dict_layout(spec).items():
        leaf = key.rsplit(".", 1)[-1]
        if leaf == "num_batches_tracked":
            sd[key] = torch.tensor(12345, dtype=torch.int64)
            continue
        if key.endswith("scale"):  # TSM temperature: positive, far from 1
            t = 2.0 + 2.0 * torch.rand(shape, generator=g)
        elif leaf == "running_var":
            t = 0.5 + 1.5 * torch.rand(shape, generator=g)
        elif leaf == "running_mean":
            t = 0.3 * torch.randn(shape, generator=g)
        elif leaf == "weight" and len(shape) == 1:  # LN / BN affine
            t = 1.0 + 0.3 * torch.randn(shape, generator=g)
        elif leaf == "weight":  # linear / conv: fan-in scaled
            t = torch.randn(shape, generator=g) / math.sqrt(math.prod(shape[1:]))
        elif leaf == "bias":
            t = 0.1 * torch.randn(shape, generator=g)
        else:  # cls_token, pos_embed
            t = 0.5 * torch.randn(shape, generator=g)
        sd[key] = t.float()
    return sd


def sit_state_dict(
    variant: str, *, num_classes: int = 1000, seed: int = 0, **overrides: Any
) -> dict[str, torch.Tensor]:
    """Random SiT weights with exactly the released key names/shapes (``tsm``, ``rtsm``, ``aux_head`` included)."""
    return _random_state_dict(sit_spec(variant, num_classes=num_classes, **overrides), seed)


def lvvit_state_dict(
    variant: str, *, num_classes: int = 1000, seed: int = 0, **overrides: Any
) -> dict[str, torch.Tensor]:
    """Random dense LV-ViT teacher weights with exactly the upstream key names/shapes."""
    return _random_state_dict(lvvit_spec(variant, num_classes=num_classes, **overrides), seed)


# ----------------------------------------------------------------------------------------------- forward


def _stem(sd: dict[str, torch.Tensor], spec: Spec, x: torch.Tensor) -> torch.Tensor:
    """Conv/BN(eval)/GELU stem -> row-major patch tokens [B, grid*grid, D]."""
    for j, (_, _, stride, gelu) in enumerate(spec["stem_layers"], 1):
        x = F.conv2d(x, sd[f"patch_embed.conv{j}.weight"], stride=stride, padding=1)
        bn = f"patch_embed.bn{j}."
        inv = (sd[bn + "running_var"] + spec["bn_eps"]).rsqrt()
        x = (x - sd[bn + "running_mean"][:, None, None]) * (inv * sd[bn + "weight"])[:, None, None] + sd[bn + "bias"][
            :, None, None
        ]
        if gelu:
            x = F.gelu(x)
    return x.flatten(2).transpose(1, 2)


def _ln(sd: dict[str, torch.Tensor], p: str, x: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], eps)


def _block(sd: dict[str, torch.Tensor], spec: Spec, i: int, x: torch.Tensor) -> torch.Tensor:
    """Pre-LN block; both residual branches are divided by skip_lam."""
    p, eps, lam = f"blocks.{i}", spec["ln_eps"], spec["skip_lam"]
    b, n, d = x.shape
    h, hd = spec["num_heads"], spec["head_dim"]
    y = F.linear(_ln(sd, p + ".norm1", x, eps), sd[p + ".attn.qkv.weight"], sd.get(p + ".attn.qkv.bias"))
    q, k, v = y.reshape(b, n, 3, h, hd).permute(2, 0, 3, 1, 4)  # each [B, H, N, hd]
    attn = torch.softmax(q @ k.transpose(-2, -1) * hd**-0.5, dim=-1)
    y = (attn @ v).transpose(1, 2).reshape(b, n, d)
    x = x + F.linear(y, sd[p + ".attn.proj.weight"], sd[p + ".attn.proj.bias"]) / lam
    y = F.gelu(F.linear(_ln(sd, p + ".norm2", x, eps), sd[p + ".mlp.fc1.weight"], sd[p + ".mlp.fc1.bias"]))
    return x + F.linear(y, sd[p + ".mlp.fc2.weight"], sd[p + ".mlp.fc2.bias"]) / lam


def _tsm(sd: dict[str, torch.Tensor], spec: Spec, j: int, tokens: torch.Tensor) -> torch.Tensor:
    """Token Slimming Module j: [B, N, D] patch tokens -> [B, M, D], M = keep[j+1].

    logits = Linear2(GELU(Linear1(LN(tokens))))  [B, N, M]; weights = softmax(logits * scale) over N;
    new token m = sum_n weights[b, n, m] * tokens[b, n].
    """
    p = f"tsm.{j}.weight"
    y = F.gelu(F.linear(_ln(sd, p + ".0", tokens, spec["ln_eps"]), sd[p + ".1.weight"], sd[p + ".1.bias"]))
    y = F.linear(y, sd[p + ".3.weight"], sd[p + ".3.bias"])
    w = torch.softmax(y * sd[f"tsm.{j}.scale"], dim=1)
    return w.transpose(1, 2) @ tokens


def _encode(sd: dict[str, torch.Tensor], spec: Spec, images: torch.Tensor) -> torch.Tensor:
    """Final-normed tokens [B, 1 + tokens left, D] (float64); sd must already be float64."""
    x = _stem(sd, spec, images.double())
    cls = sd["cls_token"].expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], dim=1) + sd["pos_embed"]
    slim_after = spec.get("slim_after", ())
    for i in range(spec["depth"]):
        x = _block(sd, spec, i, x)
        if i + 1 in slim_after:  # class token bypasses the TSM
            x = torch.cat([x[:, :1], _tsm(sd, spec, slim_after.index(i + 1), x[:, 1:])], dim=1)
    return _ln(sd, "norm", x, spec["ln_eps"])


def _f64(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.double() for k, v in state_dict.items() if v.is_floating_point()}


def sit_forward(state_dict: dict[str, torch.Tensor], spec: Spec, images: torch.Tensor) -> torch.Tensor:
    """float64 logits [B, num_classes] = element 0 of upstream's eval output (aux_head and rtsm unused)."""
    sd = _f64(state_dict)
    return F.linear(_encode(sd, spec, images)[:, 0], sd["head.weight"], sd["head.bias"])


def lvvit_forward(
    state_dict: dict[str, torch.Tensor], spec: Spec, images: torch.Tensor, *, token_label_aux: bool = False
) -> torch.Tensor:
    """float64 logits of a dense LV-ViT teacher as Sense-X/SiT evaluates it (``head`` on the class token only).

    ``token_label_aux=True`` instead adds ``0.5 * max over patch tokens of aux_head(norm(x))`` -- the eval
    convention of the original TokenLabeling ``LV_ViT`` with ``return_dense``; SiT itself never does this.
    """
    sd = _f64(state_dict)
    x = _encode(sd, spec, images)
    logits = F.linear(x[:, 0], sd["head.weight"], sd["head.bias"])
    if token_label_aux:
        logits = logits + 0.5 * F.linear(x[:, 1:], sd["aux_head.weight"], sd["aux_head.bias"]).max(dim=1).values
    return logits
