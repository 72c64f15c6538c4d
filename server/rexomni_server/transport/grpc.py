"""gRPC transport (grpc.aio): Detect, DetectStream, health tied to readiness, reflection, and the
one error table for gRPC. Translation and error mapping only; the service does the work."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from pydantic import ValidationError

from rexomni_server._pb.rexomni.v1 import detector_pb2 as pb
from rexomni_server._pb.rexomni.v1 import detector_pb2_grpc as pb_grpc  # the servicer base class
from rexomni_server.auth import API_KEY_HEADER, AUTHORIZATION_HEADER
from rexomni_server.errors import (
    EngineFailure,
    EngineNotReady,
    InvalidRequest,
    Overloaded,
    RequestTimeout,
    RexOmniError,
    Unauthenticated,
)
from rexomni_server.runtime import Runtime
from rexomni_server.schemas import validation_summary
from rexomni_server.service import AcceptedEvent, DetectionEvent, DoneEvent, new_request_id
from rexomni_server.transport.convert import (
    CLIENT_MAX_MESSAGE_BYTES,
    detection_to_pb,
    params_from_pb,
    result_to_pb,
)

log = logging.getLogger(__name__)

REQUEST_ID_KEY = "x-request-id"
SERVICE_NAME = "rexomni.v1.Detector"
# Headroom over the largest accepted image for the rest of the request message.
MESSAGE_OVERHEAD_BYTES = 1 << 20


@dataclass(frozen=True)
class UndecodableRequest:
    """A request message protobuf cannot parse (e.g. a string field that is not UTF-8). Handed
    to the servicer, which answers INVALID_ARGUMENT and counts it like any bad input, where
    gRPC would otherwise answer UNKNOWN."""

    reason: str


def parse_request(data: bytes) -> Any:
    try:
        return pb.DetectRequest.FromString(data)
    except DecodeError as exc:
        return UndecodableRequest(str(exc))


def add_detector_servicer(servicer: DetectorServicer, server: grpc.aio.Server) -> None:
    """The generated registration, with requests parsed by ``parse_request``."""
    handlers = {
        "Detect": grpc.unary_unary_rpc_method_handler(
            servicer.Detect, request_deserializer=parse_request, response_serializer=pb.DetectResponse.SerializeToString
        ),
        "DetectStream": grpc.unary_stream_rpc_method_handler(
            servicer.DetectStream,
            request_deserializer=parse_request,
            response_serializer=pb.DetectEvent.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


MAX_SEND_BYTES = 64 << 20

# The gRPC error table: most specific class first (looked up along the exception's MRO).
GRPC_STATUS: dict[type[RexOmniError], grpc.StatusCode] = {
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,  # includes every image error
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    EngineNotReady: grpc.StatusCode.UNAVAILABLE,
    RequestTimeout: grpc.StatusCode.DEADLINE_EXCEEDED,
    EngineFailure: grpc.StatusCode.INTERNAL,
}


def grpc_status(exc: RexOmniError) -> grpc.StatusCode:
    for cls in type(exc).__mro__:
        if cls in GRPC_STATUS:
            return GRPC_STATUS[cls]  # type: ignore[index]
    return grpc.StatusCode.INTERNAL


class DetectorServicer(pb_grpc.DetectorServicer):  # type: ignore[misc]
    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime

    async def _begin(self, request: Any, context: grpc.aio.ServicerContext) -> tuple[Any, bytes, str, float | None]:
        metadata = dict(context.invocation_metadata() or ())
        request_id = str(metadata.get(REQUEST_ID_KEY, "")).strip()[:128] or new_request_id()
        try:
            self._runtime.api_keys.check(metadata.get(AUTHORIZATION_HEADER), metadata.get(API_KEY_HEADER))
        except Unauthenticated as exc:
            self._runtime.service.record_rejected(request_id, "unknown", "grpc", exc.code)
            await _abort(context, exc, request_id)
        try:
            if isinstance(request, UndecodableRequest):
                raise ValueError(f"the request message cannot be parsed: {request.reason}")
            params, image = params_from_pb(request)
        except (ValidationError, ValueError) as exc:
            self._runtime.service.record_rejected(request_id, "unknown", "grpc", InvalidRequest.code)
            await _abort(context, InvalidRequest(_validation_message(exc)), request_id)
        return params, image, request_id, context.time_remaining()

    async def Detect(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        params, image, request_id, remaining = await self._begin(request, context)
        try:
            result = await self._runtime.service.detect(
                params, image, request_id=request_id, transport="grpc", timeout_s=remaining
            )
        except RexOmniError as exc:
            await _abort(context, exc, request_id)
        await context.send_initial_metadata(((REQUEST_ID_KEY, request_id),))
        return result_to_pb(result)

    async def DetectStream(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        params, image, request_id, remaining = await self._begin(request, context)
        events = self._runtime.service.stream(
            params, image, request_id=request_id, transport="grpc", timeout_s=remaining
        )
        try:
            async for event in events:
                if isinstance(event, AcceptedEvent):
                    # Headers only once the request is admitted: a refusal before this point
                    # is a trailers-only answer, which gRPC's retry policy may send again.
                    await context.send_initial_metadata(((REQUEST_ID_KEY, request_id),))
                elif isinstance(event, DetectionEvent):
                    yield pb.DetectEvent(
                        detection=pb.DetectionEvent(
                            index=event.index,
                            detection=detection_to_pb(event.detection),
                            elapsed_ms=event.elapsed_ms,
                        )
                    )
                elif isinstance(event, DoneEvent):
                    yield pb.DetectEvent(done=result_to_pb(event.result))
        except RexOmniError as exc:
            await _abort(context, exc, request_id)
        finally:
            await events.aclose()  # type: ignore[attr-defined]


async def _abort(context: grpc.aio.ServicerContext, exc: RexOmniError, request_id: str) -> NoReturn:
    """End the call with the error's status and the request id in the trailers. "Not now"
    errors also say when to come back, as ``retry-after`` (seconds) and as
    ``grpc-retry-pushback-ms``, which gRPC's own retry policy (the Python clients enable it)
    obeys. No headers were sent before (see DetectStream), so the call can be retried."""
    trailers = [(REQUEST_ID_KEY, request_id)]
    if exc.retry_after_s is not None:
        seconds = max(1, round(exc.retry_after_s))
        trailers += [("retry-after", str(seconds)), ("grpc-retry-pushback-ms", str(seconds * 1000))]
    context.set_trailing_metadata(tuple(trailers))
    await context.abort(grpc_status(exc), exc.message)
    raise AssertionError("unreachable")  # context.abort raises


def _validation_message(exc: Exception) -> str:
    return validation_summary(exc.errors()) if isinstance(exc, ValidationError) else str(exc)


class GrpcServer:
    """grpc.aio server with health (tracking engine readiness) and reflection."""

    def __init__(self, runtime: Runtime, host: str, port: int) -> None:
        self._runtime = runtime
        # Beyond this gRPC itself answers RESOURCE_EXHAUSTED, which clients retry as "queue full":
        # so at least what our clients send, and an image over our limit gets INVALID_ARGUMENT.
        max_receive = max(runtime.settings.max_image_bytes, CLIENT_MAX_MESSAGE_BYTES) + MESSAGE_OVERHEAD_BYTES
        self.server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", max_receive),
                ("grpc.max_send_message_length", MAX_SEND_BYTES),
            ]
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
