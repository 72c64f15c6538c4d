"""One record per request, from arrival to its last byte, logged and counted exactly once.

A transport opens the record when a request arrives (HTTP: a middleware around every detect
path; gRPC: the method handler), before anything can refuse it, and closes it when the answer
is sent, whatever happened in between: a missing key, a body over the limit, bad input, a full
queue, a generation, a client that left. The service fills it in (task, status, the details of
the log line) and never logs a request itself. In-process calls get a record of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

from rexomni_server.errors import RequestTimeout, RexOmniError
from rexomni_server.metrics import Metrics

log = logging.getLogger("rexomni.requests")

# How long past its time budget a request whose client stopped reading is cut: the service
# ends a request on time itself whenever it is asked for the next event.
DEADLINE_GRACE_S = 1.0
UNKNOWN_TASK = "unknown"  # a request refused before its task was read
OK = "ok"
CANCELLED = "cancelled"  # the client left (or the server stopped) before the answer
INTERNAL = "internal"  # a bug of ours: the traceback is in the log


@dataclass
class RequestRecord:
    request_id: str
    transport: str
    arrived: float = field(default_factory=time.perf_counter)
    task: str = UNKNOWN_TASK
    # None until something decides it: "ok", an error code, or "cancelled". The first word
    # wins: a refusal is not overwritten by the cancellation that follows it.
    status: str | None = None
    admitted: bool = False  # reached the service's admission and was let in
    fields: dict[str, object] = field(default_factory=dict)  # the log line's details
    # Told the request's time budget (seconds) once it is admitted; the transport uses it to
    # cut an answer whose client stopped reading (see ``deadline_guard``).
    on_deadline: Callable[[float], None] | None = None
    # ``time.perf_counter()`` when its generation started (left the queue) and when its first
    # detection was ready; None until then.
    started: float | None = None
    first_detection: float | None = None

    def fail(self, status: str) -> None:
        if self.status is None:
            self.status = status

    def start_deadline(self, seconds: float) -> None:
        if self.on_deadline is not None:
            self.on_deadline(seconds)

    @property
    def elapsed_s(self) -> float:
        return time.perf_counter() - self.arrived

    def ms_since_arrival(self, moment: float) -> float:
        return (moment - self.arrived) * 1000


@contextlib.contextmanager
def recording(record: RequestRecord) -> Iterator[None]:
    """Sets the record's status from how the block ends: "ok", the error's code, "cancelled"
    (also for a generator closed early: its client left), "timeout", or "internal"."""
    try:
        yield
    except (asyncio.CancelledError, GeneratorExit):
        record.fail(CANCELLED)
        raise
    except TimeoutError:
        record.fail(RequestTimeout.code)
        raise
    except RexOmniError as exc:
        record.fail(exc.code)
        raise
    except BaseException:
        record.fail(INTERNAL)
        raise
    record.fail(OK)


class RequestLedger:
    """Opens and closes request records: the only place a request is logged and counted."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    @contextlib.contextmanager
    def scope(self, request_id: str, transport: str) -> Iterator[RequestRecord]:
        record = RequestRecord(request_id, transport)
        try:
            with recording(record):
                yield record
        finally:
            self.close(record)

    def close(self, record: RequestRecord) -> None:
        status = record.status or OK
        elapsed = record.elapsed_s
        self.metrics.requests.labels(record.task, record.transport, status).inc()
        if record.admitted:  # refusals at the door would drag the latency figures down
            self.metrics.latency.labels(record.task, record.transport).observe(elapsed)
        fields: dict[str, object] = {
            "request_id": record.request_id,
            "transport": record.transport,
            "task": record.task,
            "status": status,
            **record.fields,
            "total_ms": round(elapsed * 1000, 2),
        }
        log.info("request", extra={"fields": fields})


@contextlib.asynccontextmanager
async def deadline_guard(record: RequestRecord, grace_s: float = DEADLINE_GRACE_S) -> AsyncIterator[None]:
    """Raises TimeoutError ``grace_s`` after the request's time budget ran out, wherever the
    transport is then. The service keeps the budget itself while it is asked for events, but
    an answer whose client stopped reading waits in the transport's send, out of its reach."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(None) as timeout:
            record.on_deadline = lambda seconds: timeout.reschedule(loop.time() + seconds + grace_s)
            yield
    except TimeoutError:
        # The cancellation that ended the request was recorded as "cancelled" where it landed;
        # its cause was the deadline.
        record.status = RequestTimeout.code
        raise
    finally:
        record.on_deadline = None
