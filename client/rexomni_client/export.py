"""Results in other tools' formats: a COCO document, a Label Studio import file, supervision's
``Detections`` (for ``rexomni detect --format`` and Python users).

COCO has no points: a point is written as a zero-size box at the point (``bbox [x, y, 0, 0]``,
``area 0``) with the point itself in an extra ``point`` field. Keypoints follow COCO's
``person_keypoints`` layout: the category lists the keypoint names (the server's keypoint set)
and the skeleton; each annotation has ``keypoints [x, y, v, ...]`` (v 2 visible, 0 not given,
with x = y = 0) and ``num_keypoints``; its area is its box's. A score the server did not give
is left out rather than written as null.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rexomni_server.schemas import (
    BoxDetection,
    DetectionModel,
    DetectResult,
    KeypointsDetection,
    PointDetection,
    PolygonDetection,
)
from rexomni_server.tasks import KEYPOINT_SETS

if TYPE_CHECKING:
    import supervision

# The lines drawn between keypoints, by name: COCO's person skeleton and AP-10K's animal one.
SKELETONS: dict[str, tuple[tuple[str, str], ...]] = {
    "person": (
        ("left ankle", "left knee"),
        ("left knee", "left hip"),
        ("right ankle", "right knee"),
        ("right knee", "right hip"),
        ("left hip", "right hip"),
        ("left shoulder", "left hip"),
        ("right shoulder", "right hip"),
        ("left shoulder", "right shoulder"),
        ("left shoulder", "left elbow"),
        ("right shoulder", "right elbow"),
        ("left elbow", "left wrist"),
        ("right elbow", "right wrist"),
        ("left eye", "right eye"),
        ("nose", "left eye"),
        ("nose", "right eye"),
        ("left eye", "left ear"),
        ("right eye", "right ear"),
        ("left ear", "left shoulder"),
        ("right ear", "right shoulder"),
    ),
    "animal": (
        ("left eye", "right eye"),
        ("left eye", "nose"),
        ("right eye", "nose"),
        ("nose", "neck"),
        ("neck", "root of tail"),
        ("neck", "left shoulder"),
        ("left shoulder", "left elbow"),
        ("left elbow", "left front paw"),
        ("neck", "right shoulder"),
        ("right shoulder", "right elbow"),
        ("right elbow", "right front paw"),
        ("root of tail", "left hip"),
        ("left hip", "left knee"),
        ("left knee", "left back paw"),
        ("root of tail", "right hip"),
        ("right hip", "right knee"),
        ("right knee", "right back paw"),
    ),
}

# Label Studio's keypoint size, in percent of the image width.
POINT_SIZE_PERCENT = 0.5


def keypoint_set_for(label: str, names: Iterable[str], keypoint_type: str | None = None) -> str | None:
    """The keypoint set (a key of KEYPOINT_SETS) that keypoints with these names belong to:
    ``keypoint_type`` (what was asked for) when it has them all, else the one set that does
    (the one named like the label when both do); None when none does or it is ambiguous."""
    given = set(names)
    if keypoint_type in KEYPOINT_SETS and given <= set(KEYPOINT_SETS[keypoint_type]):
        return keypoint_type
    candidates = [kind for kind, known in KEYPOINT_SETS.items() if given <= set(known)]
    if label in candidates:
        return label
    return candidates[0] if len(candidates) == 1 else None


def _px(value: float) -> float:
    return round(value, 2)


def _bounds(points: Sequence[Sequence[float]]) -> tuple[float, float, float, float]:
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    return min(xs), min(ys), max(xs), max(ys)


def _polygon_area(points: Sequence[Sequence[float]]) -> float:
    """The shoelace formula."""
    twice = sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(points, [*points[1:], points[0]], strict=True))
    return abs(twice) / 2


def _xywh(x0: float, y0: float, x1: float, y1: float) -> list[float]:
    return [_px(x0), _px(y0), _px(x1 - x0), _px(y1 - y0)]


# ---- COCO -----------------------------------------------------------------------------------
def to_coco(results: Sequence[tuple[str, DetectResult]], *, keypoint_type: str | None = None) -> dict[str, Any]:
    """One COCO document for ``(file name, result)`` pairs: images numbered from 1 in the
    order given, one category per label (numbered in order of first appearance)."""
    categories: dict[str, dict[str, Any]] = {}
    keypoint_names: dict[str, dict[str, None]] = {}  # label -> names seen, in order
    for _, result in results:
        for det in result.detections:
            categories.setdefault(det.label, {"id": len(categories) + 1, "name": det.label})
            if isinstance(det, KeypointsDetection):
                keypoint_names.setdefault(det.label, {}).update(dict.fromkeys(det.keypoints))
    for label, seen in keypoint_names.items():
        kind = keypoint_set_for(label, seen, keypoint_type)
        names = KEYPOINT_SETS[kind] if kind else tuple(seen)
        categories[label]["keypoints"] = list(names)
        edges = SKELETONS[kind] if kind else ()
        categories[label]["skeleton"] = [[names.index(a) + 1, names.index(b) + 1] for a, b in edges]

    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for image_id, (file_name, result) in enumerate(results, 1):
        images.append(
            {"id": image_id, "file_name": file_name, "width": result.image.width, "height": result.image.height}
        )
        for det in result.detections:
            category = categories[det.label]
            annotation: dict[str, Any] = {
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": category["id"],
                "iscrowd": 0,
                **_coco_geometry(det, category.get("keypoints", ())),
            }
            if det.score is not None:
                annotation["score"] = det.score
            annotations.append(annotation)
    models = sorted({result.model for _, result in results})
    return {
        "info": {"description": "rexomni detect", "model": ", ".join(models)},
        "images": images,
        "categories": list(categories.values()),
        "annotations": annotations,
    }


def _coco_geometry(det: DetectionModel, keypoint_names: Sequence[str]) -> dict[str, Any]:
    if isinstance(det, PolygonDetection):
        x0, y0, x1, y1 = _bounds(det.polygon)
        return {
            "bbox": _xywh(x0, y0, x1, y1),
            "area": _px(_polygon_area(det.polygon)),
            "segmentation": [[_px(v) for point in det.polygon for v in point]],
        }
    if isinstance(det, PointDetection):
        x, y = det.point
        return {"bbox": [_px(x), _px(y), 0.0, 0.0], "area": 0.0, "point": [_px(x), _px(y)]}
    x0, y0, x1, y1 = det.box
    geometry: dict[str, Any] = {"bbox": _xywh(x0, y0, x1, y1), "area": _px((x1 - x0) * (y1 - y0))}
    if isinstance(det, KeypointsDetection):
        flat: list[float] = []
        for name in keypoint_names:
            xy = det.keypoints.get(name)
            flat += [_px(xy[0]), _px(xy[1]), 2] if xy is not None else [0, 0, 0]
        geometry["keypoints"] = flat
        geometry["num_keypoints"] = sum(1 for name in keypoint_names if det.keypoints.get(name) is not None)
    return geometry


# ---- Label Studio ---------------------------------------------------------------------------
def to_labelstudio(
    results: Sequence[tuple[str, DetectResult]],
    *,
    from_name: str = "label",
    to_name: str = "image",
    keypoint_from_name: str = "keypoint",
) -> list[dict[str, Any]]:
    """A Label Studio import file: one task per ``(image path or URL, result)``, its detections
    as one prediction. Boxes are ``rectanglelabels``, polygons ``polygonlabels`` and points
    ``keypointlabels`` (labelled with the category), all from the control ``from_name``; a
    keypoint detection is its box plus one ``keypointlabels`` region per keypoint given, labelled
    with the keypoint's name, from ``keypoint_from_name`` (a labelling config cannot give two
    controls one name), its ``parentID`` the box's region. Coordinates are percent of the image,
    kept within it."""
    return [_labelstudio_task(image, result, from_name, to_name, keypoint_from_name) for image, result in results]


def _labelstudio_task(
    image: str, result: DetectResult, from_name: str, to_name: str, keypoint_from_name: str
) -> dict[str, Any]:
    width, height = result.image.width, result.image.height
    regions: list[dict[str, Any]] = []

    def region(
        kind: str, value: dict[str, Any], score: float | None, control: str = from_name, parent: str | None = None
    ) -> str:
        entry: dict[str, Any] = {
            "id": f"r{len(regions) + 1}",
            "from_name": control,
            "to_name": to_name,
            "type": kind,
            "original_width": width,
            "original_height": height,
            "image_rotation": 0,
            "value": value,
        }
        if score is not None:
            entry["score"] = score
        if parent is not None:
            entry["parentID"] = parent
        regions.append(entry)
        return str(entry["id"])

    def pct(x: float, y: float) -> tuple[float, float]:
        """Percent of the image, kept within it (Label Studio's regions are)."""
        return round(min(100.0, max(0.0, 100 * x / width)), 4), round(min(100.0, max(0.0, 100 * y / height)), 4)

    def keypoint(xy: Sequence[float], name: str, score: float | None, control: str, parent: str | None = None) -> None:
        x, y = pct(xy[0], xy[1])
        value = {"x": x, "y": y, "width": POINT_SIZE_PERCENT, "keypointlabels": [name]}
        region("keypointlabels", value, score, control, parent)

    for det in result.detections:
        box_id = None
        if isinstance(det, (BoxDetection, KeypointsDetection)):
            x0, y0, x1, y1 = det.box
            (x, y), (x_end, y_end) = pct(x0, y0), pct(x1, y1)
            box = {"x": x, "y": y, "width": round(x_end - x, 4), "height": round(y_end - y, 4), "rotation": 0}
            box_id = region("rectanglelabels", {**box, "rectanglelabels": [det.label]}, det.score)
        if isinstance(det, KeypointsDetection):
            for name, xy in det.keypoints.items():
                if xy is not None:
                    keypoint(xy, name, det.score, keypoint_from_name, box_id)  # each points at its box
        elif isinstance(det, PointDetection):
            keypoint(det.point, det.label, det.score, from_name)
        elif isinstance(det, PolygonDetection):
            points = [list(pct(p[0], p[1])) for p in det.polygon]
            region("polygonlabels", {"points": points, "closed": True, "polygonlabels": [det.label]}, det.score)
    prediction: dict[str, Any] = {"model_version": result.model, "result": regions}
    scores = [det.score for det in result.detections if det.score is not None]
    if scores:
        prediction["score"] = round(sum(scores) / len(scores), 4)
    return {"data": {"image": image}, "predictions": [prediction]}


# ---- supervision ----------------------------------------------------------------------------
@dataclass(frozen=True)
class DetectionArrays:
    """The columns of supervision's ``Detections``, as plain lists."""

    xyxy: list[list[float]]
    confidence: list[float] | None  # None when no detection has a score; NaN for one without
    class_id: list[int]
    class_name: list[str]
    kind: list[str]  # box, point, polygon or keypoints
    classes: list[str]  # class_id -> name


def detection_arrays(result: DetectResult, classes: Sequence[str] = ()) -> DetectionArrays:
    """Every detection as a box: boxes and keypoint boxes as they are, polygons by their
    bounds, points as zero-size boxes. ``class_id`` indexes ``classes``; labels not in it are
    numbered after it, in order of first appearance."""
    names = list(classes)
    index = {name: i for i, name in enumerate(names)}
    xyxy: list[list[float]] = []
    class_id: list[int] = []
    for det in result.detections:
        if isinstance(det, PolygonDetection):
            xyxy.append(list(_bounds(det.polygon)))
        elif isinstance(det, PointDetection):
            xyxy.append([det.point[0], det.point[1], det.point[0], det.point[1]])
        else:
            xyxy.append(list(det.box))
        if det.label not in index:
            index[det.label] = len(names)
            names.append(det.label)
        class_id.append(index[det.label])
    scores = [det.score for det in result.detections]
    confidence = None if all(s is None for s in scores) else [math.nan if s is None else s for s in scores]
    return DetectionArrays(
        xyxy=xyxy,
        confidence=confidence,
        class_id=class_id,
        class_name=[det.label for det in result.detections],
        kind=[det.type for det in result.detections],
        classes=names,
    )


def to_supervision(result: DetectResult, classes: Sequence[str] = ()) -> supervision.Detections:
    """The result as ``supervision.Detections`` (``xyxy``, ``confidence``, ``class_id``, and
    ``data["class_name"]``, ``data["type"]``), to use supervision's annotators, trackers and
    zones. supervision is not a dependency of rexomni: ``pip install supervision``."""
    try:
        import numpy as np
        import supervision as sv
    except ImportError as exc:
        raise ImportError(
            "to_supervision needs the supervision package, which rexomni does not install: pip install supervision"
        ) from exc
    arrays = detection_arrays(result, classes)
    return sv.Detections(
        xyxy=np.asarray(arrays.xyxy, dtype=np.float32).reshape(-1, 4),
        confidence=None if arrays.confidence is None else np.asarray(arrays.confidence, dtype=np.float32),
        class_id=np.asarray(arrays.class_id, dtype=int),
        data={"class_name": np.asarray(arrays.class_name, dtype=str), "type": np.asarray(arrays.kind, dtype=str)},
    )
