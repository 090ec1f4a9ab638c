# caitdeploy: `make demo` runs the main job on an embedded default, `make test` runs mypy and the tests, `make lint`
# ruff.
# The environments are nox sessions (noxfile.py), each a fresh virtual environment:
#   lint    ruff only, at the version pyproject's `dev` extra pins: .nox/lint (make lint)
#   latest  Python 3.11, `pip install -e '.[test]'`: .nox/latest, which .venv links to (make setup / demo / test);
#           make test runs mypy (pinned in the `dev` and `test` extras, settings: pyproject.toml [tool.mypy]) first
#   floor   Python 3.12, the lent GPU machine's stack (.ci/floor-constraints.txt): .nox/floor (make test-floor)
#   docs    Python 3.11, the `docs` extra (mkdocs + mkdocs-material + playwright) only: .nox/docs (make docs -> site/;
#           the browser test drives Debian's /usr/bin/chromium: apt-get install chromium)
# nox itself lives in .nox/.runner (pip install nox, the only thing installed outside the project's legs).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
OUT := out
NOX_VERSION ?= 2026.10.20
NOX := .nox/.runner/bin/nox

.PHONY: setup demo lint test test-floor docs docs-examples ci aot-check gpu-wheels gpu-check bench-fuse clean

$(NOX):
	$(PYTHON) -m venv .nox/.runner
	.nox/.runner/bin/python -m pip install -q "nox==$(NOX_VERSION)"

setup: $(VENV)/.installed

# a fresh .nox/latest (nox recreates it), then .venv -> .nox/latest (an older real .venv folder is replaced)
$(VENV)/.installed: pyproject.toml | $(NOX)
	$(NOX) -s latest --install-only
	if [ -d $(VENV) ] && [ ! -L $(VENV) ]; then rm -rf $(VENV); fi
	ln -sfn .nox/latest $(VENV)
	touch $@

# CAIT-DeiT-Small at the paper's 55% FLOPs reduction: make a checkpoint, fuse it, export it (ONNX + engine), report.
demo: setup
	mkdir -p $(OUT)
	$(BIN)/caitdeploy make-checkpoint --arch deit_small_patch16_224 --flops-reduction 0.55 --merges 4:h,8:v -o $(OUT)/cait_deit_small.pth
	$(BIN)/caitdeploy fuse $(OUT)/cait_deit_small.pth --report $(OUT)/cait_deit_small.fuse.json
	$(BIN)/caitdeploy export $(OUT)/cait_deit_small.fused.safetensors --trt --report $(OUT)/cait_deit_small.export.json

# ruff check and ruff format --check on the whole tree (settings: pyproject.toml [tool.ruff]), in its own small environment
lint: | $(NOX)
	$(NOX) -s lint

# the latest leg on the environment setup made (-R: reuse it, install nothing): mypy on caitdeploy/, then pytest
test: setup
	$(NOX) -R -s latest

# the floor leg in a fresh environment: tests, the gpu-check rehearsal, AOT with the GPU machine's triton
test-floor: | $(NOX)
	$(NOX) -s floor

# the documentation site into site/ (mkdocs.yml), in its own small environment: `mkdocs build --strict`, so a broken
# link fails it; the CLI reference page is generated from the click commands (docs/gen_cli.py), mermaid is a pinned
# copy served by the site (docs/hooks.py fetches it once from the npm registry). Then docs/check_links.py on site/
# (every internal link and #anchor resolves, no localhost link) and tests/docs/test_site.py: the site served on
# 127.0.0.1 in headless Debian Chromium (/usr/bin/chromium; missing, it fails the leg): navigation, tables and the
# mermaid picture render, no console error, no request leaves 127.0.0.1
docs: | $(NOX)
	$(NOX) -s docs

# the docs' slow examples (blocks marked <!-- docs-test: slow -->: engine builds, int8, servers, training runs), on the
# environment setup made; `make test` ran every other block (tests/docs/test_examples.py, caitdeploy/testing/docs.py)
docs-examples: setup
	CAITDEPLOY_DOCS_SLOW=1 $(BIN)/python -m pytest -q -p no:cacheprovider -n 2 --dist load tests/docs/test_examples.py

# what .ci/run runs
ci: lint test test-floor docs docs-examples aot-check

# Every Triton kernel compiled ahead of time (no GPU needed) for sm_80/86/89/90, each dtype, with this venv's
# triton: everything compiles, a config fits each target's shared memory, sm_90 fp16/bf16 uses wgmma. The floor
# leg does the same with triton 3.6 (the lent GPU machine's). CI runs both.
aot-check: setup
	env -u TRITON_INTERPRET TRITON_DEFAULT_FP_FUSION=1 $(BIN)/python -m caitdeploy.kernels.aot --quick

# Wheels the lent GPU machine lacks or has in another version (polygraphy, onnx-graphsurgeon, timm), at the floor
# leg's versions, into wheels/gpu (< 5 MB): carry that folder. The floor leg does this itself.
gpu-wheels:
	test -x .nox/floor/bin/python || $(NOX) -s floor --install-only
	.nox/floor/bin/python benchmarks/gpu_check.py --download-wheels

# On a machine with a CUDA GPU and no network (see benchmarks/README.md): the carried wheels installed into
# $(GPU_SITE) (no index), then every step into $$GPU_CHECK_OUT. Without CUDA: one line, exit 2, nothing run.
# A re-run of the steps that failed: make gpu-check GPU_CHECK_ARGS=--steps=smoke,kernels
GPU_PYTHON ?= python3
GPU_SITE ?= /tmp/caitdeploy-gpu-site
gpu-check:
	$(eval GPU_WHY := $(shell PYTHONPATH=$(CURDIR) $(GPU_PYTHON) benchmarks/gpu_check.py --why-not 2>&1 | head -n 1))
	$(if $(GPU_WHY),$(error $(GPU_WHY)))
	test ! -d wheels/gpu || $(GPU_PYTHON) -m pip install -q --no-index --no-deps --no-compile --upgrade --target $(GPU_SITE) wheels/gpu/*.whl
	PYTHONPATH=$(GPU_SITE):$(CURDIR) $(GPU_PYTHON) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

bench-fuse: setup
	$(BIN)/python benchmarks/bench_fuse.py

clean:
	rm -rf $(OUT) site .pytest_cache .triton-* .nox $(VENV) docs/javascripts/mermaid.min.js
