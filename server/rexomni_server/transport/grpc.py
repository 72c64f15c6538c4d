"""gRPC transport (grpc.aio): Detect, DetectStream, health tied to readiness, reflection, and the
one error table for gRPC. Translation and error mapping only; the service does the work."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any, NoReturn

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from pydantic import ValidationError

from rexomni_server._pb.rexomni.v1 import detector_pb2 as pb
from rexomni_server._pb.rexomni.v1 import detector_pb2_grpc as pb_grpc  # the servicer base class
from rexomni_server.accounting import RequestRecord, deadline_guard
from rexomni_server.auth import API_KEY_HEADER, AUTHORIZATION_HEADER
from rexomni_server.errors import (
    EngineDead,
    EngineFailure,
    EngineNotReady,
    InvalidRequest,
    Overloaded,
    RequestTimeout,
    RexOmniError,
    Unauthenticated,
)
from rexomni_server.runtime import Runtime
from rexomni_server.schemas import DetectParams, validation_summary
from rexomni_server.service import AcceptedEvent, DetectionEvent, DoneEvent, ServiceEvent, new_request_id
from rexomni_server.settings import Settings
from rexomni_server.transport.convert import (
    detection_to_pb,
    params_from_pb,
    result_to_pb,
)
from rexomni_server.vocabulary import MAX_MESSAGE_BYTES, REQUEST_OVERHEAD_BYTES

log = logging.getLogger(__name__)

REQUEST_ID_KEY = "x-request-id"
SERVICE_NAME = "rexomni.v1.Detector"


def add_detector_servicer(servicer: DetectorServicer, server: grpc.aio.Server) -> None:
    """The generated registration, except that requests reach the servicer as bytes: it parses
    them itself, off the event loop when they are large, and answers a message protobuf cannot
    parse with INVALID_ARGUMENT (gRPC would say UNKNOWN)."""
    handlers = {
        "Detect": grpc.unary_unary_rpc_method_handler(
            servicer.Detect, response_serializer=pb.DetectResponse.SerializeToString
        ),
        "DetectStream": grpc.unary_stream_rpc_method_handler(
            servicer.DetectStream, response_serializer=pb.DetectEvent.SerializeToString
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


# Messages up to this size are parsed on the event loop (a thread hop costs more); larger ones,
# as every message with a real photo in it, in a worker thread.
INLINE_MESSAGE_BYTES = 64 * 1024

# The gRPC error table: most specific class first (looked up along the exception's MRO).
# "Not now" is UNAVAILABLE, the code gRPC's retry policies retry: RESOURCE_EXHAUSTED is what
# gRPC itself answers for a message over the receive limit, which no retry can cure.
GRPC_STATUS: dict[type[RexOmniError], grpc.StatusCode] = {
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,  # includes every image error
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    Overloaded: grpc.StatusCode.UNAVAILABLE,
    EngineNotReady: grpc.StatusCode.UNAVAILABLE,
    EngineDead: grpc.StatusCode.UNAVAILABLE,
    RequestTimeout: grpc.StatusCode.DEADLINE_EXCEEDED,
    EngineFailure: grpc.StatusCode.INTERNAL,
}


def grpc_status(exc: RexOmniError) -> grpc.StatusCode:
    for cls in type(exc).__mro__:
        if cls in GRPC_STATUS:
            return GRPC_STATUS[cls]  # type: ignore[index]
    return grpc.StatusCode.INTERNAL


def request_id_of(metadata: Any) -> str:
    given = dict(metadata or ()).get(REQUEST_ID_KEY, "")
    return str(given).strip()[:128] or new_request_id()


def decode_request(data: bytes) -> tuple[DetectParams, bytes]:
    """Wire bytes -> validated params and image bytes; InvalidRequest for anything wrong."""
    try:
        return params_from_pb(pb.DetectRequest.FromString(data))
    except DecodeError as exc:
        raise InvalidRequest(f"the request message cannot be parsed: {exc}") from None
    except ValidationError as exc:
        raise InvalidRequest(validation_summary(exc.errors())) from None
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None


class DetectorServicer(pb_grpc.DetectorServicer):  # type: ignore[misc]
    """Each call is one request record (see ``accounting``), held to its time budget even
    while its client does not read (answers are written with ``context.write`` inside the
    deadline guard)."""

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime

    async def _params(self, data: bytes) -> tuple[DetectParams, bytes]:
        if len(data) <= INLINE_MESSAGE_BYTES:
            return decode_request(data)
        return await asyncio.to_thread(decode_request, data)

    @contextlib.asynccontextmanager
    async def _call(self, context: grpc.aio.ServicerContext) -> AsyncIterator[RequestRecord]:
        """One call: its record (logged and counted once), held to its time budget; a domain
        error or the deadline ends the call with its status."""
        request_id = request_id_of(context.invocation_metadata())
        with self._runtime.service.ledger.scope(request_id, "grpc") as record:
            try:
                async with deadline_guard(record):
                    yield record
            except TimeoutError:
                await _abort(context, record, RequestTimeout("the request exceeded its time budget"))
            except RexOmniError as exc:
                await _abort(context, record, exc)

    async def Detect(self, data: bytes, context: grpc.aio.ServicerContext) -> Any:
        async with self._call(context) as record:
            params, image = await self._params(data)
            result = await self._runtime.service.detect(
                params, image, record=record, timeout_s=context.time_remaining()
            )
            await context.send_initial_metadata(((REQUEST_ID_KEY, record.request_id),))
            return result_to_pb(result)

    async def DetectStream(self, data: bytes, context: grpc.aio.ServicerContext) -> None:
        async with self._call(context) as record:
            params, image = await self._params(data)
            events = self._runtime.service.stream(params, image, record=record, timeout_s=context.time_remaining())
            async with contextlib.aclosing(events):  # type: ignore[type-var]
                async for event in events:
                    await _send(context, record.request_id, event)


async def _send(context: grpc.aio.ServicerContext, request_id: str, event: ServiceEvent) -> None:
    if isinstance(event, AcceptedEvent):
        # Headers only once the request is admitted: a refusal before this point is a
        # trailers-only answer, which gRPC's retry policy may send again.
        await context.send_initial_metadata(((REQUEST_ID_KEY, request_id),))
    elif isinstance(event, DetectionEvent):
        detection = pb.DetectionEvent(
            index=event.index, detection=detection_to_pb(event.detection), elapsed_ms=event.elapsed_ms
        )
        await context.write(pb.DetectEvent(detection=detection))
    elif isinstance(event, DoneEvent):
        await context.write(pb.DetectEvent(done=result_to_pb(event.result)))


async def _abort(context: grpc.aio.ServicerContext, record: RequestRecord, exc: RexOmniError) -> NoReturn:
    """End the call with the error's status and the request id in the trailers (and the error's
    code on the record). "Not now" errors also say when to come back, as ``retry-after``
    (seconds) and as ``grpc-retry-pushback-ms``, which gRPC's own retry policy (the Python
    clients enable it) obeys. No headers were sent before (see _send), so the call can be
    retried."""
    record.fail(exc.code)
    trailers = [(REQUEST_ID_KEY, record.request_id)]
    if exc.retry_after_s is not None:
        seconds = max(1, round(exc.retry_after_s))
        trailers += [("retry-after", str(seconds)), ("grpc-retry-pushback-ms", str(seconds * 1000))]
    context.set_trailing_metadata(tuple(trailers))
    await context.abort(grpc_status(exc), exc.message)
    raise AssertionError("unreachable")  # context.abort raises


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Checks a Detector call's API key from its metadata, before its message is read: a
    refused call is handed to a request-streaming handler that never reads its request, so a
    keyless client cannot make the server receive or parse megabytes."""

    def __init__(self, runtime: Runtime) -> None:
        self._keys = runtime.api_keys
        self._ledger = runtime.service.ledger

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        if not self._keys.enabled or not details.method.startswith(f"/{SERVICE_NAME}/"):
            return await continuation(details)
        metadata = dict(details.invocation_metadata or ())
        try:
            self._keys.check(metadata.get(AUTHORIZATION_HEADER), metadata.get(API_KEY_HEADER))
        except Unauthenticated as exc:
            return grpc.stream_unary_rpc_method_handler(self._refusal(exc, request_id_of(metadata.items())))
        return await continuation(details)

    def _refusal(self, exc: Unauthenticated, request_id: str) -> Any:
        async def refuse(_unread: object, context: grpc.aio.ServicerContext) -> None:
            with self._ledger.scope(request_id, "grpc") as record:
                await _abort(context, record, exc)

        return refuse


def server_options(settings: Settings) -> list[tuple[str, int]]:
    """Message limits and connection hygiene. A request is read up to what an image at the
    limit needs (gRPC answers RESOURCE_EXHAUSTED past it, before we see the message); idle
    connections are pinged and dropped when they do not answer; a client that pings more
    often than allowed is disconnected (a cheap way to keep a server busy). Connections are
    aged out (GOAWAY, calls in flight finish within their budget): a client balancing over
    the addresses of a headless Service resolves again and finds new replicas."""
    ms = 1000
    return [
        ("grpc.max_receive_message_length", settings.max_image_bytes + REQUEST_OVERHEAD_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", int(settings.grpc_keepalive_s * ms)),
        ("grpc.keepalive_timeout_ms", 20 * ms),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", int(settings.grpc_min_ping_interval_s * ms)),
        ("grpc.http2.max_ping_strikes", 2),
        ("grpc.max_connection_age_ms", int(settings.grpc_max_connection_age_s * ms)),
        ("grpc.max_connection_age_grace_ms", int(settings.request_timeout_s * ms)),
    ]


class GrpcServer:
    """grpc.aio server with health (tracking engine readiness) and reflection."""

    def __init__(self, runtime: Runtime, host: str, port: int) -> None:
        self._runtime = runtime
        self.server = grpc.aio.server(
            interceptors=[ApiKeyInterceptor(runtime)],
            options=server_options(runtime.settings),
            maximum_concurrent_rpcs=runtime.settings.grpc_max_concurrent_rpcs,
        )
        add_detector_servicer(DetectorServicer(runtime), self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        names = (
            pb.DESCRIPTOR.services_by_name["Detector"].full_name,
            health.SERVICE_NAME,
            reflection.SERVICE_NAME,
        )
        reflection.enable_server_reflection(names, self.server)
        settings = runtime.settings
        try:
            if settings.tls_cert_file is not None and settings.tls_key_file is not None:
                pair = (settings.tls_key_file.read_bytes(), settings.tls_cert_file.read_bytes())
                self.port = self.server.add_secure_port(f"{host}:{port}", grpc.ssl_server_credentials([pair]))
            else:
                self.port = self.server.add_insecure_port(f"{host}:{port}")
        except RuntimeError as exc:  # grpc's way of saying the port is taken
            raise OSError(f"the gRPC server could not listen on {host}:{port}: {exc}") from None
        self._watcher: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._set_serving(False)
        await self.server.start()
        self._watcher = asyncio.create_task(self._watch_readiness())

    async def _set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def _watch_readiness(self, interval_s: float = 0.2) -> None:
        serving: bool | None = None
        while True:
            ready = self._runtime.ready
            if ready != serving:
                await self._set_serving(ready)
                serving = ready
            await asyncio.sleep(interval_s)

    async def stop(self, grace_s: float = 5.0) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        await self._set_serving(False)
        await self.server.stop(grace_s)
