"""HTTP transport: wire <-> schema translation and the one error table for HTTP. Nothing else."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, FastAPI, File, Form, Request, Response, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import ValidationError
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import Scope

from rexomni_server.accounting import CANCELLED, RequestRecord
from rexomni_server.errors import (
    BodyTimeout,
    EngineDead,
    EngineFailure,
    EngineNotReady,
    ImageTooLarge,
    InvalidImage,
    InvalidRequest,
    MalformedRequest,
    Overloaded,
    RequestTimeout,
    RexOmniError,
    Unauthenticated,
    UnsupportedImageFormat,
)
from rexomni_server.runtime import Runtime
from rexomni_server.schemas import (
    MAX_CATEGORY_ENTRIES,
    MAX_FORCED_OUTPUT_CHARS,
    MAX_VISUAL_PROMPT_BOXES,
    REQUEST_ID_HEADER,
    DetectParams,
    DetectRequest,
    DetectResult,
    ErrorResponse,
    TaskInfo,
    TasksResponse,
    validation_summary,
)
from rexomni_server.service import DetectionEvent, DoneEvent, EncodedImage, ServiceEvent, new_request_id
from rexomni_server.tasks import KEYPOINT_SETS, TASKS
from rexomni_server.tiled import UNTILEABLE_TASKS

DETECT_PATHS = frozenset({"/detect", "/v1/detect", "/detect/stream", "/v1/detect/stream"})
SSE_PING_S = 15
DISCONNECT_POLL_S = 0.25  # how soon a unary request notices its client has gone
CLIENT_CLOSED_REQUEST = 499  # nginx's code: the client closed the connection first
# Error codes for the refusals the web framework makes before our handlers run.
FRAMEWORK_ERROR_CODES = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed"}

# The HTTP error table: most specific class first (looked up along the exception's MRO).
HTTP_STATUS: dict[type[RexOmniError], int] = {
    UnsupportedImageFormat: 415,
    ImageTooLarge: 413,
    InvalidImage: 400,
    MalformedRequest: 400,
    InvalidRequest: 422,
    BodyTimeout: 408,
    Unauthenticated: 401,
    Overloaded: 429,
    EngineNotReady: 503,
    EngineDead: 503,
    RequestTimeout: 504,
    EngineFailure: 500,
}


def http_status(exc: RexOmniError) -> int:
    for cls in type(exc).__mro__:
        if cls in HTTP_STATUS:
            return HTTP_STATUS[cls]  # type: ignore[index]
    return 500


def error_response(
    status: int, code: str, message: str, request_id: str | None, retry_after_s: float | None = None
) -> JSONResponse:
    headers = {REQUEST_ID_HEADER: request_id} if request_id else {}
    if retry_after_s is not None:
        headers["Retry-After"] = str(max(1, round(retry_after_s)))
    body = {"error": {"code": code, "message": message, "request_id": request_id}}
    return JSONResponse(body, status_code=status, headers=headers)


def request_id_of(request: Request) -> str:
    """Set by the request-id middleware (accepted from the header or generated)."""
    rid = getattr(request.state, "request_id", None)
    return rid if isinstance(rid, str) else new_request_id()


def record_of(scope: Scope) -> RequestRecord | None:
    """The request's record, where the request-scope middleware opened one (detect paths)."""
    record = scope.get("state", {}).get("record")
    return record if isinstance(record, RequestRecord) else None


def _fail(request: Request, code: str) -> None:
    """Put a refusal's code on the request's record (detect paths have one)."""
    record = record_of(request.scope)
    if record is not None:
        record.fail(code)


def install_error_handlers(app: FastAPI) -> None:
    async def domain_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RexOmniError)
        _fail(request, exc.code)
        return error_response(http_status(exc), exc.code, exc.message, request_id_of(request), exc.retry_after_s)

    async def validation_error(request: Request, exc: Exception) -> JSONResponse:
        errors = exc.errors() if isinstance(exc, (RequestValidationError, ValidationError)) else []
        message = validation_summary(errors)
        _fail(request, InvalidRequest.code)
        return error_response(422, InvalidRequest.code, message or str(exc), request_id_of(request))

    async def framework_error(request: Request, exc: Exception) -> JSONResponse:
        # Refusals Starlette makes itself (unknown path, wrong method, a body it cannot
        # parse) in the same error body as ours, and counted like them.
        assert isinstance(exc, StarletteHTTPException)
        code = FRAMEWORK_ERROR_CODES.get(exc.status_code, "http_error")
        _fail(request, code)
        response = error_response(exc.status_code, code, str(exc.detail), request_id_of(request))
        response.headers.update(exc.headers or {})
        return response

    async def client_left(request: Request, exc: Exception) -> Response:
        # The client went away while it sent its body (or a guard refused the body and said
        # so): nobody is there to read an answer, and nothing failed on our side.
        _fail(request, CANCELLED)
        return Response(status_code=CLIENT_CLOSED_REQUEST)

    app.add_exception_handler(ClientDisconnect, client_left)
    app.add_exception_handler(RexOmniError, domain_error)
    app.add_exception_handler(StarletteHTTPException, framework_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(ValidationError, validation_error)


# The runtime the app was built with (create_app keeps it on app.state).
def runtime_of(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


def _record(request: Request) -> RequestRecord:
    """Opened for every detect path by the request-scope middleware."""
    record = record_of(request.scope)
    assert record is not None
    return record


# Bodies up to this size are parsed on the event loop (a thread hop costs more than parsing
# them); larger ones, as every body with a real photo in it, in a worker thread, so a huge body
# never stalls the other requests' streams and probes.
INLINE_JSON_BYTES = 64 * 1024


# Parsing costs time per JSON value, and the parser holds the interpreter's lock even in a
# worker thread: 2 million categories stall every other request for a quarter of a second. A
# valid body has a few hundred values besides the text of forced_output, so a body with more
# separators than that text could hold is refused before it is parsed (counting them takes
# milliseconds).
MAX_JSON_SEPARATORS = MAX_FORCED_OUTPUT_CHARS + 1024


def parse_detect_request(body: bytes) -> DetectRequest:
    """The JSON body, validated. Invalid JSON is a 422 like any invalid field; a body that is
    not even UTF-8 text is malformed (400), as the web framework answers both."""
    separators = body.count(b",")
    if separators > MAX_JSON_SEPARATORS:
        raise InvalidRequest(
            f"the body holds {separators} JSON values or more, far more than a request can use "
            f"(at most {MAX_CATEGORY_ENTRIES} categories, {MAX_VISUAL_PROMPT_BOXES} visual prompt boxes)"
        )
    try:
        return DetectRequest.model_validate_json(body)
    except ValidationError as exc:
        if exc.errors()[0]["type"] == "json_invalid" and not _is_utf8(body):
            raise MalformedRequest("the body is not UTF-8 text") from None
        raise


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


async def _detect_request(request: Request) -> DetectRequest:
    body = await request.body()
    if len(body) <= INLINE_JSON_BYTES:
        return parse_detect_request(body)
    return await asyncio.to_thread(parse_detect_request, body)


# The JSON routes parse their bodies themselves (see _detect_request): their schema is declared
# here for the OpenAPI document, and its components are added by ``add_request_schemas``.
JSON_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{DetectRequest.__name__}"}}},
    }
}


def add_request_schemas(schema: dict[str, Any]) -> None:
    """Put the JSON request body's schema (and the ones it refers to) in the OpenAPI components."""
    body = DetectRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for name, definition in body.pop("$defs", {}).items():
        components.setdefault(name, definition)
    components[DetectRequest.__name__] = body


def _json_field(name: str, raw: str | None) -> Any:
    if raw is None or not raw.strip():
        return None
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"form field {name!r} is not valid JSON: {exc.msg}") from exc
    except RecursionError:
        raise InvalidRequest(f"form field {name!r} is nested too deeply") from None
    except ValueError as exc:  # e.g. an integer of thousands of digits
        raise InvalidRequest(f"form field {name!r} cannot be read: {exc}") from None


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in sorted(set(HTTP_STATUS.values()))
}
STREAM_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/event-stream": {}}, "description": "event: detection | done | error"},
    **ERROR_RESPONSES,
}


MULTIPART_FIELDS = frozenset({"image", "task", "categories", "keypoint_type", "visual_prompt_boxes", "options"})


class MultipartForm:
    """The multipart fields of /detect and /detect/stream, parsed into the shared schema."""

    def __init__(
        self,
        image: Annotated[UploadFile, File(description="The image file (JPEG, PNG, WebP, BMP, GIF, TIFF).")],
        task: Annotated[str, Form()] = "detection",
        categories: Annotated[str, Form(description="Comma-separated phrases.")] = "",
        keypoint_type: Annotated[str | None, Form()] = None,
        visual_prompt_boxes: Annotated[str | None, Form(description="JSON [[x0, y0, x1, y1], ...]")] = None,
        options: Annotated[str | None, Form(description="JSON object, as in /v1/detect.")] = None,
    ) -> None:
        self.image = image
        self.fields: dict[str, Any] = {"task": task, "categories": categories}
        if keypoint_type:
            self.fields["keypoint_type"] = keypoint_type
        self._raw_json = {"visual_prompt_boxes": visual_prompt_boxes, "options": options}

    async def parse(self, request: Request, max_bytes: int) -> tuple[DetectParams, bytes]:
        # Like the JSON body (extra fields forbidden): a misspelt field is an error, not
        # silently a default, and a field sent twice is not decided by which came last.
        form = await request.form()  # already parsed for the fields above: cached
        unknown = sorted(set(form.keys()) - MULTIPART_FIELDS)
        if unknown:
            expected = ", ".join(sorted(MULTIPART_FIELDS))
            raise InvalidRequest(f"unknown form field(s) {', '.join(map(repr, unknown))}; the fields are {expected}")
        repeated = sorted(k for k in set(form.keys()) if len(form.getlist(k)) > 1)
        if repeated:
            raise InvalidRequest(f"form field(s) {', '.join(map(repr, repeated))} given more than once")
        data = await self.image.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise ImageTooLarge(f"image is larger than the limit of {max_bytes} bytes")
        fields = dict(self.fields)
        for name, raw in self._raw_json.items():
            value = _json_field(name, raw)
            if value is not None:
                fields[name] = value
        return DetectParams.model_validate(fields), data


def _sse_frame(event: ServiceEvent) -> ServerSentEvent | bytes | None:
    if isinstance(event, DetectionEvent):
        # The hottest frame: written directly, the detection serialised by pydantic's own
        # encoder (JSON escapes every line break, so the data is one line, as SSE needs).
        detection = event.detection.model_dump_json()
        data = f'{{"index": {event.index}, "elapsed_ms": {round(event.elapsed_ms, 3)!r}, "detection": {detection}}}'
        return b"event: detection\r\ndata: " + data.encode() + b"\r\n\r\n"
    if isinstance(event, DoneEvent):
        return ServerSentEvent(data=event.result.model_dump_json(), event="done")
    return None


async def _sse(request: Request, params: DetectParams, image: EncodedImage) -> EventSourceResponse:
    rid = request_id_of(request)
    events = runtime_of(request).service.stream(params, image, record=_record(request))
    # Run up to AcceptedEvent before answering: invalid input still gets a plain 4xx status.
    try:
        await anext(events)
    except BaseException:
        await events.aclose()  # type: ignore[attr-defined]
        raise

    async def frames() -> AsyncIterator[ServerSentEvent | bytes]:
        try:
            async for event in events:
                frame = _sse_frame(event)
                if frame is not None:
                    yield frame
        except RexOmniError as exc:
            # `status`: what the same failure answers as a plain response (e.g. 504 timeout).
            body = {"error": {"code": exc.code, "message": exc.message, "request_id": rid, "status": http_status(exc)}}
            yield ServerSentEvent(data=json.dumps(body), event="error")
        finally:
            # A client that disconnects cancels this generator: closing the service stream
            # aborts the engine request.
            await events.aclose()  # type: ignore[attr-defined]

    # Should sse-starlette see the server stop (plain uvicorn signal handling; `serve` owns the
    # signals itself), a stream still gets the drain timeout to finish instead of ending at once.
    grace = runtime_of(request).settings.drain_timeout_s
    return EventSourceResponse(frames(), ping=SSE_PING_S, headers={REQUEST_ID_HEADER: rid}, shutdown_grace_period=grace)


T = TypeVar("T")


async def while_connected(request: Request, work: Awaitable[T]) -> T | Response:
    """``work``'s result; if the client leaves first, ``work`` is cancelled (aborting its
    generations: Starlette does not cancel a plain endpoint when its client goes away, so the
    engine would run on) and the answer is a 499 nobody reads."""
    future = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({future}, timeout=DISCONNECT_POLL_S)
            if done:
                return future.result()
            if await request.is_disconnected():
                future.cancel()
                await asyncio.wait({future})  # its own CancelledError stays in it; ours would still rise
                return Response(status_code=CLIENT_CLOSED_REQUEST)  # nobody is there to read it
    finally:
        if not future.done():  # this handler itself was cancelled
            future.cancel()


async def _detect_while_connected(
    request: Request, params: DetectParams, image: EncodedImage
) -> DetectResult | Response:
    """The unary result, the generation aborted if the client leaves first."""
    return await while_connected(request, runtime_of(request).service.detect(params, image, record=_record(request)))


def build_router() -> APIRouter:
    router = APIRouter()

    @router.post(
        "/v1/detect", response_model=DetectResult, responses=ERROR_RESPONSES, tags=["detect"], openapi_extra=JSON_BODY
    )
    async def detect_json(request: Request) -> DetectResult | Response:
        """Detect with a JSON body; the image is base64 or a data URI."""
        body = await _detect_request(request)
        return await _detect_while_connected(request, body, body.image)

    @router.post("/detect", response_model=DetectResult, responses=ERROR_RESPONSES, tags=["detect"])
    async def detect_multipart(request: Request, form: Annotated[MultipartForm, Depends()]) -> DetectResult | Response:
        """Detect with a multipart upload (``curl -F image=@photo.jpg -F categories=person,car``)."""
        params, data = await form.parse(request, runtime_of(request).settings.max_image_bytes)
        return await _detect_while_connected(request, params, data)

    @router.post("/v1/detect/stream", responses=STREAM_RESPONSES, tags=["detect"], openapi_extra=JSON_BODY)
    async def detect_stream_json(request: Request) -> EventSourceResponse:
        """Server-sent events: ``detection`` per detection as it is decoded, then ``done``
        (the same body as /v1/detect), or ``error``. Bad input fails with a plain 4xx first."""
        body = await _detect_request(request)
        return await _sse(request, body, body.image)

    @router.post("/detect/stream", responses=STREAM_RESPONSES, tags=["detect"])
    async def detect_stream_multipart(
        request: Request, form: Annotated[MultipartForm, Depends()]
    ) -> EventSourceResponse:
        """Server-sent events for a multipart upload (same fields as /detect)."""
        params, data = await form.parse(request, runtime_of(request).settings.max_image_bytes)
        return await _sse(request, params, data)

    @router.get("/metrics", tags=["ops"], response_class=Response)
    async def metrics(request: Request) -> Response:
        """Prometheus exposition: the server's metrics, plus the engine's own where it has them."""
        runtime = runtime_of(request)
        body = runtime.service.metrics.exposition()
        engine_metrics = getattr(runtime.engine, "metrics_exposition", None)
        if callable(engine_metrics):
            body += engine_metrics()
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    @router.get("/health", tags=["ops"])
    async def health(request: Request) -> JSONResponse:
        """Liveness: the process answers, and says which model and engine. 503, with the
        error, once the model failed to load or the engine died (the server is exiting)."""
        runtime = runtime_of(request)
        problem = runtime.problem
        body = {
            "status": "ok" if problem is None else "error",
            "ready": runtime.ready,
            "engine": runtime.engine.name,
            "model": runtime.service.model_label,
            "random_weights": runtime.random_weights,
            "error": problem,
        }
        return JSONResponse(body, status_code=200 if problem is None else 503)

    @router.get("/ready", tags=["ops"])
    async def ready(request: Request) -> JSONResponse:
        """Readiness: 200 once the model is loaded, 503 before (or if it failed to load)."""
        runtime = runtime_of(request)
        if runtime.ready:
            return JSONResponse({"ready": True})
        return JSONResponse({"ready": False, "error": runtime.problem}, status_code=503, headers={"Retry-After": "5"})

    @router.get("/v1/tasks", response_model=TasksResponse, tags=["detect"])
    async def tasks() -> TasksResponse:
        """The tasks, their exact prompt templates, and the keypoint sets."""
        return TasksResponse(
            tasks=[
                TaskInfo(
                    name=spec.task,
                    template=spec.template,
                    description=spec.description,
                    output=spec.geometry.value,
                    requires_categories=spec.requires_categories,
                    requires_visual_prompt=spec.requires_visual_prompt,
                    requires_keypoint_type=spec.requires_keypoint_type,
                    tileable=spec.task not in UNTILEABLE_TASKS,
                )
                for spec in TASKS.values()
            ],
            keypoint_sets={name: list(points) for name, points in KEYPOINT_SETS.items()},
        )

    return router
