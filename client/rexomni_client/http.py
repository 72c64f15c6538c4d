"""HTTP client (sync and async) returning the server's own typed results."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from rexomni_server.schemas import DetectOptions, DetectParams, DetectRequest, DetectResult

ImageInput = str | Path | bytes


class RexOmniHTTPError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


def _image_bytes(image: ImageInput) -> bytes:
    return image if isinstance(image, bytes) else Path(image).read_bytes()


def build_request(
    image: ImageInput,
    task: str = "detection",
    categories: Sequence[str] | str = (),
    *,
    keypoint_type: str | None = None,
    visual_prompt_boxes: Sequence[Sequence[float]] | None = None,
    **options: Any,
) -> DetectRequest:
    params = DetectParams.model_validate(
        {
            "task": task,
            "categories": categories if isinstance(categories, str) else list(categories),
            "keypoint_type": keypoint_type,
            "visual_prompt_boxes": [list(b) for b in visual_prompt_boxes] if visual_prompt_boxes else None,
            "options": DetectOptions(**options),
        }
    )
    encoded = base64.b64encode(_image_bytes(image)).decode("ascii")
    return DetectRequest(image=encoded, **params.model_dump())


def _result(response: httpx.Response) -> DetectResult:
    if response.status_code >= 400:
        try:
            error = response.json()["error"]
            raise RexOmniHTTPError(response.status_code, error["code"], error["message"])
        except (ValueError, KeyError, TypeError):
            raise RexOmniHTTPError(response.status_code, "http_error", response.text) from None
    return DetectResult.model_validate(response.json())


class RexOmniClient:
    """``RexOmniClient("http://127.0.0.1:8000").detect("photo.jpg", categories=["person"])``"""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", timeout: float = 600.0) -> None:
        self._http = httpx.Client(base_url=base_url, timeout=timeout)

    def detect(
        self, image: ImageInput, task: str = "detection", categories: Sequence[str] | str = (), **kw: Any
    ) -> DetectResult:
        request = build_request(image, task, categories, **kw)
        return _result(self._http.post("/v1/detect", json=request.model_dump(mode="json")))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> RexOmniClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncRexOmniClient:
    def __init__(self, base_url: str = "http://127.0.0.1:8000", timeout: float = 600.0) -> None:
        self._http = httpx.AsyncClient(base_url=base_url, timeout=timeout)

    async def detect(
        self, image: ImageInput, task: str = "detection", categories: Sequence[str] | str = (), **kw: Any
    ) -> DetectResult:
        request = build_request(image, task, categories, **kw)
        return _result(await self._http.post("/v1/detect", json=request.model_dump(mode="json")))

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncRexOmniClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
