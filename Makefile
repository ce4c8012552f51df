# Thin wrappers over pip, pytest and the edgekd CLI. `make demo` and `make test` are the README's first two commands.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch and torchvision are pinned to the pair that installs from this machine kind's local cache and works with timm.
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.edgekd-installed

.PHONY: install demo test test-fast test-floor lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/edgekd distill

test: $(STAMP)
	$(PY) -m pytest -q tests

# Everything but the tests marked slow (end-to-end runs, subprocess kills) or gpu (skipped without one anyway).
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not gpu" tests

# The oldest torch edgekd supports (pyproject: torch>=2.11) is the GPU machine's, torch 2.11 with triton 3.6.
# `make test-floor` runs the CPU suites on it in a venv of its own, so .venv keeps 2.14.1. The version is one pin,
# FLOOR_TORCH_PIN; the stamp's name carries it, so changing it rebuilds the venv. PyPI's torch 2.11 Linux wheel is the
# CUDA build, whose libtorch_cuda.so links cuDNN, cuBLAS, NCCL, ... even to import on a CPU (--no-deps fails with
# "libcudnn.so.9: cannot open shared object file"), so pip brings torch's own nvidia-* pins with it. A constraints
# file holds the pins, so that edgekd's dependencies cannot replace torch or torchvision.
FLOOR_VENV ?= .venv-floor
FLOOR_PY := $(FLOOR_VENV)/bin/python
FLOOR_TORCH_PIN ?= torch==2.11.0 torchvision==0.26.0
# Triton 3.6 (torch 2.11's) runs `range(tensor)` in its CPU interpreter as int() of a 1-element array, a TypeError
# from numpy 2.4 on (triton-lang/triton#9171; triton 3.8 has the fix): every Triton kernel test fails without this.
FLOOR_CONSTRAINTS ?= numpy<2.4
FLOOR_STAMP := $(FLOOR_VENV)/.edgekd-installed-$(subst ==,-,$(firstword $(FLOOR_TORCH_PIN)))
# The CPU-runnable suites that exercise torch most: losses, Triton kernels (interpreter), DDP, training, export.
FLOOR_TESTS ?= tests/losses tests/kernels tests/distributed tests/train tests/export

$(FLOOR_STAMP): pyproject.toml
	$(PYTHON) -m venv --clear $(FLOOR_VENV)
	$(FLOOR_PY) -m pip install -q --upgrade pip
	printf '%s\n' $(foreach pin,$(FLOOR_TORCH_PIN) $(FLOOR_CONSTRAINTS),'$(pin)') > $(FLOOR_VENV)/constraints.txt
	$(FLOOR_PY) -m pip install -q -c $(FLOOR_VENV)/constraints.txt $(FLOOR_TORCH_PIN) -e '.[dev]'
	touch $(FLOOR_STAMP)

test-floor: $(FLOOR_STAMP)
	$(FLOOR_PY) -c "import torch, triton; print('floor: torch', torch.__version__, 'triton', triton.__version__)"
	$(FLOOR_PY) -m pytest -q -m "not gpu" $(FLOOR_TESTS)

lint: $(STAMP)
	$(VENV)/bin/ruff check edgekd kernels export calib tests bench
	$(VENV)/bin/ruff format --check edgekd kernels export calib tests bench

clean:
	rm -rf $(VENV) $(FLOOR_VENV) build *.egg-info

# `make gpu-check OUT=dir` on a GPU machine: bench/gpu_check.py records the environment, runs the GPU tests and measures
# the shared-head loss, the distillation step and mbf latency within 520 s, results (7 files) in OUT.
# `make gpu-check DRY=1` runs the same stages at tiny sizes on the CPU. The Python is PYTHON when given, else .venv's,
# else python3 (the GPU image has no venv); edgekd needs no install there (the script imports it from the tree).
# `make gpu-stamp` writes the commit to bench/.gpu-check-commit, which git neither tracks nor ignores: it travels to a
# device machine, where .git does not, and the environment stage reads it there. DRY=1 stamps too (where git can).
OUT ?= runs/gpu-check
GPU_CHECK_PY = $(if $(filter command line environment,$(origin PYTHON)),$(PYTHON),$(if $(wildcard $(PY)),$(PY),$(PYTHON)))

.PHONY: gpu-check gpu-stamp
gpu-check:
	$(if $(DRY),-$(GPU_CHECK_PY) -m bench.gpu_check --stamp)
	$(GPU_CHECK_PY) -m bench.gpu_check --out $(OUT) $(if $(DRY),--dry-run)

gpu-stamp:
	$(GPU_CHECK_PY) -m bench.gpu_check --stamp
