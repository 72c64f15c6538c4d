"""The streaming parser: exact coordinates, exactly-once emission, truncation, garbage, chunking."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rexomni_server.parsing import Detection, StreamParser, parse_output
from rexomni_server.tasks import Geometry, Task

W, H = 640, 480


def px(bin_x: int, bin_y: int) -> tuple[float, float]:
    return (bin_x / 999 * W, bin_y / 999 * H)


def group(phrase: str, *coords: tuple[int, ...]) -> str:
    body = ", ".join("".join(f"<{c}>" for c in cs) for cs in coords)
    return f"<|object_ref_start|>{phrase}<|object_ref_end|><|box_start|>{body}<|box_end|>"


DETECTION_OUTPUT = (
    ", ".join([group("person", (0, 35, 980, 987), (646, 0, 999, 940)), group("car", (10, 20, 30, 40))]) + "<|im_end|>"
)
KEYPOINT_OUTPUT = (
    '```json\n{"person1": {"bbox": " <1> <36> <987> <984> ", "keypoints": {"nose": " <540> <351> ", '
    '"left eye": "unvisible"}}, "person2": {"bbox": " <100> <200> <300> <400> ", "keypoints": '
    '{"nose": " <150> <250> "}}}\n```<|im_end|>'
)


def test_boxes_in_original_pixels() -> None:
    detections, state = parse_output(Task.DETECTION, DETECTION_OUTPUT, W, H)
    assert [(d.label, d.box) for d in detections] == [
        ("person", (*px(0, 35), *px(980, 987))),
        ("person", (*px(646, 0), *px(999, 940))),
        ("car", (*px(10, 20), *px(30, 40))),
    ]
    assert state.finished and not state.truncated and state.skipped == 0
    assert detections[2].coordinate_ordinals == (8, 9, 10, 11)


def test_points_and_polygons_and_ocr_text() -> None:
    points, _ = parse_output(Task.POINTING, group("cup", (500, 500), (1, 2)), W, H)
    assert [(d.type, d.point) for d in points] == [(Geometry.POINT, px(500, 500)), (Geometry.POINT, px(1, 2))]
    polys, _ = parse_output(
        Task.OCR_POLYGON,
        group("Hello, world", (1, 2, 3, 4, 5, 6, 7, 8)) + group("42", (9, 9, 10, 9, 10, 10)),
        W,
        H,
    )
    assert [d.label for d in polys] == ["Hello, world", "42"]
    assert polys[0].polygon == (px(1, 2), px(3, 4), px(5, 6), px(7, 8))
    assert polys[1].type is Geometry.POLYGON


def test_box_is_emitted_at_its_fourth_coordinate_not_at_the_group_end() -> None:
    parser = StreamParser(Task.DETECTION, W, H)
    assert parser.feed("<|object_ref_start|>dog<|object_ref_end|><|box_start|><1><2><3>") == []
    emitted = parser.feed("<4>")
    assert len(emitted) == 1 and emitted[0].box == (*px(1, 2), *px(3, 4))
    assert parser.feed(", <5><6><7><8><|box_end|>")[0].box == (*px(5, 6), *px(7, 8))
    assert parser.finish() == []


def test_split_tokens_are_reassembled() -> None:
    parser = StreamParser(Task.DETECTION, W, H)
    chunks = [
        "<|object_ref_st",
        "art|>cat<|obj",
        "ect_ref_end|><|box_start|><1",
        "2><3",
        "4><56><7",
        "8><|box_",
        "end|>",
    ]
    out: list[Detection] = []
    for chunk in chunks:
        out += parser.feed(chunk)
    assert [d.box for d in out] == [(*px(12, 34), *px(56, 78))]


def test_truncated_output_keeps_complete_detections() -> None:
    cut = DETECTION_OUTPUT[: DETECTION_OUTPUT.index("<999><940>") + len("<999><9")]
    detections, state = parse_output(Task.DETECTION, cut, W, H)
    assert len(detections) == 1 and state.truncated and not state.finished


def test_truncated_polygon_is_dropped() -> None:
    detections, state = parse_output(
        Task.OCR_POLYGON, group("a", (1, 2, 3, 4, 5, 6)).removesuffix("<|box_end|>") + ", <1><2>", W, H
    )
    assert [d.label for d in detections] == ["a"] and state.truncated


def test_garbage_is_skipped_and_counted_never_raised() -> None:
    text = "hello <|box_end|> <1234> " + group("ok", (1, 2, 3, 4)) + group("bad", (1, 2, 3))
    detections, state = parse_output(Task.DETECTION, text, W, H)
    assert [d.label for d in detections] == ["ok"]
    assert state.skipped >= 3


def test_absurdly_nested_keypoint_json_is_skipped_not_raised() -> None:
    nested = '{"person1": ' + '{"a":' * 3000 + "1" + "}" * 3000 + "}"
    detections, state = parse_output(Task.KEYPOINT, nested, 100, 100)
    assert detections == [] and state.skipped >= 1


def test_runaway_digit_strings_in_keypoint_json_are_skipped_not_raised() -> None:
    # int() refuses 4300+ digits; a model stuck on one digit per token can write that many.
    runaway = "<" + "7" * 5000 + ">"
    text = (
        '{"person1": {"bbox": " ' + runaway + ' <2> <3> <4> ", "keypoints": {"nose": " <5> <6> "}}, '
        '"person2": {"bbox": " <1> <2> <3> <4> ", "keypoints": {"nose": " ' + runaway + ' <6> "}}}'
    )
    detections, state = parse_output(Task.KEYPOINT, text, 100, 100)
    assert state.skipped >= 1 and [d.label for d in detections] == ["person"]
    assert detections[0].keypoints == {"nose": None}  # an unreadable keypoint is left unplaced


def test_keypoint_json_with_fence_and_unvisible() -> None:
    detections, state = parse_output(Task.KEYPOINT, KEYPOINT_OUTPUT, W, H)
    assert [d.label for d in detections] == ["person", "person"]
    assert detections[0].box == (*px(1, 36), *px(987, 984))
    assert detections[0].keypoints == {"nose": px(540, 351), "left eye": None}
    assert detections[1].keypoints == {"nose": px(150, 250)}
    assert state.finished and not state.truncated
    assert detections[1].coordinate_ordinals == (6, 7, 8, 9, 10, 11)


def test_keypoint_json_without_fence_and_truncated() -> None:
    bare = KEYPOINT_OUTPUT.removeprefix("```json\n")
    cut = bare[: bare.index('"person2"') + 20]
    detections, state = parse_output(Task.KEYPOINT, cut, W, H)
    assert len(detections) == 1 and state.truncated


def test_keypoint_instance_emitted_when_its_object_closes() -> None:
    parser = StreamParser(Task.KEYPOINT, W, H)
    split = KEYPOINT_OUTPUT.index("}}") + 1
    assert parser.feed(KEYPOINT_OUTPUT[:split]) == []
    assert len(parser.feed(KEYPOINT_OUTPUT[split : split + 1])) == 1


def test_feed_after_finish_is_an_error() -> None:
    parser = StreamParser(Task.POINTING, W, H)
    parser.finish()
    with pytest.raises(RuntimeError):
        parser.feed("x")


# ---- property tests: any chunking gives the same result as parsing whole -------------------
coords = st.integers(min_value=0, max_value=999)
phrases = st.text(
    alphabet=st.characters(blacklist_characters="<>", blacklist_categories=("Cs",)), min_size=1, max_size=12
)


@st.composite
def phrase_outputs(draw: st.DrawFn) -> str:
    groups = []
    for _ in range(draw(st.integers(0, 5))):
        arity = draw(st.sampled_from([2, 4, 6, 8]))
        items = draw(st.lists(st.tuples(*[coords] * arity), min_size=1, max_size=4))
        groups.append(group(draw(phrases).strip() or "x", *items))
    text = ", ".join(groups)
    if draw(st.booleans()):
        text += "<|im_end|>"
    else:  # sometimes cut anywhere, like max_tokens does
        text = text[: draw(st.integers(0, len(text)))]
    return text


@st.composite
def chunkings(draw: st.DrawFn, text: str) -> list[str]:
    cuts = sorted(set(draw(st.lists(st.integers(0, len(text)), max_size=12))))
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


def streamed(task: Task, chunks: list[str]) -> tuple[list[Detection], tuple[int, bool, bool]]:
    parser = StreamParser(task, W, H)
    out: list[Detection] = []
    for chunk in chunks:
        out += parser.feed(chunk)
    out += parser.finish()
    s = parser.state
    return out, (s.skipped, s.truncated, s.finished)


@settings(max_examples=200, deadline=None)
@given(data=st.data(), task=st.sampled_from([Task.DETECTION, Task.POINTING, Task.OCR_POLYGON]))
def test_any_chunking_equals_whole(data: st.DataObject, task: Task) -> None:
    text = data.draw(phrase_outputs())
    whole, whole_state = parse_output(task, text, W, H)
    chunked, chunked_state = streamed(task, data.draw(chunkings(text)))
    assert chunked == whole
    assert chunked_state == (whole_state.skipped, whole_state.truncated, whole_state.finished)


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_keypoint_any_chunking_equals_whole(data: st.DataObject) -> None:
    text = KEYPOINT_OUTPUT[: data.draw(st.integers(0, len(KEYPOINT_OUTPUT)))]
    whole, state = parse_output(Task.KEYPOINT, text, W, H)
    chunked, chunked_state = streamed(Task.KEYPOINT, data.draw(chunkings(text)))
    assert chunked == whole
    assert chunked_state == (state.skipped, state.truncated, state.finished)


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=200), task=st.sampled_from(list(Task)))
def test_arbitrary_text_never_raises(text: str, task: Task) -> None:
    detections, _ = parse_output(task, text, W, H)
    for d in detections:
        assert d.label is not None
