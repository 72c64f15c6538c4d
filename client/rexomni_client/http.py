"""HTTP client (sync and async) returning the server's own typed results."""

from __future__ import annotations

import asyncio
import base64
import datetime
import email.utils
import json
import ssl
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
from httpx_sse import SSEError, aconnect_sse, connect_sse
from pydantic import TypeAdapter, ValidationError

from rexomni_server.schemas import (
    REQUEST_ID_HEADER,
    DetectionModel,
    DetectOptions,
    DetectParams,
    DetectRequest,
    DetectResult,
)

DETECTION_ADAPTER: TypeAdapter[DetectionModel] = TypeAdapter(DetectionModel)

ImageInput = str | Path | bytes


class RexOmniHTTPError(Exception):
    """The server refused or failed a request. ``status``: the HTTP status (for a failure
    inside an accepted stream, the status the same failure gets as a plain response; 502 when
    the stream broke off); ``code`` and ``message``: the server's; ``request_id``: the id the
    server logged the request under."""

    def __init__(self, status: int, code: str, message: str, request_id: str | None = None) -> None:
        super().__init__(f"{status} {code}: {message}" + (f" (request {request_id})" if request_id else ""))
        self.status = status
        self.code = code
        self.message = message
        self.request_id = request_id


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
# A wait the server asks for beyond this is not waited out: the request fails at once instead.
MAX_RETRY_WAIT_S = 30.0
# The connection closed before any answer: typically a keep-alive connection the server had
# just closed as idle. Detection has no side effects, so sending again is safe.
RESENDABLE_ERRORS = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)


def backoff(attempt: int) -> float:
    return 0.5 * 2.0**attempt


def resend_delay(dropped: Exception, attempt: int, retries: int) -> float:
    """Seconds before sending again a request whose connection dropped; re-raises the error
    once the retries are used up."""
    if attempt >= retries:
        raise dropped
    return backoff(attempt)


def retry_after_s(response: httpx.Response) -> float | None:
    """The response's Retry-After in seconds (a number of seconds or an HTTP date), if any."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return max((when - datetime.datetime.now(datetime.UTC)).total_seconds(), 0.0)


def retry_wait(response: httpx.Response, attempt: int, retries: int) -> float | None:
    """Seconds to wait before sending the request again, or None to give the response to the
    caller: not a "not now" status, retries used up, or a longer wait asked than we wait."""
    if response.status_code not in RETRY_STATUSES or attempt >= retries:
        return None
    asked = retry_after_s(response)
    delay = backoff(attempt) if asked is None else asked
    return delay if delay <= MAX_RETRY_WAIT_S else None


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


def _request_id(response: httpx.Response, payload: Any) -> str | None:
    try:
        rid = payload["error"]["request_id"]
    except (KeyError, TypeError):
        rid = None
    return rid if isinstance(rid, str) else response.headers.get(REQUEST_ID_HEADER)


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _result(response: httpx.Response) -> DetectResult:
    """The response's result, or RexOmniHTTPError with the server's code, message and request id
    (also for an answer that is not a Rex-Omni result: a proxy's page, a wrong port)."""
    payload = _json(response)
    rid = _request_id(response, payload)
    if response.status_code >= 400:
        try:
            error = payload["error"]
            raise RexOmniHTTPError(response.status_code, str(error["code"]), str(error["message"]), rid)
        except (KeyError, TypeError):
            raise RexOmniHTTPError(response.status_code, "http_error", response.text[:500], rid) from None
    try:
        return DetectResult.model_validate(payload)
    except ValidationError:
        snippet = response.text[:200]
        raise RexOmniHTTPError(
            response.status_code, "bad_response", f"not a Rex-Omni result: {snippet!r}", rid
        ) from None


def _stream_event(event: str, data: str, response: httpx.Response) -> DetectionModel | DetectResult:
    payload = json.loads(data)
    if event == "detection":
        return DETECTION_ADAPTER.validate_python(payload["detection"])
    if event == "done":
        return DetectResult.model_validate(payload)
    error = payload.get("error", {})
    raise RexOmniHTTPError(
        int(error.get("status", 500)),
        error.get("code", "stream_error"),
        error.get("message", data),
        error.get("request_id") or response.headers.get(REQUEST_ID_HEADER),
    )


class _AcceptedStream:
    """The events of an accepted SSE stream, for both clients. A stream that ends without its
    result (the server stopped, the connection dropped) raises ``stream_incomplete``: the
    detections already yielded are complete, but the answer may not be."""

    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self._finished = False

    def item(self, event: str, data: str) -> DetectionModel | DetectResult:
        item = _stream_event(event, data, self._response)
        self._finished = isinstance(item, DetectResult)
        return item

    def not_events(self, exc: Exception) -> RexOmniHTTPError:
        rid = self._response.headers.get(REQUEST_ID_HEADER)
        return RexOmniHTTPError(self._response.status_code, "bad_response", f"not an event stream: {exc}", rid)

    def broke(self, exc: Exception) -> RexOmniHTTPError:
        return self._incomplete(f"the connection broke off: {exc}")

    def end(self) -> None:
        if not self._finished:
            raise self._incomplete("the server ended the stream before its result")

    def _incomplete(self, why: str) -> RexOmniHTTPError:
        return RexOmniHTTPError(502, "stream_incomplete", why, self._response.headers.get(REQUEST_ID_HEADER))


class RexOmniClient(_HTTPClientBase):
    """``RexOmniClient("http://127.0.0.1:8000").detect("photo.jpg", categories=["person"])``"""

    _http: httpx.Client

    def _send(self, body: dict[str, Any]) -> httpx.Response:
        for attempt in range(self._retries + 1):
            try:
                response = self._http.post("/v1/detect", json=body)
            except RESENDABLE_ERRORS as exc:
                time.sleep(resend_delay(exc, attempt, self._retries))
                continue
            wait = retry_wait(response, attempt, self._retries)
            if wait is None:
                return response
            time.sleep(wait)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def detect(
        self, image: ImageInput, task: str = "detection", categories: Sequence[str] | str = (), **kw: Any
    ) -> DetectResult:
        return _result(self._send(build_request(image, task, categories, **kw).model_dump(mode="json")))

    def detect_stream(
        self, image: ImageInput, task: str = "detection", categories: Sequence[str] | str = (), **kw: Any
    ) -> Iterator[DetectionModel | DetectResult]:
        """Server-sent events: each detection as soon as it is decoded, then the full result.
        A stream that breaks off before its result raises RexOmniHTTPError (stream_incomplete)."""
        body = build_request(image, task, categories, **kw).model_dump(mode="json")
        for attempt in range(self._retries + 1):
            try:
                with connect_sse(self._http, "POST", "/v1/detect/stream", json=body) as source:
                    response = source.response
                    if response.status_code >= 400:
                        response.read()
                        wait = retry_wait(response, attempt, self._retries)
                        if wait is not None:
                            time.sleep(wait)
                            continue
                        _result(response)
                    stream = _AcceptedStream(response)
                    try:
                        for sse in source.iter_sse():
                            yield stream.item(sse.event, sse.data)
                    except SSEError as exc:  # a 200 that is not an event stream (a proxy's page)
                        raise stream.not_events(exc) from exc
                    except httpx.TransportError as exc:
                        raise stream.broke(exc) from exc
                    stream.end()
                    return
            except RESENDABLE_ERRORS as exc:  # before any response: safe to send again
                time.sleep(resend_delay(exc, attempt, self._retries))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> RexOmniClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncRexOmniClient(_HTTPClientBase):
    _http_class = httpx.AsyncClient
    _http: httpx.AsyncClient

    async def _send(self, body: dict[str, Any]) -> httpx.Response:
        for attempt in range(self._retries + 1):
            try:
                response = await self._http.post("/v1/detect", json=body)
            except RESENDABLE_ERRORS as exc:
                await asyncio.sleep(resend_delay(exc, attempt, self._retries))
                continue
            wait = retry_wait(response, attempt, self._retries)
            if wait is None:
                return response
            await asyncio.sleep(wait)
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def detect(
        self, image: ImageInput, task: str = "detection", categories: Sequence[str] | str = (), **kw: Any
    ) -> DetectResult:
        return _result(await self._send(build_request(image, task, categories, **kw).model_dump(mode="json")))

    async def detect_stream(
        self, image: ImageInput, task: str = "detection", categories: Sequence[str] | str = (), **kw: Any
    ) -> AsyncIterator[DetectionModel | DetectResult]:
        """Server-sent events: each detection as soon as it is decoded, then the full result.
        A stream that breaks off before its result raises RexOmniHTTPError (stream_incomplete).
        Closing the stream early (``async with contextlib.aclosing(...)``, then ``break``)
        closes the connection, and the server stops generating."""
        body = build_request(image, task, categories, **kw).model_dump(mode="json")
        for attempt in range(self._retries + 1):
            try:
                async with aconnect_sse(self._http, "POST", "/v1/detect/stream", json=body) as source:
                    response = source.response
                    if response.status_code >= 400:
                        await response.aread()
                        wait = retry_wait(response, attempt, self._retries)
                        if wait is not None:
                            await asyncio.sleep(wait)
                            continue
                        _result(response)
                    stream = _AcceptedStream(response)
                    try:
                        async for sse in source.aiter_sse():
                            yield stream.item(sse.event, sse.data)
                    except SSEError as exc:  # a 200 that is not an event stream (a proxy's page)
                        raise stream.not_events(exc) from exc
                    except httpx.TransportError as exc:
                        raise stream.broke(exc) from exc
                    stream.end()
                    return
            except RESENDABLE_ERRORS as exc:  # before any response: safe to send again
                await asyncio.sleep(resend_delay(exc, attempt, self._retries))

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncRexOmniClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
