"""The FastAPI application factory (HTTP composition root)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rexomni_server import __version__
from rexomni_server.accounting import deadline_guard
from rexomni_server.auth import API_KEY_HEADER, AUTHORIZATION_HEADER, ApiKeys
from rexomni_server.errors import BodyTimeout, ImageTooLarge, RequestTimeout, RexOmniError, Unauthenticated
from rexomni_server.playground import PLAYGROUND_PATHS, playground_router
from rexomni_server.runtime import Runtime
from rexomni_server.schemas import REQUEST_ID_HEADER
from rexomni_server.service import new_request_id
from rexomni_server.settings import Settings
from rexomni_server.transport.http import (
    DETECT_PATHS,
    add_request_schemas,
    build_router,
    error_response,
    http_status,
    install_error_handlers,
    record_of,
)
from rexomni_server.transport.label_studio import label_studio_router
from rexomni_server.vocabulary import REQUEST_OVERHEAD_BYTES


class RequestIdMiddleware:
    """Accepts ``X-Request-ID`` (or makes one), exposes it as ``request.state.request_id`` and
    returns it on every response. Pure ASGI, so streaming responses are not buffered."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header = REQUEST_ID_HEADER.lower().encode()
        given = dict(scope.get("headers", [])).get(header, b"").decode("latin-1").strip()[:128]
        request_id = given or new_request_id()
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != header]
                headers.append((header, request_id.encode("latin-1")))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_id)


async def send_error(scope: Scope, receive: Receive, send: Send, exc: RexOmniError) -> None:
    """Answer ``exc`` in the documented error body, and put its code on the request's record."""
    record = record_of(scope)
    if record is not None:
        record.fail(exc.code)
    request_id = scope.get("state", {}).get("request_id")
    response = error_response(http_status(exc), exc.code, exc.message, request_id, exc.retry_after_s)
    if isinstance(exc, Unauthenticated):
        response.headers["WWW-Authenticate"] = "Bearer"
    await response(scope, receive, send)


class RequestScopeMiddleware:
    """One record per detect request, opened before anything can refuse it and closed (logged
    and counted, once) when the answer is sent; see ``accounting``. It also holds the request
    to its time budget when the client stops reading an answer (see ``deadline_guard``)."""

    def __init__(self, app: ASGIApp, runtime: Runtime) -> None:
        self.app = app
        self.ledger = runtime.service.ledger

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or route_path(scope) not in DETECT_PATHS:
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                status = int(message["status"])
                if status >= 400 and record.status is None:  # a refusal no handler of ours named
                    record.fail(f"http_{status}")
            await send(message)

        with self.ledger.scope(scope["state"]["request_id"], "http") as record:
            scope["state"]["record"] = record
            try:
                async with deadline_guard(record):
                    await self.app(scope, receive, tracking_send)
            except TimeoutError:
                exc = RequestTimeout("the request exceeded its time budget (its client stopped reading)")
                if started:  # mid-answer: nothing more can be said; the connection is closed
                    record.fail(exc.code)
                    return
                await send_error(scope, receive, send, exc)


class BodyGuardMiddleware:
    """Request bodies: 413 over ``max_bytes`` before they are read into memory (by the
    Content-Length header when there is one, else by counting the streamed chunks), and 408
    when the whole body takes longer than ``timeout_s`` to arrive (a slow-body attack)."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers", [])).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await send_error(scope, receive, send, self._too_large())
            return
        seen = 0
        complete = False
        refused = False
        loop = asyncio.get_running_loop()
        body_deadline = loop.time() + self.timeout_s

        async def guarded_receive() -> Message:
            nonlocal seen, complete, refused
            if complete or refused:  # the body is in: what follows is the wait for a disconnect
                return await receive()
            try:
                async with asyncio.timeout_at(body_deadline):
                    message = await receive()
            except TimeoutError:
                refused = True
                await send_error(
                    scope, receive, send, BodyTimeout(f"the request body took longer than {self.timeout_s:g} s")
                )
                return {"type": "http.disconnect"}  # tells the app the client left, so it stops reading
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                complete = not message.get("more_body", False)
                if seen > self.max_bytes:
                    refused = True
                    await send_error(scope, receive, send, self._too_large())
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            if not refused:  # the refusal already went out
                await send(message)

        try:
            await self.app(scope, guarded_receive, guarded_send)
        except Exception:
            if not refused:
                raise
            # Refused and answered: the app's own trouble with the body it never got is moot.

    def _too_large(self) -> ImageTooLarge:
        return ImageTooLarge(f"request body is larger than {self.max_bytes} bytes")


# Open without a key: probes, scrapers and the API's own description (its pages and their
# assets, served from the package: no CDN). Everything else, present and future, needs one
# (deny by default).
DOCS_ASSETS = "/docs-assets"
OPEN_PATHS = frozenset(
    {"/health", "/ready", "/metrics", "/v1/tasks", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}
    | PLAYGROUND_PATHS  # a static page; the key is typed into it and sent with its requests
)
OPEN_PREFIXES = (f"{DOCS_ASSETS}/",)


def is_open(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


def route_path(scope: Scope) -> str:
    """The path as routes see it (without a ``root_path`` prefix set by a proxy)."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


class ApiKeyMiddleware:
    """Requests without a valid API key get 401 before their bodies are read (an
    unauthenticated client cannot make the server read megabytes); see OPEN_PATHS."""

    def __init__(self, app: ASGIApp, keys: ApiKeys) -> None:
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = route_path(scope) if scope["type"] == "http" else ""
        if scope["type"] != "http" or not self.keys.enabled or is_open(path):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers", []))

        def header(name: str) -> str | None:
            value: bytes | None = headers.get(name.encode())
            return value.decode("latin-1") if value else None

        try:
            self.keys.check(header(AUTHORIZATION_HEADER), header(API_KEY_HEADER))
        except Unauthenticated as exc:
            await send_error(scope, receive, send, exc)
            return
        await self.app(scope, receive, send)


def document_api(app: FastAPI, keys: ApiKeys) -> None:
    """The OpenAPI document, completed: the JSON request body the detect routes parse themselves,
    and, when keys are on, the API-key schemes on every operation the keys close (see
    OPEN_PATHS), so generated clients and the /docs page know to send a key."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            add_request_schemas(schema)
            if keys.enabled:
                schema.setdefault("components", {})["securitySchemes"] = {
                    "bearer": {"type": "http", "scheme": "bearer"},
                    "apiKeyHeader": {"type": "apiKey", "in": "header", "name": API_KEY_HEADER},
                    "basic": {"type": "http", "scheme": "basic"},  # the key as the password
                }
                for path, operations in schema["paths"].items():
                    if not is_open(path):
                        for operation in operations.values():
                            operation["security"] = [{"bearer": []}, {"apiKeyHeader": []}, {"basic": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def max_body_bytes(settings: Settings) -> int:
    """The largest useful body: a base64 image at the byte limit, plus room for the fields."""
    return settings.max_image_bytes * 4 // 3 + REQUEST_OVERHEAD_BYTES


def create_app(
    settings: Settings | None = None, runtime: Runtime | None = None, *, manage_runtime: bool = True
) -> FastAPI:
    """``manage_runtime=False`` when another owner (``serve``, tests) starts and stops the engine."""
    settings = settings or (runtime.settings if runtime else Settings())
    runtime = runtime or Runtime(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not manage_runtime:
            yield
            return
        runtime.start_background()
        try:
            yield
        finally:
            await runtime.stop()

    # FastAPI with /docs and /redoc whose scripts, styles and icon come from the package (an
    # air-gapped cluster has no CDN), and no Google fonts.
    app = FastAPIOffline(
        static_url=DOCS_ASSETS,
        title="Rex-Omni server",
        version=__version__,
        description="Detect anything named in text: boxes, points, polygons, keypoints, OCR, GUI.",
        lifespan=lifespan,
    )
    app.state.runtime = runtime
    install_error_handlers(app)
    app.include_router(build_router())
    app.include_router(label_studio_router())
    app.include_router(playground_router())
    document_api(app, runtime.api_keys)
    # Added last = outermost: the request id first, then the record, the key, the body guard.
    app.add_middleware(BodyGuardMiddleware, max_bytes=max_body_bytes(settings), timeout_s=settings.http_body_timeout_s)
    app.add_middleware(ApiKeyMiddleware, keys=runtime.api_keys)  # outside the body guard: checked before reading
    app.add_middleware(RequestScopeMiddleware, runtime=runtime)
    app.add_middleware(RequestIdMiddleware)
    return app
