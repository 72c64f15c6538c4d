"""DetectionService on the scripted engine: event order, options, limits and errors."""

from __future__ import annotations

import asyncio

import pytest

from rexomni_server.engines.scripted import ScriptedEngine
from rexomni_server.errors import EngineNotReady, InvalidRequest, Overloaded, RequestTimeout
from rexomni_server.schemas import DetectParams
from rexomni_server.service import AcceptedEvent, DetectionEvent, DetectionService, DoneEvent, ServiceEvent
from rexomni_server.settings import Settings
from tests.conftest import image_bytes

OUTPUT = (
    "<|object_ref_start|>person<|object_ref_end|><|box_start|><0><0><999><999>, <1><2><3><4><|box_end|>, "
    "<|object_ref_start|>car<|object_ref_end|><|box_start|><10><20><30><40><|box_end|>"
)
IMAGE = image_bytes(999, 999)


async def make_service(**overrides: object) -> tuple[DetectionService, ScriptedEngine]:
    engine = ScriptedEngine(default_output=OUTPUT, token_delay_s=float(overrides.pop("delay", 0.0)))  # type: ignore[arg-type]
    await engine.start()
    settings = Settings(**{"allow_forced_output": True, **overrides})  # type: ignore[arg-type]
    return DetectionService(settings, engine, "scripted"), engine


def params(**fields: object) -> DetectParams:
    return DetectParams.model_validate({"categories": ["person", "car"], **fields})


async def test_stream_yields_each_detection_then_done_with_the_same_detections() -> None:
    service, _ = await make_service()
    events: list[ServiceEvent] = [e async for e in service.stream(params(), IMAGE)]
    assert [type(e) for e in events] == [AcceptedEvent] + [DetectionEvent] * 3 + [DoneEvent]
    done = events[-1]
    assert isinstance(done, DoneEvent)
    streamed = [e.detection for e in events if isinstance(e, DetectionEvent)]
    assert done.result.detections == streamed
    assert [d.label for d in streamed] == ["person", "person", "car"]
    assert streamed[0].model_dump()["box"] == [0.0, 0.0, 999.0, 999.0]
    assert done.result.usage.completion_tokens > 20
    assert done.result.timings.first_detection_ms is not None
    assert service.in_flight == 0


async def test_unary_equals_stream_and_raw_output_on_request() -> None:
    service, _ = await make_service()
    result = await service.detect(params(options={"return_raw_output": True}), IMAGE)
    assert result.raw_output == OUTPUT
    assert len(result.detections) == 3 and result.finish_reason == "stop" and not result.truncated


async def test_max_new_tokens_truncates_and_reports_it() -> None:
    service, _ = await make_service()
    result = await service.detect(params(options={"max_new_tokens": 14}), IMAGE)
    assert result.truncated and result.finish_reason == "length"
    assert len(result.detections) == 1


async def test_prompt_and_resized_image_reach_the_engine() -> None:
    service, engine = await make_service()
    await service.detect(params(options={"max_pixels": 100 * 28 * 28}), IMAGE)
    request = engine.requests[-1]
    assert (
        request.task_text
        == "Detect person, car. Output the bounding box coordinates in [x0, y0, x1, y1] format."
    )
    assert request.image.size[0] * request.image.size[1] <= 100 * 28 * 28
    assert request.sampling.repetition_penalty == 1.05 and request.sampling.top_k == 1


async def test_option_limits() -> None:
    service, _ = await make_service()
    with pytest.raises(InvalidRequest, match="max_new_tokens"):
        await service.detect(params(options={"max_new_tokens": 10**6}), IMAGE)
    with pytest.raises(InvalidRequest, match="max_pixels"):
        await service.detect(params(options={"max_pixels": 10**9}), IMAGE)
    with pytest.raises(InvalidRequest, match="min_pixels"):
        await service.detect(params(options={"min_pixels": 5000, "max_pixels": 4000}), IMAGE)
    assert service.in_flight == 0


async def test_forced_output_is_rejected_unless_enabled() -> None:
    service, _ = await make_service(allow_forced_output=False)
    with pytest.raises(InvalidRequest, match="forced_output"):
        await service.detect(params(options={"forced_output": "x"}), IMAGE)


async def test_not_ready_engine() -> None:
    service, engine = await make_service()
    await engine.stop()
    with pytest.raises(EngineNotReady):
        await service.detect(params(), IMAGE)


async def test_queue_limit_rejects_with_retry_after() -> None:
    service, _ = await make_service(max_queue=2, delay=0.01)
    results = await asyncio.gather(
        *[service.detect(params(), IMAGE) for _ in range(3)], return_exceptions=True
    )
    overloaded = [r for r in results if isinstance(r, Overloaded)]
    assert len(overloaded) == 1 and overloaded[0].retry_after_s
    assert sum(1 for r in results if not isinstance(r, Exception)) == 2
    assert service.in_flight == 0


async def test_timeout_aborts() -> None:
    service, _ = await make_service(request_timeout_s=0.05, delay=0.01)
    with pytest.raises(RequestTimeout):
        await service.detect(params(), IMAGE)
    assert service.in_flight == 0


async def test_consumer_that_stops_early_frees_its_slot() -> None:
    service, _ = await make_service(delay=0.001)
    stream = service.stream(params(), IMAGE)
    assert isinstance(await anext(stream), AcceptedEvent)
    assert isinstance(await anext(stream), DetectionEvent)
    await stream.aclose()  # type: ignore[attr-defined]
    assert service.in_flight == 0
