# One virtual environment for everything; `make serve` and `make test` install what they need.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU build of torch (on a GPU machine, install your CUDA torch into the venv first).
TORCH_SPEC ?= torch==2.13.0

.PHONY: install serve test lint typecheck unit proto

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[transformers,dev]"
	touch $@

install: $(VENV)/.installed

# The server on the real model when it can be had, else the tiny random-weight model (labelled).
serve: install
	$(BIN)/rexomni-server serve --fallback-to-tiny $(ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python proto/generate.py --check

typecheck: install
	$(BIN)/mypy

unit: install
	$(BIN)/pytest tests/unit -q

test: lint typecheck
	$(BIN)/pytest -q

proto: install
	$(BIN)/python proto/generate.py
