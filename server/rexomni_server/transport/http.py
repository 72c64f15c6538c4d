"""HTTP transport: wire <-> schema translation and the one error table for HTTP. Nothing else."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from rexomni_server.errors import (
    EngineFailure,
    EngineNotReady,
    ImageTooLarge,
    InvalidImage,
    InvalidRequest,
    Overloaded,
    RequestTimeout,
    RexOmniError,
    Unauthenticated,
    UnsupportedImageFormat,
)
from rexomni_server.images import decode_base64_image
from rexomni_server.runtime import Runtime
from rexomni_server.schemas import (
    DetectOptions,
    DetectParams,
    DetectRequest,
    DetectResult,
    ErrorResponse,
    TaskInfo,
    TasksResponse,
)
from rexomni_server.service import new_request_id
from rexomni_server.tasks import KEYPOINT_SETS, TASKS

REQUEST_ID_HEADER = "X-Request-ID"

# The HTTP error table: most specific class first (looked up along the exception's MRO).
HTTP_STATUS: dict[type[RexOmniError], int] = {
    UnsupportedImageFormat: 415,
    ImageTooLarge: 413,
    InvalidImage: 400,
    InvalidRequest: 422,
    Unauthenticated: 401,
    Overloaded: 429,
    EngineNotReady: 503,
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


def install_error_handlers(app: FastAPI) -> None:
    async def domain_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RexOmniError)
        return error_response(
            http_status(exc), exc.code, exc.message, request_id_of(request), exc.retry_after_s
        )

    async def validation_error(request: Request, exc: Exception) -> JSONResponse:
        errors = exc.errors() if isinstance(exc, (RequestValidationError, ValidationError)) else []
        message = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'request'}: {e.get('msg')}"
            for e in errors
        )
        return error_response(422, "invalid_request", message or str(exc), request_id_of(request))

    app.add_exception_handler(RexOmniError, domain_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(ValidationError, validation_error)


def _runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


def _json_field(name: str, raw: str | None) -> Any:
    if raw is None or not raw.strip():
        return None
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"form field {name!r} is not valid JSON: {exc.msg}") from exc


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in sorted(set(HTTP_STATUS.values()))
}


def build_router() -> APIRouter:
    router = APIRouter()

    @router.post("/v1/detect", response_model=DetectResult, responses=ERROR_RESPONSES, tags=["detect"])
    async def detect_json(body: DetectRequest, request: Request) -> DetectResult:
        """Detect with a JSON body; the image is base64 or a data URI."""
        image = decode_base64_image(body.image)
        return await _runtime(request).service.detect(
            body, image, request_id=request_id_of(request), transport="http"
        )

    @router.post("/detect", response_model=DetectResult, responses=ERROR_RESPONSES, tags=["detect"])
    async def detect_multipart(
        request: Request,
        image: Annotated[UploadFile, File(description="The image file (JPEG, PNG, WebP, BMP, GIF, TIFF).")],
        task: Annotated[str, Form()] = "detection",
        categories: Annotated[str, Form(description="Comma-separated phrases.")] = "",
        keypoint_type: Annotated[str | None, Form()] = None,
        visual_prompt_boxes: Annotated[str | None, Form(description="JSON [[x0, y0, x1, y1], ...]")] = None,
        options: Annotated[str | None, Form(description="JSON object, as in /v1/detect.")] = None,
    ) -> DetectResult:
        """Detect with a multipart upload (``curl -F image=@photo.jpg -F categories=person,car``)."""
        runtime = _runtime(request)
        limit = runtime.settings.max_image_bytes
        data = await image.read(limit + 1)
        if len(data) > limit:
            raise ImageTooLarge(f"image is larger than the limit of {limit} bytes")
        fields: dict[str, Any] = {"task": task, "categories": categories}
        if keypoint_type:
            fields["keypoint_type"] = keypoint_type
        boxes = _json_field("visual_prompt_boxes", visual_prompt_boxes)
        if boxes is not None:
            fields["visual_prompt_boxes"] = boxes
        opts = _json_field("options", options)
        if opts is not None:
            fields["options"] = DetectOptions.model_validate(opts)
        params = DetectParams.model_validate(fields)
        return await runtime.service.detect(params, data, request_id=request_id_of(request), transport="http")

    @router.get("/health", tags=["ops"])
    async def health(request: Request) -> dict[str, Any]:
        """Liveness: the process answers. Says which model and engine, and any start error."""
        runtime = _runtime(request)
        return {
            "status": "ok",
            "ready": runtime.ready,
            "engine": runtime.engine.name,
            "model": runtime.service.model_label,
            "random_weights": runtime.random_weights,
            "error": runtime.boot_error,
        }

    @router.get("/ready", tags=["ops"])
    async def ready(request: Request) -> JSONResponse:
        """Readiness: 200 once the model is loaded, 503 before (or if it failed to load)."""
        runtime = _runtime(request)
        if runtime.ready:
            return JSONResponse({"ready": True})
        return JSONResponse(
            {"ready": False, "error": runtime.boot_error}, status_code=503, headers={"Retry-After": "5"}
        )

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
                )
                for spec in TASKS.values()
            ],
            keypoint_sets={name: list(points) for name, points in KEYPOINT_SETS.items()},
        )

    return router
