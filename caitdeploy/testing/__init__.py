"""Generators of upstream layouts and small models shared by tests and benchmarks (and the harnesses both run).

    checkpoints   random_checkpoint: a small `cait-compactor/1` checkpoint from random weights (no downloads)
    cli           one_line_error, run_cli_limited: the CLI's error contract, the CLI under RLIMIT_AS
    upstream_sit, upstream_spvit, upstream_swin
                  other systems' checkpoint layouts (SiT / LV-ViT, SPViT, Swin), written from docs/formats/
    fuzz          the reader-fuzzing harness (hypothesis: the `test` extra); benchmarks/fuzz_readers.py runs it
    gpu_check     the plan `make gpu-check` runs on a CUDA machine (benchmarks/gpu_check.py) and its rehearsal

Tests and benchmarks import these modules; neither reaches into the other's folder. Nothing here is imported by
the rest of the package, and optional test-only dependencies (hypothesis) are imported inside functions.
"""
