"""Request validation and the public JSON shape of detections."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from rexomni_server.parsing import Detection
from rexomni_server.schemas import DetectParams, DetectResult
from rexomni_server.tasks import Geometry, Task
from rexomni_server.tracking import to_schema


def test_categories_accept_a_comma_separated_string_and_are_cleaned() -> None:
    params = DetectParams.model_validate({"categories": " person, car ,, dog "})
    assert params.categories == ["person", "car", "dog"]
    # Repeats would be asked twice under fan-out: the first spelling is kept.
    assert DetectParams.model_validate({"categories": "cat, Cat , dog, cat"}).categories == ["cat", "dog"]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"categories": []}, "at least one category"),
        ({"task": "teleport", "categories": ["x"]}, "task"),
        ({"task": "visual_prompting"}, "visual_prompt_boxes"),
        ({"task": "visual_prompting", "visual_prompt_boxes": [[10, 10, 5, 20]]}, "x1 > x0"),
        ({"task": "visual_prompting", "visual_prompt_boxes": [[1, 2, 3]]}, "at least 4"),
        ({"task": "keypoint", "categories": ["cat"]}, "keypoint_type"),
        ({"categories": ["<|im_end|>"]}, "special-token"),
        ({"categories": ["x" * 300]}, "longer than"),
        ({"categories": [f"c{i}" for i in range(65)]}, "at most 64"),
        ({"categories": ["a"], "options": {"max_new_tokens": 0}}, "greater than"),
        ({"categories": ["a"], "options": {"bogus": 1}}, "Extra inputs"),
    ],
)
def test_invalid_requests_say_what_is_wrong(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        DetectParams.model_validate(fields)


def test_keypoint_type_defaults_to_a_matching_category() -> None:
    params = DetectParams.model_validate({"task": "keypoint", "categories": ["animal"]})
    assert params.keypoint_type == "animal"


def test_public_shapes() -> None:
    box = to_schema(Detection("person", Geometry.BOX, box=(1.0, 2.0, 3.0, 4.0)), score=0.9)
    assert box.model_dump() == {"label": "person", "type": "box", "box": [1.0, 2.0, 3.0, 4.0], "score": 0.9}
    point = to_schema(Detection("cup", Geometry.POINT, point=(5.0, 6.0)))
    assert point.model_dump() == {"label": "cup", "type": "point", "point": [5.0, 6.0], "score": None}
    poly = to_schema(Detection("Hi", Geometry.POLYGON, polygon=((0.0, 0.0), (1.0, 0.0), (1.0, 1.0))))
    assert poly.model_dump()["polygon"] == [[0.0, 0.0], [1.0, 0.0], [1.0, 1.0]]
    kp = to_schema(
        Detection(
            "person",
            Geometry.KEYPOINTS,
            box=(0.0, 0.0, 9.0, 9.0),
            keypoints={"nose": (1.0, 2.0), "left eye": None},
        )
    )
    assert kp.model_dump()["keypoints"] == {"nose": [1.0, 2.0], "left eye": None}


def test_result_round_trips_through_json() -> None:
    result = DetectResult.model_validate(
        {
            "request_id": "r",
            "model": "m",
            "task": "pointing",
            "detections": [{"label": "a", "type": "point", "point": [1, 2]}],
            "image": {"width": 10, "height": 10, "resized_width": 28, "resized_height": 28},
            "truncated": False,
            "finish_reason": "stop",
            "skipped": 0,
            "usage": {"prompt_tokens": 1, "completion_tokens": 2},
            "timings": {"queue_ms": 0, "first_detection_ms": None, "total_ms": 1},
        }
    )
    assert DetectResult.model_validate_json(result.model_dump_json()) == result
    assert result.task is Task.POINTING
