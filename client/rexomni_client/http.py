"""HTTP client (sync and async) returning the server's own typed results."""

from __future__ import annotations

import base64
import json
import ssl
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
from httpx_sse import aconnect_sse, connect_sse
from pydantic import TypeAdapter

from rexomni_server.schemas import DetectionModel, DetectOptions, DetectParams, DetectRequest, DetectResult

DETECTION_ADAPTER: TypeAdapter[DetectionModel] = TypeAdapter(DetectionModel)

ImageInput = str | Path | bytes


class RexOmniHTTPError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


def image_bytes_of(image: ImageInput) -> bytes:
    return image if isinstance(image, bytes) else Path(image).read_bytes()


def build_params(
    task: str = "detection",
    categories: Sequence[str] | str = (),
    *,
    keypoint_type: str | None = None,
    visual_prompt_boxes: Sequence[Sequence[float]] | None = None,
    **options: Any,
) -> DetectParams:
    """Validated locally with the server's own schema: mistakes fail before the network."""
    return DetectParams.model_validate(
        {
            "task": task,
            "categories": categories if isinstance(categories, str) else list(categories),
            "keypoint_type": keypoint_type,
            "visual_prompt_boxes": [list(b) for b in visual_prompt_boxes] if visual_prompt_boxes else None,
            "options": DetectOptions(**options),
        }
    )


def build_request(
    image: ImageInput, task: str = "detection", categories: Sequence[str] | str = (), **kw: Any
) -> DetectRequest:
    params = build_params(task, categories, **kw)
    encoded = base64.b64encode(image_bytes_of(image)).decode("ascii")
    return DetectRequest(image=encoded, **params.model_dump())


def auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


class _HTTPClientBase:
    _http_class: Any = httpx.Client  # or httpx.AsyncClient

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        timeout: float = 600.0,
        api_key: str | None = None,
        ca_file: str | Path | None = None,
    ) -> None:
        # https:// URLs trust the system's roots, or the CA in ca_file (a private CA).
        verify = ssl.create_default_context(cafile=str(ca_file)) if ca_file else True
        self._http = self._http_class(base_url=base_url, timeout=timeout, headers=auth_headers(api_key), verify=verify)


def _raise_for_error(status: int, payload: Any, text: str) -> None:
    try:
        error = payload["error"]
        raise RexOmniHTTPError(status, error["code"], error["message"])
    except (KeyError, TypeError):
        raise RexOmniHTTPError(status, "http_error", text) from None


def _result(response: httpx.Response) -> DetectResult:
    if response.status_code >= 400:
        try:
            payload = response.json()
        except ValueError:
            payload = None
        _raise_for_error(response.status_code, payload, response.text)
    return DetectResult.model_validate(response.json())


def _stream_event(event: str, data: str) -> DetectionModel | DetectResult:
    payload = json.loads(data)
    if event == "detection":
        return DETECTION_ADAPTER.validate_python(payload["detection"])
    if event == "done":
        return DetectResult.model_validate(payload)
    error = payload.get("error", {})
    raise RexOmniHTTPError(200, error.get("code", "stream_error"), error.get("message", data))


class RexOmniClient(_HTTPClientBase):
    """``RexOmniClient("http://127.0.0.1:8000").detect("photo.jpg", categories=["person"])``"""

    _http: httpx.Client

    def detect(
        self, image: ImageInput, task: str = "detection", categories: Sequence[str] | str = (), **kw: Any
    ) -> DetectResult:
        request = build_request(image, task, categories, **kw)
        return _result(self._http.post("/v1/detect", json=request.model_dump(mode="json")))

    def detect_stream(
        self, image: ImageInput, task: str = "detection", categories: Sequence[str] | str = (), **kw: Any
    ) -> Iterator[DetectionModel | DetectResult]:
        """Server-sent events: each detection as soon as it is decoded, then the full result."""
        request = build_request(image, task, categories, **kw)
        with connect_sse(self._http, "POST", "/v1/detect/stream", json=request.model_dump(mode="json")) as source:
            if source.response.status_code >= 400:
                source.response.read()
                _result(source.response)
            for sse in source.iter_sse():
                yield _stream_event(sse.event, sse.data)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> RexOmniClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncRexOmniClient(_HTTPClientBase):
    _http_class = httpx.AsyncClient
    _http: httpx.AsyncClient

    async def detect(
        self, image: ImageInput, task: str = "detection", categories: Sequence[str] | str = (), **kw: Any
    ) -> DetectResult:
        request = build_request(image, task, categories, **kw)
        return _result(await self._http.post("/v1/detect", json=request.model_dump(mode="json")))

    async def detect_stream(
        self, image: ImageInput, task: str = "detection", categories: Sequence[str] | str = (), **kw: Any
    ) -> AsyncIterator[DetectionModel | DetectResult]:
        """Server-sent events: each detection as soon as it is decoded, then the full result.
        Closing the stream early (``async with contextlib.aclosing(...)``, then ``break``)
        closes the connection, and the server stops generating."""
        request = build_request(image, task, categories, **kw)
        async with aconnect_sse(
            self._http, "POST", "/v1/detect/stream", json=request.model_dump(mode="json")
        ) as source:
            if source.response.status_code >= 400:
                await source.response.aread()
                _result(source.response)
            async for sse in source.aiter_sse():
                yield _stream_event(sse.event, sse.data)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncRexOmniClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
