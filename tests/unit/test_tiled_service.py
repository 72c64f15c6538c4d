"""Tiled detection through the service, on the scripted engine with forced outputs: tiles as
engine requests of their own, coordinates mapped back exactly, merging, streaming, admission."""

from __future__ import annotations

import asyncio
import io
import random
from collections.abc import AsyncIterator

import pytest
from PIL import Image

from rexomni_server.engines.base import EngineEvent, EngineRequest
from rexomni_server.engines.scripted import ScriptedEngine
from rexomni_server.errors import InvalidRequest, Overloaded
from rexomni_server.schemas import BoxDetection, DetectParams, PointDetection
from rexomni_server.service import DetectionEvent, DetectionService, DoneEvent, ServiceEvent
from rexomni_server.settings import Settings
from rexomni_server.vocabulary import MAX_BIN
from tests.support import image_bytes, phrase_group, wait_until


def pixel(bin_index: int, size: int, start: int) -> float:
    """Where a tile's coordinate bin lands in the original image."""
    return bin_index / MAX_BIN * size + start


def tiled(**fields: object) -> DetectParams:
    return DetectParams.model_validate({"categories": ["car"], **fields})


async def make_service(
    engine: ScriptedEngine | None = None, **overrides: object
) -> tuple[DetectionService, ScriptedEngine]:
    engine = engine or ScriptedEngine(default_output="")
    await engine.start()
    settings = Settings(**{"allow_forced_output": True, **overrides})  # type: ignore[arg-type]
    return DetectionService(settings, engine, "scripted"), engine


def streamed_and_done(events: list[ServiceEvent]) -> tuple[list[BoxDetection], DoneEvent]:
    done = events[-1]
    assert isinstance(done, DoneEvent)
    return [e.detection for e in events if isinstance(e, DetectionEvent)], done  # type: ignore[misc]


# 2000 x 2000 cut into 1100-pixel tiles with 10 % overlap: a 2 x 2 grid starting at 0 and 900.
GRID_IMAGE = image_bytes(2000, 2000)
GRID = {"tile_size": 1100, "overlap": 0.1, "whole_image": False}
STARTS = [(0, 0), (900, 0), (0, 900), (900, 900)]


async def test_a_plain_forced_output_answers_every_tile_each_mapped_into_its_tile() -> None:
    service, engine = await make_service()
    forced = phrase_group("car", 400, 400, 600, 600)  # the middle of a tile: nothing to merge
    events = [e async for e in service.stream(tiled(options={"tiling": GRID, "forced_output": forced}), GRID_IMAGE)]
    streamed, done = streamed_and_done(events)
    result = done.result
    expected = [[pixel(400, 1100, x), pixel(400, 1100, y), pixel(600, 1100, x), pixel(600, 1100, y)] for x, y in STARTS]
    assert sorted(d.box for d in result.detections) == sorted(expected)
    assert result.detections == streamed  # the result is exactly what streamed
    assert result.tiles is not None and [(t.x0, t.y0, t.x1, t.y1) for t in result.tiles] == [
        (x, y, x + 1100, y + 1100) for x, y in STARTS
    ]
    # Four engine requests, each seeing its tile resized within max_pixels (1100 -> 1092).
    requests = list(engine.requests)
    assert len(requests) == 4 and {r.image.size for r in requests} == {(1092, 1092)}
    assert {(t.resized_width, t.resized_height) for t in result.tiles} == {(1092, 1092)}
    # usage sums every tile's tokens; the image is reported at its own size.
    one_tile = (await service.detect(tiled(options={"forced_output": forced}), image_bytes(1100, 1100))).usage
    assert result.usage.completion_tokens == 4 * one_tile.completion_tokens
    assert result.usage.prompt_tokens == 4 * one_tile.prompt_tokens
    assert (result.image.width, result.image.height) == (2000, 2000)
    assert service.metrics.tiles.labels("detection")._value.get() == 4
    assert service.engine_requests == 0 and service.in_flight == 0


async def test_each_tile_sees_exactly_its_own_pixels() -> None:
    source = Image.frombytes("RGB", (1400, 560), random.Random(1).randbytes(1400 * 560 * 3))
    buffer = io.BytesIO()
    source.save(buffer, "PNG")
    service, engine = await make_service()
    options = {"tiling": {"tile_size": 784, "overlap": 0.1, "whole_image": True}, "forced_output": ""}
    result = await service.detect(tiled(options=options), buffer.getvalue())
    assert result.tiles is not None and len(result.tiles) == 3 and result.tiles[-1].whole
    seen = {r.image.tobytes() for r in engine.requests}
    for tile in result.tiles[:-1]:  # 784 is a multiple of 28: seen pixel for pixel
        assert source.crop((tile.x0, tile.y0, tile.x1, tile.y1)).tobytes() in seen
    assert engine.requests[0].image.size == (result.image.resized_width, result.image.resized_height)


# 2000 x 1000 in two tiles side by side: [0, 1100) and [900, 2000), whole-image pass last.
PAIR_IMAGE = image_bytes(2000, 1000)
PAIR = {"tile_size": 1100, "overlap": 0.1}


async def test_an_object_cut_by_a_tile_edge_becomes_one_detection() -> None:
    service, _ = await make_service()
    # The car spans x 700..1500: the left tile sees it cut at its right side, the right tile at its left.
    left, right = phrase_group("car", 636, 300, 999, 599), phrase_group("car", 0, 300, 545, 599)
    options = {"tiling": {**PAIR, "whole_image": False}, "forced_tile_outputs": [left, right]}
    streamed, done = streamed_and_done([e async for e in service.stream(tiled(options=options), PAIR_IMAGE)])
    assert len(done.result.detections) == 1 and done.result.detections == streamed
    assert done.result.detections[0].box == [
        pixel(636, 1100, 0),
        pixel(300, 1000, 0),
        pixel(545, 1100, 900),
        pixel(599, 1000, 0),
    ]


async def test_the_whole_image_pass_wins_for_a_cut_object_and_duplicates_in_the_overlap_merge() -> None:
    service, _ = await make_service()
    left = f"{phrase_group('car', 636, 300, 999, 599)}, {phrase_group('bus', 900, 50, 980, 150)}"
    right = f"{phrase_group('car', 0, 300, 545, 599)}, {phrase_group('bus', 82, 50, 163, 150)}"
    whole = phrase_group("car", 350, 300, 749, 599)  # the same car, seen whole
    options = {"tiling": PAIR, "forced_tile_outputs": [left, right, whole], "scores": False}
    result = await service.detect(tiled(categories=["car", "bus"], options=options), PAIR_IMAGE)
    boxes = {d.label: d.box for d in result.detections if isinstance(d, BoxDetection)}
    assert len(result.detections) == 2
    assert boxes["car"] == [pixel(350, 2000, 0), pixel(300, 1000, 0), pixel(749, 2000, 0), pixel(599, 1000, 0)]
    # The bus, seen by both tiles in their overlap: one of the two (equal scores: the first to arrive).
    assert boxes["bus"] in (
        [pixel(900, 1100, 0), pixel(50, 1000, 0), pixel(980, 1100, 0), pixel(150, 1000, 0)],
        [pixel(82, 1100, 900), pixel(50, 1000, 0), pixel(163, 1100, 900), pixel(150, 1000, 0)],
    )


async def test_the_raw_output_lists_the_tiles_answers_in_tile_order() -> None:
    service, engine = await make_service()
    answers = [phrase_group("car", 1, 2, 3, 4), phrase_group("car", 5, 6, 7, 8), phrase_group("car", 9, 10, 11, 12)]
    options = {"tiling": PAIR, "forced_tile_outputs": answers, "return_raw_output": True}
    result = await service.detect(tiled(options=options), PAIR_IMAGE)
    assert result.raw_output == ", ".join(answers)
    assert engine.requests[0].forced_output == answers[-1]  # the whole-image pass started first


async def test_points_merge_by_distance_and_are_mapped_back() -> None:
    service, _ = await make_service()
    point = "<|object_ref_start|>cup<|object_ref_end|><|box_start|>{}<|box_end|>"
    options = {
        "tiling": {**PAIR, "whole_image": False},
        "forced_tile_outputs": [point.format("<955><500>"), point.format("<137><500>")],  # both near x 1050
    }
    result = await service.detect(tiled(task="pointing", categories=["cup"], options=options), PAIR_IMAGE)
    assert len(result.detections) == 1 and isinstance(result.detections[0], PointDetection)
    assert result.detections[0].point[0] == pytest.approx(1051.6, abs=1.0)


class GatedEngine(ScriptedEngine):
    """Holds back the end of one engine request's answer until released."""

    held: str = "-1"  # engine request ids end in -<position>
    release: asyncio.Event

    async def stream(self, request: EngineRequest) -> AsyncIterator[EngineEvent]:
        async for event in super().stream(request):
            if event.finish_reason is not None and request.request_id.endswith(self.held):
                await self.release.wait()
            yield event


async def test_a_detection_streams_before_the_other_tiles_end_when_nothing_can_merge_it() -> None:
    engine = GatedEngine()
    engine.release = asyncio.Event()
    service, _ = await make_service(engine)
    interior, banded = phrase_group("car", 100, 100, 200, 200), phrase_group("car", 850, 100, 950, 200)
    options = {"tiling": {**PAIR, "whole_image": False}, "forced_tile_outputs": [f"{interior}, {banded}", ""]}
    events = service.stream(tiled(options=options), PAIR_IMAGE)
    try:
        first = await asyncio.wait_for(anext(aiter(events)), 10)  # accepted
        first = await asyncio.wait_for(anext(aiter(events)), 10)
        # The right tile's answer is held, yet the interior box streamed; the banded one waits.
        assert isinstance(first, DetectionEvent) and first.detection.box[0] == pixel(100, 1100, 0)
        engine.release.set()
        rest = [e async for e in events]
    finally:
        await events.aclose()  # type: ignore[attr-defined]
    streamed, done = streamed_and_done([first, *rest])
    assert len(streamed) == 2 and done.result.detections == streamed


async def test_max_detections_counts_merged_detections_and_the_result_is_what_streamed() -> None:
    service, _ = await make_service()
    forced = f"{phrase_group('car', 400, 400, 600, 600)}, {phrase_group('car', 100, 100, 200, 200)}"
    options = {"tiling": GRID, "forced_output": forced, "max_detections": 3}
    streamed, done = streamed_and_done([e async for e in service.stream(tiled(options=options), GRID_IMAGE)])
    assert len(streamed) == 3 and done.result.detections == streamed
    assert done.result.finish_reason == "max_detections"


async def test_tiles_fan_out_and_admission_counts_every_engine_request() -> None:
    engine = GatedEngine(concurrent_batching=True)
    engine.held = "-0"
    engine.release = asyncio.Event()
    service, _ = await make_service(engine, max_queue=8)
    options = {"tiling": {**PAIR}, "forced_output": phrase_group("bus", 1, 2, 3, 4)}
    request = tiled(categories=["car", "bus"], options=options)
    running = asyncio.create_task(service.detect(request, PAIR_IMAGE))
    # 3 tiles (the whole-image pass included) x 2 categories, all started.
    await wait_until(lambda: len(engine.requests) == 6, what="six engine requests")
    assert service.engine_requests == 6
    with pytest.raises(Overloaded):  # 6 + 6 > 8, found once the second image is planned
        await service.detect(request, PAIR_IMAGE)
    assert service.engine_requests == 6
    engine.release.set()
    result = await running
    assert sorted({r.task_text for r in engine.requests}) == sorted(
        {
            "Detect car. Output the bounding box coordinates in [x0, y0, x1, y1] format.",
            "Detect bus. Output the bounding box coordinates in [x0, y0, x1, y1] format.",
        }
    )
    assert result.tiles is not None and len(result.tiles) == 3 and service.engine_requests == 0
    with pytest.raises(InvalidRequest, match=r"12 engine requests \(3 tiles x 4\)"):
        await service.detect(tiled(categories=["a", "b", "c", "d"], options=options), PAIR_IMAGE)


async def test_an_image_within_max_pixels_is_one_tile() -> None:
    service, engine = await make_service()
    forced = phrase_group("car", 10, 20, 30, 40)
    small = image_bytes(640, 480)
    plain = await service.detect(tiled(options={"forced_output": forced}), small)
    one = await service.detect(tiled(options={"forced_output": forced, "tiling": "auto"}), small)
    assert one.detections == plain.detections and one.tiles is not None and len(one.tiles) == 1
    assert plain.tiles is None and engine.requests[-1].image.size == engine.requests[-2].image.size


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"task": "gui_grounding", "options": {"tiling": "auto"}}, "cannot apply to task 'gui_grounding'"),
        ({"task": "gui_pointing", "options": {"tiling": "auto"}}, "cannot apply to task 'gui_pointing'"),
        (
            {
                "task": "visual_prompting",
                "categories": [],
                "visual_prompt_boxes": [[1, 2, 3, 4]],
                "options": {"tiling": "auto"},
            },
            "cannot apply to task 'visual_prompting'",
        ),
        ({"options": {"forced_tile_outputs": ["a"]}}, "forced_tile_outputs .* needs options.tiling"),
        ({"options": {"tiling": PAIR, "forced_tile_outputs": ["a"]}}, "has 1 answers; this image is tiled into 3"),
        ({"options": {"tiling": {"tile_size": 100}}}, r"at most 4 are allowed: raise tile_size"),
    ],
)
async def test_what_tiling_cannot_do_is_refused_clearly(fields: dict[str, object], message: str) -> None:
    service, engine = await make_service(max_tiles=4)
    with pytest.raises(InvalidRequest, match=message):
        await service.detect(DetectParams.model_validate({"categories": ["car"], **fields}), PAIR_IMAGE)
    assert service.engine_requests == 0 and service.in_flight == 0 and not engine.requests


async def test_forced_tile_outputs_are_refused_unless_forced_outputs_are_enabled() -> None:
    service, _ = await make_service(allow_forced_output=False)
    with pytest.raises(InvalidRequest, match="testing facility"):
        await service.detect(tiled(options={"tiling": PAIR, "forced_tile_outputs": ["", "", ""]}), PAIR_IMAGE)
