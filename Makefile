# caitdeploy: `make demo` runs the main job on an embedded default, `make test` runs the tests.
# Both create the virtual environment at .venv first (python3 -m venv, pip install -e '.[test]').
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
OUT := out

.PHONY: setup demo test aot-check gpu-wheels gpu-check bench-fuse clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e '.[test]'
	touch $@

# CAIT-DeiT-Small at the paper's 55% FLOPs reduction: make a checkpoint, fuse it, export it (ONNX + engine), report.
demo: setup
	mkdir -p $(OUT)
	$(BIN)/caitdeploy make-checkpoint --arch deit_small_patch16_224 --flops-reduction 0.55 --merges 4:h,8:v -o $(OUT)/cait_deit_small.pth
	$(BIN)/caitdeploy fuse $(OUT)/cait_deit_small.pth --report $(OUT)/cait_deit_small.fuse.json
	$(BIN)/caitdeploy export $(OUT)/cait_deit_small.fused.safetensors --trt --report $(OUT)/cait_deit_small.export.json

test: setup
	$(BIN)/python -m pytest -q

# Every Triton kernel compiled ahead of time (no GPU needed) for sm_80/86/89/90, each dtype, with this venv's
# triton and with triton 3.6 (what the lent GPU machines carry): everything compiles, a config fits each
# target's shared memory, sm_90 fp16/bf16 uses wgmma. CI runs it after the tests.
TRITON_OLD ?= 3.6.0
aot-check: setup
	env -u TRITON_INTERPRET TRITON_DEFAULT_FP_FUSION=1 $(BIN)/python -m caitdeploy.kernels.aot --quick
	test -d .triton-$(TRITON_OLD) || $(BIN)/python -m pip install -q --no-deps --target .triton-$(TRITON_OLD) triton==$(TRITON_OLD)
	env -u TRITON_INTERPRET PYTHONPATH=.triton-$(TRITON_OLD) $(BIN)/python -m caitdeploy.kernels.aot --quick

# Wheels the lent GPU machine lacks (it has torch, triton, timm, onnx, onnxruntime, safetensors, click, rich,
# matplotlib and no network): carry wheels/gpu there (< 64 MiB).
gpu-wheels: setup
	$(BIN)/python -m pip download -q --no-deps -d wheels/gpu polygraphy onnx-graphsurgeon onnxscript onnx_ir tqdm

# On a machine with a CUDA GPU (see benchmarks/README.md): tests, bench smoke, benchmarks, AOT, into $GPU_CHECK_OUT.
gpu-check:
	test ! -d wheels/gpu || python3 -m pip install -q --no-index --no-deps --find-links wheels/gpu polygraphy onnx-graphsurgeon onnxscript onnx_ir tqdm
	PYTHONPATH=$(CURDIR) python3 benchmarks/gpu_check.py

bench-fuse: setup
	$(BIN)/python benchmarks/bench_fuse.py

clean:
	rm -rf $(OUT) .pytest_cache .triton-*
