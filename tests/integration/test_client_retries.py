"""The clients ask again when the server says "not now" (HTTP 429/503, gRPC
RESOURCE_EXHAUSTED/UNAVAILABLE), after its Retry-After / pushback, and raise at once with
retries=0. Real uvicorn and grpc.aio servers whose queue holds one request."""

from __future__ import annotations

import asyncio
import datetime
import email.utils
from collections.abc import AsyncIterator

import grpc
import httpx
import pytest

from rexomni_client import AsyncRexOmniClient, AsyncRexOmniGrpcClient, RexOmniClient, RexOmniHTTPError
from rexomni_client.http import MAX_RETRY_WAIT_S, retry_wait
from rexomni_server.engines.scripted import ScriptedEngine
from rexomni_server.runtime import Runtime
from rexomni_server.schemas import DetectResult
from rexomni_server.serve import start_servers
from rexomni_server.settings import Settings
from tests.support import image_bytes, noise_png

OUTPUT = "<|object_ref_start|>cat<|object_ref_end|><|box_start|><0><0><999><999><|box_end|>"
PNG = image_bytes(64, 48)
BIG_PNG = noise_png(400, 400)  # ~470 KB: over gRPC's default 256 KiB retry buffer


@pytest.fixture(scope="module")
async def one_slot() -> AsyncIterator[tuple[str, str]]:
    settings = Settings(model="scripted", engine="scripted", max_queue=1)
    # 10 pieces at 80 ms: each request holds the only slot for about 0.8 s.
    runtime = Runtime(settings, engine=ScriptedEngine(default_output=OUTPUT, token_delay_s=0.08))
    await runtime.engine.start()
    servers = await start_servers(runtime, "127.0.0.1", 0, 0)
    yield f"http://127.0.0.1:{servers.http_port}", f"127.0.0.1:{servers.grpc_port}"
    await servers.stop(0)
    await runtime.stop()


async def slot_taken(url: str) -> None:
    """Until the server says its only slot is held (rather than sleeping and hoping)."""
    async with httpx.AsyncClient(base_url=url) as client:
        for _ in range(500):
            if "rexomni_in_flight_requests 1.0" in (await client.get("/metrics")).text:
                return
            await asyncio.sleep(0.01)
    raise AssertionError("the first request never took the slot")


def test_retry_wait_follows_retry_after_and_gives_up_on_longer_waits() -> None:
    def response(headers: dict[str, str], status: int = 429) -> httpx.Response:
        return httpx.Response(status, headers=headers)

    assert retry_wait(response({"Retry-After": "2"}), 0, 2) == 2.0
    assert retry_wait(response({}), 0, 2) == 0.5 and retry_wait(response({}), 2, 3) == 2.0  # backoff
    in_4s = email.utils.format_datetime(datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=4), True)
    assert 2.5 < (retry_wait(response({"Retry-After": in_4s}), 0, 2) or 0) <= 4.0  # an HTTP date
    assert retry_wait(response({"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}), 0, 2) == 0.0  # already past
    assert retry_wait(response({"Retry-After": str(MAX_RETRY_WAIT_S + 1)}), 0, 2) is None  # fail now, not later
    assert retry_wait(response({"Retry-After": "1"}), 2, 2) is None  # retries used up
    assert retry_wait(response({"Retry-After": "1"}, 500), 0, 2) is None  # not a "not now" status


async def test_async_client_waits_out_a_full_queue(one_slot: tuple[str, str]) -> None:
    url, _ = one_slot
    async with AsyncRexOmniClient(url, retries=0) as impatient, AsyncRexOmniClient(url) as patient:
        first = asyncio.create_task(patient.detect(PNG, "detection", ["cat"]))
        await slot_taken(url)  # the first request now holds the only slot
        with pytest.raises(RexOmniHTTPError) as refused:
            await impatient.detect(PNG, "detection", ["cat"])
        assert refused.value.status == 429
        second = await patient.detect(PNG, "detection", ["cat"])  # 429, waits Retry-After (1 s), then served
        streamed = [item async for item in patient.detect_stream(PNG, "detection", ["cat"])]
        assert (await first).detections == second.detections
        assert isinstance(streamed[-1], DetectResult) and [d.label for d in streamed[-1].detections] == ["cat"]


async def test_sync_client_retries_unary_and_streams(one_slot: tuple[str, str]) -> None:
    url, _ = one_slot

    def busy_then(call: str) -> object:
        with RexOmniClient(url) as client:
            return (
                client.detect(PNG, "detection", ["cat"])
                if call == "detect"
                else list(client.detect_stream(PNG, "detection", ["cat"]))
            )

    async with AsyncRexOmniClient(url) as holder:
        for call in ("detect", "stream"):
            first = asyncio.create_task(holder.detect(PNG, "detection", ["cat"]))
            await slot_taken(url)
            result = await asyncio.to_thread(busy_then, call)
            await first
            detections = result.detections if isinstance(result, DetectResult) else result[-1].detections  # type: ignore[index, union-attr]
            assert [d.label for d in detections] == ["cat"]


async def test_grpc_clients_follow_the_servers_pushback(one_slot: tuple[str, str]) -> None:
    url, target = one_slot
    async with (
        AsyncRexOmniClient(url) as holder,
        AsyncRexOmniGrpcClient(target, retries=0) as impatient,
        AsyncRexOmniGrpcClient(target) as patient,
    ):
        first = asyncio.create_task(holder.detect(PNG, "detection", ["cat"]))
        await slot_taken(url)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await impatient.detect(PNG, "detection", ["cat"])
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE  # "not now": the code gRPC retries
        trailing = dict(refused.value.trailing_metadata() or ())
        assert trailing["retry-after"] == "1" and trailing["grpc-retry-pushback-ms"] == "1000"
        assert trailing["x-request-id"]  # refused calls carry their id in the trailers
        # gRPC retries after the pushback, also for a request larger than its default replay buffer.
        second = await patient.detect(BIG_PNG, "detection", ["cat"])
        assert [d.label for d in (await first).detections] == [d.label for d in second.detections] == ["cat"]
        first = asyncio.create_task(holder.detect(PNG, "detection", ["cat"]))
        await slot_taken(url)
        streamed = [item async for item in patient.detect_stream(PNG, "detection", ["cat"])]
        await first
        assert isinstance(streamed[-1], DetectResult) and [d.label for d in streamed[-1].detections] == ["cat"]
