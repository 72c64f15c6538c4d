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
from dataclasses import dataclass, field
from enum import Enum, auto

from rexomni_server.coords import MAX_BIN, from_bin
from rexomni_server.tasks import TASKS, Geometry, Task

OBJECT_REF_START = "<|object_ref_start|>"
OBJECT_REF_END = "<|object_ref_end|>"
BOX_START = "<|box_start|>"
BOX_END = "<|box_end|>"
IM_END = "<|im_end|>"
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
_SPECIAL = re.compile(r"<\|[a-z_]+\|>")
_COORD = re.compile(r"<(\d{1,4})>")
# A buffer tail that may still grow into a special or coordinate token.
_PARTIAL = re.compile(r"<(\|[a-z_]*\|?|\d{0,4})\Z")
_COORD_ANYWHERE = re.compile(r"<(\d+)>")


class _Kind(Enum):
    TEXT = auto()
    SPECIAL = auto()
    COORD = auto()


@dataclass(frozen=True)
class _Lexeme:
    kind: _Kind
    text: str
    value: int = -1


class _Lexer:
    """Splits streamed text into special tokens, coordinate tokens and plain text."""

    def __init__(self) -> None:
        self._buffer = ""

    def feed(self, chunk: str) -> list[_Lexeme]:
        self._buffer += chunk
        buf = self._buffer
        out: list[_Lexeme] = []
        pos = 0
        while pos < len(buf):
            lt = buf.find("<", pos)
            if lt == -1:
                out.append(_Lexeme(_Kind.TEXT, buf[pos:]))
                pos = len(buf)
                break
            if lt > pos:
                out.append(_Lexeme(_Kind.TEXT, buf[pos:lt]))
                pos = lt
            special = _SPECIAL.match(buf, pos)
            if special:
                out.append(_Lexeme(_Kind.SPECIAL, special.group()))
                pos = special.end()
                continue
            coord = _COORD.match(buf, pos)
            if coord:
                out.append(_Lexeme(_Kind.COORD, coord.group(), int(coord.group(1))))
                pos = coord.end()
                continue
            if _PARTIAL.match(buf, pos):
                break  # wait for the rest of this token
            out.append(_Lexeme(_Kind.TEXT, "<"))
            pos += 1
        self._buffer = buf[pos:]
        return out

    @property
    def pending(self) -> str:
        return self._buffer


class _GroupState(Enum):
    OUTSIDE = auto()
    PHRASE = auto()
    AFTER_PHRASE = auto()
    COORDS = auto()
    DONE = auto()


class _PhraseGroupParser:
    def __init__(self, geometry: Geometry, width: int, height: int) -> None:
        self._eager = {Geometry.BOX: 4, Geometry.POINT: 2}.get(geometry)
        self._width = width
        self._height = height
        self._lexer = _Lexer()
        self._state = _GroupState.OUTSIDE
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
        for lexeme in self._lexer.feed(chunk):
            self._step(lexeme, out)
        return out

    def finish(self) -> list[Detection]:
        # The lexer only ever holds back the start of a token: the output stopped inside it.
        cut_inside_token = bool(self._lexer.pending) and self._state is not _GroupState.DONE
        in_group = self._state in (_GroupState.PHRASE, _GroupState.AFTER_PHRASE, _GroupState.COORDS)
        if cut_inside_token or in_group:
            # Complete coordinates were already emitted; the partial one is dropped.
            self.result.truncated = True
        return []

    # -- state machine --------------------------------------------------------------------
    def _step(self, lx: _Lexeme, out: list[Detection]) -> None:
        ordinal = -1
        if lx.kind is _Kind.COORD:
            ordinal = self._coordinate_count
            self._coordinate_count += 1
        state = self._state
        if state is _GroupState.DONE:
            return
        if lx.kind is _Kind.SPECIAL and lx.text == IM_END:
            if state is _GroupState.COORDS:
                self._close_coords(out)
            elif state is not _GroupState.OUTSIDE:
                self.result.skipped += 1
            self._state = _GroupState.DONE
            self.result.finished = True
            return
        if state is _GroupState.OUTSIDE:
            self._outside(lx)
        elif state is _GroupState.PHRASE:
            if lx.kind is _Kind.SPECIAL and lx.text == OBJECT_REF_END:
                self._label = "".join(self._phrase).strip()
                self._state = _GroupState.AFTER_PHRASE
            elif lx.kind is _Kind.SPECIAL:
                self.result.skipped += 1
                self._state = _GroupState.OUTSIDE
                self._outside(lx)
            else:
                self._phrase.append(lx.text)
        elif state is _GroupState.AFTER_PHRASE:
            if lx.kind is _Kind.SPECIAL and lx.text == BOX_START:
                self._start_coords()
            elif lx.kind is _Kind.TEXT and not lx.text.strip():
                pass
            else:
                self.result.skipped += 1
                self._state = _GroupState.OUTSIDE
                self._outside(lx)
        elif state is _GroupState.COORDS:
            if lx.kind is _Kind.COORD:
                self._add_coord(lx.value, ordinal, out)
            elif lx.kind is _Kind.TEXT:
                for char in lx.text:
                    if char == ",":
                        self._close_coords(out)
                    elif not char.isspace():
                        self.result.skipped += 1
            elif lx.text == BOX_END:
                self._close_coords(out)
                self._state = _GroupState.OUTSIDE
            else:  # another group started without closing this one
                self._close_coords(out)
                self.result.skipped += 1
                self._state = _GroupState.OUTSIDE
                self._outside(lx)

    def _outside(self, lx: _Lexeme) -> None:
        if lx.kind is _Kind.SPECIAL and lx.text == OBJECT_REF_START:
            self._phrase = []
            self._state = _GroupState.PHRASE
        elif lx.kind is _Kind.SPECIAL and lx.text == BOX_START:
            # Coordinates without a phrase: keep them, unlabelled.
            self._label = ""
            self._start_coords()
        elif lx.kind is _Kind.TEXT and not lx.text.replace(",", "").strip():
            pass  # the ", " between groups
        else:
            self.result.skipped += 1

    def _start_coords(self) -> None:
        self._state = _GroupState.COORDS
        self._coords = []
        self._ordinals = []
        self._emitted_current = False

    def _add_coord(self, value: int, ordinal: int, out: list[Detection]) -> None:
        if self._emitted_current:
            self.result.skipped += 1  # more coordinates than this task's geometry has
            return
        if value > MAX_BIN:
            self.result.skipped += 1
            return
        self._coords.append(value)
        self._ordinals.append(ordinal)
        if self._eager is not None and len(self._coords) == self._eager:
            out.append(self._build())
            self._emitted_current = True

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
        xy = [
            (from_bin(self._coords[i], self._width), from_bin(self._coords[i + 1], self._height))
            for i in range(0, len(self._coords), 2)
        ]
        ordinals = tuple(self._ordinals)
        if len(xy) == 1:
            return Detection(self._label, Geometry.POINT, point=xy[0], coordinate_ordinals=ordinals)
        if len(xy) == 2:
            (x0, y0), (x1, y1) = xy
            return Detection(self._label, Geometry.BOX, box=(x0, y0, x1, y1), coordinate_ordinals=ordinals)
        return Detection(self._label, Geometry.POLYGON, polygon=tuple(xy), coordinate_ordinals=ordinals)


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
        leftover = prefix.replace("```json", "").replace("```", "").replace(IM_END, "")
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
        ordinal_base = len(_COORD_ANYWHERE.findall(self._buffer, 0, start))
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

    def feed(self, chunk: str) -> list[Detection]:
        if self._finished:
            raise RuntimeError("feed() after finish()")
        return self._impl.feed(chunk)

    def finish(self) -> list[Detection]:
        """Flush what is left; call once when the output ended."""
        if self._finished:
            return []
        self._finished = True
        return self._impl.finish()

    @property
    def state(self) -> ParseState:
        return self._impl.result


def parse_output(task: Task, text: str, width: int, height: int) -> tuple[list[Detection], ParseState]:
    """Parse a whole output at once (the same code path as streaming)."""
    parser = StreamParser(task, width, height)
    detections = parser.feed(text) + parser.finish()
    return detections, parser.state
