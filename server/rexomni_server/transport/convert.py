"""pydantic <-> protobuf, in one place (round-trip tested). The JSON schemas are the source of
truth; these functions only translate."""

from __future__ import annotations

from functools import reduce
from typing import Any

from rexomni_server._pb.rexomni.v1 import detector_pb2 as pb
from rexomni_server.schemas import (
    MAX_CATEGORY_ENTRIES,
    MAX_FORCED_TILE_OUTPUTS,
    MAX_VISUAL_PROMPT_BOXES,
    BoxDetection,
    DetectionModel,
    DetectParams,
    DetectResult,
    ImageInfo,
    KeypointsDetection,
    PointDetection,
    PolygonDetection,
    TileInfo,
    TilingOptions,
    Timings,
    Usage,
)
from rexomni_server.tasks import Task

# The schema's limits on repeated fields (by their path in DetectRequest), checked on the message
# before any Python list (or pydantic model) is built from an over-long one.
_REPEATED_LIMITS = {
    "categories": MAX_CATEGORY_ENTRIES,
    "visual_prompt_boxes": MAX_VISUAL_PROMPT_BOXES,
    "options.forced_tile_outputs": MAX_FORCED_TILE_OUTPUTS,
}

_TASK_TO_PB = {task: pb.Task.Value(f"TASK_{task.value.upper()}") for task in Task}
_PB_TO_TASK = {value: task for task, value in _TASK_TO_PB.items()}


def task_to_pb(task: Task) -> Any:
    return _TASK_TO_PB[task]


def task_from_pb(value: int) -> Task:
    if value == pb.TASK_UNSPECIFIED:
        return Task.DETECTION
    if value not in _PB_TO_TASK:
        raise ValueError(f"unknown task enum value {value}")
    return _PB_TO_TASK[value]


def _box(values: list[float]) -> Any:
    x0, y0, x1, y1 = values
    return pb.Box(x0=x0, y0=y0, x1=x1, y1=y1)


def _box_values(box: Any) -> list[float]:
    return [box.x0, box.y0, box.x1, box.y1]


# ---- requests -------------------------------------------------------------------------------
def params_to_pb(params: DetectParams, image: bytes) -> Any:
    o = params.options
    options = pb.DetectOptions(
        return_raw_output=o.return_raw_output,
        stop_on_repetition=o.stop_on_repetition,
        scores=o.scores,
        priority=o.priority,
    )
    for name in ("max_new_tokens", "min_pixels", "max_pixels", "forced_output", "max_detections", "fan_out"):
        if getattr(o, name) is not None:
            setattr(options, name, getattr(o, name))
    options.forced_tile_outputs.extend(o.forced_tile_outputs or ())
    if o.tiling is not None:
        options.tiling.CopyFrom(_tiling_to_pb(o.tiling))
    return pb.DetectRequest(
        image=image,
        task=task_to_pb(params.task),
        categories=params.categories,
        keypoint_type=params.keypoint_type or "",
        visual_prompt_boxes=[_box(b) for b in params.visual_prompt_boxes or []],
        options=options,
    )


def _tiling_to_pb(t: TilingOptions) -> Any:
    return pb.Tiling(
        tile_size=t.tile_size or 0, overlap=t.overlap, whole_image=t.whole_image, iou_threshold=t.iou_threshold
    )


def _tiling_from_pb(t: Any) -> dict[str, Any]:
    """The fields the message sets; the schema fills in the defaults of the others."""
    tiling: dict[str, Any] = {"tile_size": t.tile_size or None}
    for name in ("overlap", "whole_image", "iou_threshold"):
        if t.HasField(name):
            tiling[name] = getattr(t, name)
    return tiling


def _check_repeated_lengths(request: Any) -> None:
    for name, limit in _REPEATED_LIMITS.items():
        count = len(reduce(getattr, name.split("."), request))
        if count > limit:
            raise ValueError(f"{name}: at most {limit} items, not {count}")


def params_from_pb(request: Any) -> tuple[DetectParams, bytes]:
    """Raises pydantic.ValidationError / ValueError on bad input (mapped to INVALID_ARGUMENT)."""
    _check_repeated_lengths(request)
    o = request.options
    # Validated as part of DetectParams, so errors read "options.x: ..." as they do over HTTP.
    options = dict(
        max_new_tokens=o.max_new_tokens if o.HasField("max_new_tokens") else None,
        min_pixels=o.min_pixels if o.HasField("min_pixels") else None,
        max_pixels=o.max_pixels if o.HasField("max_pixels") else None,
        return_raw_output=o.return_raw_output,
        forced_output=o.forced_output if o.HasField("forced_output") else None,
        forced_tile_outputs=list(o.forced_tile_outputs) or None,
        max_detections=o.max_detections if o.HasField("max_detections") else None,
        stop_on_repetition=o.stop_on_repetition if o.HasField("stop_on_repetition") else True,
        fan_out=o.fan_out if o.HasField("fan_out") else None,
        scores=o.scores if o.HasField("scores") else True,
        priority=o.priority,
        tiling=_tiling_from_pb(o.tiling) if o.HasField("tiling") else None,
    )
    params = DetectParams.model_validate(
        {
            "task": task_from_pb(request.task),
            "categories": list(request.categories),
            "keypoint_type": request.keypoint_type or None,
            "visual_prompt_boxes": [_box_values(b) for b in request.visual_prompt_boxes] or None,
            "options": options,
        }
    )
    return params, bytes(request.image)


# ---- detections -----------------------------------------------------------------------------
def detection_to_pb(d: DetectionModel) -> Any:
    out = pb.Detection(label=d.label)
    if d.score is not None:
        out.score = d.score
    if isinstance(d, BoxDetection):
        out.box.CopyFrom(_box(d.box))
    elif isinstance(d, PointDetection):
        out.point.CopyFrom(pb.Point(x=d.point[0], y=d.point[1]))
    elif isinstance(d, PolygonDetection):
        out.polygon.CopyFrom(pb.Polygon(points=[pb.Point(x=x, y=y) for x, y in d.polygon]))
    else:
        keypoints = [
            pb.Keypoint(name=name, point=pb.Point(x=xy[0], y=xy[1])) if xy is not None else pb.Keypoint(name=name)
            for name, xy in d.keypoints.items()
        ]
        out.keypoints.CopyFrom(pb.Keypoints(box=_box(d.box), keypoints=keypoints))
    return out


def detection_from_pb(d: Any) -> DetectionModel:
    score = d.score if d.HasField("score") else None
    kind = d.WhichOneof("geometry")
    if kind == "box":
        return BoxDetection(label=d.label, score=score, box=_box_values(d.box))
    if kind == "point":
        return PointDetection(label=d.label, score=score, point=[d.point.x, d.point.y])
    if kind == "polygon":
        return PolygonDetection(label=d.label, score=score, polygon=[[p.x, p.y] for p in d.polygon.points])
    if kind == "keypoints":
        keypoints = {k.name: ([k.point.x, k.point.y] if k.HasField("point") else None) for k in d.keypoints.keypoints}
        return KeypointsDetection(label=d.label, score=score, box=_box_values(d.keypoints.box), keypoints=keypoints)
    raise ValueError("detection without geometry")


# ---- results --------------------------------------------------------------------------------
def result_to_pb(r: DetectResult) -> Any:
    out = pb.DetectResponse(
        request_id=r.request_id,
        model=r.model,
        task=task_to_pb(r.task),
        detections=[detection_to_pb(d) for d in r.detections],
        image=pb.ImageInfo(**r.image.model_dump()),
        truncated=r.truncated,
        finish_reason=r.finish_reason,
        skipped=r.skipped,
        duplicates=r.duplicates,
        usage=pb.Usage(**r.usage.model_dump()),
        timings=pb.Timings(queue_ms=r.timings.queue_ms, total_ms=r.timings.total_ms),
    )
    if r.timings.first_detection_ms is not None:
        out.timings.first_detection_ms = r.timings.first_detection_ms
    if r.raw_output is not None:
        out.raw_output = r.raw_output
    if r.tiles is not None:
        out.tiled = True
        out.tiles.extend(pb.TileInfo(**tile.model_dump()) for tile in r.tiles)
    return out


def _tile_from_pb(t: Any) -> TileInfo:
    return TileInfo(**{name: getattr(t, name) for name in TileInfo.model_fields})


def result_from_pb(r: Any) -> DetectResult:
    return DetectResult(
        request_id=r.request_id,
        model=r.model,
        task=task_from_pb(r.task),
        detections=[detection_from_pb(d) for d in r.detections],
        image=ImageInfo(
            width=r.image.width,
            height=r.image.height,
            resized_width=r.image.resized_width,
            resized_height=r.image.resized_height,
        ),
        truncated=r.truncated,
        finish_reason=r.finish_reason,
        skipped=r.skipped,
        duplicates=r.duplicates,
        usage=Usage(prompt_tokens=r.usage.prompt_tokens, completion_tokens=r.usage.completion_tokens),
        timings=Timings(
            queue_ms=r.timings.queue_ms,
            first_detection_ms=r.timings.first_detection_ms if r.timings.HasField("first_detection_ms") else None,
            total_ms=r.timings.total_ms,
        ),
        raw_output=r.raw_output if r.HasField("raw_output") else None,
        tiles=[_tile_from_pb(t) for t in r.tiles] if r.tiled else None,
    )
