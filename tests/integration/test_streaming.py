"""SSE and gRPC on real loopback servers with the tiny model: incremental delivery, equal
results across transports, cancellation, health, metrics, error codes."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rexomni_server._pb.rexomni.v1 import detector_pb2 as pb
from rexomni_server._pb.rexomni.v1 import detector_pb2_grpc as pb_grpc
from rexomni_server.runtime import Runtime
from rexomni_server.schemas import DetectParams
from rexomni_server.transport.convert import detection_from_pb, params_to_pb, result_from_pb
from tests.support import image_bytes, metric_value, sse_events

W, H = 640, 480
PNG = image_bytes(W, H)


def forced_boxes(n: int) -> str:
    boxes = ", ".join(f"<{i}><{i + 1}><{i + 50}><{i + 60}>" for i in range(n))
    return f"<|object_ref_start|>person<|object_ref_end|><|box_start|>{boxes}<|box_end|>"


FORCED_50 = forced_boxes(50)


def body(forced: str = FORCED_50, **fields: Any) -> dict[str, Any]:
    return {
        "image": base64.b64encode(PNG).decode(),
        "categories": ["person"],
        "options": {"forced_output": forced},
        **fields,
    }


@contextlib.contextmanager
def overridden_settings(runtime: Runtime, **update: Any) -> Iterator[None]:
    """Run with some service settings changed, restoring them afterwards."""
    original = runtime.service.settings
    runtime.service.settings = original.model_copy(update=update)
    try:
        yield
    finally:
        runtime.service.settings = original


async def test_sse_streams_each_detection_before_done(live_servers: tuple[str, str]) -> None:
    url, _ = live_servers
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        async with client.stream("POST", "/v1/detect/stream", json=body()) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            events = [e async for e in sse_events(response)]
        unary = (await client.post("/v1/detect", json=body())).json()
    kinds = [kind for kind, _, _ in events]
    assert kinds == ["detection"] * 50 + ["done"]
    assert [data["index"] for _, data, _ in events[:-1]] == list(range(50))
    done = events[-1][1]
    assert [data["detection"] for _, data, _ in events[:-1]] == done["detections"] == unary["detections"]
    # Incremental: the first detection arrived well before the result was complete.
    first_at, done_at = events[0][2], events[-1][2]
    assert done_at - first_at > 0.3 * (done["timings"]["total_ms"] / 1000)


async def test_sse_multipart_and_errors(live_servers: tuple[str, str]) -> None:
    url, _ = live_servers
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        files = {"image": ("a.png", PNG, "image/png")}
        data = {"categories": "person", "options": json.dumps({"forced_output": forced_boxes(2)})}
        async with client.stream("POST", "/detect/stream", files=files, data=data) as response:
            kinds = [kind async for kind, _, _ in sse_events(response)]
        assert kinds == ["detection", "detection", "done"]
        bad = await client.post("/v1/detect/stream", json={**body(), "image": "bm90IGFuIGltYWdl"})
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_image"
        invalid = await client.post("/v1/detect/stream", json={**body(), "categories": []})
        assert invalid.status_code == 422


async def test_sse_error_event_after_acceptance(live_servers: tuple[str, str], tiny_runtime: Runtime) -> None:
    url, _ = live_servers
    with overridden_settings(tiny_runtime, request_timeout_s=0.2):
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            async with client.stream("POST", "/v1/detect/stream", json=body(forced_boxes(400))) as response:
                events = [(kind, data) async for kind, data, _ in sse_events(response)]
    assert events[-1][0] == "error" and events[-1][1]["error"]["code"] == "timeout"
    assert events[-1][1]["error"]["status"] == 504  # what a unary request gets for the same failure


async def wait_idle(runtime: Runtime, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while (runtime.service.in_flight or runtime.engine._cancel) and time.monotonic() < deadline:  # type: ignore[attr-defined]
        await asyncio.sleep(0.02)


async def test_sse_disconnect_aborts_the_engine_request(live_servers: tuple[str, str], tiny_runtime: Runtime) -> None:
    url, _ = live_servers
    metrics = tiny_runtime.service.metrics
    long_forced = forced_boxes(400)  # ~2800 tokens: seconds of work if not aborted
    before = metric_value(metrics.exposition().decode(), "rexomni_requests_total", {"status": "cancelled"})
    tokens_before = metric_value(metrics.exposition().decode(), "rexomni_generated_tokens_total")
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        async with client.stream("POST", "/v1/detect/stream", json=body(long_forced)) as response:
            async for kind, _, _ in sse_events(response):
                assert kind == "detection"
                break  # disconnect after the first detection
    await wait_idle(tiny_runtime)
    text = metrics.exposition().decode()
    assert tiny_runtime.service.in_flight == 0
    assert metric_value(text, "rexomni_in_flight_requests") == 0
    assert metric_value(text, "rexomni_requests_total", {"status": "cancelled"}) == before + 1
    # The generation stopped early instead of running to the end of the forced output.
    assert metric_value(text, "rexomni_generated_tokens_total") - tokens_before < 2000


def grpc_request(forced: str = FORCED_50, **fields: Any) -> Any:
    params = DetectParams.model_validate({"categories": ["person"], "options": {"forced_output": forced}, **fields})
    return params_to_pb(params, PNG)


async def test_grpc_unary_and_stream_match_http(live_servers: tuple[str, str]) -> None:
    url, target = live_servers
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        http_result = (await client.post("/v1/detect", json=body())).json()
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.DetectorStub(channel)
        call = stub.Detect(grpc_request(), metadata=(("x-request-id", "grpc-1"),))
        unary = await call
        assert dict(await call.initial_metadata())["x-request-id"] == "grpc-1"
        events = [event async for event in stub.DetectStream(grpc_request())]
    unary_result = result_from_pb(unary)
    assert unary_result.request_id == "grpc-1"
    http_detections = http_result["detections"]
    assert [d.model_dump() for d in unary_result.detections] == http_detections
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds == ["detection"] * 50 + ["done"]
    streamed = [detection_from_pb(e.detection.detection).model_dump() for e in events[:-1]]
    assert streamed == http_detections
    assert [d.model_dump() for d in result_from_pb(events[-1].done).detections] == http_detections


async def test_grpc_cancel_mid_stream_aborts(live_servers: tuple[str, str], tiny_runtime: Runtime) -> None:
    _, target = live_servers
    async with grpc.aio.insecure_channel(target) as channel:
        call = pb_grpc.DetectorStub(channel).DetectStream(grpc_request(forced_boxes(400)))
        async for event in call:
            assert event.WhichOneof("event") == "detection"
            call.cancel()
            break
    await wait_idle(tiny_runtime)
    assert tiny_runtime.service.in_flight == 0


async def test_grpc_deadline_is_propagated(live_servers: tuple[str, str], tiny_runtime: Runtime) -> None:
    _, target = live_servers
    async with grpc.aio.insecure_channel(target) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await pb_grpc.DetectorStub(channel).Detect(grpc_request(forced_boxes(400)), timeout=0.5)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await wait_idle(tiny_runtime)
    assert tiny_runtime.service.in_flight == 0


@pytest.mark.parametrize(
    ("request_fields", "image", "code"),
    [
        ({}, b"not an image", grpc.StatusCode.INVALID_ARGUMENT),
        ({"categories": []}, PNG, grpc.StatusCode.INVALID_ARGUMENT),
        ({"task": pb.TASK_KEYPOINT, "categories": ["cat"]}, PNG, grpc.StatusCode.INVALID_ARGUMENT),
        ({"task": 99}, PNG, grpc.StatusCode.INVALID_ARGUMENT),
        ({"options": pb.DetectOptions(max_new_tokens=10**6)}, PNG, grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
async def test_grpc_bad_input_codes(
    live_servers: tuple[str, str], request_fields: dict[str, Any], image: bytes, code: grpc.StatusCode
) -> None:
    _, target = live_servers
    request = pb.DetectRequest(image=image, categories=["person"])
    for key, value in request_fields.items():
        if key == "categories":
            del request.categories[:]
            request.categories.extend(value)
        elif key == "options":
            request.options.CopyFrom(value)
        else:
            setattr(request, key, value)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.DetectorStub(channel)
        for call in (stub.Detect(request), stub.DetectStream(request)):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                if hasattr(call, "__aiter__"):
                    _ = [e async for e in call]
                else:
                    await call
            assert err.value.code() == code and err.value.details()
        assert len((await stub.Detect(grpc_request(forced_boxes(1)))).detections) == 1  # still serving


async def test_grpc_refusals_that_happen_before_our_code_are_invalid_argument(
    live_servers: tuple[str, str], tiny_runtime: Runtime
) -> None:
    """Bad UTF-8 in a string field (protobuf refuses to parse it), and an image over our limit
    but within what gRPC reads (an image at the limit plus the rest of the message)."""
    _, target = live_servers
    not_utf8 = pb.DetectRequest(image=PNG).SerializeToString() + bytes([3 << 3 | 2, 2, 0xFF, 0xFE])
    over_our_limit = pb.DetectRequest(image=b"\0" * (tiny_runtime.settings.max_image_bytes + 1), categories=["person"])
    async with grpc.aio.insecure_channel(target) as channel:
        raw = channel.unary_unary("/rexomni.v1.Detector/Detect", response_deserializer=pb.DetectResponse.FromString)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await raw(not_utf8)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "cannot be parsed" in (
            err.value.details() or ""
        )
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await pb_grpc.DetectorStub(channel).Detect(over_our_limit)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "limit" in (err.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await pb_grpc.DetectorStub(channel).Detect(
                pb.DetectRequest(image=PNG, categories=["person"], options=pb.DetectOptions(max_new_tokens=0))
            )
        assert (err.value.details() or "").startswith("options.max_new_tokens:")  # worded as over HTTP


async def test_grpc_reads_no_more_than_an_image_at_the_limit_needs(
    live_servers: tuple[str, str], tiny_runtime: Runtime
) -> None:
    """Past an image at the limit plus the rest of the message, gRPC refuses the message itself
    (RESOURCE_EXHAUSTED, which the clients do not retry: no retry can make it fit)."""
    from rexomni_client.grpc import AsyncRexOmniGrpcClient

    _, target = live_servers
    too_large = tiny_runtime.settings.max_image_bytes + (2 << 20)
    async with grpc.aio.insecure_channel(target) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await pb_grpc.DetectorStub(channel).Detect(pb.DetectRequest(image=b"\0" * too_large, categories=["a"]))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    async with AsyncRexOmniGrpcClient(target) as client:  # retries on: still one answer, at once
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.detect(b"\0" * too_large, "detection", ["a"])
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_grpc_overloaded_is_unavailable(live_servers: tuple[str, str], tiny_runtime: Runtime) -> None:
    _, target = live_servers
    with overridden_settings(tiny_runtime, max_queue=1):
        async with grpc.aio.insecure_channel(target) as channel:
            stub = pb_grpc.DetectorStub(channel)
            holder = stub.DetectStream(grpc_request(forced_boxes(400)))  # seconds: it holds the only slot
            await holder.read()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Detect(grpc_request(forced_boxes(1)))
            holder.cancel()
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert dict(err.value.trailing_metadata() or ())["grpc-retry-pushback-ms"] == "1000"


async def test_grpc_health_flips_with_readiness(tiny_model_dir: Any) -> None:
    from rexomni_server.settings import Settings
    from rexomni_server.transport.grpc import GrpcServer

    runtime = Runtime(Settings(model=str(tiny_model_dir), engine="transformers"))
    server = GrpcServer(runtime, "127.0.0.1", 0)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)

            async def status() -> int:
                response = await stub.Check(health_pb2.HealthCheckRequest(service="rexomni.v1.Detector"))
                return int(response.status)

            assert await status() == health_pb2.HealthCheckResponse.NOT_SERVING
            # Detect while loading: UNAVAILABLE with a pushback (gRPC's retry policy waits it out).
            with pytest.raises(grpc.aio.AioRpcError) as loading:
                await pb_grpc.DetectorStub(channel).Detect(grpc_request(forced_boxes(1)))
            assert loading.value.code() == grpc.StatusCode.UNAVAILABLE
            assert dict(loading.value.trailing_metadata() or ())["retry-after"] == "5"
            await runtime.engine.start()
            deadline = time.monotonic() + 5
            while await status() != health_pb2.HealthCheckResponse.SERVING and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert await status() == health_pb2.HealthCheckResponse.SERVING
            await runtime.engine.stop()
            deadline = time.monotonic() + 5
            while await status() != health_pb2.HealthCheckResponse.NOT_SERVING and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert await status() == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        await server.stop(0)


async def test_grpc_reflection_lists_the_service(live_servers: tuple[str, str]) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    _, target = live_servers
    async with grpc.aio.insecure_channel(target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        responses = [r async for r in stub.ServerReflectionInfo(iter([request]))]
    names = {s.name for s in responses[0].list_services_response.service}
    assert {"rexomni.v1.Detector", "grpc.health.v1.Health"} <= names


async def test_metrics_change_by_the_expected_amounts(live_servers: tuple[str, str]) -> None:
    url, target = live_servers
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        before = (await client.get("/metrics")).text
        ok = await client.post("/v1/detect", json=body(forced_boxes(3)))
        options = {"forced_output": forced_boxes(3), "max_new_tokens": 10}
        truncated = await client.post("/v1/detect", json={**body(), "options": options})
        bad = await client.post("/v1/detect", json={**body(), "image": "bm90IGFuIGltYWdl"})
        async with grpc.aio.insecure_channel(target) as channel:
            grpc_result = await pb_grpc.DetectorStub(channel).Detect(grpc_request(forced_boxes(2)))
        after = (await client.get("/metrics")).text
    assert ok.status_code == 200 and truncated.status_code == 200 and bad.status_code == 400

    def delta(name: str, labels: dict[str, str] | None = None) -> float:
        return metric_value(after, name, labels) - metric_value(before, name, labels)

    assert delta("rexomni_requests_total", {"transport": "http", "status": "ok"}) == 2
    assert delta("rexomni_requests_total", {"transport": "http", "status": "invalid_image"}) == 1
    assert delta("rexomni_requests_total", {"transport": "grpc", "status": "ok"}) == 1
    assert delta("rexomni_truncated_outputs_total", {"task": "detection"}) == 1
    assert delta("rexomni_detections_per_request_sum", {"task": "detection"}) == 3 + 1 + 2
    assert delta("rexomni_detections_per_request_count", {"task": "detection"}) == 3
    ok_tokens = ok.json()["usage"]["completion_tokens"]
    grpc_tokens = grpc_result.usage.completion_tokens
    assert delta("rexomni_generated_tokens_total") == ok_tokens + 10 + grpc_tokens
    assert delta("rexomni_request_duration_seconds_count", {"transport": "http"}) == 3
    assert delta("rexomni_time_to_first_detection_seconds_count") == 3
    assert delta("rexomni_image_pixels_count") == 3
    assert metric_value(after, "rexomni_in_flight_requests") == 0
    assert metric_value(after, "rexomni_queue_depth") == 0


async def test_python_clients_stream_over_http_and_grpc(live_servers: tuple[str, str]) -> None:
    from rexomni_client import RexOmniClient, RexOmniGrpcClient, RexOmniHTTPError
    from rexomni_server.schemas import DetectResult

    url, target = live_servers
    forced = forced_boxes(3)

    def run_http() -> list[object]:
        with RexOmniClient(url) as client:
            return list(client.detect_stream(PNG, "detection", ["person"], forced_output=forced))

    def run_grpc() -> list[object]:
        with RexOmniGrpcClient(target) as client:
            unary = client.detect(PNG, "detection", "person", forced_output=forced)
            return [*client.detect_stream(PNG, "detection", ["person"], forced_output=forced), unary]

    def run_http_error() -> None:
        with RexOmniClient(url) as client:
            list(client.detect_stream(b"nope", "detection", ["person"]))

    http_items = await asyncio.to_thread(run_http)
    grpc_items = await asyncio.to_thread(run_grpc)
    assert len(http_items) == 4 and isinstance(http_items[-1], DetectResult)
    assert http_items[:3] == grpc_items[:3] == http_items[-1].detections
    assert isinstance(grpc_items[-1], DetectResult) and grpc_items[-1].detections == http_items[-1].detections
    with pytest.raises(RexOmniHTTPError) as err:
        await asyncio.to_thread(run_http_error)
    assert err.value.status == 400


async def test_async_client_streams_and_closing_early_stops_the_server(
    live_servers: tuple[str, str], tiny_runtime: Runtime
) -> None:
    from rexomni_client import AsyncRexOmniClient, RexOmniHTTPError
    from rexomni_server.schemas import DetectResult

    url, _ = live_servers
    metrics = tiny_runtime.service.metrics
    async with AsyncRexOmniClient(url) as client:
        items = [
            item async for item in client.detect_stream(PNG, "detection", ["person"], forced_output=forced_boxes(3))
        ]
        assert len(items) == 4 and isinstance(items[-1], DetectResult) and items[:3] == items[-1].detections

        cancelled = metric_value(metrics.exposition().decode(), "rexomni_requests_total", {"status": "cancelled"})
        stream = client.detect_stream(PNG, "detection", ["person"], forced_output=forced_boxes(400))
        async with contextlib.aclosing(stream):
            async for first in stream:
                assert not isinstance(first, DetectResult)
                break
        await wait_idle(tiny_runtime)
        after = metric_value(metrics.exposition().decode(), "rexomni_requests_total", {"status": "cancelled"})
        assert after == cancelled + 1

        with pytest.raises(RexOmniHTTPError) as err:
            [item async for item in client.detect_stream(b"nope", "detection", ["person"])]
        assert err.value.status == 400


async def test_async_grpc_client_matches_and_cancels(live_servers: tuple[str, str], tiny_runtime: Runtime) -> None:
    from rexomni_client import AsyncRexOmniGrpcClient
    from rexomni_server.schemas import DetectResult

    _, target = live_servers
    metrics = tiny_runtime.service.metrics
    async with AsyncRexOmniGrpcClient(target) as client:
        unary = await client.detect(PNG, "detection", ["person"], forced_output=forced_boxes(3))
        items = [item async for item in client.detect_stream(PNG, "detection", "person", forced_output=forced_boxes(3))]
        assert len(unary.detections) == 3 and items[:3] == unary.detections
        assert isinstance(items[-1], DetectResult) and items[-1].detections == unary.detections

        cancelled = metric_value(metrics.exposition().decode(), "rexomni_requests_total", {"status": "cancelled"})
        stream = client.detect_stream(PNG, "detection", ["person"], forced_output=forced_boxes(400))
        async with contextlib.aclosing(stream):
            async for _ in stream:
                break
        await wait_idle(tiny_runtime)
        after = metric_value(metrics.exposition().decode(), "rexomni_requests_total", {"status": "cancelled"})
        assert after == cancelled + 1

        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.detect(b"nope", "detection", ["person"])
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_unary_disconnect_aborts_the_engine_request(live_servers: tuple[str, str], tiny_runtime: Runtime) -> None:
    url, _ = live_servers
    metrics = tiny_runtime.service.metrics
    before = metric_value(metrics.exposition().decode(), "rexomni_requests_total", {"status": "cancelled"})
    tokens_before = metric_value(metrics.exposition().decode(), "rexomni_generated_tokens_total")
    async with httpx.AsyncClient(base_url=url) as client:
        with pytest.raises(httpx.ReadTimeout):  # the client gives up after half a second
            await client.post("/v1/detect", json=body(forced_boxes(400)), timeout=httpx.Timeout(60, read=0.5))
    await wait_idle(tiny_runtime)
    text = metrics.exposition().decode()
    assert tiny_runtime.service.in_flight == 0
    assert metric_value(text, "rexomni_requests_total", {"status": "cancelled"}) == before + 1
    # ~2800 tokens of forced output: stopped long before the end.
    assert metric_value(text, "rexomni_generated_tokens_total") - tokens_before < 2000
