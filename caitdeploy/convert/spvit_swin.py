"""SPViT-Swin (ziplab/SPViT, SPViT_Swin/) -> family "swin" fused models (`convert --from spvit` detects it).

The upstream file is a Microsoft-layout Swin (PatchMerging at the end of a stage, `head.*`; read as timm's) whose
blocks are window attention (`attn.qk` + `attn.v`), a 1x1 or 3x3 convolution (`attn.head_probs`, `attn.bn_1x1`
or `attn.bn_3x3`, `attn.v`, `attn.proj`), or skipped (no `attn.*` keys), with a physically pruned FFN per block.
What differs from SPViT-DeiT (convert/spvit.py), as upstream's `UnifiedWindowAttention.finetune_forward` has it:
- the head mixture is softmax(head_probs / alpha) over heads with alpha = 1e2 (the Swin config's EXTRA.alpha);
- the 1x1 convolution uses column 0 of the mixture (the centre tap);
- the 3x3 kernel takes columns [1, 2, 3, 4, 0, 5, 6, 7, 8] in that order (column 0 is the centre), laid out
  column-major (kernel[:, :, row, col] = tap 3 * col + row); its bias is the sum of the nine mixed v biases;
- 3x3 blocks run on the whole map: no cyclic shift, no window partition (a 1x1 is per token: windows do not
  change it). Attention blocks keep Swin's windows and shifts.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from caitdeploy.convert.spvit import mixed_taps, mixer_kind
from caitdeploy.core.errors import CaitError, OptionError
from caitdeploy.families.lvvit import fold_bn
from caitdeploy.families.vit.config import ConfigError

ALPHA = 1e2
SWIN_TAPS = [1, 2, 3, 4, 0, 5, 6, 7, 8]  # head_probs column of each 3x3 kernel position (column-major)
BN = {"conv1": "bn_1x1", "conv3": "bn_3x3"}


def is_spvit_swin(sd: dict[str, torch.Tensor]) -> bool:
    return any(
        re.fullmatch(r"layers\.\d+\.blocks\.\d+\.attn\.(qk\.weight|head_probs|bn_[13]x[13]\.weight)", k) for k in sd
    )


def conv_weights(sd: dict[str, torch.Tensor], p: str, kind: str, heads: int, alpha: float = ALPHA):
    """(W1 [d, D, k, k], b1 [d], W2 [D, d], b2 [D]) of a conv block before its BatchNorm, float64."""

    a = p + "attn."
    v_taps, b_taps, p_taps = mixed_taps(sd, a, heads, alpha)
    d, dim = v_taps.shape[1:]
    b2 = sd[a + "proj.bias"].double()
    if kind == "conv1":
        return v_taps[0][:, :, None, None], b_taps[0], p_taps[0], b2
    w1 = v_taps[SWIN_TAPS].reshape(3, 3, d, dim).permute(2, 3, 1, 0)  # W1[:, :, row, col]
    return w1, b_taps.sum(0), p_taps.sum(0), b2


def convert(path: Path, sd: dict[str, torch.Tensor], num_heads: int | None, align: int):
    """(SwinConfig, deploy tensors, float64 reference forward, notes)."""
    from caitdeploy.compress.surgery import round_up
    from caitdeploy.convert.common import check_layout
    from caitdeploy.families.swin.keys import timm_layout
    from caitdeploy.families.swin.model import CaitSwin, SwinBlock, SwinConfig, checkpoint_key

    if num_heads is not None:
        raise OptionError("num_heads", "an SPViT-Swin file tells its heads per stage: leave it out")
    sd, layout = timm_layout(sd)
    pw = sd.get("patch_embed.proj.weight")
    if pw is None or pw.dim() != 4 or "head.fc.weight" not in sd:
        raise CaitError(f"{path}: missing the Swin stem/head keys (patch_embed.proj.weight, head.weight)")
    dim0, patch, in_chans = int(pw.shape[0]), int(pw.shape[-1]), int(pw.shape[1])
    depths: dict[int, int] = {}
    for k in sd:
        if m := re.match(r"layers\.(\d{1,2})\.blocks\.(\d{1,3})\.", k):
            depths[int(m.group(1))] = max(depths.get(int(m.group(1)), 0), int(m.group(2)) + 1)
    if not depths or sorted(depths) != list(range(len(depths))):
        raise CaitError(f"{path}: no Swin blocks (layers.S.blocks.I.*) numbered from stage 0")
    n_stages = len(depths)
    dims = [dim0 * 2**s for s in range(n_stages)]
    kinds = [
        [mixer_kind(sd, f"layers.{s}.blocks.{i}.attn.", f"{path}: ") for i in range(depths[s])] for s in range(n_stages)
    ]
    heads, window = [], None
    for s in range(n_stages):
        h = None
        for i, kind in enumerate(kinds[s]):
            p = f"layers.{s}.blocks.{i}.attn."
            t = sd.get(p + "relative_position_bias_table") if kind == "attn" else sd.get(p + "head_probs")
            if t is not None and t.dim() == 2:
                h = int(t.shape[1] if kind == "attn" else t.shape[0])
                if kind == "attn" and s == 0 and window is None:
                    side = math.isqrt(int(t.shape[0]))
                    window = (side + 1) // 2 if side * side == t.shape[0] and side % 2 else None
                break
        heads.append(h if h is not None else max(1, dims[s] // 32))  # Swin's 32-wide heads otherwise
    window = window or 7
    classes = int(sd["head.fc.weight"].shape[0])
    req = {
        "patch_embed.proj.weight": tuple(pw.shape),
        "patch_embed.proj.bias": (dim0,),
        "patch_embed.norm.weight": (dim0,),
        "patch_embed.norm.bias": (dim0,),
        "norm.weight": (dims[-1],),
        "norm.bias": (dims[-1],),
        "head.fc.weight": (classes, dims[-1]),
        "head.fc.bias": (classes,),
    }
    stages = []
    for s in range(n_stages):
        c, h = dims[s], heads[s]
        if c % h:
            raise CaitError(f"{path}: stage {s}: width {c} is not divisible by {h} heads")
        d = c // h
        if s:
            req.update(
                {
                    f"layers.{s}.downsample.norm.weight": (4 * dims[s - 1],),
                    f"layers.{s}.downsample.norm.bias": (4 * dims[s - 1],),
                    f"layers.{s}.downsample.reduction.weight": (c, 4 * dims[s - 1]),
                }
            )
        row = []
        for i, kind in enumerate(kinds[s]):
            p = f"layers.{s}.blocks.{i}."
            w1 = sd.get(p + "mlp.fc1.weight")
            if w1 is None or w1.dim() != 2 or w1.shape[1] != c:
                raise CaitError(f"{path}: key '{p}mlp.fc1.weight' is missing or not [F, {c}]")
            f = int(w1.shape[0])
            req.update(
                {
                    p + "norm1.weight": (c,),
                    p + "norm1.bias": (c,),
                    p + "norm2.weight": (c,),
                    p + "norm2.bias": (c,),
                    p + "mlp.fc1.weight": (f, c),
                    p + "mlp.fc1.bias": (f,),
                    p + "mlp.fc2.weight": (c, f),
                    p + "mlp.fc2.bias": (c,),
                }
            )
            if kind != "skip":
                req.update(
                    {
                        p + "attn.v.weight": (c, c),
                        p + "attn.v.bias": (c,),
                        p + "attn.proj.weight": (c, c),
                        p + "attn.proj.bias": (c,),
                    }
                )
            if kind == "attn":
                req[p + "attn.qk.weight"] = (2 * c, c)
                if p + "attn.qk.bias" in sd:
                    req[p + "attn.qk.bias"] = (2 * c,)
            elif kind != "skip":
                req[p + "attn.head_probs"] = (h, 9)
                req.update({f"{p}attn.{BN[kind]}.{x}": (d,) for x in ("weight", "bias", "running_mean", "running_var")})
            row.append(SwinBlock(h, d, d, round_up(f, align), d**-0.5, None, kind))
        stages.append(tuple(row))
    fmt: dict[str, Any] = {
        "family": "swin",
        "arch": None,
        "img_size": 224,
        "patch_size": patch,
        "in_chans": in_chans,
        "num_classes": classes,
        "embed_dim": dim0,
        "depths": [depths[s] for s in range(n_stages)],
        "num_heads": heads,
        "window_size": window,
        "mlp_ratio": 4.0,
        "qkv_bias": True,
        "ln_eps": 1e-5,
        "merges": {},
    }
    try:
        cfg = SwinConfig(
            img_size=224,
            patch_size=patch,
            in_chans=in_chans,
            num_classes=classes,
            dims=tuple(dims),
            stages=tuple(stages),
            window=window,
            qkv_bias=True,
            ln_eps=1e-5,
            source=fmt,
        )
    except ConfigError as e:
        raise CaitError(f"{path}: {e}") from None
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in CaitSwin(cfg).state_dict().items()}
    for s, i, b in cfg.flat():  # attention blocks' relative position tables, sized by the block's window
        if b.kind == "attn":
            key = f"layers.{s}.blocks.{i}.attn.relative_position_bias_table"
            req[key] = shapes[key]
    check_layout(path, sd, req, re.compile(r".*\.num_batches_tracked"), "SPViT-Swin layout")
    out: dict[str, torch.Tensor] = {}
    for s, i, b in cfg.flat():
        p = f"layers.{s}.blocks.{i}."
        f = sd[p + "mlp.fc1.weight"].shape[0]
        pad = b.mlp_hidden - f
        out[p + "fc1.weight"] = F.pad(sd[p + "mlp.fc1.weight"], (0, 0, 0, pad))
        out[p + "fc1.bias"] = F.pad(sd[p + "mlp.fc1.bias"], (0, pad))
        out[p + "fc2.weight"] = F.pad(sd[p + "mlp.fc2.weight"], (0, pad))
        if b.kind == "attn":
            qb = sd.get(p + "attn.qk.bias", torch.zeros(2 * cfg.dims[s]))
            out[p + "attn.qkv.weight"] = torch.cat([sd[p + "attn.qk.weight"], sd[p + "attn.v.weight"]])
            out[p + "attn.qkv.bias"] = torch.cat([qb, sd[p + "attn.v.bias"]])
        elif b.kind != "skip":
            w1, b1, w2, b2 = conv_weights(sd, p, b.kind, b.num_heads)
            bn = f"{p}attn.{BN[b.kind]}."
            gamma, beta, mean, var = (sd[bn + x].double() for x in ("weight", "bias", "running_mean", "running_var"))
            w1, b1 = fold_bn(w1, gamma, beta, mean, var, bias=b1)
            out.update(
                {
                    p + "attn.conv.weight": w1,
                    p + "attn.conv.bias": b1,
                    p + "attn.proj.weight": w2,
                    p + "attn.proj.bias": b2,
                }
            )
    for k in shapes:
        if k not in out:
            out[k] = sd[checkpoint_key(cfg, k)]
    tensors = {k: v.float().contiguous() for k, v in out.items()}
    flat = [k for row in kinds for k in row]
    counts = {k: flat.count(k) for k in ("attn", "conv1", "conv3", "skip") if flat.count(k)}
    notes = [
        f"SPViT-Swin ({layout} layout): {', '.join(f'{v} {k}' for k, v in counts.items())}; heads {heads}, "
        f"window {window}; FFN widths {[b.mlp_hidden for _, _, b in cfg.flat()]}"
        + (f" (zero-padded to multiples of {align})" if align > 1 else ""),
        (
            f"folded: head_probs (alpha {ALPHA:g}; 1x1 = column 0, 3x3 taps {SWIN_TAPS}) and BatchNorm of every "
            "conv block; qk + v -> qkv; img_size 224 (not stored in the weights)"
        ),
    ]
    return cfg, tensors, lambda x: reference(sd, cfg, x), notes


def _windows(x, w):
    b, h, wd, c = x.shape
    return x.reshape(b, h // w, w, wd // w, w, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, w * w, c)


def _unwindows(y, w, h, wd):
    c = y.shape[-1]
    return y.reshape(-1, h // w, wd // w, w, w, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, h, wd, c)


def reference(sd: dict[str, torch.Tensor], cfg, images: torch.Tensor) -> torch.Tensor:
    """SPViT-Swin's eval forward written from the upstream format (timm-layout keys), float64, BatchNorm unfolded,
    square windows as upstream (window = the side when the map is no larger; no shift then)."""

    def w(k):
        return sd[k].double()

    eps = 1e-5
    x = F.conv2d(images, w("patch_embed.proj.weight"), w("patch_embed.proj.bias"), stride=cfg.patch_size)
    x = F.layer_norm(
        x.permute(0, 2, 3, 1), (cfg.dims[0],), w("patch_embed.norm.weight"), w("patch_embed.norm.bias"), eps
    )
    for s, blocks in enumerate(cfg.stages):
        c = cfg.dims[s]
        if s:
            p = f"layers.{s}.downsample."
            x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
            x = F.layer_norm(x, (4 * cfg.dims[s - 1],), w(p + "norm.weight"), w(p + "norm.bias"), eps)
            x = x @ w(p + "reduction.weight").T
        bsz, hh, ww, _ = x.shape
        for i, b in enumerate(blocks):
            p = f"layers.{s}.blocks.{i}."
            y = F.layer_norm(x, (c,), w(p + "norm1.weight"), w(p + "norm1.bias"), eps)
            if b.kind == "attn":
                win, shift = cfg.window, cfg.window // 2 if i % 2 else 0
                if min(hh, ww) <= win:
                    win, shift = min(hh, ww), 0
                heads, d = b.num_heads, c // b.num_heads
                t = torch.roll(y, (-shift, -shift), (1, 2)) if shift else y
                t = _windows(t, win)
                n = win * win
                qk = t @ w(p + "attn.qk.weight").T + (w(p + "attn.qk.bias") if p + "attn.qk.bias" in sd else 0)
                q, k = (z.reshape(-1, n, heads, d).transpose(1, 2) for z in qk.split(c, dim=-1))
                v = (t @ w(p + "attn.v.weight").T + w(p + "attn.v.bias")).reshape(-1, n, heads, d).transpose(1, 2)
                a = (q * d**-0.5) @ k.transpose(-2, -1)
                coords = torch.stack(torch.meshgrid(torch.arange(win), torch.arange(win), indexing="ij")).flatten(1)
                rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (win - 1)
                idx = rel[..., 0] * (2 * win - 1) + rel[..., 1]
                a = a + w(p + "attn.relative_position_bias_table")[idx.reshape(-1)].reshape(n, n, heads).permute(
                    2, 0, 1
                )
                if shift:
                    img = torch.zeros(hh, ww)
                    cnt = 0
                    for hs in (slice(0, -win), slice(-win, -shift), slice(-shift, None)):
                        for ws in (slice(0, -win), slice(-win, -shift), slice(-shift, None)):
                            img[hs, ws] = cnt
                            cnt += 1
                    mw = _windows(img[None, :, :, None], win).squeeze(-1)
                    mask = (mw[:, None, :] - mw[:, :, None] != 0).double() * -100.0
                    a = (a.reshape(bsz, -1, heads, n, n) + mask[None, :, None]).reshape(-1, heads, n, n)
                t = (a.softmax(-1) @ v).transpose(1, 2).reshape(-1, n, c)
                t = t @ w(p + "attn.proj.weight").T + w(p + "attn.proj.bias")
                t = _unwindows(t, win, hh, ww)
                y = torch.roll(t, (shift, shift), (1, 2)) if shift else t
            elif b.kind != "skip":
                w1, b1, w2, b2 = conv_weights(sd, p, b.kind, b.num_heads)
                bn = f"{p}attn.{BN[b.kind]}."
                t = F.conv2d(y.permute(0, 3, 1, 2), w1, b1, padding=w1.shape[-1] // 2)
                t = F.batch_norm(
                    t,
                    w(bn + "running_mean"),
                    w(bn + "running_var"),
                    w(bn + "weight"),
                    w(bn + "bias"),
                    training=False,
                    eps=eps,
                )
                y = F.relu(t).permute(0, 2, 3, 1) @ w2.T + b2
            x = x + y
            y = F.layer_norm(x, (c,), w(p + "norm2.weight"), w(p + "norm2.bias"), eps)
            x = (
                x
                + F.gelu(y @ w(p + "mlp.fc1.weight").T + w(p + "mlp.fc1.bias")) @ w(p + "mlp.fc2.weight").T
                + w(p + "mlp.fc2.bias")
            )
    x = F.layer_norm(x, (cfg.dims[-1],), w("norm.weight"), w("norm.bias"), eps).mean(dim=(1, 2))
    return x @ w("head.fc.weight").T + w("head.fc.bias")
