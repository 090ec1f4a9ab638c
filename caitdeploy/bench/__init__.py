"""`caitdeploy bench`: CAIT vs dense vs ToMe over PyTorch, torch.compile, ONNX Runtime, TensorRT, Triton."""

from caitdeploy.bench.report import print_table, to_markdown, write_markdown, write_plot, write_records_json
from caitdeploy.bench.run import add_speedups, build_models, run_bench
from caitdeploy.bench.runners import (
    BACKENDS,
    MEASURED_KEYS,
    RECORD_KEYS,
    RECORD_SCHEMA,
    BenchModel,
    RunOptions,
    Timing,
    run_one,
)

__all__ = [
    "BACKENDS",
    "MEASURED_KEYS",
    "RECORD_KEYS",
    "RECORD_SCHEMA",
    "BenchModel",
    "RunOptions",
    "Timing",
    "add_speedups",
    "build_models",
    "print_table",
    "run_bench",
    "run_one",
    "to_markdown",
    "write_markdown",
    "write_plot",
    "write_records_json",
]
