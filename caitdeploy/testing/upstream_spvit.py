"""Test helpers for SPViT-DeiT checkpoints (ziplab/SPViT, ``SPViT_DeiT/``), written from docs/formats/spvit.md.

Nothing here imports or copies upstream code. Three things:

* ``spvit_state_dict``: random float32 weights with exactly the key names and shapes of a fine-tuned
  (searched + pruned) SPViT-DeiT checkpoint's ``ckpt["model"]`` for a given per-block architecture.
* ``SPVIT_RELEASED``: the searched architectures of the released checkpoints (block kinds, FFN widths).
* ``spvit_forward``: an independent float64 functional forward equal to upstream's eval-mode logits.

Block kinds: ``"attn"`` (multi-head self-attention), ``"conv1"`` / ``"conv3"`` (the 1x1 / 3x3 "bottleneck
convolution" whose kernels are mixed from the v / proj weights by ``softmax(head_probs / alpha)``), ``"skip"``
(the attention branch returns its LayerNorm-ed input, so the block adds ``LN1(x)``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

KINDS = ("attn", "conv1", "conv3", "skip")
ALPHA = 1e-2  # UnifiedAttention's default temperature; never stored in a checkpoint
LN_EPS = 1e-6
BN_EPS = 1e-5

# DeiT sizes upstream registers (all: depth 12, patch 16, 224x224, mlp_ratio 4 before pruning, qkv bias on).
SPVIT_VARIANTS = {
    "tiny": {"embed_dim": 192, "num_heads": 3, "depth": 12},
    "small": {"embed_dim": 384, "num_heads": 6, "depth": 12},
    "base": {"embed_dim": 768, "num_heads": 12, "depth": 12},
}


def _kinds(n_conv1: int, n_conv3: int, depth: int = 12) -> list[str]:
    return ["conv1"] * n_conv1 + ["conv3"] * n_conv3 + ["attn"] * (depth - n_conv1 - n_conv3)


# Kinds from the `assigned_indicators` of SPViT_DeiT/config/*_ft.json, FFN widths = number of ones per block in
# SPViT_DeiT/ffn_indicators/*_search_*epoch.pth (the files fine-tuning prunes with). Parameter counts computed from
# these match the README (4.9M / 16.4M / 46.2M / 62.3M). The "_dist" files share the architecture of their base.
SPVIT_RELEASED: dict[str, dict] = {
    "spvit_deit_ti_l200_t10": {
        "variant": "tiny",
        "files": ["spvit_deit_ti_l200_t10.pth", "spvit_deit_ti_l200_t10_dist.pth"],
        "kinds": _kinds(2, 0),
        "mlp_widths": [744, 758, 764, 767, 766, 764, 756, 659, 633, 473, 179, 145],
    },
    "spvit_deit_sm_l30_t32": {
        "variant": "small",
        "files": ["spvit_deit_sm_l30_t32.pth", "spvit_deit_sm_l30_t32_dist.pth"],
        "kinds": _kinds(1, 0),
        "mlp_widths": [1304, 1399, 1344, 1214, 1251, 1183, 1140, 925, 742, 391, 104, 103],
    },
    "spvit_deit_bs_l008_t60": {
        "variant": "base",
        "files": ["spvit_deit_bs_l008_t60.pth", "spvit_deit_bs_l008_t60_dist.pth"],
        "kinds": _kinds(3, 2),
        "mlp_widths": [1118, 489, 1050, 1345, 1336, 1326, 1431, 1564, 1606, 1702, 1290, 190],
    },
    # Listed in the README from Dec 2021 to Jun 2023, then dropped from the table (file name kept in the release).
    "spvit_deit_bs_l006_t100": {
        "variant": "base",
        "files": ["spvit_deit_bs_l006_t100.pth"],
        "kinds": _kinds(3, 1),
        "mlp_widths": [1253, 610, 1343, 1912, 2354, 2306, 2483, 2753, 2869, 2860, 2443, 934],
    },
}


def kinds_from_indicators(indicators: list[list[float]]) -> list[str]:
    """Map upstream ``assigned_indicators`` rows ([1x1 on, 3x3 on, MSA on], cumulative) to block kinds."""
    out = []
    for a, b, c in indicators:
        out.append("skip" if not a else "conv1" if not b else "conv3" if not c else "attn")
    return out


def block_kind(state_dict: dict[str, torch.Tensor], i: int) -> str:
    """Block kind read from keys alone (unoptimized layout or post-training ``bconv`` layout)."""
    p = f"blocks.{i}.attn."
    if p + "qk.weight" in state_dict:
        return "attn"
    if p + "bn_3x3.weight" in state_dict:
        return "conv3"
    if p + "bn_1x1.weight" in state_dict:
        return "conv1"
    if p + "bconv.0.weight" in state_dict:
        return "conv3" if state_dict[p + "bconv.0.weight"].shape[-1] == 3 else "conv1"
    return "skip"


def spvit_state_dict(
    kinds: list[str],
    mlp_widths: list[int],
    *,
    embed_dim: int = 384,
    num_heads: int = 6,
    img_size: int = 224,
    patch_size: int = 16,
    num_classes: int = 1000,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Random float32 weights named and shaped exactly like a fine-tuned SPViT-DeiT ``ckpt["model"]``.

    Keys come in upstream's registration order. BN running stats are non-trivial (running_var > 0),
    ``head_probs`` = 1 + small noise, so that ``softmax(head_probs / 0.01)`` is clearly non-uniform but not one-hot.
    """
    if len(kinds) != len(mlp_widths):
        raise ValueError("kinds and mlp_widths must have one entry per block")
    g = torch.Generator().manual_seed(seed)
    D, H = embed_dim, num_heads
    d = D // H
    grid = img_size // patch_size

    def lin(out_f: int, in_f: int) -> torch.Tensor:
        return torch.randn(out_f, in_f, generator=g) / math.sqrt(in_f)

    def vec(n: int, scale: float = 0.1, base: float = 0.0) -> torch.Tensor:
        return base + scale * torch.randn(n, generator=g)

    sd: dict[str, torch.Tensor] = {
        "cls_token": 0.5 * torch.randn(1, 1, D, generator=g),
        "pos_embed": 0.5 * torch.randn(1, 1 + grid * grid, D, generator=g),
        "patch_embed.proj.weight": torch.randn(D, 3, patch_size, patch_size, generator=g) / (math.sqrt(3) * patch_size),
        "patch_embed.proj.bias": vec(D),
    }
    for i, (kind, w) in enumerate(zip(kinds, mlp_widths, strict=True)):
        if kind not in KINDS:
            raise ValueError(f"unknown block kind {kind!r}")
        b = f"blocks.{i}."
        sd[b + "norm1.weight"], sd[b + "norm1.bias"] = vec(D, base=1.0), vec(D)
        if kind == "attn":
            sd[b + "attn.qk.weight"], sd[b + "attn.qk.bias"] = lin(2 * D, D), vec(2 * D)
        elif kind in ("conv1", "conv3"):
            bn = b + ("attn.bn_1x1." if kind == "conv1" else "attn.bn_3x3.")
            sd[b + "attn.head_probs"] = 1.0 + 0.01 * torch.randn(H, 9, generator=g)
            sd[bn + "weight"], sd[bn + "bias"] = vec(d, base=1.0), vec(d)
            sd[bn + "running_mean"] = vec(d, scale=0.3)
            sd[bn + "running_var"] = 0.5 + torch.rand(d, generator=g)
            sd[bn + "num_batches_tracked"] = torch.tensor(12345, dtype=torch.long)
        if kind != "skip":
            sd[b + "attn.v.weight"], sd[b + "attn.v.bias"] = lin(D, D), vec(D)
            sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"] = lin(D, D), vec(D)
        sd[b + "norm2.weight"], sd[b + "norm2.bias"] = vec(D, base=1.0), vec(D)
        sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"] = lin(w, D), vec(w)
        sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"] = lin(D, w), vec(D)
    sd["norm.weight"], sd["norm.bias"] = vec(D, base=1.0), vec(D)
    sd["head.weight"], sd["head.bias"] = 4 * lin(num_classes, D), vec(num_classes)
    return sd


def conv_weights(
    state_dict: dict[str, torch.Tensor], i: int, *, num_heads: int, alpha: float = ALPHA
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fold block i's conv branch into plain weights: (W1 [d,D,k,k], b1 [d], W2 [D,d], b2 [D]).

    P = softmax(head_probs / alpha) over heads (dim 0), P[h, t] for kernel tap t in 0..8.
    Head h owns rows h*d:(h+1)*d of v and columns h*d:(h+1)*d of proj.
    Mixed per tap: V_t = sum_h P[h,t] v.weight[h], c_t = sum_h P[h,t] v.bias[h], Q_t = sum_h P[h,t] proj.weight[:, h].
    conv1: W1 = V_4, b1 = c_4, W2 = Q_4.
    conv3: W1[:, :, r, s] = V_{3*s + r} (tap index is column-major over the 3x3 window), b1 = sum_t c_t,
           W2 = sum_t Q_t.   b2 = proj.bias in both cases.
    """
    p = f"blocks.{i}.attn."
    kind = block_kind(state_dict, i)
    sd = {k: v.double() for k, v in state_dict.items() if k.startswith(p)}
    if p + "bconv.0.weight" in sd:  # already folded by post_training_optimize_checkpoint.py
        W2 = sd[p + "bconv.3.weight"].flatten(1)
        return sd[p + "bconv.0.weight"], sd[p + "bconv.0.bias"], W2, sd[p + "bconv.3.bias"]
    D = sd[p + "v.weight"].shape[1]
    d = D // num_heads
    P = torch.softmax(sd[p + "head_probs"] / alpha, dim=0)  # [H, 9]
    V = torch.einsum("ht,hdc->tdc", P, sd[p + "v.weight"].view(num_heads, d, D))  # [9, d, D]
    c = torch.einsum("ht,hd->td", P, sd[p + "v.bias"].view(num_heads, d))  # [9, d]
    Q = torch.einsum("ht,ohd->tod", P, sd[p + "proj.weight"].view(D, num_heads, d))  # [9, D, d]
    if kind == "conv1":
        return V[4][:, :, None, None], c[4], Q[4], sd[p + "proj.bias"]
    W1 = V.view(3, 3, d, D).permute(2, 3, 1, 0)  # tap t = 3*s + r  ->  W1[:, :, r, s]
    return W1, c.sum(0), Q.sum(0), sd[p + "proj.bias"]


def _layer_norm(x: torch.Tensor, sd: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], sd[name + ".weight"], sd[name + ".bias"], LN_EPS)


def spvit_forward(
    state_dict: dict[str, torch.Tensor], images: torch.Tensor, *, num_heads: int, alpha: float = ALPHA
) -> torch.Tensor:
    """Eval-mode SPViT-DeiT logits [B, num_classes] in float64 (upstream returns these as ``output[0]``).

    Handles every block kind and both the released layout and the post-training ``bconv`` layout.
    """
    sd = {k: v.double() for k, v in state_dict.items() if v.is_floating_point()}
    x = images.double()
    pw = sd["patch_embed.proj.weight"]
    x = F.conv2d(x, pw, sd["patch_embed.proj.bias"], stride=pw.shape[-1]).flatten(2).transpose(1, 2)
    B, _, D = x.shape
    x = torch.cat([sd["cls_token"].expand(B, -1, -1), x], 1) + sd["pos_embed"]
    d = D // num_heads
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(depth):
        b = f"blocks.{i}."
        h = _layer_norm(x, sd, b + "norm1")
        kind = block_kind(state_dict, i)
        if kind == "attn":
            N = h.shape[1]
            qk = F.linear(h, sd[b + "attn.qk.weight"], sd[b + "attn.qk.bias"])
            q = qk[..., :D].reshape(B, N, num_heads, d).transpose(1, 2)
            k = qk[..., D:].reshape(B, N, num_heads, d).transpose(1, 2)
            v = F.linear(h, sd[b + "attn.v.weight"], sd[b + "attn.v.bias"]).reshape(B, N, num_heads, d).transpose(1, 2)
            a = torch.softmax((q * d**-0.5) @ k.transpose(-1, -2), dim=-1)
            o = F.linear((a @ v).transpose(1, 2).reshape(B, N, D), sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"])
        elif kind in ("conv1", "conv3"):
            W1, b1, W2, b2 = conv_weights(state_dict, i, num_heads=num_heads, alpha=alpha)
            bn = b + (
                "attn.bconv.1"
                if b + "attn.bconv.1.weight" in sd
                else "attn.bn_1x1"
                if kind == "conv1"
                else "attn.bn_3x3"
            )
            G = math.isqrt(h.shape[1] - 1)
            t = h[:, 1:].reshape(B, G, G, D).permute(0, 3, 1, 2)  # patch tokens are row-major on the grid
            t = F.conv2d(t, W1, b1, padding=W1.shape[-1] // 2)
            t = F.batch_norm(
                t,
                sd[bn + ".running_mean"],
                sd[bn + ".running_var"],
                sd[bn + ".weight"],
                sd[bn + ".bias"],
                training=False,
                eps=BN_EPS,
            )
            t = F.linear(F.relu(t).flatten(2).transpose(1, 2), W2, b2)
            o = torch.cat([h[:, :1], t], 1)  # class token: the LN1 output passes through unchanged
        else:
            o = h  # skip: the attention branch is the identity on its (normalized) input
        x = x + o
        m = F.gelu(F.linear(_layer_norm(x, sd, b + "norm2"), sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"]))
        x = x + F.linear(m, sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"])
    x = _layer_norm(x, sd, "norm")
    return F.linear(x[:, 0], sd["head.weight"], sd["head.bias"])


def spvit_optimized_state_dict(
    state_dict: dict[str, torch.Tensor], *, num_heads: int, alpha: float = ALPHA
) -> dict[str, torch.Tensor]:
    """The layout ``post_training_optimize_checkpoint.py`` writes: conv blocks lose head_probs/v/proj/bn_* and get
    ``attn.bconv.0`` (Conv2d D->d, k x k), ``attn.bconv.1`` (BatchNorm2d d), ``attn.bconv.3`` (Conv2d d->D, 1x1)."""
    out: dict[str, torch.Tensor] = {}
    depth = 1 + max(int(k.split(".")[1]) for k in state_dict if k.startswith("blocks."))
    conv = {i: block_kind(state_dict, i) for i in range(depth)}
    conv = {i: k for i, k in conv.items() if k in ("conv1", "conv3")}
    for k, v in state_dict.items():
        parts = k.split(".")
        if parts[0] == "blocks" and parts[2] == "attn" and int(parts[1]) in conv:
            continue
        out[k] = v
    for i, kind in conv.items():
        p = f"blocks.{i}.attn."
        W1, b1, W2, b2 = conv_weights(state_dict, i, num_heads=num_heads, alpha=alpha)
        dt = state_dict[p + "v.weight"].dtype
        out[p + "bconv.0.weight"], out[p + "bconv.0.bias"] = W1.to(dt), b1.to(dt)
        out[p + "bconv.3.weight"], out[p + "bconv.3.bias"] = W2[:, :, None, None].to(dt), b2.to(dt)
        bn = p + ("bn_1x1." if kind == "conv1" else "bn_3x3.")
        for s in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            out[p + "bconv.1." + s] = state_dict[bn + s]
    return out
