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
    import asyncio

    import uvicorn

    from rexomni_server.transport.grpc import GrpcServer

    app = create_app(runtime=tiny_runtime, manage_runtime=False)
    http = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None, lifespan="off"))
    task = asyncio.create_task(http.serve())
    while not http.started:
        await asyncio.sleep(0.02)
    port = http.servers[0].sockets[0].getsockname()[1]
    grpc_server = GrpcServer(tiny_runtime, "127.0.0.1", 0)
    await grpc_server.start()
    yield f"http://127.0.0.1:{port}", f"127.0.0.1:{grpc_server.port}"
    await grpc_server.stop(0)
    http.should_exit = True
    await task
