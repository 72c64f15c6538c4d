"""Incremental parser of Rex-Omni's raw output into detections.

Fed arbitrary chunks of the decoded text (a chunk may end inside ``<12`` or ``<|box_e``), it
emits every detection exactly once, as soon as it is complete, in pixel coordinates of the
original image. Garbage never raises: it is skipped and counted. Parsing a text in one piece
or in any chunking gives the same detections (property-tested).

Two grammars:
- phrase groups (every task but keypoint):
  ``<|object_ref_start|>PHRASE<|object_ref_end|><|box_start|>COORDS(, COORDS)*<|box_end|>``
  where COORDS of 2 tokens is a point, 4 a box, an even number >= 6 a polygon;
- keypoint JSON, possibly inside a json fence:
  ``{"person1": {"bbox": " <1> <2> <3> <4> ", "keypoints": {"nose": " <5> <6> ", ...}}}``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from rexomni_server.coords import bin_token, from_bin
from rexomni_server.tasks import TASKS, Geometry, Task
from rexomni_server.vocabulary import END_MARKER, MAX_BIN, NUM_BINS

OBJECT_REF_START = "<|object_ref_start|>"
OBJECT_REF_END = "<|object_ref_end|>"
BOX_START = "<|box_start|>"
BOX_END = "<|box_end|>"
UNVISIBLE = "unvisible"  # (sic) the model's marker of a hidden keypoint

Point = tuple[float, float]


@dataclass(frozen=True)
class Detection:
    """One parsed detection in original-image pixels.

    ``coordinate_ordinals`` are the positions (0-based, among all coordinate tokens of the
    output) of the tokens this detection was read from: engines use them to attach scores.
    """

    label: str
    type: Geometry
    box: tuple[float, float, float, float] | None = None
    point: Point | None = None
    polygon: tuple[Point, ...] | None = None
    keypoints: dict[str, Point | None] | None = None
    coordinate_ordinals: tuple[int, ...] = ()


@dataclass
class ParseState:
    """What a parser has concluded so far, beside the detections it emitted."""

    skipped: int = 0  # garbage pieces ignored
    truncated: bool = False  # the output ended inside a detection
    finished: bool = False  # the end marker (or the closing brace of keypoint JSON) was seen


MAX_BIN_DIGITS = 4  # longer digit runs between < > are never a coordinate bin
# One lexeme of the phrase-group grammar, by its group: a special token, a coordinate token
# (and its digits), or plain text (a run without "<", or a "<" that starts no token).
_LEXEME = re.compile(r"(<\|[a-z_]+\|>)|(<(\d{1,4})>)|([^<]+|<)")
# A buffer tail that may still grow into a special or coordinate token.
_PARTIAL = re.compile(r"<(\|[a-z_]*\|?|\d{0,4})\Z")
_COORD_ANYWHERE = re.compile(r"<(\d+)>")

# Engines stream one token per delta: these whole tokens skip the lexer's regular expressions.
_BIN_OF_TOKEN = {bin_token(b): b for b in range(NUM_BINS)}
_KNOWN_SPECIALS = frozenset((OBJECT_REF_START, OBJECT_REF_END, BOX_START, BOX_END, END_MARKER))

# States of the phrase-group grammar (plain ints: compared once per token).
_OUTSIDE, _PHRASE, _AFTER_PHRASE, _COORDS, _DONE = range(5)
# Coordinates after which a detection is complete without waiting for its group to close.
_EAGER_COORDINATES = {Geometry.BOX: 4, Geometry.POINT: 2}


class _PhraseGroupParser:
    """The phrase-group grammar: a lexer feeding a state machine, one handler per lexeme kind.

    The lexer holds back only a tail that may still grow into a token (``<12``, ``<|box_e``);
    when nothing is held and a chunk is exactly one token (the usual engine delta), it is
    dispatched without the regular expressions. Both routes yield the same lexemes, so the
    result does not depend on the chunking.
    """

    __slots__ = (
        "_coordinate_count",
        "_coords",
        "_eager",
        "_emitted_current",
        "_height",
        "_label",
        "_ordinals",
        "_pending",
        "_phrase",
        "_state",
        "_width",
        "result",
    )

    def __init__(self, geometry: Geometry, width: int, height: int) -> None:
        self._eager = _EAGER_COORDINATES.get(geometry, 0)  # 0: only when the group closes
        self._width = width
        self._height = height
        self._pending = ""  # the start of a token cut off by the end of the last chunk
        self._state = _OUTSIDE
        self._phrase: list[str] = []
        self._label = ""
        self._coords: list[int] = []
        self._ordinals: list[int] = []
        self._emitted_current = False
        self._coordinate_count = 0
        self.result = ParseState()

    # -- public -------------------------------------------------------------------------
    def feed(self, chunk: str) -> list[Detection]:
        out: list[Detection] = []
        if self._pending:
            self._lex(self._pending + chunk, out)
            return out
        value = _BIN_OF_TOKEN.get(chunk)
        if value is not None:
            self._coord(chunk, value, out)
        elif chunk in _KNOWN_SPECIALS:
            self._special(chunk, out)
        elif "<" not in chunk:
            if chunk:
                self._text(chunk, out)
        else:
            self._lex(chunk, out)
        return out

    def finish(self) -> list[Detection]:
        # The lexer only ever holds back the start of a token: the output stopped inside it.
        cut_inside_token = bool(self._pending) and self._state != _DONE
        if cut_inside_token or self._state in (_PHRASE, _AFTER_PHRASE, _COORDS):
            # Complete coordinates were already emitted; the partial one is dropped.
            self.result.truncated = True
        return []

    # -- lexer ------------------------------------------------------------------------------
    def _lex(self, text: str, out: list[Detection]) -> None:
        # A token has no "<" after its first character, so only the last "<" can start one
        # that the next chunk completes.
        last = text.rfind("<")
        if last != -1 and _PARTIAL.match(text, last):
            self._pending = text[last:]
            text = text[:last]
        else:
            self._pending = ""
        on_coord, on_special, on_text = self._coord, self._special, self._text
        for special, coord, digits, plain in _LEXEME.findall(text):
            if coord:
                on_coord(coord, int(digits), out)
            elif special:
                on_special(special, out)
            else:
                on_text(plain, out)

    # -- state machine: one handler per lexeme kind ---------------------------------------
    def _coord(self, token: str, value: int, out: list[Detection]) -> None:
        ordinal = self._coordinate_count
        self._coordinate_count = ordinal + 1
        state = self._state
        if state == _COORDS:
            if self._emitted_current or value > MAX_BIN:
                # More coordinates than this task's geometry has, or no bin at all.
                self.result.skipped += 1
                return
            coords = self._coords
            coords.append(value)
            self._ordinals.append(ordinal)
            if len(coords) == self._eager:
                out.append(self._build())
                self._emitted_current = True
        elif state == _PHRASE:
            self._phrase.append(token)
        elif state == _AFTER_PHRASE:
            self._break_group()
            self.result.skipped += 1  # and the coordinate itself is stray
        elif state == _OUTSIDE:
            self.result.skipped += 1

    def _special(self, token: str, out: list[Detection]) -> None:
        state = self._state
        if state == _DONE:
            return
        if token == END_MARKER:
            if state == _COORDS:
                self._close_coords(out)
            elif state != _OUTSIDE:
                self.result.skipped += 1
            self._state = _DONE
            self.result.finished = True
        elif state == _COORDS:
            self._close_coords(out)
            if token == BOX_END:
                self._state = _OUTSIDE
            else:  # another group started without closing this one
                self._break_group()
                self._special_outside(token)
        elif state == _OUTSIDE:
            self._special_outside(token)
        elif state == _PHRASE:
            if token == OBJECT_REF_END:
                self._label = "".join(self._phrase).strip()
                self._state = _AFTER_PHRASE
            else:
                self._break_group()
                self._special_outside(token)
        elif token == BOX_START:  # after the phrase
            self._start_coords()
        else:
            self._break_group()
            self._special_outside(token)

    def _text(self, text: str, out: list[Detection]) -> None:
        state = self._state
        if state == _COORDS:
            for char in text:
                if char == ",":
                    self._close_coords(out)
                elif not char.isspace():
                    self.result.skipped += 1
        elif state == _PHRASE:
            self._phrase.append(text)
        elif state == _OUTSIDE:
            self._text_outside(text)
        elif state == _AFTER_PHRASE and text.strip():
            self._break_group()
            self._text_outside(text)

    def _break_group(self) -> None:
        """The group went off the grammar: count it once, and read on from outside any group."""
        self.result.skipped += 1
        self._state = _OUTSIDE

    def _special_outside(self, token: str) -> None:
        if token == OBJECT_REF_START:
            self._phrase = []
            self._state = _PHRASE
        elif token == BOX_START:
            # Coordinates without a phrase: keep them, unlabelled.
            self._label = ""
            self._start_coords()
        else:
            self.result.skipped += 1

    def _text_outside(self, text: str) -> None:
        if text.replace(",", "").strip():  # anything but the ", " between groups
            self.result.skipped += 1

    def _start_coords(self) -> None:
        self._state = _COORDS
        self._coords = []
        self._ordinals = []
        self._emitted_current = False

    def _close_coords(self, out: list[Detection]) -> None:
        if not self._emitted_current and self._coords:
            n = len(self._coords)
            if n in (2, 4) or (n >= 6 and n % 2 == 0):
                out.append(self._build())
            else:
                self.result.skipped += 1
        self._coords = []
        self._ordinals = []
        self._emitted_current = False

    def _build(self) -> Detection:
        # Bin -> pixel is coords.from_bin's arithmetic written out (a test holds them equal):
        # here a call per coordinate would cost as much as the rest of a box.
        c, w, h = self._coords, self._width, self._height
        ordinals = tuple(self._ordinals)
        if len(c) == 4:
            box = (c[0] / MAX_BIN * w, c[1] / MAX_BIN * h, c[2] / MAX_BIN * w, c[3] / MAX_BIN * h)
            return Detection(self._label, Geometry.BOX, box, None, None, None, ordinals)
        if len(c) == 2:
            point = (c[0] / MAX_BIN * w, c[1] / MAX_BIN * h)
            return Detection(self._label, Geometry.POINT, None, point, None, None, ordinals)
        polygon = tuple((c[i] / MAX_BIN * w, c[i + 1] / MAX_BIN * h) for i in range(0, len(c), 2))
        return Detection(self._label, Geometry.POLYGON, None, None, polygon, None, ordinals)


@dataclass
class _JsonScan:
    """Resumable scan position of a brace/string-aware walk over keypoint JSON."""

    pos: int = 0
    depth: int = 0
    in_string: bool = False
    escape: bool = False
    string_start: int = 0
    last_key: str = ""
    object_start: int = 0
    started: bool = False
    stray: bool = False  # non-whitespace text outside the JSON (besides a fence)
    fence: list[str] = field(default_factory=list)


class _KeypointJsonParser:
    def __init__(self, width: int, height: int) -> None:
        self._width = width
        self._height = height
        self._buffer = ""
        self._scan = _JsonScan()
        # Coordinate tokens before ``_counted_to`` in the buffer: instances start at a "{", never
        # inside a token, so each instance counts only the text since the previous one.
        self._counted_to = 0
        self._coordinates_before = 0
        self.result = ParseState()

    def feed(self, chunk: str) -> list[Detection]:
        self._buffer += chunk
        return self._run()

    def finish(self) -> list[Detection]:
        out = self._run()
        scan = self._scan
        if scan.started and not self.result.finished:
            self.result.truncated = True
        prefix = self._buffer.split("{", 1)[0] if scan.started else self._buffer
        leftover = prefix.replace("```json", "").replace("```", "").replace(END_MARKER, "")
        if leftover.strip():
            self.result.skipped += 1
        return out

    def _run(self) -> list[Detection]:
        out: list[Detection] = []
        scan, buf = self._scan, self._buffer
        while scan.pos < len(buf) and not self.result.finished:
            i, char = scan.pos, buf[scan.pos]
            scan.pos += 1
            if scan.in_string:
                if scan.escape:
                    scan.escape = False
                elif char == "\\":
                    scan.escape = True
                elif char == '"':
                    scan.in_string = False
                    if scan.depth == 1:
                        scan.last_key = self._decode_string(buf[scan.string_start : i + 1])
                continue
            if not scan.started:
                if char == "{":
                    scan.started = True
                    scan.depth = 1
                continue
            if char == '"':
                scan.in_string = True
                scan.string_start = i
            elif char == "{":
                scan.depth += 1
                if scan.depth == 2:
                    scan.object_start = i
            elif char == "}":
                if scan.depth == 2:
                    detection = self._instance(scan.last_key, scan.object_start, i + 1)
                    if detection is not None:
                        out.append(detection)
                scan.depth -= 1
                if scan.depth == 0:
                    self.result.finished = True
        return out

    @staticmethod
    def _decode_string(literal: str) -> str:
        try:
            value = json.loads(literal)
        except json.JSONDecodeError:
            return literal.strip('"')
        return value if isinstance(value, str) else literal

    def _coords(self, text: object) -> list[int] | None:
        if not isinstance(text, str):
            return None
        digits = _COORD_ANYWHERE.findall(text)
        # A runaway digit string is garbage like any other (and int() refuses 4300+ digits).
        if any(len(d) > MAX_BIN_DIGITS for d in digits):
            return None
        values = [int(d) for d in digits]
        if any(v > MAX_BIN for v in values):
            return None
        return values

    def _ordinal_at(self, start: int) -> int:
        """How many coordinate tokens the output has before ``start``."""
        self._coordinates_before += len(_COORD_ANYWHERE.findall(self._buffer, self._counted_to, start))
        self._counted_to = start
        return self._coordinates_before

    def _instance(self, key: str, start: int, end: int) -> Detection | None:
        try:
            data = json.loads(self._buffer[start:end])
        except (json.JSONDecodeError, RecursionError):  # RecursionError: absurdly deep nesting
            self.result.skipped += 1
            return None
        box_bins = self._coords(data.get("bbox")) if isinstance(data, dict) else None
        if not isinstance(data, dict) or box_bins is None or len(box_bins) != 4:
            self.result.skipped += 1
            return None
        ordinal_base = self._ordinal_at(start)
        ordinals = list(range(ordinal_base, ordinal_base + 4))
        next_ordinal = ordinal_base + 4
        keypoints: dict[str, Point | None] = {}
        raw_keypoints = data.get("keypoints")
        if isinstance(raw_keypoints, dict):
            for name, value in raw_keypoints.items():
                bins = self._coords(value)
                if bins is not None and len(bins) == 2:
                    keypoints[str(name)] = (
                        from_bin(bins[0], self._width),
                        from_bin(bins[1], self._height),
                    )
                    ordinals += [next_ordinal, next_ordinal + 1]
                else:
                    keypoints[str(name)] = None
                    if value != UNVISIBLE:
                        self.result.skipped += 1
                if bins:
                    next_ordinal += len(bins)
        x0, y0, x1, y1 = box_bins
        label = re.sub(r"\d+$", "", key).strip() or key
        return Detection(
            label,
            Geometry.KEYPOINTS,
            box=(
                from_bin(x0, self._width),
                from_bin(y0, self._height),
                from_bin(x1, self._width),
                from_bin(y1, self._height),
            ),
            keypoints=keypoints,
            coordinate_ordinals=tuple(ordinals),
        )


class StreamParser:
    """Incremental parser for one request's output: ``feed`` deltas, then ``finish`` once."""

    def __init__(self, task: Task, width: int, height: int) -> None:
        if width <= 0 or height <= 0:
            raise ValueError("image size must be positive")
        geometry = TASKS[task].geometry
        self._impl: _PhraseGroupParser | _KeypointJsonParser
        if geometry is Geometry.KEYPOINTS:
            self._impl = _KeypointJsonParser(width, height)
        else:
            self._impl = _PhraseGroupParser(geometry, width, height)
        self._finished = False
        # ``feed`` is the implementation's own method (called once per token: no wrapper
        # frame) until ``finish``, which makes it refuse.
        self.feed: Callable[[str], list[Detection]] = self._impl.feed

    def finish(self) -> list[Detection]:
        """Flush what is left; call once when the output ended."""
        if self._finished:
            return []
        self._finished = True
        self.feed = _refuse_feed
        return self._impl.finish()

    @property
    def state(self) -> ParseState:
        return self._impl.result


def _refuse_feed(chunk: str) -> list[Detection]:
    raise RuntimeError("feed() after finish()")


def parse_output(task: Task, text: str, width: int, height: int) -> tuple[list[Detection], ParseState]:
    """Parse a whole output at once: the parser that streams, so the same result as any chunking."""
    parser = StreamParser(task, width, height)
    detections = parser.feed(text) + parser.finish()
    return detections, parser.state
