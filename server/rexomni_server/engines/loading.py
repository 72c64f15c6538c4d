"""Model loading off the event loop, in a thread the process need not wait for.

``asyncio.to_thread`` uses the loop's default executor, whose threads ``asyncio.run`` joins at
exit: a server told to stop (SIGTERM, a port already taken) while a multi-GB model loads would
hang until the load finished. A daemon thread is abandoned instead."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
_started: list[threading.Thread] = []


def loads_still_running() -> bool:
    """A load abandoned mid-way is still running (a process that ends now must not run the
    interpreter's teardown under it: torch's native code would abort the process)."""
    _started[:] = [thread for thread in _started if thread.is_alive()]
    return bool(_started)


async def run_abandonable(fn: Callable[[], T], name: str) -> T:
    """``fn()`` in a daemon thread; cancelling the await abandons it (it runs on, unwaited)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def deliver(outcome: Callable[[], None]) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
            loop.call_soon_threadsafe(outcome)

    def settle_result(value: T) -> None:
        if not future.done():
            future.set_result(value)

    def settle_error(exc: BaseException) -> None:
        if not future.done():
            future.set_exception(exc)

    def target() -> None:
        try:
            value = fn()
        except BaseException as exc:
            deliver(functools.partial(settle_error, exc))
        else:
            deliver(functools.partial(settle_result, value))

    thread = threading.Thread(target=target, name=name, daemon=True)
    _started.append(thread)
    thread.start()
    return await future
