"""Shared fixtures: the tiny checkpoint (generated once per run) and image helpers."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import pytest

# The vLLM tests need vLLM; `make test` runs them in their own environment (.venv-vllm).
collect_ignore_glob = [] if importlib.util.find_spec("vllm") else ["vllm/*"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    from rexomni_server.tiny import make_tiny_model

    yield make_tiny_model(tmp_path_factory.mktemp("tiny-model"))
