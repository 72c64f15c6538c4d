"""A real transformers engine on the tiny checkpoint, started once and shared."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from rexomni_server.app import create_app
from rexomni_server.runtime import Runtime
from rexomni_server.settings import Settings


@pytest.fixture(scope="session")
async def tiny_runtime(tiny_model_dir: Path) -> AsyncIterator[Runtime]:
    settings = Settings(model=str(tiny_model_dir), engine="transformers", allow_forced_output=True)
    runtime = Runtime(settings)
    await runtime.engine.start()
    yield runtime
    await runtime.stop()


@pytest.fixture(scope="session")
async def tiny_client(tiny_runtime: Runtime) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(runtime=tiny_runtime)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://tiny") as client:
        yield client


@pytest.fixture(scope="session")
async def live_servers(tiny_runtime: Runtime) -> AsyncIterator[tuple[str, str]]:
    """A real uvicorn and a real grpc.aio server on loopback, sharing the tiny engine.
    Yields (http base url, grpc target)."""
    from rexomni_server.serve import start_servers

    servers = await start_servers(tiny_runtime, "127.0.0.1", 0, 0)
    yield f"http://127.0.0.1:{servers.http_port}", f"127.0.0.1:{servers.grpc_port}"
    await servers.stop(0)
