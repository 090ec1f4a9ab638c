"""Decisions the GPU paths make, as pure functions a CPU can test, and shared runner helpers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from caitdeploy.core.errors import CaitError

# ONNX Runtime type strings -> torch dtypes (what an IO binding must allocate)
ORT_TYPES: dict[str, torch.dtype] = {
    "tensor(float)": torch.float32,
    "tensor(float16)": torch.float16,
    "tensor(bfloat16)": torch.bfloat16,
    "tensor(double)": torch.float64,
    "tensor(int64)": torch.int64,
    "tensor(int32)": torch.int32,
    "tensor(int8)": torch.int8,
    "tensor(uint8)": torch.uint8,
    "tensor(bool)": torch.bool,
}


def torch_dtype_of_ort(type_str: str, what: str = "tensor") -> torch.dtype:
    if type_str not in ORT_TYPES:
        raise CaitError(f"{what}: ONNX Runtime type {type_str!r} has no torch buffer type")
    return ORT_TYPES[type_str]


@dataclass(frozen=True)
class RuntimeSpec:
    """Where and how a runner runs: device "cpu" | "cuda", threads (CPU), compile mode (torch.compile)."""

    device: str = "cpu"
    threads: int | None = None
    compile_mode: str | None = None

    def __post_init__(self) -> None:
        if self.device not in ("cpu", "cuda"):
            raise CaitError(f"device {self.device!r}: cpu or cuda")


def choose_providers(
    available: list[str],
    device: str,
    *,
    fp16: bool = False,
    batch: int = 1,
    input_name: str = "images",
    chw: tuple[int, int, int] | None = None,
    trt_cache_dir: str | None = None,
) -> list[Any]:
    """ONNX Runtime execution providers, in order: TensorRT EP > CUDA EP > CPU EP on CUDA, CPU EP on CPU.

    Raises CaitError when a GPU is asked for and this onnxruntime has no GPU provider (the CPU-only wheel)."""
    if device == "cpu":
        return ["CPUExecutionProvider"]
    gpu = [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in available]
    if not gpu:
        raise CaitError("onnxruntime has no GPU execution provider (install onnxruntime-gpu instead of onnxruntime)")
    out: list[Any] = []
    if "TensorrtExecutionProvider" in gpu:
        opts: dict[str, Any] = {"trt_fp16_enable": fp16}
        if chw is not None:
            shape = f"{input_name}:{{}}x{chw[0]}x{chw[1]}x{chw[2]}"
            opts.update(
                trt_profile_min_shapes=shape.format(1),
                trt_profile_opt_shapes=shape.format(batch),
                trt_profile_max_shapes=shape.format(batch),
            )
        if trt_cache_dir is not None:
            opts.update(trt_engine_cache_enable=True, trt_engine_cache_path=trt_cache_dir)
        out.append(("TensorrtExecutionProvider", opts))
    if "CUDAExecutionProvider" in gpu:
        out.append("CUDAExecutionProvider")
    return out + ["CPUExecutionProvider"]


def cuda_graphs_ok(
    device: str, backend: str, compile_mode: str | None, dynamic_shapes: bool = False
) -> tuple[bool, str]:
    """(whether a run captures CUDA graphs, why). CUDA graphs need a CUDA device, torch.compile in a mode that
    captures them ("reduce-overhead" or "max-autotune"), and static shapes (one graph per input shape)."""
    if device != "cuda":
        return False, "CUDA graphs need a CUDA device"
    if backend != "compile":
        return False, f"backend {backend} does not capture CUDA graphs (torch.compile does)"
    if compile_mode not in ("reduce-overhead", "max-autotune"):
        return False, f"torch.compile mode {compile_mode or 'default'} does not capture CUDA graphs"
    if dynamic_shapes:
        return False, "dynamic shapes: CUDA graphs are captured per static shape"
    return True, f"torch.compile mode {compile_mode} captures CUDA graphs"


def quiet_polygraphy() -> None:
    """Polygraphy's logger prints progress at INFO; caitdeploy's output is its own."""
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.ERROR
