"""Shared fixtures: the tiny checkpoint (generated once per run) and image helpers."""

from __future__ import annotations

import importlib.util
import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

# The vLLM tests need vLLM; `make test` runs them in their own environment (.venv-vllm).
collect_ignore_glob = [] if importlib.util.find_spec("vllm") else ["vllm/*"]


def image_bytes(width: int = 640, height: int = 480, fmt: str = "PNG", mode: str = "RGB", **save: object) -> bytes:
    colour: object = (30, 120, 200) if mode in ("RGB", "RGBA") else 128
    buf = io.BytesIO()
    Image.new(mode, (width, height), colour).save(buf, fmt, **save)  # type: ignore[arg-type]
    return buf.getvalue()


def noise_png(width: int, height: int, seed: int = 0) -> bytes:
    """A PNG of random pixels: it does not compress, so its size is about width * height * 3."""
    import random

    pixels = random.Random(seed).randbytes(width * height * 3)
    buf = io.BytesIO()
    Image.frombytes("RGB", (width, height), pixels).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    from rexomni_server.tiny import make_tiny_model

    yield make_tiny_model(tmp_path_factory.mktemp("tiny-model"))
