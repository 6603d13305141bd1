# Every target makes its own environment in $(VENV) first.
# On a CPU machine torch must be the local CPU wheel (a plain `torch` pulls GBs of CUDA);
# on a GPU machine set TORCH_SPEC to the torch build you want.
VENV ?= .venv
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
export CUDA_HOME ?= /usr/local/cuda

BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint gpu-check clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

demo: $(STAMP)
	$(BIN)/sla-tl demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q
	$(BIN)/sla-tl kernels

gpu-check:
	bash benchmarks/gpu_check.sh

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
