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

ATTN_COMPACTORS = ("q", "k", "v")
COMPACTORS = (*ATTN_COMPACTORS, "fc1")
MERGE_KEY = {"h": "htm", "v": "vtm"}  # merge kind -> module name in a cait-compactor/1 checkpoint
FUSED_MERGE = "merge"  # module name of a merge in a fused model


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
