"""Baselines the CAIT models are benchmarked against."""

from caitdeploy.baselines.tome import (
    ToMeViT,
    bipartite_soft_matching,
    choose_r,
    describe_r,
    merge_wavg,
    r_schedule,
    tome_flops,
    tome_model,
    tome_tokens,
)

__all__ = [
    "ToMeViT",
    "bipartite_soft_matching",
    "choose_r",
    "describe_r",
    "merge_wavg",
    "r_schedule",
    "tome_flops",
    "tome_model",
    "tome_tokens",
]
