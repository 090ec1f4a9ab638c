"""Training with compactors: the wrappers that put compactors and ATME merges into a timm model (`wrappers`) and
the loop (`loop`: data, CDCP controller, checkpoints, torchrun/DDP)."""
