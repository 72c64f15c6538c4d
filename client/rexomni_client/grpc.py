"""gRPC clients (sync and asyncio; unary and server streaming) returning the server's typed results."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc

from rexomni_client.http import ImageInput, build_params, image_bytes_of
from rexomni_server._pb.rexomni.v1 import detector_pb2_grpc as pb_grpc
from rexomni_server.schemas import DetectionModel, DetectResult
from rexomni_server.transport.convert import (
    detection_from_pb,
    params_to_pb,
    result_from_pb,
)
from rexomni_server.vocabulary import MAX_MESSAGE_BYTES


def _channel_options(max_message_bytes: int, retries: int) -> list[tuple[str, int | str]]:
    """Message limits; calls balanced round-robin over every address the target resolves to
    (``dns:///rexomni-grpc:50051`` for a headless Service, ``ipv4:10.0.0.1:50051,10.0.0.2:50051``
    for a list; gRPC's default would send everything to the first); and gRPC's own retry
    policy for "not now" answers (UNAVAILABLE: queue full, loading, restarting; CANCELLED
    before any answer: a server that was stopping dropped the call before handling it, and
    detection has no side effects). It waits as long as the server's pushback says and never
    retries once a response message has arrived, so streams are not replayed.
    RESOURCE_EXHAUSTED (a message over the server's limit) is final."""
    options: list[tuple[str, int | str]] = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]
    config: dict[str, Any] = {"loadBalancingConfig": [{"round_robin": {}}]}
    if retries > 0:
        policy = {
            "maxAttempts": min(retries + 1, 5),  # gRPC caps attempts at 5
            "initialBackoff": "0.5s",
            "maxBackoff": "30s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE", "CANCELLED"],
        }
        config["methodConfig"] = [{"name": [{"service": "rexomni.v1.Detector"}], "retryPolicy": policy}]
        options += [
            ("grpc.enable_retries", 1),
            # gRPC replays only calls it kept whole (256 KiB by default): a photo is bigger.
            ("grpc.per_rpc_retry_buffer_size", max_message_bytes),
        ]
    options.append(("grpc.service_config", json.dumps(config)))
    return options


def _open_channel(
    api: Any, target: str, max_message_bytes: int, retries: int, tls: bool, ca_file: str | Path | None
) -> Any:
    """A channel from ``api`` (``grpc`` or ``grpc.aio``): TLS with the system roots or a
    private CA's certificate, else plaintext."""
    options = _channel_options(max_message_bytes, retries)
    if not (tls or ca_file):
        return api.insecure_channel(target, options=options)
    roots = Path(ca_file).read_bytes() if ca_file else None
    return api.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=roots), options=options)


def _metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()


def _request(image: ImageInput, task: str, categories: Sequence[str] | str, **kw: Any) -> Any:
    return params_to_pb(build_params(task, categories, **kw), image_bytes_of(image))


def _event(event: Any) -> DetectionModel | DetectResult:
    if event.WhichOneof("event") == "detection":
        return detection_from_pb(event.detection.detection)
    return result_from_pb(event.done)


class _GrpcClientBase:
    _api: Any = grpc  # grpc or grpc.aio

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        timeout: float = 600.0,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        api_key: str | None = None,
        tls: bool = False,
        ca_file: str | Path | None = None,
        retries: int = 2,
    ) -> None:
        """``retries``: how often a call refused with UNAVAILABLE (queue full, loading) is made
        again, after the server's pushback; 0 raises at once."""
        self._channel = _open_channel(self._api, target, max_message_bytes, retries, tls, ca_file)
        self._stub = pb_grpc.DetectorStub(self._channel)  # type: ignore[no-untyped-call]
        self._timeout = timeout
        self._metadata = _metadata(api_key)


class RexOmniGrpcClient(_GrpcClientBase):
    """``RexOmniGrpcClient("127.0.0.1:50051").detect("photo.jpg", categories=["person"])``"""

    def detect(
        self, image: ImageInput, task: str = "detection", categories: Sequence[str] | str = (), **kw: Any
    ) -> DetectResult:
        request = _request(image, task, categories, **kw)
        return result_from_pb(self._stub.Detect(request, timeout=self._timeout, metadata=self._metadata))

    def detect_stream(
        self, image: ImageInput, task: str = "detection", categories: Sequence[str] | str = (), **kw: Any
    ) -> Iterator[DetectionModel | DetectResult]:
        """Each detection as soon as the server decodes it, then the full result."""
        request = _request(image, task, categories, **kw)
        for event in self._stub.DetectStream(request, timeout=self._timeout, metadata=self._metadata):
            yield _event(event)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> RexOmniGrpcClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncRexOmniGrpcClient(_GrpcClientBase):
    """The asyncio version (grpc.aio): ``async with AsyncRexOmniGrpcClient(target) as client``."""

    _api = grpc.aio

    async def detect(
        self, image: ImageInput, task: str = "detection", categories: Sequence[str] | str = (), **kw: Any
    ) -> DetectResult:
        request = _request(image, task, categories, **kw)
        return result_from_pb(await self._stub.Detect(request, timeout=self._timeout, metadata=self._metadata))

    async def detect_stream(
        self, image: ImageInput, task: str = "detection", categories: Sequence[str] | str = (), **kw: Any
    ) -> AsyncIterator[DetectionModel | DetectResult]:
        """Each detection as soon as the server decodes it, then the full result. Closing the
        stream early cancels the call, and the server stops generating."""
        call = self._stub.DetectStream(
            _request(image, task, categories, **kw), timeout=self._timeout, metadata=self._metadata
        )
        try:
            async for event in call:
                yield _event(event)
        finally:
            call.cancel()

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncRexOmniGrpcClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
