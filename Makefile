# Thin wrappers over pip, pytest and the edgekd CLI. `make demo` and `make test` are the README's first two commands.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch and torchvision are pinned to the pair that installs from this machine kind's local cache and works with timm.
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.edgekd-installed

.PHONY: install demo test test-fast lint bench clean

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

lint: $(STAMP)
	$(VENV)/bin/ruff check edgekd kernels export calib tests bench
	$(VENV)/bin/ruff format --check edgekd kernels export calib tests bench

clean:
	rm -rf $(VENV) build *.egg-info

# `make gpu-check OUT=dir` on a GPU machine: bench/gpu_check.py records the environment, runs the GPU tests and measures
# the shared-head loss, the distillation step and mbf latency in under 8 minutes, results (8 files) in OUT.
# `make gpu-check DRY=1` runs the same stages at tiny sizes on the CPU. The Python is PYTHON when given, else .venv's,
# else python3 (the GPU image has no venv); edgekd needs no install there (the script imports it from the tree).
OUT ?= runs/gpu-check
GPU_CHECK_PY = $(if $(filter command line environment,$(origin PYTHON)),$(PYTHON),$(if $(wildcard $(PY)),$(PY),$(PYTHON)))

.PHONY: gpu-check
gpu-check:
	$(GPU_CHECK_PY) bench/gpu_check.py --out $(OUT) $(if $(DRY),--dry-run)
