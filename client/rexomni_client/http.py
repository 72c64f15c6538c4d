"""HTTP client (sync and async) returning the server's own typed results."""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
import time
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


# Statuses that mean "not now" (overloaded, still loading): worth asking again after Retry-After.
RETRY_STATUSES = frozenset({429, 503})
MAX_RETRY_WAIT_S = 30.0


def retry_delay(response: httpx.Response, attempt: int) -> float:
    """Seconds to wait before asking again: the server's Retry-After, else exponential backoff."""
    try:
        delay = float(response.headers["retry-after"])
    except (KeyError, ValueError):
        delay = 0.5 * 2**attempt
    return min(max(delay, 0.0), MAX_RETRY_WAIT_S)


class _HTTPClientBase:
    _http_class: Any = httpx.Client  # or httpx.AsyncClient

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        timeout: float = 600.0,
        api_key: str | None = None,
        ca_file: str | Path | None = None,
        retries: int = 2,
    ) -> None:
        """``retries``: how often a request refused with 429 (overloaded) or 503 (loading) is
        sent again, after the server's Retry-After; 0 raises at once."""
        self._retries = max(0, retries)
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
        body = build_request(image, task, categories, **kw).model_dump(mode="json")
        for attempt in range(self._retries + 1):
            response = self._http.post("/v1/detect", json=body)
            if response.status_code not in RETRY_STATUSES or attempt == self._retries:
                break
            time.sleep(retry_delay(response, attempt))
        return _result(response)

    def detect_stream(
        self, image: ImageInput, task: str = "detection", categories: Sequence[str] | str = (), **kw: Any
    ) -> Iterator[DetectionModel | DetectResult]:
        """Server-sent events: each detection as soon as it is decoded, then the full result."""
        body = build_request(image, task, categories, **kw).model_dump(mode="json")
        for attempt in range(self._retries + 1):
            with connect_sse(self._http, "POST", "/v1/detect/stream", json=body) as source:
                response = source.response
                if response.status_code in RETRY_STATUSES and attempt < self._retries:
                    response.read()
                    time.sleep(retry_delay(response, attempt))
                    continue
                if response.status_code >= 400:
                    response.read()
                    _result(response)
                for sse in source.iter_sse():
                    yield _stream_event(sse.event, sse.data)
                return

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
        body = build_request(image, task, categories, **kw).model_dump(mode="json")
        for attempt in range(self._retries + 1):
            response = await self._http.post("/v1/detect", json=body)
            if response.status_code not in RETRY_STATUSES or attempt == self._retries:
                break
            await asyncio.sleep(retry_delay(response, attempt))
        return _result(response)

    async def detect_stream(
        self, image: ImageInput, task: str = "detection", categories: Sequence[str] | str = (), **kw: Any
    ) -> AsyncIterator[DetectionModel | DetectResult]:
        """Server-sent events: each detection as soon as it is decoded, then the full result.
        Closing the stream early (``async with contextlib.aclosing(...)``, then ``break``)
        closes the connection, and the server stops generating."""
        body = build_request(image, task, categories, **kw).model_dump(mode="json")
        for attempt in range(self._retries + 1):
            async with aconnect_sse(self._http, "POST", "/v1/detect/stream", json=body) as source:
                response = source.response
                if response.status_code in RETRY_STATUSES and attempt < self._retries:
                    await response.aread()
                    await asyncio.sleep(retry_delay(response, attempt))
                    continue
                if response.status_code >= 400:
                    await response.aread()
                    _result(response)
                async for sse in source.aiter_sse():
                    yield _stream_event(sse.event, sse.data)
                return

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncRexOmniClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
