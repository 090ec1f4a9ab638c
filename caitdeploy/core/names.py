"""The formats' names and key layout, in one place (docs/CHECKPOINT_FORMAT.md is the contract).

`cait-compactor/1`: a CAIT training checkpoint (timm ViT keys + compactors + ATME merges).
`cait-fused/1`: a fused model (safetensors; config in the metadata).
`caitdeploy-onnx/1`, `caitdeploy-engine/1`: our ONNX metadata and engine sidecars.
"""
from __future__ import annotations

FORMAT = "cait-compactor/1"
FUSED_FORMAT = "cait-fused/1"
ONNX_FORMAT = "caitdeploy-onnx/1"
ENGINE_FORMAT = "caitdeploy-engine/1"

CONFIG_KEYS = ("img_size", "patch_size", "in_chans", "num_classes", "embed_dim", "depth", "num_heads",
               "mlp_ratio", "qkv_bias")
# optional `config` keys of a cait-compactor/1 checkpoint -> (default, accepted types). The model options of
# `CaitConfig` plus two the training model has and the fused model folds away: `layer_scale` (DeiT III's
# ls1/ls2 gammas, folded into proj/fc2) and `skip_lam` (LV-ViT's residual divisor, folded likewise); `arch`
# names the timm model the checkpoint came from (informational).
OPTIONAL_CONFIG: dict[str, tuple] = {
    "family": ("vit", (str,)),
    "arch": (None, (str, type(None))),
    "class_token": (True, (bool,)),
    "dist_token": (False, (bool,)),
    "reg_tokens": (0, (int,)),
    "no_embed_class": (False, (bool,)),
    "global_pool": ("token", (str,)),
    "fc_norm": (False, (bool,)),
    "ln_eps": (1e-6, (int, float)),
    "layer_scale": (False, (bool,)),
    "skip_lam": (1.0, (int, float)),
    "stem": ("patch", (str,)),
}
ATTN_COMPACTORS = ("q", "k", "v")
COMPACTORS = (*ATTN_COMPACTORS, "fc1")
MERGE_KEY = {"h": "htm", "v": "vtm"}           # merge kind -> module name in a cait-compactor/1 checkpoint
FUSED_MERGE = "merge"                            # module name of a merge in a fused model


def compactor_prefix(block: int, name: str) -> str:
    """Key prefix of a compactor ("q", "k", "v" or "fc1") of block `block`; + ".weight" / ".mask"."""
    if name == "fc1":
        return f"blocks.{block}.mlp.fc1_compactor"
    if name not in ATTN_COMPACTORS:
        raise ValueError(f"unknown compactor {name!r}")
    return f"blocks.{block}.attn.{name}_compactor"


def merge_prefix(block: int, kind: str) -> str:
    """Key prefix of the ATME merge Linear of block `block` in a checkpoint; + ".weight" / ".bias"."""
    return f"blocks.{block}.{MERGE_KEY[kind]}.fc"
