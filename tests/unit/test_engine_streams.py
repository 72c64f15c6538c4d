"""The time budget of a request's engine streams: one timer, a quiet engine is cut at the
deadline, and a client that leaves stays a cancellation."""

from __future__ import annotations

import asyncio
import time

import pytest

from rexomni_server.engine_streams import Deadline
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
