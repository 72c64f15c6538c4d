"""The engine streams of one request, read as their events arrive, within its time budget.

A request starts one engine request, or one per category when fanned out. One stream is read
directly by the request's own task: no pump task and no queue hop per token. Several are
pumped into one queue by a task each, so a slow category never holds up the others.

The time budget costs one timer per request, not one per token: it marks the budget spent,
interrupts the reading task if it is waiting then, and any later wait fails at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import TypeVar

from rexomni_server.engines.base import Engine, EngineEvent, EngineRequest
from rexomni_server.errors import RequestTimeout

T = TypeVar("T")


class Deadline:
    """A request's time budget (``at`` is a ``time.perf_counter()`` value)."""

    def __init__(self, at: float, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.expired = False
        self._waiting: asyncio.Task[object] | None = None
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(max(at - time.perf_counter(), 0.0), self._expire)

    def _expire(self) -> None:
        self.expired = True
        if self._waiting is not None:
            self._waiting.cancel()

    def error(self) -> RequestTimeout:
        return RequestTimeout(f"request exceeded {self.timeout_s:g} s")

    def enter(self, task: asyncio.Task[object]) -> None:
        """``task`` starts waiting: from now the timer interrupts it (RequestTimeout at once if
        the budget is spent already)."""
        if self.expired:
            raise self.error()
        self._waiting = task

    def leave(self, cancelled: asyncio.CancelledError | None = None) -> None:
        """The wait ended; given the CancelledError that ended it, raises RequestTimeout if the
        cancel was the timer's own (anyone else's, e.g. a client that left, stays a cancel)."""
        task, self._waiting = self._waiting, None
        if cancelled is not None and self.expired and task is not None and task.uncancel() == 0:
            raise self.error() from None

    async def wait(self, awaitable: Awaitable[T]) -> T:
        """``await awaitable``, or RequestTimeout once the budget is spent."""
        task = asyncio.current_task()
        assert task is not None
        try:
            self.enter(task)
        except RequestTimeout:
            if asyncio.iscoroutine(awaitable):
                awaitable.close()  # not awaited: closed, so it is not reported as forgotten
            raise
        try:
            result = await awaitable
        except asyncio.CancelledError as exc:
            self.leave(exc)
            raise
        self.leave()
        return result

    def cancel(self) -> None:
        self._timer.cancel()


class EngineStreams:
    """``next()`` gives (engine request index, event) as events arrive, None once every stream
    has ended; with several streams also (index, None) when that one ends (a tiled request
    finishes a tile then). ``stop(i)`` ends one early (its generation is aborted, and no end is
    reported for it); ``close()`` ends all."""

    def __init__(self, engine: Engine, requests: Sequence[EngineRequest], deadline: Deadline) -> None:
        self._deadline = deadline
        self._task: asyncio.Task[object] | None = None  # the reading task, once known
        self._active = set(range(len(requests)))
        if len(requests) == 1:
            self._single: AsyncIterator[EngineEvent] | None = engine.stream(requests[0])
            self._next_single = self._single.__anext__
            self._pumps: list[asyncio.Task[None]] = []
        else:
            self._single = None
            self._queue: asyncio.Queue[tuple[int, EngineEvent | BaseException | None]] = asyncio.Queue()
            self._pumps = [asyncio.create_task(self._pump(engine, i, r)) for i, r in enumerate(requests)]

    def _current_task(self) -> asyncio.Task[object]:
        # One task reads a request's streams from start to end (the request's own).
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        return task

    def active(self, index: int) -> bool:
        return index in self._active

    async def next(self) -> tuple[int, EngineEvent | None] | None:
        if self._single is not None:
            # The hot path (once per token): Deadline.wait inlined, the reading task looked up once.
            if not self._active:
                return None
            deadline = self._deadline
            deadline.enter(self._task or self._current_task())
            try:
                event = await self._next_single()
            except StopAsyncIteration:
                deadline.leave()
                self._active.clear()
                return None
            except asyncio.CancelledError as exc:
                deadline.leave(exc)
                raise
            deadline.leave()
            return 0, event
        while self._active:
            index, item = await self._deadline.wait(self._queue.get())
            if isinstance(item, BaseException):
                raise item
            if item is None:
                if index not in self._active:
                    continue  # stopped already: its end was the caller's own doing
                self._active.discard(index)
            return index, item
        return None

    def stop(self, index: int) -> None:
        self._active.discard(index)
        if self._pumps:
            self._pumps[index].cancel()

    async def close(self) -> None:
        """Ends every stream: unfinished generations are aborted, and stopped pumps are left to
        finish closing their engine streams."""
        if self._single is not None:
            await self._single.aclose()  # type: ignore[attr-defined]
            return
        for pump in self._pumps:
            if not pump.cancelling():
                pump.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)

    async def _pump(self, engine: Engine, index: int, request: EngineRequest) -> None:
        stream = engine.stream(request)
        try:
            async for event in stream:
                self._queue.put_nowait((index, event))
            self._queue.put_nowait((index, None))
        except Exception as exc:
            self._queue.put_nowait((index, exc))
        finally:
            await stream.aclose()  # type: ignore[attr-defined]  # aborts an unfinished generation
