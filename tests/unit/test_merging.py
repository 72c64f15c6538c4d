"""Merging tiled detections: duplicates, edge cuts, the whole-image pass, and streaming."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rexomni_server.merging import StreamingMerger, box_of, iou, is_final, merge
from rexomni_server.schemas import (
    BoxDetection,
    DetectionModel,
    KeypointsDetection,
    PointDetection,
    PolygonDetection,
)
from rexomni_server.tiling import TilingPlan, plan_explicit

# Two tiles side by side, [0, 100) and [75, 175), sharing the band x in [75, 100]; whole pass is 2.
PAIR = plan_explicit(175, 100, tile_size=100, overlap=25, whole_pass=True)
PAIR_NO_WHOLE = plan_explicit(175, 100, tile_size=100, overlap=25, whole_pass=False)


def box(x0: float, y0: float, x1: float, y1: float, score: float | None = 0.5, label: str = "car") -> BoxDetection:
    return BoxDetection(label=label, score=score, box=[x0, y0, x1, y1])


def test_iou_and_box_of() -> None:
    assert iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1
    assert iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(1 / 3)
    assert iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0
    assert iou((3, 3, 3, 3), (3, 3, 3, 3)) == 1
    assert box_of(PointDetection(label="p", point=[2, 3])) == (2, 3, 2, 3)
    assert box_of(PolygonDetection(label="p", polygon=[[1, 5], [4, 2], [3, 9]])) == (1, 2, 4, 9)
    assert box_of(KeypointsDetection(label="p", box=[1, 2, 3, 4], keypoints={})) == (1, 2, 3, 4)


def test_duplicates_in_the_overlap_collapse_to_the_best() -> None:
    merged = merge([(0, box(80, 10, 95, 30, 0.6)), (1, box(80.5, 10, 95, 30.5, 0.9))], PAIR)
    assert merged == [box(80.5, 10, 95, 30.5, 0.9)]


def test_null_scores_rank_lowest_and_ties_go_to_the_first() -> None:
    a, b, c = box(80, 10, 95, 30, None), box(80, 10, 95, 30, 0.1), box(80, 10, 95, 30, 0.1)
    assert merge([(0, a), (1, b)], PAIR) == [b]
    merged = merge([(1, c), (0, b.model_copy(update={"label": "car"}))], PAIR)
    assert len(merged) == 1 and merged[0] is c


def test_different_labels_and_types_never_merge() -> None:
    dets: list[tuple[int, DetectionModel]] = [
        (0, box(80, 10, 95, 30, 0.9, "car")),
        (1, box(80, 10, 95, 30, 0.8, "truck")),
        (1, KeypointsDetection(label="car", box=[80, 10, 95, 30], keypoints={})),
    ]
    assert len(merge(dets, PAIR)) == 3


def test_interior_detections_of_different_tiles_are_kept() -> None:
    assert len(merge([(0, box(10, 10, 40, 40)), (1, box(120, 10, 150, 40))], PAIR)) == 2


def test_a_box_cut_by_a_tile_edge_becomes_its_union() -> None:
    # The object spans x 60..130: tile 0 sees 60..100 (cut at its right side), tile 1 sees 75..130.
    left, right = box(60, 20, 100, 60, 0.4), box(75, 22, 130, 61, 0.7)
    for plan in (PAIR, PAIR_NO_WHOLE):
        assert merge([(0, left), (1, right)], plan) == [box(60, 20, 130, 61, 0.7)]


def test_misaligned_or_uncut_pieces_stay_apart() -> None:
    # Not aligned across the cut: two objects.
    assert len(merge([(0, box(60, 0, 100, 30)), (1, box(75, 60, 130, 95))], PAIR_NO_WHOLE)) == 2
    # Neither touches a cut side: two whole objects side by side in the band.
    assert len(merge([(0, box(76, 20, 85, 60)), (1, box(86, 20, 95, 60))], PAIR_NO_WHOLE)) == 2


def test_the_whole_image_detection_wins_over_the_pieces() -> None:
    whole = box(58, 18, 131, 62, 0.3)
    merged = merge([(0, box(60, 20, 100, 60, 0.4)), (1, box(75, 22, 130, 61, 0.7)), (2, whole)], PAIR)
    assert merged == [whole]


def test_a_tile_detection_wins_over_the_whole_image() -> None:
    tile_view = box(10, 10, 40, 40, 0.2)
    assert merge([(2, box(11, 10, 40, 41, 0.9)), (0, tile_view)], PAIR) == [tile_view]
    # A whole-image detection matching nothing is kept.
    alone = box(0, 0, 175, 100, 0.9)
    assert merge([(2, alone), (0, tile_view)], PAIR) == [alone, tile_view]


def test_points_merge_by_distance() -> None:
    near = [(0, PointDetection(label="p", score=0.3, point=[90, 50])), (1, PointDetection(label="p", point=[91, 50]))]
    assert merge(near, PAIR) == [near[0][1]]
    assert len(merge(near, PAIR, point_distance_px=0.5)) == 2
    far = [(0, PointDetection(label="p", point=[80, 50])), (1, PointDetection(label="p", point=[95, 50]))]
    assert len(merge(far, PAIR)) == 2


def test_polygons_and_keypoints_merge_by_their_boxes() -> None:
    a = PolygonDetection(label="g", score=0.9, polygon=[[80, 10], [95, 10], [95, 30]])
    b = PolygonDetection(label="g", score=0.5, polygon=[[80, 10], [95, 30], [80, 30]])
    assert merge([(0, a), (1, b)], PAIR) == [a]
    k1 = KeypointsDetection(label="person", score=0.4, box=[80, 10, 95, 30], keypoints={"nose": None})
    k2 = KeypointsDetection(label="person", score=0.8, box=[81, 10, 95, 30], keypoints={"nose": [85, 12]})
    assert merge([(0, k1), (1, k2)], PAIR) == [k2]


def test_results_keep_their_first_appearance_order() -> None:
    a, b, c = box(10, 10, 40, 40, 0.1), box(120, 10, 150, 40, 0.9), box(80, 10, 90, 40, 0.5, "x")
    assert merge([(1, b), (0, c), (0, a)], PAIR) == [b, c, a]


def test_finality() -> None:
    interior, banded = box(10, 10, 40, 40), box(80, 10, 90, 40)
    cut = box(60, 10, 100, 40)
    assert is_final(0, interior, PAIR, set())
    assert not is_final(0, banded, PAIR, {0}) and is_final(0, banded, PAIR, {1})
    assert not is_final(0, cut, PAIR, {0, 1}) and is_final(0, cut, PAIR, {0, 1, 2})
    assert is_final(0, cut, PAIR_NO_WHOLE, {0, 1})
    assert not is_final(2, interior, PAIR, {0, 2}) and is_final(2, interior, PAIR, {0, 1, 2})


def test_a_tiles_own_detections_never_merge() -> None:
    # Two overlapping boxes of one tile stand, as in a request without tiling; a third, from the
    # neighbour, is suppressed by the best of them.
    a, b = box(80, 10, 95, 30, 0.9), box(81, 10, 95, 30, 0.8)
    assert merge([(0, a), (0, b)], PAIR) == [a, b]
    assert merge([(0, a), (0, b), (1, box(80, 11, 95, 30, 0.7))], PAIR) == [a, b]


def test_streaming_emits_interior_detections_at_once() -> None:
    merger = StreamingMerger(PAIR)
    interior, banded = box(10, 10, 40, 40), box(80, 10, 90, 40, 0.4)
    assert merger.add(0, interior) == [interior]
    assert merger.add(0, banded) == []
    better = box(80, 10, 90, 40.5, 0.8)
    assert merger.add(1, better) == []
    assert merger.tile_done(1) == []  # better: tile 0 may still send a better one
    assert merger.tile_done(0) == [better]
    # In the band, alone: final once the neighbour is done, its own tile still running.
    merger = StreamingMerger(PAIR)
    merger.tile_done(1)
    assert merger.add(0, banded) == [banded]
    assert merger.finish() == []
    with pytest.raises(ValueError, match="finished"):
        merger.tile_done(2)


def test_whole_image_detections_wait_for_every_tile() -> None:
    merger = StreamingMerger(PAIR)
    alone = box(0, 0, 175, 100, 0.9)
    assert merger.add(2, alone) == []
    assert merger.tile_done(2) == [] and merger.tile_done(0) == []
    assert merger.tile_done(1) == [alone]


def test_streaming_refuses_repeats_and_strangers() -> None:
    merger = StreamingMerger(PAIR)
    merger.tile_done(0)
    with pytest.raises(ValueError, match="done already"):
        merger.add(0, box(1, 1, 2, 2))
    with pytest.raises(ValueError, match="not in the plan"):
        merger.add(7, box(1, 1, 2, 2))


def key(detection: DetectionModel) -> str:
    return detection.model_dump_json()


GRID = st.integers(0, 24).map(lambda n: n * 5.0)  # coarse coordinates: plenty of coincidences


@st.composite
def detection_in(draw: st.DrawFn, plan: TilingPlan, index: int) -> DetectionModel:
    tile = plan.tiles[index]
    loose = draw(st.booleans()) and draw(st.booleans())  # now and then outside its tile
    lo_x, lo_y = (0, 0) if loose else (tile.x0, tile.y0)
    hi_x, hi_y = (plan.width, plan.height) if loose else (tile.x1, tile.y1)

    def coord(lo: int, hi: int) -> float:
        return min(max(draw(GRID) + lo, lo), hi) if not loose else draw(st.floats(lo, hi))

    x0, x1 = sorted((coord(lo_x, hi_x), coord(lo_x, hi_x)))
    y0, y1 = sorted((coord(lo_y, hi_y), coord(lo_y, hi_y)))
    label = draw(st.sampled_from(["a", "b"]))
    score = draw(st.sampled_from([None, 0.2, 0.5, 0.5, 0.9]))
    kind = draw(st.sampled_from(["box", "box", "box", "point", "polygon", "keypoints"]))
    if kind == "box":
        return BoxDetection(label=label, score=score, box=[x0, y0, x1, y1])
    if kind == "point":
        return PointDetection(label=label, score=score, point=[x0, y0])
    if kind == "polygon":
        return PolygonDetection(label=label, score=score, polygon=[[x0, y0], [x1, y0], [x1, y1]])
    return KeypointsDetection(label=label, score=score, box=[x0, y0, x1, y1], keypoints={"k": [x0, y1], "h": None})


Event = tuple[int, DetectionModel | None]  # a tile's detection, or None: that tile is done


@st.composite
def runs(draw: st.DrawFn) -> tuple[TilingPlan, list[Event], bool]:
    """A plan, and its tiles' detections interleaved as concurrent tiles deliver them, each
    tile's done event after its last detection; now and then some tiles never finish."""
    width, height = draw(st.integers(28, 260)), draw(st.integers(28, 260))
    size = draw(st.integers(28, 140))
    plan = plan_explicit(width, height, size, draw(st.integers(0, size // 2)), draw(st.booleans()), max_tiles=1000)
    order = draw(st.permutations([t.index for t in plan.tiles]))
    started = order[: draw(st.integers(0, len(order)))] if draw(st.booleans()) else order
    pending = {i: [*draw(st.lists(detection_in(plan, i), max_size=6)), None] for i in started}
    finishes = {i: draw(st.booleans()) or len(started) == len(order) for i in started}
    events: list[Event] = []
    while pending:
        index = draw(st.sampled_from(sorted(pending)))
        item = pending[index].pop(0)
        if not pending[index]:
            del pending[index]
            if not finishes[index]:
                continue  # never done: finish() ends it
        events.append((index, item))
    return plan, events, all(finishes.values()) and len(started) == len(order)


def replay(merger: StreamingMerger, events: list[Event]) -> list[DetectionModel]:
    streamed: list[DetectionModel] = []
    for index, detection in events:
        streamed += merger.tile_done(index) if detection is None else merger.add(index, detection)
    return streamed


@settings(max_examples=400, deadline=None)
@given(runs(), st.sampled_from([0.3, 0.5, 0.7]))
def test_streaming_equals_merge_and_never_takes_back(
    run: tuple[TilingPlan, list[Event], bool], threshold: float
) -> None:
    plan, events, _complete = run
    merger = StreamingMerger(plan, iou_threshold=threshold)
    streamed = replay(merger, events)
    rest = merger.finish()
    # Everything streamed is in the final answer, once; the answer is exactly what streamed plus the rest.
    inputs = [(index, d) for index, d in events if d is not None]
    expected = merge(inputs, plan, iou_threshold=threshold)
    assert Counter(map(key, streamed + rest)) == Counter(map(key, expected))
    assert len(streamed + rest) == len(expected)


@settings(max_examples=150, deadline=None)
@given(runs())
def test_everything_streams_before_finish_once_all_tiles_are_done(run: tuple[TilingPlan, list[Event], bool]) -> None:
    plan, events, complete = run
    merger = StreamingMerger(plan)
    replay(merger, events)
    rest = merger.finish()
    if complete:
        assert rest == []
