"""The FastAPI application factory (HTTP composition root)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rexomni_server import __version__
from rexomni_server.auth import API_KEY_HEADER, AUTHORIZATION_HEADER, ApiKeys
from rexomni_server.errors import ImageTooLarge, Unauthenticated
from rexomni_server.runtime import Runtime
from rexomni_server.schemas import REQUEST_ID_HEADER
from rexomni_server.service import new_request_id
from rexomni_server.settings import Settings
from rexomni_server.transport.http import (
    DETECT_PATHS,
    build_router,
    error_response,
    http_status,
    install_error_handlers,
)


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


class BodyLimitMiddleware:
    """413 for request bodies over ``max_bytes`` before they are read into memory: by the
    Content-Length header when there is one, else by counting the streamed chunks."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers", [])).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self._reject(scope, receive, send)
            return
        seen = 0
        rejected = False

        async def counting_receive() -> Message:
            nonlocal seen, rejected
            message = await receive()
            if message["type"] == "http.request" and not rejected:
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    # Answer 413 now and tell the app the client left, so it stops reading.
                    rejected = True
                    await self._reject(scope, receive, send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            if not rejected:  # the 413 already went out
                await send(message)

        await self.app(scope, counting_receive, guarded_send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        request_id = scope.get("state", {}).get("request_id")
        message = f"request body is larger than {self.max_bytes} bytes"
        response = error_response(413, ImageTooLarge.code, message, request_id)
        await response(scope, receive, send)


# Open without a key: probes, scrapers and the API's own description. Everything else, present
# and future, needs one (deny by default).
OPEN_PATHS = frozenset(
    {"/health", "/ready", "/metrics", "/v1/tasks", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}
)


def route_path(scope: Scope) -> str:
    """The path as routes see it (without a ``root_path`` prefix set by a proxy)."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


class ApiKeyMiddleware:
    """Requests without a valid API key get 401 before their bodies are read (an
    unauthenticated client cannot make the server read megabytes); see OPEN_PATHS."""

    def __init__(self, app: ASGIApp, runtime: Runtime) -> None:
        self.app = app
        self.runtime = runtime
        self.keys: ApiKeys = runtime.api_keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = route_path(scope) if scope["type"] == "http" else ""
        if scope["type"] != "http" or not self.keys.enabled or path in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers", []))

        def header(name: str) -> str | None:
            value: bytes | None = headers.get(name.encode())
            return value.decode("latin-1") if value else None

        try:
            self.keys.check(header(AUTHORIZATION_HEADER), header(API_KEY_HEADER))
        except Unauthenticated as exc:
            request_id = scope.get("state", {}).get("request_id") or new_request_id()
            if path in DETECT_PATHS:  # counted and logged like every refused detection
                self.runtime.service.record_rejected(request_id, "unknown", "http", exc.code)
            response = error_response(http_status(exc), exc.code, exc.message, request_id)
            response.headers["WWW-Authenticate"] = "Bearer"
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def document_api_keys(app: FastAPI) -> None:
    """Declare the API-key schemes in the OpenAPI document on every operation the keys close
    (see OPEN_PATHS), so generated clients and the /docs page know to send a key."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            schema.setdefault("components", {})["securitySchemes"] = {
                "bearer": {"type": "http", "scheme": "bearer"},
                "apiKeyHeader": {"type": "apiKey", "in": "header", "name": API_KEY_HEADER},
            }
            for path, operations in schema["paths"].items():
                if path not in OPEN_PATHS:
                    for operation in operations.values():
                        operation["security"] = [{"bearer": []}, {"apiKeyHeader": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def max_body_bytes(settings: Settings) -> int:
    """The largest useful body: a base64 image at the byte limit, plus room for the fields."""
    return settings.max_image_bytes * 4 // 3 + (1 << 20)


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

    app = FastAPI(
        title="Rex-Omni server",
        version=__version__,
        description="Detect anything named in text: boxes, points, polygons, keypoints, OCR, GUI.",
        lifespan=lifespan,
    )
    app.state.runtime = runtime
    install_error_handlers(app)
    app.include_router(build_router())
    if runtime.api_keys.enabled:
        document_api_keys(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes(settings))
    app.add_middleware(ApiKeyMiddleware, runtime=runtime)  # outside the body limit: checked first
    app.add_middleware(RequestIdMiddleware)  # added last = outermost: ids reach every response
    return app
