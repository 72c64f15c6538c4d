"""``rexomni-server serve``: HTTP and gRPC in one process, on one engine.

The runtime (engine) is owned here, not by either server: both start on it, and on SIGINT or
SIGTERM both stop accepting, drain, and only then is the engine released.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

import uvicorn

from rexomni_server.app import create_app
from rexomni_server.runtime import Runtime
from rexomni_server.settings import Settings

log = logging.getLogger(__name__)


async def serve(settings: Settings) -> None:
    runtime = Runtime(settings)
    runtime.start_background()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        # signal.signal (not loop.add_signal_handler) so uvicorn, which re-raises the signals
        # it captured after its own shutdown, lands here instead of killing the process.
        signal.signal(sig, lambda *_: loop.call_soon_threadsafe(stop.set))

    http: uvicorn.Server | None = None
    http_task: asyncio.Task[None] | None = None
    grpc_server = None
    try:
        if settings.grpc_enabled:
            from rexomni_server.transport.grpc import GrpcServer

            grpc_server = GrpcServer(runtime, settings.host, settings.grpc_port)
            await grpc_server.start()
            log.info("gRPC listening", extra={"fields": {"host": settings.host, "port": grpc_server.port}})
        if settings.http_enabled:
            app = create_app(runtime=runtime, manage_runtime=False)
            config = uvicorn.Config(
                app, host=settings.host, port=settings.port, log_config=None, access_log=False
            )
            http = uvicorn.Server(config)
            http_task = asyncio.create_task(http.serve())
            log.info("HTTP listening", extra={"fields": {"host": settings.host, "port": settings.port}})
        waiters = [asyncio.create_task(stop.wait())] + ([http_task] if http_task else [])
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        log.info("shutting down")
        if http is not None and http_task is not None:
            http.should_exit = True
            with contextlib.suppress(asyncio.CancelledError):
                await http_task
        if grpc_server is not None:
            await grpc_server.stop()
        await runtime.stop()
