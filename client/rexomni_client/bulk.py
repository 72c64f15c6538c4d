"""Many images through one async client, ``concurrency`` requests in flight, so the server
batches them (the reason it exists: the reference wrapper runs one image at a time)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import grpc
import httpx

from rexomni_client.http import ImageInput, RexOmniHTTPError
from rexomni_server.schemas import DetectResult

# What one image may fail with without stopping the others: refused by the server, a call
# error, a timeout, a dropped connection, an unreadable file.
IMAGE_ERRORS = (RexOmniHTTPError, grpc.aio.AioRpcError, httpx.TransportError, OSError)
# Except these, which no image gets past: the run stops at once instead of failing every image
# alike. (Over gRPC an unreachable server fails each image with UNAVAILABLE instead.)
UNREACHABLE_ERRORS = (httpx.ConnectError, httpx.UnsupportedProtocol, httpx.ProxyError)


def fails_one_image(exc: BaseException) -> bool:
    return isinstance(exc, IMAGE_ERRORS) and not isinstance(exc, UNREACHABLE_ERRORS)


class AsyncDetector(Protocol):
    async def detect(
        self, image: ImageInput, task: str = ..., categories: Sequence[str] | str = ..., **kw: Any
    ) -> DetectResult: ...


async def detect_many(
    client: AsyncDetector,
    images: Sequence[ImageInput],
    task: str = "detection",
    categories: Sequence[str] | str = (),
    *,
    concurrency: int = 8,
    **kw: Any,
) -> AsyncIterator[tuple[int, DetectResult | Exception]]:
    """``(index into images, result or the error for that image)``, as each finishes."""
    limit = asyncio.Semaphore(max(1, concurrency))

    async def one(index: int, image: ImageInput) -> tuple[int, DetectResult | Exception]:
        async with limit:
            try:
                data = await asyncio.to_thread(Path(image).read_bytes) if not isinstance(image, bytes) else image
                return index, await client.detect(data, task, categories, **kw)
            except IMAGE_ERRORS as exc:
                if not fails_one_image(exc):
                    raise
                return index, exc

    tasks = [asyncio.create_task(one(i, image)) for i, image in enumerate(images)]
    try:
        for finished in asyncio.as_completed(tasks):
            yield await finished
    finally:
        for task_ in tasks:
            task_.cancel()
