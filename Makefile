# Every target makes its own environment in $(VENV) first.
# torch comes from pip's configured index unless TORCH_INDEX names another. From PyPI,
# torch==2.13.0 on Linux is the CUDA build (GBs); on a CPU-only machine set TORCH_INDEX to
# PyTorch's CPU index. On a GPU machine set TORCH_SPEC to the torch build you want.
VENV ?= .venv
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
export CUDA_HOME ?= /usr/local/cuda

BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint gpu-check clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"
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
