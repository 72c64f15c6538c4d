"""Bookkeeping for one engine generation: parse its deltas, score each detection from its
coordinate tokens' log-probabilities, drop exact duplicates, and spot runaway repetition.

Score: the geometric mean of the probabilities of a detection's coordinate tokens,
``exp(mean(logprob))``, in [0, 1]. A box whose four coordinates the model was sure of scores
near 1; one it hesitated on scores lower. Engines that cannot report log-probabilities leave
``score`` null.

Runaway guard: Rex-Omni's known failure is writing the same box again and again until
max_tokens (tens of seconds wasted). An exact duplicate (same label, same coordinates) is never
useful, so it is dropped and counted; ``repetition_limit`` duplicates in a row mark the
generation as a runaway, and the service stops it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from rexomni_server.engines.base import EngineEvent
from rexomni_server.parsing import Detection, StreamParser
from rexomni_server.schemas import (
    BoxDetection,
    DetectionModel,
    KeypointsDetection,
    PointDetection,
    PolygonDetection,
)
from rexomni_server.tasks import Geometry, Task
from rexomni_server.vocabulary import FinishReason

DetectionKey = tuple[object, ...]


def to_schema(detection: Detection, score: float | None = None) -> DetectionModel:
    """Parser dataclass -> public pydantic model."""
    if detection.type is Geometry.BOX and detection.box is not None:
        return BoxDetection(label=detection.label, box=list(detection.box), score=score)
    if detection.type is Geometry.POINT and detection.point is not None:
        return PointDetection(label=detection.label, point=list(detection.point), score=score)
    if detection.type is Geometry.POLYGON and detection.polygon is not None:
        return PolygonDetection(label=detection.label, polygon=[list(p) for p in detection.polygon], score=score)
    if detection.type is Geometry.KEYPOINTS and detection.box is not None:
        keypoints = {k: (list(v) if v is not None else None) for k, v in (detection.keypoints or {}).items()}
        return KeypointsDetection(label=detection.label, box=list(detection.box), keypoints=keypoints, score=score)
    raise ValueError(f"incomplete detection {detection!r}")


def detection_key(d: Detection) -> DetectionKey:
    keypoints = tuple(sorted((d.keypoints or {}).items(), key=lambda kv: kv[0]))
    return (d.label, d.type, d.box, d.point, d.polygon, keypoints)


def score_of(ordinals: tuple[int, ...], coordinate_logprobs: list[float]) -> float | None:
    if not ordinals or ordinals[-1] >= len(coordinate_logprobs):
        return None
    mean = sum(coordinate_logprobs[i] for i in ordinals) / len(ordinals)
    return math.exp(mean)


@dataclass
class OutputTracker:
    task: Task
    width: int
    height: int
    repetition_limit: int | None  # None: never stop for repetition
    parser: StreamParser = field(init=False)
    coordinate_logprobs: list[float] = field(default_factory=list)
    detections: list[DetectionModel] = field(default_factory=list)
    raw: list[str] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    duplicates: int = 0
    finish_reason: FinishReason | None = None
    # True once ``repetition_limit`` duplicates came in a row: the service stops the generation.
    runaway: bool = False
    _seen: set[DetectionKey] = field(default_factory=set)
    _duplicate_run: int = 0

    def __post_init__(self) -> None:
        self.parser = StreamParser(self.task, self.width, self.height)

    def on_event(self, event: EngineEvent) -> Sequence[DetectionModel]:
        """Account for one engine event; returns the new (deduplicated, scored) detections.
        Called once per token or so: the common case (text, nothing complete) returns early."""
        if event.prompt_tokens is not None:
            self.prompt_tokens = event.prompt_tokens
        self.completion_tokens += event.tokens
        # Log-probabilities first: the text of this same event may complete a detection.
        if event.coordinate_logprobs:
            self.coordinate_logprobs.extend(event.coordinate_logprobs)
        if event.finish_reason is not None and self.finish_reason is None:
            self.finish_reason = event.finish_reason
        text = event.text
        if not text:
            return ()
        self.raw.append(text)
        parsed = self.parser.feed(text)
        return self._accept(parsed) if parsed else ()

    def finish(self) -> list[DetectionModel]:
        return self._accept(self.parser.finish())

    def _accept(self, parsed: list[Detection]) -> list[DetectionModel]:
        out = []
        for detection in parsed:
            key = detection_key(detection)
            if key in self._seen:
                self.duplicates += 1
                self._duplicate_run += 1
                self.runaway = self.repetition_limit is not None and self._duplicate_run >= self.repetition_limit
                continue
            self._seen.add(key)
            self._duplicate_run = 0
            model = to_schema(detection, score_of(detection.coordinate_ordinals, self.coordinate_logprobs))
            self.detections.append(model)
            out.append(model)
        return out

    @property
    def truncated(self) -> bool:
        """Cut off by the token budget (not stopped on purpose by the runaway guard)."""
        return self.finish_reason == "length" or (
            self.parser.state.truncated and self.finish_reason in (None, "stop", "length")
        )
