"""``rexomni-server serve``: HTTP and gRPC in one process, on one engine.

The runtime (engine) is owned here, not by either server: both start on it, and on SIGINT or
SIGTERM both stop accepting, drain, and only then is the engine released.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import uvicorn

from rexomni_server.app import create_app
from rexomni_server.runtime import Runtime
from rexomni_server.settings import Settings

if TYPE_CHECKING:
    from rexomni_server.transport.grpc import GrpcServer

log = logging.getLogger(__name__)


@dataclass
class RunningServers:
    """The listeners started by :func:`start_servers` (ports are the bound ones, 0 resolved)."""

    http: uvicorn.Server | None
    http_task: asyncio.Task[None] | None
    grpc: GrpcServer | None
    http_port: int | None = None
    grpc_port: int | None = None

    async def stop(self, grace_s: float = 5.0) -> None:
        """Stop accepting on both at once, then let in-flight requests finish for up to
        ``grace_s`` (uvicorn's own graceful-shutdown timeout is the same setting)."""

        async def stop_http() -> None:
            if self.http is not None and self.http_task is not None:
                self.http.should_exit = True
                with contextlib.suppress(asyncio.CancelledError):
                    await self.http_task

        async def stop_grpc() -> None:
            if self.grpc is not None:
                await self.grpc.stop(grace_s)

        await asyncio.gather(stop_http(), stop_grpc())


class _HTTPServer(uvicorn.Server):
    """uvicorn without its own signal handlers: ``serve`` owns SIGTERM/SIGINT and stops HTTP and
    gRPC together (uvicorn's handler would drain HTTP alone while gRPC kept accepting)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def _serve_http(server: uvicorn.Server) -> None:
    try:
        await server.serve()
    except SystemExit as exc:  # uvicorn exits the process when it cannot bind; we report it
        raise OSError(f"the HTTP server stopped (uvicorn exit status {exc.code})") from None


async def start_servers(runtime: Runtime, host: str, http_port: int | None, grpc_port: int | None) -> RunningServers:
    """Start HTTP (uvicorn) and/or gRPC on ``runtime``; ``None`` leaves a transport off."""
    servers = RunningServers(http=None, http_task=None, grpc=None)
    if grpc_port is not None:
        from rexomni_server.transport.grpc import GrpcServer

        servers.grpc = GrpcServer(runtime, host, grpc_port)
        await servers.grpc.start()
        servers.grpc_port = servers.grpc.port
        fields = {"host": host, "port": servers.grpc_port, "tls": runtime.settings.tls}
        log.info("gRPC listening", extra={"fields": fields})
    if http_port is not None:
        app = create_app(runtime=runtime, manage_runtime=False)
        settings = runtime.settings
        config = uvicorn.Config(
            app,
            host=host,
            port=http_port,
            log_config=None,
            access_log=False,
            lifespan="off",
            ssl_certfile=settings.tls_cert_file,
            ssl_keyfile=settings.tls_key_file,
            # In-flight responses (SSE streams included) get the drain timeout, then are cut.
            timeout_graceful_shutdown=math.ceil(settings.drain_timeout_s),
        )
        servers.http = _HTTPServer(config)
        servers.http_task = asyncio.create_task(_serve_http(servers.http))
        while not servers.http.started:
            if servers.http_task.done():  # e.g. the port is taken: uvicorn exits
                await servers.stop()
                raise OSError(f"HTTP server could not start on {host}:{http_port}")
            await asyncio.sleep(0.01)
        servers.http_port = servers.http.servers[0].sockets[0].getsockname()[1]
        fields = {"host": host, "port": servers.http_port, "tls": settings.tls}
        log.info("HTTPS listening" if settings.tls else "HTTP listening", extra={"fields": fields})
    return servers


async def serve(settings: Settings) -> None:
    runtime = Runtime(settings)
    runtime.start_background()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    servers: RunningServers | None = None
    try:
        servers = await start_servers(
            runtime,
            settings.host,
            settings.port if settings.http_enabled else None,
            settings.grpc_port if settings.grpc_enabled else None,
        )
        waiters: list[asyncio.Future[object]] = [asyncio.ensure_future(stop.wait())]
        if servers.http_task is not None:
            waiters.append(servers.http_task)  # type: ignore[arg-type]
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        log.info("shutting down", extra={"fields": {"in_flight": runtime.service.in_flight}})
        if servers is not None:
            await servers.stop(settings.drain_timeout_s)
        await runtime.stop()  # also when a port was taken: the model load is abandoned, not awaited
