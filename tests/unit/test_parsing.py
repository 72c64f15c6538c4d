"""The streaming parser: exact coordinates, exactly-once emission, truncation, garbage, chunking."""

from __future__ import annotations

import itertools
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rexomni_server.coords import from_bin
from rexomni_server.engines.scripted import split_like_tokens
from rexomni_server.parsing import Detection, StreamParser, parse_output
from rexomni_server.tasks import TASKS, Geometry, Task

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
    alphabet=st.characters(blacklist_characters="<>", blacklist_categories=["Cs"]), min_size=1, max_size=12
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


# ---- the fast paths against a straightforward reference -----------------------------------
class ReferenceParser:
    """The phrase-group grammar written plainly: a regex lexer over a growing buffer and one
    state machine step per lexeme. The parser must agree with it on every chunking, skipped
    and truncated counts included (garbage text is counted per lexeme, so per chunk)."""

    SPECIAL = re.compile(r"<\|[a-z_]+\|>")
    COORD = re.compile(r"<(\d{1,4})>")
    PARTIAL = re.compile(r"<(\|[a-z_]*\|?|\d{0,4})\Z")

    def __init__(self, task: Task) -> None:
        self.eager = {Geometry.BOX: 4, Geometry.POINT: 2}.get(TASKS[task].geometry)
        self.buffer = ""
        self.state = "outside"
        self.phrase: list[str] = []
        self.label = ""
        self.coords: list[tuple[int, int]] = []  # (bin, ordinal)
        self.emitted = False
        self.ordinal = 0
        self.skipped = 0
        self.finished = False
        self.out: list[Detection] = []

    def lex(self, chunk: str) -> list[tuple[str, str]]:
        buf, pos, lexemes = self.buffer + chunk, 0, []
        while pos < len(buf):
            if buf[pos] != "<":
                end = buf.find("<", pos) % (len(buf) + 1)  # -1 (no "<" left): the end
                lexemes.append(("text", buf[pos:end]))
                pos = end
            elif m := self.SPECIAL.match(buf, pos) or self.COORD.match(buf, pos):
                lexemes.append(("special" if m.re is self.SPECIAL else "coord", m.group()))
                pos = m.end()
            elif self.PARTIAL.match(buf, pos):
                break
            else:
                lexemes.append(("text", "<"))
                pos += 1
        self.buffer = buf[pos:]
        return lexemes

    def feed(self, chunk: str) -> None:
        for kind, text in self.lex(chunk):
            self.step(kind, text)

    def step(self, kind: str, text: str) -> None:
        if kind == "coord":
            self.ordinal += 1
        if self.state == "done":
            return
        if kind == "special" and text == "<|im_end|>":
            if self.state == "coords":
                self.close()
            elif self.state != "outside":
                self.skipped += 1
            self.state, self.finished = "done", True
        elif self.state == "phrase" and kind == "special" and text == "<|object_ref_end|>":
            self.label, self.state = "".join(self.phrase).strip(), "after_phrase"
        elif self.state == "phrase" and kind != "special":
            self.phrase.append(text)
        elif self.state == "after_phrase" and kind == "special" and text == "<|box_start|>":
            self.state, self.coords, self.emitted = "coords", [], False
        elif self.state == "after_phrase" and kind == "text" and not text.strip():
            pass
        elif self.state == "coords" and kind == "coord":
            if self.emitted or int(text[1:-1]) > 999:
                self.skipped += 1
                return
            self.coords.append((int(text[1:-1]), self.ordinal - 1))
            if len(self.coords) == self.eager:
                self.emit()
        elif self.state == "coords" and kind == "text":
            for char in text:
                if char == ",":
                    self.close()
                elif not char.isspace():
                    self.skipped += 1
        elif self.state == "coords" and text == "<|box_end|>":
            self.close()
            self.state = "outside"
        else:
            if self.state == "coords":
                self.close()
            if self.state != "outside":  # the group broke off: read this lexeme from outside
                self.skipped += 1
                self.state = "outside"
            self.outside(kind, text)

    def outside(self, kind: str, text: str) -> None:
        if kind == "special" and text == "<|object_ref_start|>":
            self.state, self.phrase = "phrase", []
        elif kind == "special" and text == "<|box_start|>":
            self.label, self.state, self.coords, self.emitted = "", "coords", [], False
        elif kind != "text" or text.replace(",", "").strip():
            self.skipped += 1

    def close(self) -> None:
        n = len(self.coords)
        if not self.emitted and n:
            if n in (2, 4) or (n >= 6 and n % 2 == 0):
                self.emit()
            else:
                self.skipped += 1
        self.coords, self.emitted = [], False

    def emit(self) -> None:
        xy = [
            (from_bin(x, W), from_bin(y, H)) for (x, _), (y, _) in zip(self.coords[::2], self.coords[1::2], strict=True)
        ]
        ordinals = tuple(o for _, o in self.coords)
        if len(xy) == 1:
            self.out.append(Detection(self.label, Geometry.POINT, point=xy[0], coordinate_ordinals=ordinals))
        elif len(xy) == 2:
            box = (*xy[0], *xy[1])
            self.out.append(Detection(self.label, Geometry.BOX, box=box, coordinate_ordinals=ordinals))
        else:
            self.out.append(Detection(self.label, Geometry.POLYGON, polygon=tuple(xy), coordinate_ordinals=ordinals))
        self.emitted = True

    def finish(self) -> tuple[int, bool, bool]:
        cut = bool(self.buffer) and self.state != "done"
        truncated = cut or self.state in ("phrase", "after_phrase", "coords")
        return self.skipped, truncated, self.finished


# What a confused model writes: grammar tokens out of place, unknown and broken specials,
# out-of-range and over-long bins, non-ASCII digits, stray brackets and blank text.
GRAMMAR_TOKENS = st.sampled_from(["<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>"])
GARBAGE = st.sampled_from(
    [
        *("<|im_end|>", "<|other|>", "<||>", "<|Box|>", "<1000>", "<1234>", "<12345>", "<007>", "<٣>", "<²>"),
        *(", ", ",", " ", "\n", "cat", "<", "|", ">", "<|", "<|box", "_end|>", "1"),
    ]
)
COORD_TOKENS = coords.map(lambda b: f"<{b}>")


@st.composite
def garbled_outputs(draw: st.DrawFn) -> str:
    """Garbage pieces, alone or inserted anywhere into a well-formed output."""
    pieces = st.one_of(GRAMMAR_TOKENS, GARBAGE, COORD_TOKENS)
    if draw(st.booleans()):
        return "".join(draw(st.lists(pieces, max_size=60)))
    text = draw(phrase_outputs())
    for _ in range(draw(st.integers(1, 6))):
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(pieces) + text[at:]
    return text


@st.composite
def chunkings_or_tokens(draw: st.DrawFn, text: str) -> list[str]:
    if draw(st.booleans()):
        return split_like_tokens(text)  # what engines stream: the parser's fast path
    return draw(chunkings(text))


@settings(max_examples=200, deadline=None)
@given(data=st.data(), task=st.sampled_from([Task.DETECTION, Task.POINTING, Task.OCR_POLYGON]))
def test_parser_agrees_with_the_reference_on_any_output_and_chunking(data: st.DataObject, task: Task) -> None:
    text = data.draw(phrase_outputs() | garbled_outputs())
    chunks = data.draw(chunkings_or_tokens(text))
    reference = ReferenceParser(task)
    for chunk in chunks:
        reference.feed(chunk)
    detections, state = streamed(task, chunks)
    assert detections == reference.out
    assert state == reference.finish()


OFF_GRAMMAR = [
    "<|object_ref_start|>a<|object_ref_end|>\n<|box_start|><1><2><3><4><|box_end|>",
    "<|object_ref_start|>a<|object_ref_end|><5><|box_start|><1><2><3><4><|box_end|>",
    "<|object_ref_start|>a<|object_ref_end|>x, <|box_start|><1><2><3><4><|box_end|>",
    "<|object_ref_start|>a<|object_ref_end|>,<|other|><|box_start|><1><2><|box_end|>",
    "<|object_ref_start|>p<|object_ref_end|><|box_start|><1><2><3><4><5><6><7>, <1><2><3><4><5><6><|box_end|>",
    "<|box_start|><1><2><3><4><5>, <1><2><3>,, <9><8><|box_end|> <1><2><3><4>",
    "<|object_ref_start|>a<|object_ref_start|>b<|object_ref_end|><|box_start|><1><2><3><4>",
    "<|box_start|><1><2><3><4><|object_ref_start|>b<|object_ref_end|><|box_start|><5><6><7><8><|box_end|>",
    "<|box_start|><1000><12345><007><٣><²><2><3><4>x;\t<5><6><|box_end|>",
    "a<b<|im_end|>after<1>",
    "<|object_ref_start|>ca<|im_end|>",
    "<|object_ref_start|>a<||>b<|Box|><7><|object_ref_end|><|box_start|><1><2><3><4><|box_end|><|box_",
    "<|object_ref_start|>a<|object_ref_end|><|box_start|><1><2><3><4>, <5><6",
    " , \n<|box_end|><|object_ref_end|><|im_end|><|im_end|>",
    "<|object_ref_start|> traffic\tlight \n<|object_ref_end|> <|box_start|><1><2><|box_end|>",
]


@pytest.mark.parametrize("text", OFF_GRAMMAR)
@pytest.mark.parametrize("task", [Task.DETECTION, Task.POINTING, Task.OCR_POLYGON])
def test_parser_agrees_with_the_reference_off_the_grammar(text: str, task: Task) -> None:
    for chunks in ([text], split_like_tokens(text), list(text)):
        reference = ReferenceParser(task)
        for chunk in chunks:
            reference.feed(chunk)
        detections, state = streamed(task, chunks)
        assert detections == reference.out, chunks
        assert state == reference.finish(), chunks


def test_bins_become_the_same_pixels_as_from_bin() -> None:
    # The parser writes the bin -> pixel arithmetic out; every bin must land on the same float.
    pairs = [(x, x + 1) for x in range(0, 1000, 2)]
    quads = [(x, x + 1, x + 2, x + 3) for x in range(0, 1000, 4)]
    for width, height in ((W, H), (1919, 1081), (1, 7), (4096, 3)):
        expected_points = [(from_bin(x, width), from_bin(y, height)) for x, y in pairs]
        polygons, _ = parse_output(Task.OCR_POLYGON, group("all", tuple(range(1000))), width, height)
        assert polygons[0].polygon == tuple(expected_points)
        points, _ = parse_output(Task.POINTING, group("all", *pairs), width, height)
        assert [p.point for p in points] == expected_points
        boxes, _ = parse_output(Task.DETECTION, group("all", *quads), width, height)
        assert [b.box for b in boxes] == [
            (from_bin(x0, width), from_bin(y0, height), from_bin(x1, width), from_bin(y1, height))
            for x0, y0, x1, y1 in quads
        ]


def test_a_chunk_ending_inside_a_token_then_whole_tokens_again() -> None:
    parser = StreamParser(Task.DETECTION, W, H)
    pieces = ["<|object_ref_start|>", "dog", "<|object_ref_end|>", "<|box_st", "art|>", "<1", "2>", "<34>", "<5"]
    assert [d for piece in pieces for d in parser.feed(piece)] == []
    emitted = parser.feed("6><78>")  # completes the held token and carries a whole one
    assert [d.box for d in emitted] == [(*px(12, 34), *px(56, 78))]
    assert parser.feed(", ") == []
    assert [d.box for d in (parser.feed("<1>") + parser.feed("<2>") + parser.feed("<3>") + parser.feed("<4>"))] == [
        (*px(1, 2), *px(3, 4))
    ]
    assert parser.feed("<|box_end|>") == [] and parser.feed("<|im_") == []
    assert not parser.state.finished
    parser.feed("end|>")
    assert parser.finish() == [] and parser.state.finished and not parser.state.truncated


def test_output_cut_inside_a_special_token_is_truncated() -> None:
    parser = StreamParser(Task.DETECTION, W, H)
    for piece in split_like_tokens(group("cat", (1, 2, 3, 4))):
        parser.feed(piece)
    parser.feed("<|im_e")
    parser.finish()
    assert parser.state.truncated and not parser.state.finished and parser.state.skipped == 0


def test_coordinate_ordinals_count_every_coordinate_token_across_groups() -> None:
    text = (
        group("a", (1, 2), (3, 4, 5, 6))  # a 2-coordinate run is a point even in detection
        + ", "
        + "<|object_ref_start|>b<|object_ref_end|><|box_start|><7><1234><8><9><10><11>, <12><13><14><15><|box_end|>"
        + "<|im_end|>"
    )
    whole, state = parse_output(Task.DETECTION, text, W, H)
    assert [d.coordinate_ordinals for d in whole] == [(0, 1), (2, 3, 4, 5), (6, 8, 9, 10), (12, 13, 14, 15)]
    assert state.skipped == 2  # the out-of-range bin and the fifth coordinate of the box
    streamed_detections, _ = streamed(Task.DETECTION, split_like_tokens(text))
    assert streamed_detections == whole


def test_keypoint_ordinals_when_streamed_token_by_token() -> None:
    bad_instance = '"person9": {"bbox": " <1> <2> <3> ", "keypoints": {}}, '
    text = KEYPOINT_OUTPUT.replace('"person2"', bad_instance + '"person2"')
    whole, state = parse_output(Task.KEYPOINT, text, W, H)
    assert [d.coordinate_ordinals for d in whole] == [(0, 1, 2, 3, 4, 5), (9, 10, 11, 12, 13, 14)]
    assert state.skipped == 1
    token_by_token, token_state = streamed(Task.KEYPOINT, split_like_tokens(text))
    assert token_by_token == whole and token_state == (state.skipped, state.truncated, state.finished)
