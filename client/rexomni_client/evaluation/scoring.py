"""Accuracy as the Rex-Omni paper reports it: precision, recall and F1 per image, then averaged.

Per image, predictions are matched one-to-one to ground truth, greedily: each ground-truth
object in turn takes the unused prediction that overlaps it most (box IoU at or above the
threshold), or, for point tasks, the first unused point that lies inside it. Matching is per
category (labels compared case- and spacing-insensitively) unless the image was asked for a
single phrase (referring, GUI), where every prediction answers that phrase.

An image's precision is matches / predictions and its recall matches / ground truth; an image
with no ground truth scores 1/1 when nothing was predicted and 0/0 otherwise. The dataset's
precision and recall are the means over images and its F1 is theirs; ``mean`` averages
precision, recall and F1 over IoU 0.50:0.05:0.95, as the paper's "F1@mIoU".

Crowd regions (COCO ``iscrowd``) are neither counted as ground truth nor held against a
prediction that falls inside one (COCO's own rule), so a model is not punished for boxing one
person in a crowd annotation.

Keypoint instances are matched the same way by object keypoint similarity (OKS, the reference's
single sigma of 0.025, normalised by the ground-truth box area) at thresholds 0.50:0.95.
Unlike the reference script, which lets one prediction count for several people and skips
keypoints the model called hidden, matching is one-to-one and a visible keypoint the model
missed scores 0.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Protocol

XYXY = tuple[float, float, float, float]
XY = tuple[float, float]
Keypoints = Mapping[str, XY | None]  # name -> position, None where hidden

IOU_THRESHOLDS: tuple[float, ...] = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))
POINT_KEY = "point"  # point tasks have one criterion: inside the object or not
CROWD_OVERLAP = 0.5  # share of a prediction's box inside a crowd region that excuses it
KEYPOINT_SIGMA = 0.025  # the reference evaluation's one falloff for every keypoint


class Shape(Protocol):
    def contains(self, x: float, y: float) -> bool: ...


@dataclass(frozen=True)
class BoxShape:
    box: XYXY

    def contains(self, x: float, y: float) -> bool:
        x0, y0, x1, y1 = self.box
        return min(x0, x1) <= x <= max(x0, x1) and min(y0, y1) <= y <= max(y0, y1)


@dataclass(frozen=True)
class PolygonShape:
    points: tuple[XY, ...]

    def contains(self, x: float, y: float) -> bool:
        """Even-odd ray casting: a horizontal ray from (x, y) crosses the border an odd number
        of times exactly when the point is inside."""
        inside = False
        pts = self.points
        for (xa, ya), (xb, yb) in zip(pts, pts[1:] + pts[:1], strict=True):
            if (ya > y) != (yb > y) and x < xa + (y - ya) * (xb - xa) / (yb - ya):
                inside = not inside
        return inside


@dataclass(frozen=True)
class MultiShape:
    """A COCO object drawn as several polygons."""

    parts: tuple[Shape, ...]

    def contains(self, x: float, y: float) -> bool:
        return any(part.contains(x, y) for part in self.parts)


@dataclass(frozen=True)
class MaskShape:
    """A COCO run-length-encoded mask, decoded on first use (needs pycocotools)."""

    rle: Mapping[str, Any]

    @cached_property
    def _mask(self) -> Any:
        try:
            from pycocotools import mask as coco_mask
        except ImportError as exc:  # pragma: no cover - the dev extra installs it
            raise RuntimeError("RLE masks need pycocotools: pip install 'rexomni[eval]'") from exc
        rle = dict(self.rle)
        if isinstance(rle.get("counts"), list):  # uncompressed RLE, as COCO stores crowds
            rle = coco_mask.frPyObjects(rle, *rle["size"])
        elif isinstance(rle.get("counts"), str):
            rle["counts"] = rle["counts"].encode("ascii")
        return coco_mask.decode(rle)

    def contains(self, x: float, y: float) -> bool:
        mask = self._mask
        col, row = int(x), int(y)
        return 0 <= row < mask.shape[0] and 0 <= col < mask.shape[1] and bool(mask[row, col])


@dataclass(frozen=True)
class Truth:
    """One ground-truth object: a box for IoU, a shape for point tests (default: the box)."""

    category: str
    box: XYXY | None = None
    shape: Shape | None = None
    crowd: bool = False
    keypoints: Keypoints | None = None

    @property
    def region(self) -> Shape:
        if self.shape is not None:
            return self.shape
        if self.box is None:
            raise ValueError("a ground-truth object needs a box or a shape")
        return BoxShape(self.box)


@dataclass(frozen=True)
class Prediction:
    label: str
    box: XYXY | None = None
    point: XY | None = None
    keypoints: Keypoints | None = None


@dataclass(frozen=True)
class SampleScore:
    """One image: ground-truth count and, per criterion (IoU threshold or POINT_KEY), the
    counted predictions and the matches."""

    truths: int
    predictions: Mapping[str, int]
    matches: Mapping[str, int]
    ignored: int = 0  # ground truth that neither counts nor punishes (crowd regions...)

    def precision_recall(self, key: str) -> tuple[float, float] | None:
        """None when the image says nothing at that criterion: all its ground truth is
        ignored and every prediction fell in it (COCO leaves such an image out too)."""
        predictions, matches = self.predictions[key], self.matches[key]
        if self.truths == 0:
            if predictions == 0 and self.ignored:
                return None
            return (1.0, 1.0) if predictions == 0 else (0.0, 0.0)
        if predictions == 0:
            return 0.0, 0.0
        return matches / predictions, matches / self.truths


@dataclass(frozen=True)
class Metric:
    precision: float
    recall: float
    f1: float


@dataclass(frozen=True)
class Summary:
    samples: int
    by_key: Mapping[str, Metric]
    mean: Metric | None  # over IoU 0.50:0.95 (box tasks only)


def iou_key(threshold: float) -> str:
    return f"{threshold:.2f}"


def normalize_label(label: str) -> str:
    return " ".join(label.lower().replace("_", " ").split())


def box_iou(a: XYXY, b: XYXY) -> float:
    ix = min(a[2], b[2]) - max(a[0], b[0])
    iy = min(a[3], b[3]) - max(a[1], b[1])
    if ix <= 0 or iy <= 0:
        return 0.0
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _share_inside(box: XYXY, region: XYXY) -> float:
    ix = min(box[2], region[2]) - max(box[0], region[0])
    iy = min(box[3], region[3]) - max(box[1], region[1])
    area = (box[2] - box[0]) * (box[3] - box[1])
    return ix * iy / area if ix > 0 and iy > 0 and area > 0 else 0.0


def match_greedy(similarity: Sequence[Sequence[float]], threshold: float) -> set[int]:
    """Prediction indices matched to some ground truth: each truth (row) in turn takes the
    unused prediction (column) most similar to it, if at least ``threshold``."""
    used: set[int] = set()
    for row in similarity:
        best, best_value = -1, 0.0
        for i, value in enumerate(row):
            if i not in used and value >= threshold and value > best_value:
                best, best_value = i, value
        if best >= 0:
            used.add(best)
    return used


def match_boxes(truths: Sequence[XYXY], predictions: Sequence[XYXY], threshold: float) -> set[int]:
    return match_greedy([[box_iou(t, p) for p in predictions] for t in truths], threshold)


def oks(truth_box: XYXY, truth: Keypoints, predicted: Keypoints) -> float:
    """Object keypoint similarity over the truth's visible keypoints: exp(-d² / (2σ²·area)) each,
    averaged; a visible keypoint the prediction leaves out or calls hidden scores 0."""
    area = (truth_box[2] - truth_box[0]) * (truth_box[3] - truth_box[1])
    visible = [(name, xy) for name, xy in truth.items() if xy is not None]
    if area <= 0 or not visible:
        return 0.0
    total = 0.0
    for name, (gx, gy) in visible:
        guess = predicted.get(name)
        if guess is not None:
            distance2 = (guess[0] - gx) ** 2 + (guess[1] - gy) ** 2
            total += math.exp(-distance2 / (2 * KEYPOINT_SIGMA**2 * area))
    return total / len(visible)


def match_points(truths: Sequence[Shape], points: Sequence[XY]) -> set[int]:
    used: set[int] = set()
    for shape in truths:
        for i, (x, y) in enumerate(points):
            if i not in used and shape.contains(x, y):
                used.add(i)
                break
    return used


def _groups(
    truths: Sequence[Truth], predictions: Sequence[Prediction], single_phrase: bool
) -> Iterable[tuple[list[Truth], list[Prediction]]]:
    if single_phrase:
        yield list(truths), list(predictions)
        return
    labels = {normalize_label(t.category) for t in truths} | {normalize_label(p.label) for p in predictions}
    for label in sorted(labels):
        yield (
            [t for t in truths if normalize_label(t.category) == label],
            [p for p in predictions if normalize_label(p.label) == label],
        )


def _box_of(prediction: Prediction) -> XYXY:
    if prediction.box is None:
        raise ValueError(f"prediction {prediction.label!r} has no box to compare by IoU")
    return prediction.box


def _point_of(prediction: Prediction) -> XY:
    if prediction.point is not None:
        return prediction.point
    x0, y0, x1, y1 = _box_of(prediction)  # a box answers a point task by its centre
    return (x0 + x1) / 2, (y0 + y1) / 2


def score_boxes(
    truths: Sequence[Truth],
    predictions: Sequence[Prediction],
    *,
    single_phrase: bool = False,
    thresholds: Sequence[float] = IOU_THRESHOLDS,
) -> SampleScore:
    counted = {iou_key(t): 0 for t in thresholds}
    matched = {iou_key(t): 0 for t in thresholds}
    for group_truths, group_preds in _groups(truths, predictions, single_phrase):
        solid = [t for t in group_truths if not t.crowd]
        crowds = [t.box for t in group_truths if t.crowd and t.box is not None]
        solid_boxes = [t.box for t in solid if t.box is not None]
        if len(solid_boxes) != len(solid):
            raise ValueError("box scoring needs a box for every ground-truth object")
        boxes = [_box_of(p) for p in group_preds]
        overlaps = [[box_iou(t, b) for b in boxes] for t in solid_boxes]  # once for every threshold
        for threshold in thresholds:
            key = iou_key(threshold)
            used = match_greedy(overlaps, threshold)
            excused = sum(
                1
                for i, box in enumerate(boxes)
                if i not in used and any(_share_inside(box, crowd) >= CROWD_OVERLAP for crowd in crowds)
            )
            matched[key] += len(used)
            counted[key] += len(boxes) - excused
    return _crowds_ignored(truths, counted, matched)


def score_points(
    truths: Sequence[Truth], predictions: Sequence[Prediction], *, single_phrase: bool = False
) -> SampleScore:
    counted = matched = 0
    for group_truths, group_preds in _groups(truths, predictions, single_phrase):
        points = [_point_of(p) for p in group_preds]
        used = match_points([t.region for t in group_truths if not t.crowd], points)
        crowds = [t.region for t in group_truths if t.crowd]
        excused = sum(1 for i, (x, y) in enumerate(points) if i not in used and any(c.contains(x, y) for c in crowds))
        matched += len(used)
        counted += len(points) - excused
    return _crowds_ignored(truths, {POINT_KEY: counted}, {POINT_KEY: matched})


def _crowds_ignored(truths: Sequence[Truth], counted: Mapping[str, int], matched: Mapping[str, int]) -> SampleScore:
    """The image's score, its crowd regions counted as neither truth nor error."""
    crowds = sum(t.crowd for t in truths)
    return SampleScore(len(truths) - crowds, counted, matched, ignored=crowds)


def score_gui(truths: Sequence[Truth], predictions: Sequence[Prediction]) -> SampleScore:
    """GUI grounding / pointing as the reference evaluation scores it: a hit when any predicted
    point, or the centre of any predicted box, lies in the target element; precision and recall
    are then both that hit (accuracy), whatever the number of predictions."""
    regions = [t.region for t in truths]
    hit = any(region.contains(*_point_of(p)) for p in predictions for region in regions)
    asked = 1 if predictions else 0
    return SampleScore(1 if truths else 0, {POINT_KEY: asked}, {POINT_KEY: int(hit)})


def score_keypoints(
    truths: Sequence[Truth],
    predictions: Sequence[Prediction],
    *,
    single_phrase: bool = False,
    thresholds: Sequence[float] = IOU_THRESHOLDS,
) -> SampleScore:
    """Keypoint instances matched one-to-one by OKS at each threshold (0.50:0.95, like IoU).
    Ground truth that cannot be judged by keypoints (a crowd, a person with no labelled
    keypoint) is not counted, and an unmatched prediction mostly inside one is not held
    against the model (as COCO's keypoint evaluation ignores them)."""
    counted = {iou_key(t): 0 for t in thresholds}
    matched = {iou_key(t): 0 for t in thresholds}
    truth_count = ignored_count = 0
    for group_truths, group_preds in _groups(truths, predictions, single_phrase):
        scored = [t for t in group_truths if not t.crowd and t.box and t.keypoints and _any_visible(t.keypoints)]
        ignored = [t.box for t in group_truths if t not in scored and t.box is not None]
        truth_count += len(scored)
        ignored_count += len(group_truths) - len(scored)
        similarity = [
            [oks(t.box, t.keypoints, p.keypoints or {}) for p in group_preds]  # type: ignore[arg-type]
            for t in scored
        ]
        for threshold in thresholds:
            key = iou_key(threshold)
            used = match_greedy(similarity, threshold)
            excused = sum(
                1
                for i, p in enumerate(group_preds)
                if i not in used
                and p.box is not None
                and any(_share_inside(p.box, box) >= CROWD_OVERLAP for box in ignored)
            )
            matched[key] += len(used)
            counted[key] += len(group_preds) - excused
    return SampleScore(truth_count, counted, matched, ignored=ignored_count)


def _any_visible(keypoints: Keypoints) -> bool:
    return any(position is not None for position in keypoints.values())


def _f1(precision: float, recall: float) -> float:
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def summarize(scores: Sequence[SampleScore]) -> Summary:
    if not scores:
        return Summary(0, {}, None)
    by_key: dict[str, Metric] = {}
    for key in scores[0].matches:
        pairs = [pair for s in scores if (pair := s.precision_recall(key)) is not None]
        if not pairs:  # every image left out (only crowd regions): nothing to say, not a zero
            continue
        precision = sum(p for p, _ in pairs) / len(pairs)
        recall = sum(r for _, r in pairs) / len(pairs)
        by_key[key] = Metric(precision, recall, _f1(precision, recall))
    iou_metrics = [by_key[iou_key(t)] for t in IOU_THRESHOLDS if iou_key(t) in by_key]
    mean = None
    if len(iou_metrics) == len(IOU_THRESHOLDS):
        n = len(iou_metrics)
        mean = Metric(
            sum(m.precision for m in iou_metrics) / n,
            sum(m.recall for m in iou_metrics) / n,
            sum(m.f1 for m in iou_metrics) / n,
        )
    return Summary(len(scores), by_key, mean)
