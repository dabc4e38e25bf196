# Two entry points for a fresh machine (see README): `make repro` and `make test`.
# Each creates .venv, installs mechdiff with its pinned dependencies, then runs.
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
export PATH := $(BIN):$(PATH)
export DVC_NO_ANALYTICS := 1
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: setup repro test

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

repro: setup
	$(BIN)/dvc repro

test: setup
	$(BIN)/python -m pytest -q
