# Two entry points on a fresh machine: `make quickstart` and `make test`.
# Each creates (or reuses) the virtual environment in .venv and installs what it needs.
# TORCH pins the CPU wheel; on a GPU machine run e.g. `make TORCH= test` to keep your own torch.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1

.PHONY: quickstart test lint

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.runtime: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q $(TORCH) -e .
	touch $@

$(VENV)/.test: pyproject.toml Makefile $(VENV)/.runtime
	$(BIN)/python -m pip install -q $(TORCH) -e ".[test]"
	# TRL 1.12, the last with PPO, beside 1.16: the PPO tests run its code in a subprocess
	$(BIN)/python -m pip install -q --no-deps --target $(VENV)/trl-1.12 trl==1.12.0
	touch $@

quickstart: $(VENV)/.runtime
	$(BIN)/prefopt quickstart

test: $(VENV)/.test
	$(BIN)/ruff check -q prefopt tests scripts
	$(BIN)/python -m pytest -q tests

lint: $(VENV)/.test
	$(BIN)/ruff check prefopt tests scripts
