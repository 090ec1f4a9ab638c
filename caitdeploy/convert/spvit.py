"""SPViT-DeiT (ziplab/SPViT, SPViT_DeiT/) -> family "spvit" fused models. Format: docs/formats/spvit.md.

Each block's kind is read from its keys (`attn.qk` -> attention, `attn.bn_3x3` -> 3x3 conv, `attn.bn_1x1` ->
1x1 conv, no `attn.*` -> skipped); FFN widths from `mlp.fc1` (kept physical; `--align N` zero-pads them to a
multiple of N, exactly: zero fc1 rows give GELU(0) = 0 into zero fc2 columns). A conv block's head mixture
P = softmax(head_probs / alpha, over heads) is folded into one Conv2d (D -> d, BatchNorm folded in) and one
Linear (d -> D); attention's `qk` + `v` become one `qkv`.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from caitdeploy.core.errors import CaitError, OptionError
from caitdeploy.families.lvvit import fold_bn
from caitdeploy.families.vit.config import BlockConfig, CaitConfig, ConfigError

ALPHA = 0.01  # upstream's constructor default; never stored in a checkpoint
HEADS_BY_WIDTH = {192: 3, 384: 6, 768: 12}  # DeiT-Ti/S/B (head width 64)
BN = {"conv1": "bn_1x1", "conv3": "bn_3x3"}


def mixer_kind(sd: dict[str, torch.Tensor], p: str, where: str) -> str:
    """The token mixer of the SPViT block whose attention keys start with `p` (".../attn."), from its keys;
    CaitError naming `where` for keys of no known kind."""
    if p + "qk.weight" in sd:
        return "attn"
    if p + "bn_3x3.weight" in sd:
        return "conv3"
    if p + "bn_1x1.weight" in sd:
        return "conv1"
    bad = next((k for k in sd if k.startswith(p)), None)
    if bad is not None:
        raise CaitError(
            f"{where}key {bad!r} is neither attention (attn.qk), a 1x1/3x3 conv (attn.bn_1x1/"
            "bn_3x3) nor a skipped block (no attn.* keys)"
        )
    return "skip"


def block_kind(sd: dict[str, torch.Tensor], i: int) -> str:
    return mixer_kind(sd, f"blocks.{i}.attn.", f"block {i}: ")


def mixed_taps(sd: dict[str, torch.Tensor], p: str, heads: int, alpha: float):
    """SPViT's head mixture P = softmax(head_probs / alpha, over heads) [H, 9] applied to the attention keys under
    `p` (".../attn."), float64: per tap t, V_t = sum_h P[h, t] v_h [9, d, D], c_t likewise for the v bias
    [9, d], Q_t = sum_h P[h, t] proj[:, h] [9, D, d]."""
    vw, vb = sd[p + "v.weight"].double(), sd[p + "v.bias"].double()
    pw = sd[p + "proj.weight"].double()
    dim = vw.shape[1]
    d = dim // heads
    mix = torch.softmax(sd[p + "head_probs"].double() / alpha, dim=0)  # [H, 9]
    return (
        torch.einsum("ht,hdc->tdc", mix, vw.reshape(heads, d, dim)),
        torch.einsum("ht,hd->td", mix, vb.reshape(heads, d)),
        torch.einsum("ht,ohd->tod", mix, pw.reshape(dim, heads, d)),
    )


def conv_weights(sd: dict[str, torch.Tensor], i: int, kind: str, heads: int, alpha: float = ALPHA):
    """(W1 [d, D, k, k], b1 [d], W2 [D, d], b2 [D]) of a conv block before its BatchNorm, float64.

    Taps of the 3x3 window column-major (t = 3 * col + row), from `mixed_taps`. 1x1 uses the centre tap; 3x3
    sums the biases and proj over taps."""
    p = f"blocks.{i}.attn."
    v_taps, b_taps, p_taps = mixed_taps(sd, p, heads, alpha)
    d, dim = v_taps.shape[1:]
    if kind == "conv1":
        return v_taps[4][:, :, None, None], b_taps[4], p_taps[4], sd[p + "proj.bias"].double()
    w1 = v_taps.reshape(3, 3, d, dim).permute(2, 3, 1, 0)  # W1[:, :, row, col]
    return w1, b_taps.sum(0), p_taps.sum(0), sd[p + "proj.bias"].double()


def convert(path: Path, sd: dict[str, torch.Tensor], num_heads, align: int):
    """(config, deploy tensors, float64 reference forward, notes)."""
    from caitdeploy.compress.surgery import round_up
    from caitdeploy.convert.common import check_layout

    if any(k.endswith(".attn.bconv.0.weight") for k in sd):
        raise CaitError(
            f"{path}: a post-training-optimized SPViT file (attn.bconv.*): convert the fine-tuned "
            "checkpoint it came from (its head_probs and BatchNorms are folded here)"
        )
    pw = sd.get("patch_embed.proj.weight")
    if pw is None or pw.dim() != 4 or "cls_token" not in sd or "pos_embed" not in sd or "head.weight" not in sd:
        raise CaitError(
            f"{path}: missing the DeiT stem/token/head keys (patch_embed.proj.weight, cls_token, "
            "pos_embed, head.weight)"
        )
    dim, patch = pw.shape[0], pw.shape[-1]
    n = sd["pos_embed"].shape[1] - 1
    g = math.isqrt(max(n, 0))
    if n < 1 or g * g != n:
        raise CaitError(f"{path}: pos_embed has {n} patch positions, not a square grid")
    depth = 1 + max((int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d{1,4})\.", k))), default=-1)
    try:
        kinds = [block_kind(sd, i) for i in range(depth)]
    except CaitError as e:
        raise CaitError(f"{path}: {e}") from None
    probs = [sd[f"blocks.{i}.attn.head_probs"] for i, k in enumerate(kinds) if k.startswith("conv")]
    heads = num_heads or (probs[0].shape[0] if probs else HEADS_BY_WIDTH.get(dim))
    if heads is None:
        raise OptionError("num_heads", f"cannot be read from a {dim}-wide SPViT without conv blocks: give --num-heads")
    if dim % heads:
        raise OptionError("num_heads", f"{heads} does not divide embed_dim {dim}")
    d = dim // heads
    classes = sd["head.weight"].shape[0]
    widths = []
    for i in range(depth):
        w1 = sd.get(f"blocks.{i}.mlp.fc1.weight")
        if w1 is None or w1.dim() != 2 or w1.shape[1] != dim:
            raise CaitError(f"{path}: key 'blocks.{i}.mlp.fc1.weight' is missing or not [F, {dim}]")
        widths.append(w1.shape[0])
    required = {
        "cls_token": (1, 1, dim),
        "pos_embed": (1, 1 + n, dim),
        "patch_embed.proj.weight": (dim, pw.shape[1], patch, patch),
        "patch_embed.proj.bias": (dim,),
        "norm.weight": (dim,),
        "norm.bias": (dim,),
        "head.weight": (classes, dim),
        "head.bias": (classes,),
    }
    for i, (kind, f) in enumerate(zip(kinds, widths)):
        b = f"blocks.{i}."
        required.update(
            {
                b + "norm1.weight": (dim,),
                b + "norm1.bias": (dim,),
                b + "norm2.weight": (dim,),
                b + "norm2.bias": (dim,),
                b + "mlp.fc1.weight": (f, dim),
                b + "mlp.fc1.bias": (f,),
                b + "mlp.fc2.weight": (dim, f),
                b + "mlp.fc2.bias": (dim,),
            }
        )
        if kind != "skip":
            required.update(
                {
                    b + "attn.v.weight": (dim, dim),
                    b + "attn.v.bias": (dim,),
                    b + "attn.proj.weight": (dim, dim),
                    b + "attn.proj.bias": (dim,),
                }
            )
        if kind == "attn":
            required.update({b + "attn.qk.weight": (2 * dim, dim), b + "attn.qk.bias": (2 * dim,)})
        elif kind != "skip":
            required[b + "attn.head_probs"] = (heads, 9)
            required.update(
                {f"{b}attn.{BN[kind]}.{s}": (d,) for s in ("weight", "bias", "running_mean", "running_var")}
            )
    check_layout(path, sd, required, None, "SPViT-DeiT layout")

    blocks = []
    out = {
        k: sd[k]
        for k in (
            "cls_token",
            "pos_embed",
            "patch_embed.proj.weight",
            "patch_embed.proj.bias",
            "norm.weight",
            "norm.bias",
            "head.weight",
            "head.bias",
        )
    }
    for i, (kind, f) in enumerate(zip(kinds, widths)):
        b = f"blocks.{i}."
        width = round_up(f, align)
        for k in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "mlp.fc2.bias"):
            out[b + k] = sd[b + k]
        pad = width - f
        out[b + "mlp.fc1.weight"] = F.pad(sd[b + "mlp.fc1.weight"], (0, 0, 0, pad))
        out[b + "mlp.fc1.bias"] = F.pad(sd[b + "mlp.fc1.bias"], (0, pad))
        out[b + "mlp.fc2.weight"] = F.pad(sd[b + "mlp.fc2.weight"], (0, pad))
        if kind == "attn":
            out[b + "attn.qkv.weight"] = torch.cat([sd[b + "attn.qk.weight"], sd[b + "attn.v.weight"]])
            out[b + "attn.qkv.bias"] = torch.cat([sd[b + "attn.qk.bias"], sd[b + "attn.v.bias"]])
            out[b + "attn.proj.weight"], out[b + "attn.proj.bias"] = (
                sd[b + "attn.proj.weight"],
                sd[b + "attn.proj.bias"],
            )
        elif kind != "skip":
            w1, b1, w2, b2 = conv_weights(sd, i, kind, heads)
            bn = f"{b}attn.{BN[kind]}."
            gamma, beta, mean, var = (sd[bn + s].double() for s in ("weight", "bias", "running_mean", "running_var"))
            w1, b1 = fold_bn(w1, gamma, beta, mean, var, bias=b1)
            out.update(
                {
                    b + "attn.conv.weight": w1,
                    b + "attn.conv.bias": b1,
                    b + "attn.proj.weight": w2,
                    b + "attn.proj.bias": b2,
                }
            )
        blocks.append(BlockConfig(heads, d, d, width, d**-0.5, None, kind))
    try:
        cfg = CaitConfig(
            img_size=g * patch,
            patch_size=patch,
            in_chans=pw.shape[1],
            num_classes=classes,
            embed_dim=dim,
            qkv_bias=True,
            blocks=tuple(blocks),
            family="spvit",
            source={
                "img_size": g * patch,
                "patch_size": patch,
                "in_chans": pw.shape[1],
                "num_classes": classes,
                "embed_dim": dim,
                "depth": depth,
                "num_heads": heads,
                "mlp_ratio": 4.0,
                "qkv_bias": True,
                "merges": {},
            },
        )
    except ConfigError as e:
        raise CaitError(f"{path}: {e}") from None
    tensors = {k: v.float().contiguous() for k, v in out.items()}
    counts = {k: kinds.count(k) for k in ("attn", "conv1", "conv3", "skip") if kinds.count(k)}
    notes = [
        f"blocks: {', '.join(f'{v} {k}' for k, v in counts.items())}; FFN widths {widths}"
        + (f" (zero-padded to multiples of {align})" if align > 1 else ""),
        f"folded: head_probs (alpha {ALPHA:g}) and BatchNorm of every conv block; qk + v -> qkv",
    ]
    return cfg, tensors, lambda x: reference(sd, kinds, heads, x), notes


def reference(sd: dict[str, torch.Tensor], kinds: list[str], heads: int, images: torch.Tensor) -> torch.Tensor:
    """SPViT-DeiT's eval forward written from docs/formats/spvit.md, float64, BatchNorm unfolded."""

    def w(k):
        return sd[k].double()

    pw = w("patch_embed.proj.weight")
    x = F.conv2d(images, pw, w("patch_embed.proj.bias"), stride=pw.shape[-1]).flatten(2).transpose(1, 2)
    bsz, _, dim = x.shape
    x = torch.cat([w("cls_token").expand(bsz, -1, -1), x], dim=1) + w("pos_embed")
    d = dim // heads
    g = math.isqrt(x.shape[1] - 1)
    for i, kind in enumerate(kinds):
        b = f"blocks.{i}."
        y = F.layer_norm(x, (dim,), w(b + "norm1.weight"), w(b + "norm1.bias"), 1e-6)
        if kind == "attn":
            n = y.shape[1]
            qk = y @ w(b + "attn.qk.weight").T + w(b + "attn.qk.bias")
            q, k = (t.reshape(bsz, n, heads, d).transpose(1, 2) for t in qk.split(dim, dim=-1))
            v = (y @ w(b + "attn.v.weight").T + w(b + "attn.v.bias")).reshape(bsz, n, heads, d).transpose(1, 2)
            a = ((q * d**-0.5) @ k.transpose(-2, -1)).softmax(-1)
            y = (a @ v).transpose(1, 2).reshape(bsz, n, dim) @ w(b + "attn.proj.weight").T + w(b + "attn.proj.bias")
        elif kind != "skip":
            w1, b1, w2, b2 = conv_weights(sd, i, kind, heads)
            bn = f"{b}attn.{BN[kind]}."
            t = y[:, 1:].reshape(bsz, g, g, dim).permute(0, 3, 1, 2)
            t = F.conv2d(t, w1, b1, padding=w1.shape[-1] // 2)
            t = F.batch_norm(
                t,
                w(bn + "running_mean"),
                w(bn + "running_var"),
                w(bn + "weight"),
                w(bn + "bias"),
                training=False,
                eps=1e-5,
            )
            t = F.relu(t).flatten(2).transpose(1, 2) @ w2.T + b2
            y = torch.cat([y[:, :1], t], dim=1)
        x = x + y
        y = F.layer_norm(x, (dim,), w(b + "norm2.weight"), w(b + "norm2.bias"), 1e-6)
        x = (
            x
            + F.gelu(y @ w(b + "mlp.fc1.weight").T + w(b + "mlp.fc1.bias")) @ w(b + "mlp.fc2.weight").T
            + w(b + "mlp.fc2.bias")
        )
    x = F.layer_norm(x, (dim,), w("norm.weight"), w("norm.bias"), 1e-6)
    return x[:, 0] @ w("head.weight").T + w("head.bias")
