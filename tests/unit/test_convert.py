"""pydantic <-> protobuf conversion round-trips without loss."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rexomni_server._pb.rexomni.v1 import detector_pb2 as pb
from rexomni_server.errors import InvalidRequest
from rexomni_server.parsing import Detection
from rexomni_server.schemas import (
    MAX_CATEGORIES,
    MAX_CATEGORY_ENTRIES,
    MAX_FORCED_TILE_OUTPUTS,
    MAX_VISUAL_PROMPT_BOXES,
    DetectOptions,
    DetectParams,
    DetectResult,
    TilingOptions,
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
from rexomni_server.transport.grpc import decode_request

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
                "tiling": {"tile_size": 1024, "overlap": 0.3, "whole_image": False, "iou_threshold": 0.65},
            },
        }
    )
    # Every option differs from its default here, so a field the conversion forgets is caught
    # (forced_tile_outputs excludes forced_output: its own round trip is tested below).
    assert {name for name, value in params.options if value != DetectOptions.model_fields[name].default} == set(
        DetectOptions.model_fields
    ) - {"forced_tile_outputs"}
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


def test_tiling_auto_and_a_bare_tiling_message_are_the_defaults() -> None:
    params = DetectParams.model_validate({"categories": ["a"], "options": {"tiling": "auto"}})
    message = params_to_pb(params, b"")
    assert message.options.HasField("tiling") and message.options.tiling.tile_size == 0  # 0: auto
    back, _ = params_from_pb(message)
    assert back == params and back.options.tiling == TilingOptions()
    # Presence alone turns tiling on; every field left out takes the schema's default.
    bare = pb.DetectRequest(categories=["a"], options=pb.DetectOptions(tiling=pb.Tiling()))
    assert params_from_pb(bare)[0].options.tiling == TilingOptions()
    # Absent: off.
    assert params_from_pb(pb.DetectRequest(categories=["a"]))[0].options.tiling is None


def test_a_tile_size_the_schema_refuses_is_refused_over_grpc_too() -> None:
    request = pb.DetectRequest(categories=["a"], options=pb.DetectOptions(tiling=pb.Tiling(tile_size=3)))
    with pytest.raises(InvalidRequest, match=r"options\.tiling\.tile_size"):
        decode_request(request.SerializeToString())


def test_forced_outputs_per_tile_round_trip_as_their_own_field() -> None:
    params = DetectParams.model_validate(
        {"categories": ["a"], "options": {"tiling": {"tile_size": 512}, "forced_tile_outputs": ["one", "", "three"]}}
    )
    message = params_to_pb(params, b"")
    assert list(message.options.forced_tile_outputs) == ["one", "", "three"]
    assert not message.options.HasField("forced_output")
    back, _ = params_from_pb(message)
    assert back == params and back.options.forced_tile_outputs == ["one", "", "three"]


def test_forced_output_and_forced_tile_outputs_together_are_refused() -> None:
    options = pb.DetectOptions(forced_output="x", forced_tile_outputs=["a"], tiling=pb.Tiling())
    request = pb.DetectRequest(categories=["a"], options=options)
    with pytest.raises(ValueError, match="set forced_output or forced_tile_outputs, not both"):
        params_from_pb(request)
    # The gRPC transport answers it as any other bad request (INVALID_ARGUMENT).
    with pytest.raises(InvalidRequest, match="not both"):
        decode_request(request.SerializeToString())


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
        (
            {"options": pb.DetectOptions(forced_tile_outputs=["x"] * (MAX_FORCED_TILE_OUTPUTS + 1))},
            f"options.forced_tile_outputs: at most {MAX_FORCED_TILE_OUTPUTS} items",
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
    options = pb.DetectOptions(tiling=pb.Tiling(), forced_tile_outputs=["x"] * MAX_FORCED_TILE_OUTPUTS)
    params, _ = params_from_pb(pb.DetectRequest(categories=["a"], options=options))
    assert len(params.options.forced_tile_outputs or []) == MAX_FORCED_TILE_OUTPUTS


pixels = st.integers(min_value=0, max_value=100_000)
tiles = st.fixed_dictionaries(
    {
        "x0": pixels,
        "y0": pixels,
        "x1": pixels,
        "y1": pixels,
        "whole": st.booleans(),
        "resized_width": pixels,
        "resized_height": pixels,
    }
)


@settings(max_examples=50, deadline=None)
@given(
    dets=st.lists(detections(), max_size=5),
    first=st.none() | floats,
    raw=st.none() | st.text(max_size=30),
    plan=st.none() | st.lists(tiles, max_size=4),
)
def test_result_round_trip(
    dets: list[Detection], first: float | None, raw: str | None, plan: list[dict[str, Any]] | None
) -> None:
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
            "tiles": plan,
        }
    )
    message = result_to_pb(result)
    # Not tiled (null) and tiled into an empty plan are told apart.
    assert message.tiled == (plan is not None)
    assert result_from_pb(message) == result
