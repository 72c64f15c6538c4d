"""Runs an evaluation dataset through a server, concurrently, and scores every image.

The server does the batching; the runner keeps ``concurrency`` requests in flight so a vLLM
deployment is evaluated at its real throughput. A request the server refuses (4xx/5xx), that
times out or whose connection drops is recorded as a failed image and left out of the scores
(the report says how many); a server that cannot be reached at all stops the run.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
from pydantic import ValidationError

from rexomni_client.bulk import IMAGE_ERRORS, UNREACHABLE_ERRORS, fails_one_image
from rexomni_client.evaluation.dataset import DatasetError, EvalSample
from rexomni_client.evaluation.scoring import (
    XYXY,
    Prediction,
    SampleScore,
    Summary,
    Truth,
    normalize_label,
    score_boxes,
    score_gui,
    score_keypoints,
    score_points,
    summarize,
)
from rexomni_client.http import DETECTION_ADAPTER
from rexomni_server.schemas import (
    BoxDetection,
    DetectionModel,
    DetectResult,
    KeypointsDetection,
    PointDetection,
    validation_summary,
)
from rexomni_server.tasks import TASKS, Geometry, Task

# Tasks whose answers can be scored against boxes or regions.
EVALUATED_TASKS: dict[Task, Geometry] = {
    task: TASKS[task].geometry
    for task in (
        Task.DETECTION,
        Task.POINTING,
        Task.VISUAL_PROMPTING,
        Task.KEYPOINT,
        Task.GUI_GROUNDING,
        Task.GUI_POINTING,
    )
}


# Scored by a hit in the target element (score_gui), not by matching objects.
GUI_TASKS = frozenset({Task.GUI_GROUNDING, Task.GUI_POINTING})


@dataclass(frozen=True)
class Query:
    """One request of an image's evaluation: its categories, or (visual prompting) one
    category's reference boxes, whose answers then count for that category."""

    categories: tuple[str, ...]
    visual_prompt_boxes: tuple[XYXY, ...] | None = None
    label: str | None = None


def queries_for(task: Task, sample: EvalSample) -> list[Query]:
    if task is Task.VISUAL_PROMPTING:
        return [Query((), boxes, category) for category, boxes in sample.visual_prompts]
    return [Query(sample.categories)]


Detect = Callable[[Task, Query, bytes], Awaitable[DetectResult]]
OnRecord = Callable[[dict[str, Any]], None]


class ServerUnreachable(RuntimeError):
    """The evaluation stopped: the server could not be reached."""


@dataclass
class EvalRun:
    task: Task
    summary: Summary
    samples: int
    failed: dict[str, str] = field(default_factory=dict)  # sample id -> error
    detections: int = 0
    # Images whose answer hit max_new_tokens: their recall is a floor, not a measurement.
    length_limited: int = 0
    elapsed_s: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    by_category: dict[str, Summary] = field(default_factory=dict)
    resumed: int = 0  # images scored from an earlier run's predictions, not asked again


def check_task(task: str, samples: Sequence[EvalSample]) -> Task:
    try:
        parsed = Task(task)
    except ValueError:
        parsed = None
    if parsed not in EVALUATED_TASKS:
        raise DatasetError(f"task {task!r} cannot be scored; choose one of {', '.join(EVALUATED_TASKS)}")
    assert parsed is not None
    if parsed is Task.VISUAL_PROMPTING:
        unprompted = next((s for s in samples if not s.visual_prompts), None)
        if unprompted is not None:
            raise DatasetError(f"sample {unprompted.sample_id} has no visual_prompt boxes to ask with")
    if parsed is Task.KEYPOINT:
        bare = next((s for s in samples if not all(t.keypoints is not None for t in s.truths)), None)
        if bare is not None:
            raise DatasetError(f"sample {bare.sample_id} has objects without keypoints to compare with")
    if EVALUATED_TASKS[parsed] is Geometry.BOX and parsed not in GUI_TASKS:
        unboxed = next((s for s in samples if not s.boxed), None)
        if unboxed is not None:
            raise DatasetError(
                f"sample {unboxed.sample_id} has masks or polygons, not boxes: score it with a point task"
            )
    return parsed


def predictions_of(detections: Sequence[DetectionModel], label: str | None = None) -> list[Prediction]:
    """The scorable detections; ``label`` replaces the model's own (visual prompting)."""
    predictions = []
    for det in detections:
        name = label if label is not None else det.label
        if isinstance(det, KeypointsDetection):
            keypoints = {k: (tuple(v) if v is not None else None) for k, v in det.keypoints.items()}
            predictions.append(Prediction(name, box=tuple(det.box), keypoints=keypoints))  # type: ignore[arg-type]
        elif isinstance(det, BoxDetection):
            predictions.append(Prediction(name, box=tuple(det.box)))  # type: ignore[arg-type]
        elif isinstance(det, PointDetection):
            predictions.append(Prediction(name, point=tuple(det.point)))  # type: ignore[arg-type]
    return predictions


@dataclass(frozen=True)
class SavedAnswer:
    """An image's answer from an earlier run's predictions file (labels as credited)."""

    detections: list[DetectionModel]
    finish_reason: str


def saved_answers(text: str) -> dict[str, SavedAnswer]:
    """The answered images of a predictions file (``--predictions``); images that failed are
    left out so they are asked again. The last line of an image wins. Every record ends with a
    newline, so text after the last newline is a record cut short by a killed run: ignored
    (that image is asked again, and --resume drops it from the file before appending)."""
    complete = text[: text.rfind("\n") + 1]
    saved: dict[str, SavedAnswer] = {}
    for lineno, line in enumerate(complete.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if "detections" in record:
                detections = [DETECTION_ADAPTER.validate_python(d) for d in record["detections"]]
                saved[str(record["id"])] = SavedAnswer(detections, str(record.get("finish_reason", "stop")))
        except (ValueError, KeyError, TypeError) as exc:
            raise DatasetError(f"predictions line {lineno} cannot be read: {exc}") from None
    return saved


def score_predictions(
    task: Task, truths: Sequence[Truth], predictions: Sequence[Prediction], single_phrase: bool
) -> SampleScore:
    geometry = EVALUATED_TASKS[task]
    if task in GUI_TASKS:
        return score_gui(truths, predictions)
    if geometry is Geometry.KEYPOINTS:
        return score_keypoints(truths, predictions, single_phrase=single_phrase)
    if geometry is Geometry.BOX:
        return score_boxes(truths, predictions, single_phrase=single_phrase)
    return score_points(truths, predictions, single_phrase=single_phrase)


def per_category(
    task: Task, samples: Sequence[EvalSample], predictions: Mapping[str, Sequence[Prediction]]
) -> dict[str, Summary]:
    """The same metric restricted to one asked category at a time, over the images that asked
    for it (predictions labelled with no asked category count for none)."""
    grouped: dict[str, list[SampleScore]] = {}
    for sample in samples:
        answered = predictions.get(sample.sample_id)
        if answered is None:
            continue
        for category in sample.categories:
            key = normalize_label(category)
            truths = [t for t in sample.truths if normalize_label(t.category) == key]
            mine = answered if sample.single_phrase else [p for p in answered if normalize_label(p.label) == key]
            grouped.setdefault(category, []).append(score_predictions(task, truths, mine, True))
    return {category: summarize(scores) for category, scores in grouped.items()}


async def evaluate(
    samples: Sequence[EvalSample],
    detect: Detect,
    task: str,
    *,
    concurrency: int = 8,
    on_record: OnRecord | None = None,
    saved: Mapping[str, SavedAnswer] | None = None,
) -> EvalRun:
    """Scores every sample: from ``saved`` answers where there is one (a resumed run), else
    from the server (``detect``), ``concurrency`` images at a time."""
    parsed = check_task(task, samples)
    limit = asyncio.Semaphore(max(1, concurrency))
    scores: dict[str, SampleScore] = {}
    answers: dict[str, list[Prediction]] = {}
    run = EvalRun(parsed, summarize([]), len(samples))

    def account(sample: EvalSample, predictions: list[Prediction], finish_reasons: Sequence[str]) -> SampleScore:
        answers[sample.sample_id] = predictions
        score = scores[sample.sample_id] = score_predictions(parsed, sample.truths, predictions, sample.single_phrase)
        run.detections += len(predictions)
        run.length_limited += "length" in finish_reasons
        return score

    async def ask(sample: EvalSample) -> None:
        async with limit:
            record: dict[str, Any] = {"id": sample.sample_id, "image": str(sample.image)}
            start = time.perf_counter()
            try:
                image = await asyncio.to_thread(sample.image.read_bytes)
                queries = queries_for(parsed, sample)
                results = [await detect(parsed, query, image) for query in queries]
            except (*IMAGE_ERRORS, ValidationError) as exc:
                # ValidationError: the sample makes a request the schema refuses (no category...).
                if not (isinstance(exc, ValidationError) or fails_one_image(exc)):
                    raise  # no server there: stops the run (below)
                run.failed[sample.sample_id] = record["error"] = _describe(exc)
            else:
                latency = (time.perf_counter() - start) * 1000
                answered = list(zip(queries, results, strict=True))
                reasons = [result.finish_reason for result in results]
                predictions = [p for query, result in answered for p in predictions_of(result.detections, query.label)]
                score = account(sample, predictions, reasons)
                run.latencies_ms.append(latency)
                record.update(
                    latency_ms=round(latency, 1),
                    finish_reason="length" if "length" in reasons else reasons[-1],
                    truths=score.truths,
                    matches=dict(score.matches),
                    detections=[
                        {**d.model_dump(mode="json"), **({"label": query.label} if query.label else {})}
                        for query, result in answered
                        for d in result.detections
                    ],
                )
            if on_record is not None:
                on_record(record)

    async def one(sample: EvalSample) -> None:
        answer = (saved or {}).get(sample.sample_id)
        if answer is None:
            await ask(sample)
            return
        account(sample, predictions_of(answer.detections), [answer.finish_reason])
        run.resumed += 1

    start = time.perf_counter()
    try:
        async with asyncio.TaskGroup() as group:
            for sample in samples:
                group.create_task(one(sample))
    except BaseExceptionGroup as errors:
        # No server to talk to: stop at once rather than fail every image the same way.
        unreachable, other = errors.split(UNREACHABLE_ERRORS)
        if unreachable is None or other is not None:
            raise
        raise ServerUnreachable(str(unreachable.exceptions[0])) from None
    run.elapsed_s = time.perf_counter() - start
    # Summarised in dataset order so the numbers do not depend on completion order.
    run.summary = summarize([scores[s.sample_id] for s in samples if s.sample_id in scores])
    run.by_category = per_category(parsed, samples, answers)
    return run


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ValidationError):
        return validation_summary(exc.errors())
    if isinstance(exc, FileNotFoundError):
        return f"image not found: {exc.filename}"
    if isinstance(exc, httpx.TimeoutException):
        return "request timed out"
    return str(exc) or type(exc).__name__
