"""The time budget of a request's engine streams: one timer, a quiet engine is cut at the
deadline, and a client that leaves stays a cancellation."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from PIL import Image

from rexomni_server.engine_streams import Deadline, EngineStreams
from rexomni_server.engines.base import EngineEvent, EngineRequest, SamplingConfig
from rexomni_server.errors import RequestTimeout


async def test_a_wait_past_the_budget_ends_with_a_timeout() -> None:
    deadline = Deadline(time.perf_counter() + 0.05, 0.05)
    with pytest.raises(RequestTimeout, match=r"0\.05 s"):
        await deadline.wait(asyncio.Event().wait())  # an engine that never answers
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0  # the timer's cancel was taken back
    with pytest.raises(RequestTimeout):  # spent: no further wait starts
        await deadline.wait(asyncio.sleep(0))


async def test_an_answer_in_time_is_returned_and_the_timer_can_be_cancelled() -> None:
    deadline = Deadline(time.perf_counter() + 10, 10)
    assert await deadline.wait(asyncio.sleep(0, result="event")) == "event"
    deadline.cancel()


async def test_a_client_that_leaves_is_a_cancellation_not_a_timeout() -> None:
    async def request() -> None:
        deadline = Deadline(time.perf_counter() + 0.05, 0.05)
        await deadline.wait(asyncio.Event().wait())

    task = asyncio.create_task(request())
    await asyncio.sleep(0.01)
    task.cancel()  # the client left before the budget ran out
    with pytest.raises(asyncio.CancelledError):
        await task


class _QuietEngine:
    """Starts every generation, writes one token, then never writes again."""

    async def stream(self, request: EngineRequest) -> AsyncIterator[EngineEvent]:
        yield EngineEvent(started=True, prompt_tokens=1)
        yield EngineEvent(text="<1>", tokens=1)
        await asyncio.Event().wait()
        yield EngineEvent(finish_reason="stop")  # never reached


def _requests(n: int) -> list[EngineRequest]:
    sampling = SamplingConfig(max_new_tokens=8, temperature=0, top_p=1, top_k=1, repetition_penalty=1)
    return [EngineRequest(f"r{i}", "text", Image.new("RGB", (28, 28)), sampling) for i in range(n)]


@pytest.mark.parametrize("engine_requests", [1, 3], ids=["one stream, read directly", "fanned out, pumped"])
async def test_engine_streams_deliver_then_cut_a_quiet_engine_at_the_deadline(engine_requests: int) -> None:
    deadline = Deadline(time.perf_counter() + 0.2, 0.2)
    streams = EngineStreams(_QuietEngine(), _requests(engine_requests), deadline)  # type: ignore[arg-type]
    received = [await streams.next() for _ in range(2 * engine_requests)]
    assert sorted(index for index, _ in filter(None, received)) == sorted(list(range(engine_requests)) * 2)
    with pytest.raises(RequestTimeout):
        await streams.next()
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0  # the timer's cancel was taken back
    await streams.close()


@pytest.mark.parametrize("engine_requests", [1, 3], ids=["one stream, read directly", "fanned out, pumped"])
async def test_a_client_leaving_while_engine_streams_wait_is_a_cancellation(engine_requests: int) -> None:
    async def request() -> None:
        deadline = Deadline(time.perf_counter() + 5, 5)
        streams = EngineStreams(_QuietEngine(), _requests(engine_requests), deadline)  # type: ignore[arg-type]
        try:
            while await streams.next() is not None:
                pass
        finally:
            deadline.cancel()
            await streams.close()

    task = asyncio.create_task(request())
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


class _ShortEngine:
    """Writes ``tokens`` tokens for request ``r{i}`` (its index), then ends; request r1 waits
    for the test before its last token."""

    def __init__(self) -> None:
        self.release = asyncio.Event()

    async def stream(self, request: EngineRequest) -> AsyncIterator[EngineEvent]:
        index = int(request.request_id[1:])
        for _ in range(index + 1):
            if index == 1:
                await self.release.wait()
            yield EngineEvent(text="<1>", tokens=1)
            await asyncio.sleep(0)


async def test_several_streams_report_each_end_once_and_a_stopped_one_none() -> None:
    deadline = Deadline(time.perf_counter() + 5, 5)
    engine = _ShortEngine()
    streams = EngineStreams(engine, _requests(3), deadline)  # type: ignore[arg-type]
    seen: list[tuple[int, bool]] = []
    try:
        while (arrived := await streams.next()) is not None:
            index, event = arrived
            seen.append((index, event is None))
            if index == 2 and event is not None and not streams.active(0) and not engine.release.is_set():
                streams.stop(2)  # stopped mid-answer: no end reported for it
                engine.release.set()
    finally:
        deadline.cancel()
        await streams.close()
    assert seen.count((0, True)) == 1 and seen.count((1, True)) == 1 and (2, True) not in seen
    assert seen.count((1, False)) == 2 and seen.index((0, True)) > seen.index((0, False))
