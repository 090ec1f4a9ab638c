"""Swin files in upstream layouts, written by our own code for tests and benchmarks (no hub here): SPViT-Swin
fine-tuned checkpoints (ziplab/SPViT, SPViT_Swin/models/spvit_swin.py key layout) and DIMAP-style unstructured
pruned Swin state dicts (Microsoft or timm layout). Random weights: exactness and speed, never accuracy."""

from __future__ import annotations

import re

import torch

# The released SPViT-Swin-T (configs/spvit_swin_tn_l28_t32_ft.yaml: EXTRA.assigned_indicators, [1,0,0] = 1x1 conv,
# [0,0,0] = skipped, [1,1,1] = attention; FFN widths = the kept counts of its
# ffn_indicators/spvit_swin_t_l28_t32_search_12epoch.pth, read here with torch.load(weights_only=True)).
SPVIT_SWIN_RELEASED = {
    "spvit_swin_tn_l28_t32": {
        "kinds": [["conv1", "skip"], ["conv1", "skip"], ["attn"] * 6, ["attn"] * 2],
        "mlp_widths": [186, 152, 646, 504, 1350, 1319, 1289, 1249, 1234, 1082, 3041, 2994],
    },
}


def to_microsoft(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm Swin keys -> Microsoft's (PatchMerging at the END of the previous stage, `head.*`)."""
    return {
        re.sub(r"^layers\.(\d+)\.downsample", lambda x: f"layers.{int(x.group(1)) - 1}.downsample", k).replace(
            "head.fc.", "head."
        ): v
        for k, v in sd.items()
    }


def spvit_swin_state_dict(model, kinds, mlp_widths=None, seed: int = 0) -> dict[str, torch.Tensor]:
    """An SPViT-Swin fine-tuned file from a timm Swin `model`'s weights: `kinds[s][i]` in attn / conv1 / conv3 /
    skip; FFN widths `mlp_widths` (flat) or about half plus a few; head_probs (alpha 1e2: values ~100) and
    BatchNorm statistics random; persistent relative_position_index buffers and num_batches_tracked as upstream
    saves them."""
    g = torch.Generator().manual_seed(seed)
    base = model.state_dict()
    sd = {k: v.clone() for k, v in to_microsoft({k: v for k, v in base.items() if ".blocks." not in k}).items()}
    j = 0
    for s, layer in enumerate(model.layers):
        c, h = layer.blocks[0].norm1.normalized_shape[0], layer.blocks[0].attn.num_heads
        d = c // h
        for i, blk in enumerate(layer.blocks):
            p, kind = f"layers.{s}.blocks.{i}.", kinds[s][i]
            for n in ("norm1", "norm2"):
                sd[p + n + ".weight"], sd[p + n + ".bias"] = base[p + n + ".weight"], base[p + n + ".bias"]
            hidden = blk.mlp.fc1.out_features
            width = mlp_widths[j] if mlp_widths is not None else hidden // 2 + 3 * i
            keep = torch.randperm(hidden, generator=g)[:width]
            sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"] = (
                base[p + "mlp.fc1.weight"][keep],
                base[p + "mlp.fc1.bias"][keep],
            )
            sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"] = (
                base[p + "mlp.fc2.weight"][:, keep],
                base[p + "mlp.fc2.bias"],
            )
            j += 1
            if kind == "skip":
                continue
            qkv_w, qkv_b = base[p + "attn.qkv.weight"], base[p + "attn.qkv.bias"]
            sd[p + "attn.v.weight"], sd[p + "attn.v.bias"] = qkv_w[2 * c :], qkv_b[2 * c :]
            sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"] = (
                base[p + "attn.proj.weight"],
                base[p + "attn.proj.bias"],
            )
            if kind == "attn":
                sd[p + "attn.qk.weight"], sd[p + "attn.qk.bias"] = qkv_w[: 2 * c], qkv_b[: 2 * c]
                table = base[p + "attn.relative_position_bias_table"]
                sd[p + "attn.relative_position_bias_table"] = table
                tokens = ((int(table.shape[0] ** 0.5) + 1) // 2) ** 2
                sd[p + "attn.relative_position_index"] = torch.zeros(tokens, tokens, dtype=torch.long)  # a buffer
            else:
                sd[p + "attn.head_probs"] = torch.randn(h, 9, generator=g) * 100
                bn = p + ("attn.bn_1x1." if kind == "conv1" else "attn.bn_3x3.")
                sd[bn + "weight"] = 1 + 0.2 * torch.randn(d, generator=g)
                sd[bn + "bias"] = 0.1 * torch.randn(d, generator=g)
                sd[bn + "running_mean"] = 0.1 * torch.randn(d, generator=g)
                sd[bn + "running_var"] = 0.5 + torch.rand(d, generator=g)
                sd[bn + "num_batches_tracked"] = torch.tensor(7)
    return sd


def dimap_state_dict(model, scattered: float = 0.5, whole_rows: bool = True, seed: int = 0) -> dict[str, torch.Tensor]:
    """A DIMAP-like Swin state dict (timm layout): the `scattered` share of every block matrix with the smallest
    magnitude zeroed (unstructured, per layer), and, with `whole_rows`, some whole rows too (fc1 rows with and
    without bias, q / k rows + bias, v rows + bias, proj and fc2 columns), which is what exact removal can use."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    for k, v in sd.items():
        if k.startswith("layers.") and k.endswith(".weight") and v.dim() == 2 and "norm" not in k and scattered > 0:
            cut = v.abs().flatten().kthvalue(max(1, int(scattered * v.numel()))).values
            v.mul_((v.abs() > cut).float())
    if not whole_rows:
        return sd
    for s, layer in enumerate(model.layers):
        for i, blk in enumerate(layer.blocks):
            p = f"layers.{s}.blocks.{i}."
            heads, dim = blk.attn.num_heads, blk.norm1.normalized_shape[0]
            hd = dim // heads
            sd[p + "mlp.fc1.weight"][: 5 + i] = 0  # constant GELU(b) units (bias kept)
            sd[p + "mlp.fc1.bias"][:2] = 0  # two of them fully zero
            sd[p + "mlp.fc2.weight"][:, 7] = 0  # a dead output column
            for h in range(heads):
                sd[p + "attn.qkv.weight"][h * hd + (h % 2)] = 0  # q row (head-dependent position) ...
                sd[p + "attn.qkv.bias"][h * hd + (h % 2)] = 0
                sd[p + "attn.qkv.weight"][dim + h * hd + 3] = 0  # ... and a k row + bias elsewhere
                sd[p + "attn.qkv.bias"][dim + h * hd + 3] = 0
                sd[p + "attn.qkv.weight"][2 * dim + h * hd + 2] = 0  # v row + bias
                sd[p + "attn.qkv.bias"][2 * dim + h * hd + 2] = 0
                sd[p + "attn.proj.weight"][:, h * hd + 4] = 0  # a dead proj column
    return sd
