"""Triton kernels for CAIT-compressed ViTs, each with a plain PyTorch reference.

* atme_merge_linear / atme_merge_linear_ref: ATME token merge (two neighbouring
  patch tokens -> Linear(2D -> D)), horizontal ("h") or vertical ("v").
* attention / attention_ref: softmax(q k^T * scale) v with Dqk != Dv allowed.

Importing this package never imports triton: the Triton kernels are defined
on their first call (see kernels/_runtime.py), so the references work
everywhere and a missing triton only fails the Triton entry points, with
TritonUnavailableError (an ImportError).
"""

from caitdeploy.kernels._runtime import TritonUnavailableError, interpret_requested, triton_available
from caitdeploy.kernels.atme_merge import atme_merge_linear, atme_merge_linear_ref, merged_grid
from caitdeploy.kernels.attention import MAX_HEAD_DIM, attention, attention_ref

__all__ = [
    "MAX_HEAD_DIM",
    "TritonUnavailableError",
    "atme_merge_linear",
    "atme_merge_linear_ref",
    "attention",
    "attention_ref",
    "interpret_requested",
    "merged_grid",
    "triton_available",
]
