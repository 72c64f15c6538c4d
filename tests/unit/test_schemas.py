"""Request validation and the public JSON shape of detections."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from rexomni_server.parsing import Detection
from rexomni_server.schemas import (
    MAX_CATEGORIES,
    MAX_CATEGORIES_STRING_CHARS,
    MAX_CATEGORY_CHARS,
    MAX_CATEGORY_ENTRIES,
    MAX_FORCED_OUTPUT_CHARS,
    MAX_VISUAL_PROMPT_BOXES,
    DetectParams,
    DetectRequest,
    DetectResult,
)
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
        ({"categories": ["x" * 300]}, "at most 256 characters"),
        ({"categories": [f"c{i}" for i in range(65)]}, "at most 64"),
        ({"categories": ["a"], "options": {"max_new_tokens": 0}}, "greater than"),
        ({"categories": ["a"], "options": {"bogus": 1}}, "Extra inputs"),
    ],
)
def test_invalid_requests_say_what_is_wrong(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        DetectParams.model_validate(fields)


def _only_error(exc: pytest.ExceptionInfo[ValidationError]) -> dict[str, object]:
    errors = exc.value.errors()
    assert len(errors) == 1, errors
    return dict(errors[0])


def test_a_huge_category_list_is_refused_before_its_items_are_validated() -> None:
    # Items that are not even strings: validated one by one, each would be an error of its own.
    with pytest.raises(ValidationError) as exc:
        DetectParams.model_validate({"categories": list(range(10_000))})
    error = _only_error(exc)
    assert error["type"] == "too_long" and error["loc"] == ("categories",)
    assert error["ctx"] == {"field_type": "List", "max_length": MAX_CATEGORY_ENTRIES, "actual_length": 10_000}


def test_a_huge_json_body_of_categories_is_refused_by_its_list_length() -> None:
    body = json.dumps({"image": "aGk=", "categories": [f"c{i}" for i in range(100_000)]})
    with pytest.raises(ValidationError) as exc:
        DetectRequest.model_validate_json(body)
    error = _only_error(exc)
    assert error["type"] == "too_long" and f"at most {MAX_CATEGORY_ENTRIES} items" in str(error["msg"])


def test_repeats_and_blanks_count_against_entries_not_distinct_categories() -> None:
    distinct = [f"c{i}" for i in range(MAX_CATEGORIES)]
    entries = (distinct * 4 + ["", " "] * MAX_CATEGORY_ENTRIES)[:MAX_CATEGORY_ENTRIES]
    assert DetectParams.model_validate({"categories": entries}).categories == distinct
    with pytest.raises(ValidationError, match=f"at most {MAX_CATEGORIES} distinct"):
        DetectParams.model_validate({"categories": [*distinct, "one more"]})


def test_category_length_leaves_surrounding_whitespace_out() -> None:
    padded = "  " + "x" * MAX_CATEGORY_CHARS + " \x1c"  # \x1c: str.strip removes it, pydantic-core would not
    assert DetectParams.model_validate({"categories": [padded]}).categories == ["x" * MAX_CATEGORY_CHARS]


def test_an_over_long_comma_string_is_refused_before_it_is_split() -> None:
    # Split, these commas would be a list of empty entries, refused for its length ("too_long").
    with pytest.raises(ValidationError) as exc:
        DetectParams.model_validate({"categories": "," * (MAX_CATEGORIES_STRING_CHARS + 1)})
    error = _only_error(exc)
    assert error["type"] == "string_too_long" and error["ctx"] == {"max_length": MAX_CATEGORIES_STRING_CHARS}
    assert "comma-separated" in str(error["msg"])


def test_the_longest_valid_comma_string_is_accepted() -> None:
    distinct = [f"{i:02}".ljust(MAX_CATEGORY_CHARS, "x") for i in range(MAX_CATEGORIES)]
    text = ",".join(distinct * (MAX_CATEGORY_ENTRIES // MAX_CATEGORIES))
    assert len(text) <= MAX_CATEGORIES_STRING_CHARS
    assert DetectParams.model_validate({"categories": text}).categories == distinct


def test_a_huge_box_list_is_refused_before_its_boxes_are_validated() -> None:
    with pytest.raises(ValidationError) as exc:
        DetectParams.model_validate({"task": "visual_prompting", "visual_prompt_boxes": [[1, 2, 3]] * 10_000})
    error = _only_error(exc)
    assert error["type"] == "too_long" and error["loc"] == ("visual_prompt_boxes",)
    assert error["ctx"] == {"field_type": "List", "max_length": MAX_VISUAL_PROMPT_BOXES, "actual_length": 10_000}
    boxes = [[0, 0, 10, 10]] * MAX_VISUAL_PROMPT_BOXES
    assert DetectParams.model_validate({"task": "visual_prompting", "visual_prompt_boxes": boxes}).visual_prompt_boxes


def test_forced_output_has_a_maximum() -> None:
    longest = {"categories": ["a"], "options": {"forced_output": "x" * MAX_FORCED_OUTPUT_CHARS}}
    assert DetectParams.model_validate(longest).options.forced_output
    with pytest.raises(ValidationError) as exc:
        DetectParams.model_validate(
            {"categories": ["a"], "options": {"forced_output": "x" * (MAX_FORCED_OUTPUT_CHARS + 1)}}
        )
    error = _only_error(exc)
    assert error["type"] == "string_too_long" and error["loc"] == ("options", "forced_output")


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
