"""A real vLLM engine (CPU build in CI) on the tiny checkpoint, started once for the module.

Not collected where vLLM is not installed (see tests/conftest.py); `make test` runs this
folder in the vLLM environment (`make vllm-env`), so CI always exercises it."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from rexomni_server.runtime import Runtime
from rexomni_server.serve import RunningServers, start_servers
from rexomni_server.settings import Settings

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache on the CPU build


def vllm_settings(model_dir: Path, **overrides: object) -> Settings:
    """The vLLM engine on the tiny checkpoint, forced outputs allowed."""
    return Settings(
        model=str(model_dir),
        engine="vllm",
        allow_forced_output=True,
        enforce_eager=True,  # no graph capture: ~half the start-up time on CPU
        max_model_len=4096,
        **overrides,  # type: ignore[arg-type]
    )


@pytest.fixture(scope="session")
async def vllm_runtime(tiny_model_dir: Path) -> AsyncIterator[Runtime]:
    runtime = Runtime(vllm_settings(tiny_model_dir))
    await runtime.engine.start()
    yield runtime
    await runtime.stop()


@pytest.fixture(scope="session")
async def vllm_servers(vllm_runtime: Runtime) -> AsyncIterator[RunningServers]:
    servers = await start_servers(vllm_runtime, "127.0.0.1", 0, 0)
    yield servers
    await servers.stop(0)
