"""The evaluator's metric: greedy one-to-one matching per image and category, mean P/R, F1."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pycocotools import mask as coco_mask

from rexomni_client.evaluation.scoring import (
    IOU_THRESHOLDS,
    POINT_KEY,
    MaskShape,
    Metric,
    PolygonShape,
    Prediction,
    SampleScore,
    Truth,
    box_iou,
    match_boxes,
    oks,
    score_boxes,
    score_gui,
    score_keypoints,
    score_points,
    summarize,
)


def test_box_iou_known_values() -> None:
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert box_iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0  # touching edges share no area
    assert box_iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0  # degenerate boxes do not divide by zero


def test_each_truth_takes_its_best_unused_prediction() -> None:
    truths = [(0, 0, 10, 10), (1, 0, 11, 10)]
    # Prediction 0 overlaps both truths; the first truth takes it (IoU 1.0), the second must
    # fall back to prediction 1 (IoU 0.82) rather than share.
    preds = [(0, 0, 10, 10), (2, 0, 12, 10)]
    assert match_boxes(truths, preds, 0.5) == {0, 1}
    assert match_boxes(truths, preds[:1], 0.5) == {0}  # one prediction matches one truth only
    assert match_boxes(truths, preds, 0.95) == {0}


def test_precision_recall_per_image_and_thresholds() -> None:
    truths = [Truth("cat", box=(0, 0, 10, 10)), Truth("cat", box=(20, 20, 30, 30))]
    preds = [
        Prediction("cat", box=(0, 0, 10, 10)),  # exact
        Prediction("cat", box=(20, 20, 30, 32)),  # IoU 100/120 = 0.83
        Prediction("cat", box=(50, 50, 60, 60)),  # nothing there
    ]
    score = score_boxes(truths, preds)
    assert score.truths == 2
    assert score.precision_recall("0.50") == (pytest.approx(2 / 3), 1.0)
    assert score.precision_recall("0.85") == (pytest.approx(1 / 3), 0.5)
    assert set(score.matches) == {f"{t:.2f}" for t in IOU_THRESHOLDS}


def test_matching_is_per_category_unless_one_phrase_was_asked() -> None:
    truths = [Truth("Traffic_Light", box=(0, 0, 10, 10))]
    same_label = [Prediction("traffic  light", box=(0, 0, 10, 10))]
    other_label = [Prediction("the red light on the left", box=(0, 0, 10, 10))]
    assert score_boxes(truths, same_label).matches["0.50"] == 1  # case, '_' and spacing ignored
    assert score_boxes(truths, other_label).matches["0.50"] == 0
    assert score_boxes(truths, other_label, single_phrase=True).matches["0.50"] == 1


def test_empty_images_follow_the_reference_convention() -> None:
    nothing = score_boxes([], [])
    assert nothing.precision_recall("0.50") == (1.0, 1.0)
    hallucinated = score_boxes([], [Prediction("dog", box=(0, 0, 5, 5))])
    assert hallucinated.precision_recall("0.50") == (0.0, 0.0)
    missed = score_boxes([Truth("dog", box=(0, 0, 5, 5))], [])
    assert missed.precision_recall("0.50") == (0.0, 0.0)


def test_crowd_regions_neither_count_nor_punish() -> None:
    truths = [Truth("person", box=(0, 0, 10, 10)), Truth("person", box=(100, 0, 200, 100), crowd=True)]
    preds = [
        Prediction("person", box=(0, 0, 10, 10)),
        Prediction("person", box=(110, 10, 130, 60)),  # inside the crowd: excused
        Prediction("person", box=(300, 300, 310, 310)),  # a real false positive
    ]
    score = score_boxes(truths, preds)
    assert score.truths == 1
    assert score.predictions["0.50"] == 2
    assert score.precision_recall("0.50") == (0.5, 1.0)


def test_an_image_with_only_crowd_regions_is_left_out_unless_the_model_errs_outside_them() -> None:
    crowd_only = [Truth("person", box=(0, 0, 100, 100), crowd=True)]
    missed = score_boxes([Truth("person", box=(0, 0, 10, 10))], [])
    excused = score_boxes(crowd_only, [Prediction("person", box=(10, 10, 50, 50))])
    assert excused.precision_recall("0.50") is None
    # The model found nothing real: the crowd-only image must not lift it to F1 0.5.
    summary = summarize([excused, missed])
    assert summary.by_key["0.50"] == Metric(0.0, 0.0, 0.0)
    stray = score_boxes(crowd_only, [Prediction("person", box=(300, 300, 310, 310))])
    assert stray.precision_recall("0.50") == (0.0, 0.0)  # a false positive still counts
    assert "0.50" not in summarize([excused]).by_key  # only left-out images: no figure, not a zero
    points = score_points(crowd_only, [Prediction("person", point=(5, 5))])
    assert points.precision_recall(POINT_KEY) is None
    assert score_boxes([], []).precision_recall("0.50") == (1.0, 1.0)  # nothing there, nothing said


def test_gui_answers_are_hits_of_a_point_or_box_centre_in_the_element() -> None:
    button = [Truth("the search button", box=(100, 100, 200, 140))]
    # IoU with the element is only ~0.4, but its centre (150, 120) is inside: a hit.
    wide = score_gui(button, [Prediction("search", box=(80, 90, 220, 150))])
    assert wide.precision_recall(POINT_KEY) == (1.0, 1.0)
    # Any one of several answers landing in the element is a hit; precision is that hit too.
    several = score_gui(button, [Prediction("a", point=(5, 5)), Prediction("b", point=(150, 101))])
    assert several.precision_recall(POINT_KEY) == (1.0, 1.0)
    assert score_gui(button, [Prediction("a", point=(5, 5))]).precision_recall(POINT_KEY) == (0.0, 0.0)
    assert score_gui(button, []).precision_recall(POINT_KEY) == (0.0, 0.0)


def test_points_match_inside_the_object_once() -> None:
    triangle = PolygonShape(((0.0, 0.0), (10.0, 0.0), (0.0, 10.0)))
    truths = [Truth("kite", shape=triangle), Truth("kite", box=(20, 20, 30, 30))]
    assert triangle.contains(2, 2) and not triangle.contains(8, 8)
    preds = [
        Prediction("kite", point=(8, 8)),  # in the triangle's box but outside the triangle
        Prediction("kite", point=(2, 2)),
        Prediction("kite", point=(3, 3)),  # a second point on the same kite matches nothing
        Prediction("kite", box=(21, 21, 29, 29)),  # a box answers by its centre
    ]
    score = score_points(truths, preds)
    assert score.matches == {POINT_KEY: 2}
    assert score.precision_recall(POINT_KEY) == (0.5, 1.0)


def test_rle_masks_decode_both_encodings() -> None:
    mask = np.zeros((20, 30), dtype=np.uint8, order="F")
    mask[5:10, 12:20] = 1
    compressed = coco_mask.encode(mask)
    shape = MaskShape({"size": compressed["size"], "counts": compressed["counts"].decode("ascii")})
    assert shape.contains(15, 7) and not shape.contains(5, 7) and not shape.contains(500, 7)
    flat = mask.flatten(order="F").tolist()  # uncompressed RLE: run lengths, starting with zeros
    runs, value, length = [], 0, 0
    for v in flat:
        if v == value:
            length += 1
        else:
            runs.append(length)
            value, length = v, 1
    runs.append(length)
    uncompressed = MaskShape({"size": [20, 30], "counts": runs})
    assert uncompressed.contains(15, 7) and not uncompressed.contains(12, 4)


def test_summary_means_precision_and_recall_over_images() -> None:
    a = SampleScore(2, {"0.50": 2}, {"0.50": 2})  # P 1, R 1
    b = SampleScore(4, {"0.50": 2}, {"0.50": 1})  # P 0.5, R 0.25
    summary = summarize([a, b])
    metric = summary.by_key["0.50"]
    assert (metric.precision, metric.recall) == (0.75, 0.625)
    assert metric.f1 == pytest.approx(2 * 0.75 * 0.625 / 1.375)
    assert summary.mean is None  # only one threshold scored
    assert summarize([]).samples == 0


boxes = st.tuples(st.integers(0, 900), st.integers(0, 900), st.integers(5, 100), st.integers(5, 100)).map(
    lambda b: (float(b[0]), float(b[1]), float(b[0] + b[2]), float(b[1] + b[3]))
)


@given(st.lists(st.tuples(st.sampled_from(["cat", "dog"]), boxes), max_size=12))
def test_perfect_predictions_score_one_everywhere(objects: list[tuple[str, tuple[float, ...]]]) -> None:
    truths = [Truth(c, box=b) for c, b in objects]  # type: ignore[arg-type]
    preds = [Prediction(c, box=b) for c, b in reversed(objects)]  # type: ignore[arg-type]
    summary = summarize([score_boxes(truths, preds)])
    assert summary.mean is not None
    assert math.isclose(summary.mean.f1, 1.0)


@given(st.lists(boxes, min_size=1, max_size=8), st.lists(boxes, max_size=8))
def test_matches_never_exceed_either_side(truth_boxes: list[tuple[float, ...]], pred_boxes: list) -> None:
    score = score_boxes([Truth("x", box=b) for b in truth_boxes], [Prediction("x", box=b) for b in pred_boxes])  # type: ignore[arg-type]
    previous = len(truth_boxes)
    for t in IOU_THRESHOLDS:  # a stricter threshold never matches more
        matched = score.matches[f"{t:.2f}"]
        assert matched <= min(len(truth_boxes), len(pred_boxes))
        assert matched <= previous
        previous = matched


def test_oks_is_one_at_the_truth_and_falls_off_with_distance() -> None:
    box = (0.0, 0.0, 100.0, 100.0)  # area 10000: 2σ²·area = 12.5
    truth = {"nose": (50.0, 50.0), "left eye": (40.0, 40.0), "right ear": None}  # the ear is hidden
    assert oks(box, truth, {"nose": (50.0, 50.0), "left eye": (40.0, 40.0)}) == 1.0
    off = oks(box, truth, {"nose": (53.0, 54.0), "left eye": (40.0, 40.0)})  # nose 5 px away
    assert off == pytest.approx((math.exp(-25 / 12.5) + 1) / 2)
    # A visible keypoint left out, or called hidden, scores 0; the hidden ear does not count.
    assert oks(box, truth, {"nose": (50.0, 50.0), "left eye": None, "right ear": (1.0, 1.0)}) == 0.5
    assert oks((0.0, 0.0, 0.0, 5.0), truth, truth) == 0.0  # no area: nothing to normalise by


def test_keypoint_instances_match_one_to_one_by_oks() -> None:
    a = Truth("person", box=(0, 0, 100, 100), keypoints={"nose": (10.0, 10.0)})
    b = Truth("person", box=(200, 0, 300, 100), keypoints={"nose": (210.0, 10.0)})
    hidden = Truth("person", box=(400, 0, 500, 100), keypoints={"nose": None})  # cannot be matched: not counted
    near_a = Prediction("person", box=(0, 0, 100, 100), keypoints={"nose": (12.0, 10.0)})  # OKS exp(-4/12.5)≈0.73
    exact_a = Prediction("person", box=(0, 0, 100, 100), keypoints={"nose": (10.0, 10.0)})
    score = score_keypoints([a, b, hidden], [near_a, exact_a])
    assert score.truths == 2
    assert score.matches["0.50"] == 1  # both predictions are on a; a takes only one of them
    assert score.matches["0.75"] == 1 and score.matches["0.95"] == 1  # the exact one
    assert score.precision_recall("0.50") == (0.5, 0.5)


def test_keypoint_answers_on_crowds_and_unlabelled_people_are_not_held_against_the_model() -> None:
    labelled = Truth("person", box=(0, 0, 100, 100), keypoints={"nose": (50.0, 50.0)})
    unlabelled = Truth("person", box=(200, 0, 300, 100), keypoints={"nose": None})  # COCO num_keypoints 0
    crowd = Truth("person", box=(400, 0, 600, 200), crowd=True, keypoints={"nose": None})
    predictions = [
        Prediction("person", box=(0, 0, 100, 100), keypoints={"nose": (50.0, 50.0)}),
        Prediction("person", box=(200, 0, 300, 100), keypoints={"nose": (250.0, 50.0)}),
        Prediction("person", box=(450, 50, 500, 150), keypoints={"nose": (470.0, 60.0)}),
        Prediction("person", box=(800, 0, 900, 100), keypoints={"nose": (850.0, 50.0)}),  # nobody there
    ]
    score = score_keypoints([labelled, unlabelled, crowd], predictions)
    assert score.truths == 1 and score.predictions["0.50"] == 2  # the two excused are not counted
    assert score.precision_recall("0.50") == (0.5, 1.0)
