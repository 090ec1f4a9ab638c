# caitdeploy: `make demo` runs the main job on an embedded default, `make test` runs the tests.
# Both create the virtual environment at .venv first (python3 -m venv, pip install -e '.[test]').
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
OUT := out

.PHONY: setup demo test bench-fuse clean

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

bench-fuse: setup
	$(BIN)/python benchmarks/bench_fuse.py

clean:
	rm -rf $(OUT) .pytest_cache
