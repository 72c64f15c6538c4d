"""DetectionService on the scripted engine: event order, options, limits and errors."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator

import pytest

from rexomni_server.engines.base import EngineEvent, EngineRequest, SamplingConfig
from rexomni_server.engines.scripted import ScriptedEngine
from rexomni_server.errors import EngineFailure, EngineNotReady, InvalidRequest, Overloaded, RequestTimeout
from rexomni_server.schemas import DetectParams
from rexomni_server.service import (
    AcceptedEvent,
    DetectionEvent,
    DetectionService,
    DoneEvent,
    ServiceEvent,
    overall_finish_reason,
)
from rexomni_server.settings import Settings
from rexomni_server.vocabulary import FinishReason
from tests.support import image_bytes, phrase_group

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
    assert request.task_text == "Detect person, car. Output the bounding box coordinates in [x0, y0, x1, y1] format."
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
    results = await asyncio.gather(*[service.detect(params(), IMAGE) for _ in range(3)], return_exceptions=True)
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


def box_group(label: str, *boxes: tuple[int, int, int, int]) -> str:
    body = ", ".join("".join(f"<{v}>" for v in box) for box in boxes)
    return f"<|object_ref_start|>{label}<|object_ref_end|><|box_start|>{body}<|box_end|>"


async def test_scores_are_the_geometric_mean_coordinate_probability() -> None:
    # A different log-probability for each of the 12 coordinate tokens (3 boxes of 4).
    logprobs = [-0.1 * (i + 1) for i in range(12)]
    engine = ScriptedEngine(default_output=OUTPUT, coordinate_logprob=logprobs)
    await engine.start()
    service = DetectionService(Settings(), engine, "s")
    result = await service.detect(params(), IMAGE)
    expected = [math.exp(sum(logprobs[4 * k : 4 * k + 4]) / 4) for k in range(3)]  # each box its own 4
    assert [d.score for d in result.detections] == [pytest.approx(e) for e in expected]
    unscored = await service.detect(params(options={"scores": False}), IMAGE)
    assert [d.score for d in unscored.detections] == [None] * 3
    assert engine.requests[-1].logprobs is False


async def test_runaway_repetition_is_stopped_and_duplicates_dropped() -> None:
    runaway = box_group("person", (1, 2, 3, 4), (5, 6, 7, 8), *[(1, 2, 3, 4)] * 200)
    service, _ = await make_service()
    result = await service.detect(params(options={"forced_output": runaway}), IMAGE)
    assert result.finish_reason == "repetition" and not result.truncated
    assert [d.model_dump()["box"] for d in result.detections] == [[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]]
    assert result.duplicates == 3  # the guard's limit: stopped after three repeats in a row
    assert result.usage.completion_tokens < 60  # not 200 boxes' worth of tokens
    metrics = service.metrics.exposition().decode()
    assert 'rexomni_finish_reasons_total{reason="repetition",task="detection"} 1.0' in metrics


async def test_repetition_guard_can_be_turned_off() -> None:
    output = box_group("person", *[(1, 2, 3, 4)] * 6)
    service, _ = await make_service()
    result = await service.detect(params(options={"forced_output": output, "stop_on_repetition": False}), IMAGE)
    assert result.finish_reason == "stop" and result.duplicates == 5 and len(result.detections) == 1


async def test_max_detections_stops_generation() -> None:
    output = box_group("person", *[(i, i, i + 9, i + 9) for i in range(50)])
    service, _ = await make_service()
    events = [e async for e in service.stream(params(options={"forced_output": output, "max_detections": 5}), IMAGE)]
    done = events[-1]
    assert isinstance(done, DoneEvent)
    assert done.result.finish_reason == "max_detections" and len(done.result.detections) == 5
    assert sum(isinstance(e, DetectionEvent) for e in events) == 5
    assert done.result.usage.completion_tokens < 60


async def test_fan_out_splits_by_category_and_merges_in_category_order() -> None:
    engine = ScriptedEngine(token_delay_s=0.001, concurrent_batching=True)
    await engine.start()
    service = DetectionService(Settings(allow_forced_output=True), engine, "s")
    # "car" has fewer tokens, so it finishes first: the merged result is still person, car.
    forced = box_group("person", (1, 1, 2, 2), (3, 3, 4, 4), (5, 5, 6, 6)) + ", " + box_group("car", (7, 7, 8, 8))
    events = [e async for e in service.stream(params(options={"forced_output": forced}), IMAGE)]
    done = events[-1]
    assert isinstance(done, DoneEvent)
    assert [r.task_text for r in engine.requests] == [
        "Detect person. Output the bounding box coordinates in [x0, y0, x1, y1] format.",
        "Detect car. Output the bounding box coordinates in [x0, y0, x1, y1] format.",
    ]
    assert [d.label for d in done.result.detections] == ["person", "person", "person", "car"]
    streamed = [e.detection.label for e in events if isinstance(e, DetectionEvent)]
    assert sorted(streamed) == sorted(d.label for d in done.result.detections)
    assert streamed.index("car") < 3  # streamed as decoded, not held back for ordering
    assert done.result.usage.prompt_tokens == 200  # two engine requests
    single = await service.detect(params(options={"forced_output": forced, "fan_out": False}), IMAGE)
    assert [d.model_dump() for d in single.detections] == [d.model_dump() for d in done.result.detections]


async def test_fan_out_default_follows_the_engine() -> None:
    service, _ = await make_service()  # scripted engine without batching
    assert not service.fans_out(params())
    assert service.fans_out(params(options={"fan_out": True}))
    assert not service.fans_out(params(task="ocr_box"))
    assert not service.fans_out(params(categories=["one"], options={"fan_out": True}))


async def test_an_image_too_big_for_the_context_is_a_clear_error() -> None:
    service, engine = await make_service(max_model_len=1024)
    with pytest.raises(InvalidRequest, match=r"max_pixels to at most 601328"):
        await service.detect(params(), IMAGE)  # 999x999 -> 1008x1008 = 1296 image tokens
    assert not engine.requests


async def test_the_answer_asks_for_no_more_tokens_than_the_context_leaves() -> None:
    service, engine = await make_service(max_model_len=2048)
    await service.detect(params(options={"max_new_tokens": 4096}), IMAGE)
    assert engine.requests[-1].sampling.max_new_tokens == 2048 - 256 - 1296  # context - text - image
    await service.detect(params(options={"max_new_tokens": 100}), IMAGE)
    assert engine.requests[-1].sampling.max_new_tokens == 100  # room enough: as asked


async def test_priority_reaches_an_engine_that_schedules_by_it_and_is_refused_elsewhere() -> None:
    service, engine = await make_service()
    assert (await service.detect(params(options={"priority": 0}), IMAGE)).detections  # the default is fine
    with pytest.raises(InvalidRequest, match="schedules by priority"):
        await service.detect(params(options={"priority": 5}), IMAGE)
    engine.supports_priority = True  # as the vLLM engine is with scheduling_policy=priority
    await service.detect(params(options={"priority": 5, "fan_out": True}), IMAGE)
    assert [r.priority for r in list(engine.requests)[-2:]] == [5, 5]  # every fanned-out request
    assert service.in_flight == 0


class WholeChunkEngine(ScriptedEngine):
    """Answers each request in one chunk; requests for 'cat' answer later than the others."""

    closed: list[str]

    async def stream(self, request: EngineRequest) -> AsyncIterator[EngineEvent]:
        self.requests.append(request)
        try:
            yield EngineEvent(started=True, prompt_tokens=10)
            await asyncio.sleep(0.05 if "cat" in request.task_text else 0.0)
            yield EngineEvent(text=request.forced_output or "", tokens=1)
            await asyncio.sleep(float(self._delay))
            yield EngineEvent(finish_reason="stop")
        finally:
            self.closed.append(request.request_id)


async def whole_chunk_service(delay: float = 0.0) -> tuple[DetectionService, WholeChunkEngine]:
    engine = WholeChunkEngine(concurrent_batching=True, token_delay_s=delay)
    engine.closed = []
    await engine.start()
    return DetectionService(Settings(allow_forced_output=True), engine, "scripted"), engine


async def test_the_result_holds_exactly_what_was_streamed_when_max_detections_stops_fan_out() -> None:
    service, _ = await whole_chunk_service()
    forced = (
        f"{phrase_group('cat', 1, 2, 3, 4)}, {phrase_group('cat', 5, 6, 7, 8)}, {phrase_group('dog', 10, 20, 30, 40)}"
    )
    request = params(categories=["cat", "dog"], options={"forced_output": forced, "max_detections": 2, "fan_out": True})
    events = [e async for e in service.stream(request, IMAGE)]
    streamed = [e.detection for e in events if isinstance(e, DetectionEvent)]
    done = events[-1]
    assert isinstance(done, DoneEvent) and done.result.finish_reason == "max_detections"
    assert [d.label for d in streamed] == ["dog", "cat"]  # the dog answered first
    # Same detections as streamed, in category order (not the two cats of the cat answer).
    assert done.result.detections == [streamed[1], streamed[0]]


async def test_engine_ids_stay_unique_when_clients_reuse_a_request_id() -> None:
    service, engine = await whole_chunk_service()
    forced = phrase_group("cat", 1, 2, 3, 4)
    one = params(categories=["cat"], options={"forced_output": forced})
    results = await asyncio.gather(*(service.detect(one, IMAGE, request_id="same") for _ in range(2)))
    assert [r.request_id for r in results] == ["same", "same"]  # the client's id is kept
    ids = [r.request_id for r in engine.requests]
    assert len(set(ids)) == 2 and all(i.startswith("same~") for i in ids)


async def test_closing_a_stream_closes_its_engine_request_at_once() -> None:
    service, engine = await whole_chunk_service(delay=5.0)  # the answer would take 5 s to finish
    forced = phrase_group("dog", 1, 2, 3, 4)
    events = service.stream(params(categories=["dog"], options={"forced_output": forced}), IMAGE)
    async for event in events:
        if isinstance(event, DetectionEvent):
            break
    await events.aclose()  # type: ignore[attr-defined]
    assert len(engine.closed) == 1 and service.in_flight == 0


class BrokenEngine(ScriptedEngine):
    """Fails the way a bug would: a plain exception in the middle of a generation."""

    async def stream(self, request: EngineRequest) -> AsyncIterator[EngineEvent]:
        yield EngineEvent(started=True, prompt_tokens=10)
        raise RuntimeError("CUDA error: an illegal memory access was encountered")


async def test_an_unexpected_failure_is_a_typed_error_with_the_request_id(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="rexomni.requests")
    engine = BrokenEngine()
    await engine.start()
    service = DetectionService(Settings(), engine, "scripted")
    with pytest.raises(EngineFailure) as failure:
        await service.detect(params(), IMAGE, request_id="req-42")
    assert "req-42" in failure.value.message
    assert isinstance(failure.value.__cause__, RuntimeError)
    lines = [getattr(r, "fields", {}) for r in caplog.records if r.name == "rexomni.requests"]
    assert [(f["request_id"], f["status"]) for f in lines] == [("req-42", "internal")]  # logged once
    assert any(r.exc_info and "req-42" in str(getattr(r, "fields", "")) for r in caplog.records)  # traceback logged
    assert service.in_flight == 0


async def test_visual_prompt_boxes_are_binned_against_the_users_image_not_the_resized_one() -> None:
    service, engine = await make_service()
    image = image_bytes(640, 480)  # the model sees 644x476
    request = DetectParams.model_validate(
        {"task": "visual_prompting", "visual_prompt_boxes": [[320, 240, 640, 480]], "options": {"forced_output": ""}}
    )
    await service.detect(request, image)
    assert '"object_1": ["<499><499><999><999>"]' in engine.requests[-1].task_text


async def test_the_scripted_engine_lets_the_event_loop_run_during_a_long_replay() -> None:
    """Without a token delay it still waits every few tokens, as a real engine's stream does:
    other requests, disconnects and probes are served during a long answer."""
    from rexomni_server.engines.scripted import YIELD_EVERY_TOKENS

    boxes = ", ".join("<1><2><3><4>" for _ in range(500))
    engine = ScriptedEngine(default_output=f"<|object_ref_start|>a<|object_ref_end|><|box_start|>{boxes}<|box_end|>")
    await engine.start()
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    running = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    sampling = SamplingConfig(max_new_tokens=4096, temperature=0.0, top_p=0.8, top_k=1, repetition_penalty=1.05)
    request = EngineRequest("r", "Detect a.", None, sampling)  # type: ignore[arg-type]
    events = [event async for event in engine.stream(request)]
    running.cancel()
    tokens = sum(event.tokens for event in events)
    assert tokens > 2000 and ticks >= tokens // YIELD_EVERY_TOKENS - 1


@pytest.mark.parametrize(
    ("reasons", "expected"),
    [
        ([None, "stop"], "stop"),
        (["stop", "length"], "length"),
        (["abort", "length", "repetition"], "repetition"),
        (["stop", "abort"], "abort"),
        ([], "stop"),
    ],
)
def test_a_fanned_out_request_ends_with_its_most_telling_reason(
    reasons: list[FinishReason | None], expected: FinishReason
) -> None:
    assert overall_finish_reason(reasons) == expected
