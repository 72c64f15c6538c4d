"""The HTTP clients ask again when the server says "not now" (429 overloaded, 503 loading),
after its Retry-After, and raise at once with retries=0. A real uvicorn server whose queue
holds one request."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest

from rexomni_client import AsyncRexOmniClient, RexOmniClient, RexOmniHTTPError
from rexomni_client.http import MAX_RETRY_WAIT_S, retry_delay
from rexomni_server.engines.scripted import ScriptedEngine
from rexomni_server.runtime import Runtime
from rexomni_server.schemas import DetectResult
from rexomni_server.serve import start_servers
from rexomni_server.settings import Settings
from tests.conftest import image_bytes

OUTPUT = "<|object_ref_start|>cat<|object_ref_end|><|box_start|><0><0><999><999><|box_end|>"
PNG = image_bytes(64, 48)


@pytest.fixture(scope="module")
async def one_slot() -> AsyncIterator[str]:
    settings = Settings(model="scripted", engine="scripted", max_queue=1)
    # 10 pieces at 80 ms: each request holds the only slot for about 0.8 s.
    runtime = Runtime(settings, engine=ScriptedEngine(default_output=OUTPUT, token_delay_s=0.08))
    await runtime.engine.start()
    servers = await start_servers(runtime, "127.0.0.1", 0, None)
    yield f"http://127.0.0.1:{servers.http_port}"
    await servers.stop(0)
    await runtime.stop()


def test_retry_delay_follows_retry_after_within_bounds() -> None:
    def response(headers: dict[str, str]) -> httpx.Response:
        return httpx.Response(429, headers=headers)

    assert retry_delay(response({"Retry-After": "2"}), 0) == 2.0
    assert retry_delay(response({"Retry-After": "9999"}), 0) == MAX_RETRY_WAIT_S
    assert retry_delay(response({}), 0) == 0.5 and retry_delay(response({}), 2) == 2.0
    assert retry_delay(response({"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}), 1) == 1.0  # a date: backoff


async def test_async_client_waits_out_a_full_queue(one_slot: str) -> None:
    async with AsyncRexOmniClient(one_slot, retries=0) as impatient, AsyncRexOmniClient(one_slot) as patient:
        first = asyncio.create_task(patient.detect(PNG, "detection", ["cat"]))
        await asyncio.sleep(0.15)  # the first request now holds the only slot
        with pytest.raises(RexOmniHTTPError) as refused:
            await impatient.detect(PNG, "detection", ["cat"])
        assert refused.value.status == 429
        second = await patient.detect(PNG, "detection", ["cat"])  # 429, waits Retry-After (1 s), then served
        streamed = [item async for item in patient.detect_stream(PNG, "detection", ["cat"])]
        assert (await first).detections == second.detections
        assert isinstance(streamed[-1], DetectResult) and streamed[-1].detections == second.detections


async def test_sync_client_retries_unary_and_streams(one_slot: str) -> None:
    def busy_then(call: str) -> object:
        with RexOmniClient(one_slot) as client:
            return (
                client.detect(PNG, "detection", ["cat"])
                if call == "detect"
                else list(client.detect_stream(PNG, "detection", ["cat"]))
            )

    async with AsyncRexOmniClient(one_slot) as holder:
        for call in ("detect", "stream"):
            first = asyncio.create_task(holder.detect(PNG, "detection", ["cat"]))
            await asyncio.sleep(0.15)
            result = await asyncio.to_thread(busy_then, call)
            await first
            detections = result.detections if isinstance(result, DetectResult) else result[-1].detections  # type: ignore[index, union-attr]
            assert [d.label for d in detections] == ["cat"]
