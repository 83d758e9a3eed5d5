# Two commands on a fresh machine: `make export` (the main job) and `make test`. Both set up what they need.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TARGET ?= cpu-ort
TORCH := torch==2.13.0
# For tests only (torchvision's VisionTransformer): without its dependencies, which would replace the CPU torch with a
# CUDA build; its C operators do not load beside this torch, and the tests import its pure-Python models without them.
TORCHVISION := torchvision==0.28.0
FASHION := /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz

.PHONY: export test bench gpu-check setup data clean

export: setup data
	$(BIN)/edgefuse export --force --target $(TARGET)

# Two worker processes, each running whole test files (a file's fixtures are built once) with one torch thread: on
# 2 cores the suite takes about 5 minutes (4m01s–5m52s over six runs on a clean build/cache). TEST_WORKERS=0 runs
# it in one process.
TEST_WORKERS ?= 2

test: setup
	@$(MAKE) --no-print-directory data || echo "make test: Fashion-MNIST unavailable, its tests will skip"
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

bench: setup data
	$(BIN)/python benchmarks/bench.py

# The export for desktop-cuda (every candidate timed on the GPU) on a machine with one CUDA GPU and build/cache
# (trained zoo weights) copied in. No install step: that machine may have no package registry, so it runs on its
# own python3 (torch with CUDA, numpy, scipy, onnx, onnxruntime, safetensors, click, rich, matplotlib).
# Fashion-MNIST: the Debian package, or its four files in build/data/fashion-mnist. GPU_CHECK_ARGS: --arch, --align, --out.
gpu-check:
	PYTHONPATH=. $(PYTHON) -m edgefuse.jobs.gpucheck $(GPU_CHECK_ARGS)

setup: $(VENV)/.installed

# The CPU torch wheel first (a bare `torch` requirement would pull a CUDA build of several GB), then the project.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[test]'
	$(BIN)/python -m pip install -q --no-deps $(TORCHVISION)
	touch $@

# Fashion-MNIST comes from the Debian package; install it when we may, else say exactly what to run.
data:
	@if [ -f $(FASHION) ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then \
		(apt-get install -y -q dataset-fashion-mnist || (apt-get update -q && apt-get install -y -q dataset-fashion-mnist)) >/dev/null; \
	elif sudo -n true 2>/dev/null; then \
		(sudo apt-get install -y -q dataset-fashion-mnist || (sudo apt-get update -q && sudo apt-get install -y -q dataset-fashion-mnist)) >/dev/null; \
	fi; \
	if [ ! -f $(FASHION) ]; then \
		echo "Fashion-MNIST is missing: run 'sudo apt-get install dataset-fashion-mnist', then retry"; exit 1; \
	fi

clean:
	rm -rf build
