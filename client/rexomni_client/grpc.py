"""gRPC client (unary and server streaming) returning the server's typed results."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import grpc

from rexomni_client.http import ImageInput, build_params, image_bytes_of
from rexomni_server._pb.rexomni.v1 import detector_pb2_grpc as pb_grpc
from rexomni_server.schemas import DetectionModel, DetectResult
from rexomni_server.transport.convert import detection_from_pb, params_to_pb, result_from_pb


class RexOmniGrpcClient:
    """``RexOmniGrpcClient("127.0.0.1:50051").detect("photo.jpg", categories=["person"])``"""

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        timeout: float = 600.0,
        max_message_bytes: int = 64 << 20,
        api_key: str | None = None,
    ) -> None:
        options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
        ]
        self._channel = grpc.insecure_channel(target, options=options)
        self._stub = pb_grpc.DetectorStub(self._channel)  # type: ignore[no-untyped-call]
        self._timeout = timeout
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()

    def _request(self, image: ImageInput, task: str, categories: Sequence[str] | str, **kw: Any) -> Any:
        return params_to_pb(build_params(task, categories, **kw), image_bytes_of(image))

    def detect(
        self, image: ImageInput, task: str = "detection", categories: Sequence[str] | str = (), **kw: Any
    ) -> DetectResult:
        response = self._stub.Detect(
            self._request(image, task, categories, **kw), timeout=self._timeout, metadata=self._metadata
        )
        return result_from_pb(response)

    def detect_stream(
        self, image: ImageInput, task: str = "detection", categories: Sequence[str] | str = (), **kw: Any
    ) -> Iterator[DetectionModel | DetectResult]:
        """Each detection as soon as the server decodes it, then the full result."""
        request = self._request(image, task, categories, **kw)
        for event in self._stub.DetectStream(request, timeout=self._timeout, metadata=self._metadata):
            if event.WhichOneof("event") == "detection":
                yield detection_from_pb(event.detection.detection)
            else:
                yield result_from_pb(event.done)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> RexOmniGrpcClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
