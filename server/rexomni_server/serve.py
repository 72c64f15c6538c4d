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
from typing import TYPE_CHECKING, Any

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


class _HeaderTimeout:
    """Mixed into uvicorn's HTTP protocol: a connection that has not sent a whole request head
    within ``header_timeout_s`` of connecting (or of its last answer) is closed. uvicorn has no
    such timer: headers sent a byte at a time (slowloris) keep a connection, and its keep-alive
    timer, alive for ever."""

    header_timeout_s = 10.0
    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self._arm_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        super().connection_lost(exc)  # type: ignore[misc]

    def _arm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        loop: asyncio.AbstractEventLoop = self.loop  # type: ignore[attr-defined]
        self._header_timer = loop.call_later(self.header_timeout_s, self._header_timed_out)

    def _header_timed_out(self) -> None:
        cycle = self.cycle  # type: ignore[attr-defined]
        transport: asyncio.Transport = self.transport  # type: ignore[attr-defined]
        if (cycle is None or cycle.response_complete) and not transport.is_closing():
            transport.close()


def http_protocol(header_timeout_s: float) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol (httptools where installed, else h11) with the header timeout."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    return type("GuardedHTTPProtocol", (_HeaderTimeout, AutoHTTPProtocol), {"header_timeout_s": header_timeout_s})


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
            # Past this many connections (or requests) at once, uvicorn answers 503 itself.
            limit_concurrency=settings.http_max_connections,
            timeout_keep_alive=settings.http_keep_alive_timeout_s,
            http=http_protocol(settings.http_header_timeout_s),
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


EXIT_FATAL = 1  # the model could not be loaded, or the engine died: restart me


async def serve(settings: Settings, runtime: Runtime | None = None) -> int:
    """Serve until SIGINT/SIGTERM (exit status 0) or a fatal engine error (EXIT_FATAL, after
    ``engine_failure_exit_s`` of answering 503 so probes and load balancers see why)."""
    runtime = runtime or Runtime(settings)
    runtime.start_background()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    servers: RunningServers | None = None
    status = 0
    try:
        servers = await start_servers(
            runtime,
            settings.host,
            settings.port if settings.http_enabled else None,
            settings.grpc_port if settings.grpc_enabled else None,
        )
        stopped, fatal = asyncio.ensure_future(stop.wait()), asyncio.ensure_future(runtime.fatal.wait())
        waiters: list[asyncio.Future[Any]] = [stopped, fatal]
        if servers.http_task is not None:
            waiters.append(servers.http_task)
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        if runtime.fatal.is_set():
            status = EXIT_FATAL
            log.error("exiting after %g s: %s", settings.engine_failure_exit_s, runtime.error)
            await asyncio.wait([stopped], timeout=settings.engine_failure_exit_s)  # a signal cuts it short
        for waiter in (stopped, fatal):
            waiter.cancel()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        log.info("shutting down", extra={"fields": {"in_flight": runtime.service.in_flight}})
        if servers is not None:
            # After a fatal error the requests in flight have failed already: nothing to wait for.
            grace = (
                settings.drain_timeout_s
                if status == 0
                else min(settings.drain_timeout_s, settings.engine_failure_exit_s)
            )
            await servers.stop(grace)
        await runtime.stop()  # also when a port was taken: the model load is abandoned, not awaited
    return status
