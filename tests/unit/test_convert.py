"""pydantic <-> protobuf conversion round-trips without loss."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rexomni_server._pb.rexomni.v1 import detector_pb2 as pb
from rexomni_server.parsing import Detection
from rexomni_server.schemas import (
    MAX_CATEGORIES,
    MAX_CATEGORY_ENTRIES,
    MAX_VISUAL_PROMPT_BOXES,
    DetectOptions,
    DetectParams,
    DetectResult,
)
from rexomni_server.tasks import Geometry, Task
from rexomni_server.tracking import to_schema
from rexomni_server.transport.convert import (
    detection_from_pb,
    detection_to_pb,
    params_from_pb,
    params_to_pb,
    result_from_pb,
    result_to_pb,
    task_from_pb,
)

floats = st.floats(min_value=0, max_value=10_000, allow_nan=False)
xy = st.tuples(floats, floats)
scores = st.none() | st.floats(min_value=0, max_value=1)


@st.composite
def detections(draw: st.DrawFn) -> Detection:
    kind = draw(st.sampled_from(list(Geometry)))
    label = draw(st.text(max_size=20))
    if kind is Geometry.BOX:
        return Detection(label, kind, box=draw(st.tuples(floats, floats, floats, floats)))
    if kind is Geometry.POINT:
        return Detection(label, kind, point=draw(xy))
    if kind is Geometry.POLYGON:
        return Detection(label, kind, polygon=tuple(draw(st.lists(xy, min_size=3, max_size=8))))
    names = draw(st.lists(st.text(min_size=1, max_size=10), unique=True, max_size=17))
    keypoints = {n: draw(st.none() | xy) for n in names}
    return Detection(label, kind, box=draw(st.tuples(floats, floats, floats, floats)), keypoints=keypoints)


@settings(max_examples=200, deadline=None)
@given(detection=detections(), score=scores)
def test_detection_round_trip(detection: Detection, score: float | None) -> None:
    model = to_schema(detection, score)
    back = detection_from_pb(detection_to_pb(model))
    assert back == model
    if model.type == "keypoints":
        assert list(back.keypoints) == list(model.keypoints)  # type: ignore[union-attr]


@pytest.mark.parametrize("task", list(Task))
def test_params_round_trip(task: Task) -> None:
    params = DetectParams.model_validate(
        {
            "task": task,
            "categories": ["person"] if task is not Task.VISUAL_PROMPTING else [],
            "keypoint_type": "person" if task is Task.KEYPOINT else None,
            "visual_prompt_boxes": [[1.5, 2, 30, 40.25]] if task is Task.VISUAL_PROMPTING else None,
            "options": {
                "max_new_tokens": 77,
                "min_pixels": 3136,
                "max_pixels": 50000,
                "return_raw_output": True,
                "forced_output": "x",
                "max_detections": 9,
                "stop_on_repetition": False,
                "fan_out": True,
                "scores": False,
                "priority": -5,
            },
        }
    )
    # Every option differs from its default here, so a field the conversion forgets is caught.
    assert {name for name, value in params.options if value != DetectOptions.model_fields[name].default} == set(
        DetectOptions.model_fields
    )
    back, image = params_from_pb(params_to_pb(params, b"\x89PNG"))
    assert back == params and image == b"\x89PNG"


def test_unset_options_stay_unset_and_unspecified_task_is_detection() -> None:
    params = DetectParams.model_validate({"categories": ["a"]})
    message = params_to_pb(params, b"")
    message.task = 0
    back, _ = params_from_pb(message)
    assert back == params and back.options.max_new_tokens is None
    with pytest.raises(ValueError):
        task_from_pb(99)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"categories": ["a"] * (MAX_CATEGORY_ENTRIES + 1)}, f"categories: at most {MAX_CATEGORY_ENTRIES} items"),
        (
            {
                "task": pb.TASK_VISUAL_PROMPTING,
                "visual_prompt_boxes": [pb.Box(x0=0, y0=0, x1=1, y1=1)] * (MAX_VISUAL_PROMPT_BOXES + 1),
            },
            f"visual_prompt_boxes: at most {MAX_VISUAL_PROMPT_BOXES} items",
        ),
    ],
)
def test_over_long_repeated_fields_are_refused_before_validation(
    fields: dict[str, Any], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def never(*args: object, **kwargs: object) -> DetectParams:
        raise AssertionError("an over-long repeated field reached pydantic")

    monkeypatch.setattr(DetectParams, "model_validate", never)
    with pytest.raises(ValueError, match=message):
        params_from_pb(pb.DetectRequest(**fields))


def test_repeated_fields_at_their_limits_are_accepted() -> None:
    categories = [f"c{i % MAX_CATEGORIES}" for i in range(MAX_CATEGORY_ENTRIES)]
    params, _ = params_from_pb(pb.DetectRequest(categories=categories))
    assert len(params.categories) == MAX_CATEGORIES
    boxes = [pb.Box(x0=0, y0=0, x1=1, y1=1)] * MAX_VISUAL_PROMPT_BOXES
    params, _ = params_from_pb(pb.DetectRequest(task=pb.TASK_VISUAL_PROMPTING, visual_prompt_boxes=boxes))
    assert len(params.visual_prompt_boxes or []) == MAX_VISUAL_PROMPT_BOXES


@settings(max_examples=50, deadline=None)
@given(dets=st.lists(detections(), max_size=5), first=st.none() | floats, raw=st.none() | st.text(max_size=30))
def test_result_round_trip(dets: list[Detection], first: float | None, raw: str | None) -> None:
    result = DetectResult.model_validate(
        {
            "request_id": "rid",
            "model": "m",
            "task": "ocr_polygon",
            "detections": [to_schema(d).model_dump() for d in dets],
            "image": {"width": 10, "height": 20, "resized_width": 28, "resized_height": 56},
            "truncated": True,
            "finish_reason": "length",
            "skipped": 3,
            "duplicates": 4,
            "usage": {"prompt_tokens": 5, "completion_tokens": 9},
            "timings": {"queue_ms": 1.5, "first_detection_ms": first, "total_ms": 30.25},
            "raw_output": raw,
        }
    )
    assert result_from_pb(result_to_pb(result)) == result
