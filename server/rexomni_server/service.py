"""DetectionService: the one place that knows the order of a request's steps.

validate options -> decode + resize image (worker thread) -> build prompt -> engine stream ->
incremental parse -> typed events. Unary results are collected from the same stream, so both
paths return identical detections. Transports only translate wire formats and map errors.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from rexomni_server.engines.base import Engine, EngineEvent, EngineRequest, FinishReason, SamplingConfig
from rexomni_server.errors import EngineNotReady, InvalidRequest, Overloaded, RequestTimeout, RexOmniError
from rexomni_server.images import ImageLimits, load_and_prepare
from rexomni_server.metrics import Metrics
from rexomni_server.parsing import Detection, StreamParser
from rexomni_server.prompts import build_task_text
from rexomni_server.schemas import (
    BoxDetection,
    DetectionModel,
    DetectParams,
    DetectResult,
    ImageInfo,
    KeypointsDetection,
    PointDetection,
    PolygonDetection,
    Timings,
    Usage,
)
from rexomni_server.settings import Settings
from rexomni_server.tasks import Geometry

log = logging.getLogger("rexomni.requests")


@dataclass(frozen=True)
class AcceptedEvent:
    """The request passed validation and its image was decoded; generation is next.

    Transports use it to commit to a streaming response: errors before it are plain 4xx."""

    request_id: str
    image: ImageInfo


@dataclass(frozen=True)
class DetectionEvent:
    index: int
    detection: DetectionModel
    elapsed_ms: float


@dataclass(frozen=True)
class DoneEvent:
    result: DetectResult


ServiceEvent = AcceptedEvent | DetectionEvent | DoneEvent


@dataclass
class _Run:
    """One admitted request on its way through the engine."""

    engine_request: EngineRequest
    params: DetectParams
    image: ImageInfo
    arrived: float
    deadline: float
    timeout_s: float
    queued: list[bool]  # [True] until generation starts; shared with stream() for the gauge
    transport: str


def to_schema(detection: Detection, score: float | None = None) -> DetectionModel:
    """Parser dataclass -> public pydantic model."""
    if detection.type is Geometry.BOX and detection.box is not None:
        return BoxDetection(label=detection.label, box=list(detection.box), score=score)
    if detection.type is Geometry.POINT and detection.point is not None:
        return PointDetection(label=detection.label, point=list(detection.point), score=score)
    if detection.type is Geometry.POLYGON and detection.polygon is not None:
        return PolygonDetection(
            label=detection.label, polygon=[list(p) for p in detection.polygon], score=score
        )
    if detection.type is Geometry.KEYPOINTS and detection.box is not None:
        keypoints = {k: (list(v) if v is not None else None) for k, v in (detection.keypoints or {}).items()}
        return KeypointsDetection(
            label=detection.label, box=list(detection.box), keypoints=keypoints, score=score
        )
    raise ValueError(f"incomplete detection {detection!r}")


def new_request_id() -> str:
    return uuid.uuid4().hex


class DetectionService:
    def __init__(
        self, settings: Settings, engine: Engine, model_label: str, metrics: Metrics | None = None
    ) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.engine = engine
        self.model_label = model_label
        self._limits = ImageLimits(
            max_bytes=settings.max_image_bytes,
            max_side=settings.max_image_side,
            max_pixels=settings.max_decoded_pixels,
        )
        self.in_flight = 0

    # -- option resolution ------------------------------------------------------------------
    def _sampling(self, params: DetectParams) -> SamplingConfig:
        s = self.settings
        max_new = params.options.max_new_tokens or s.max_new_tokens
        if max_new > s.max_new_tokens_limit:
            raise InvalidRequest(f"options.max_new_tokens may be at most {s.max_new_tokens_limit}")
        return SamplingConfig(
            max_new_tokens=max_new,
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k,
            repetition_penalty=s.repetition_penalty,
        )

    def _pixel_bounds(self, params: DetectParams) -> tuple[int, int]:
        s = self.settings
        min_pixels = params.options.min_pixels or s.min_pixels
        max_pixels = params.options.max_pixels or s.max_pixels
        if max_pixels > s.max_pixels_limit:
            raise InvalidRequest(f"options.max_pixels may be at most {s.max_pixels_limit}")
        if min_pixels > max_pixels:
            raise InvalidRequest("options.min_pixels must not exceed max_pixels")
        return min_pixels, max_pixels

    def _check_forced(self, params: DetectParams) -> None:
        if params.options.forced_output is not None and not self.settings.allow_forced_output:
            raise InvalidRequest(
                "options.forced_output is a testing facility and is disabled on this server "
                "(start it with --allow-forced-output)"
            )

    # -- the pipeline -----------------------------------------------------------------------
    def record_rejected(self, request_id: str, task: str, transport: str, status: str) -> None:
        """Log and count a request a transport refused before it reached the service."""
        self.metrics.requests.labels(task, transport, status).inc()
        self._log(request_id, transport, task, status, {}, 0.0)

    @staticmethod
    def _log(
        request_id: str, transport: str, task: str, status: str, summary: dict[str, object], total_ms: float
    ) -> None:
        fields = {"request_id": request_id, "transport": transport, "task": task, "status": status}
        log.info("request", extra={"fields": {**fields, **summary, "total_ms": round(total_ms, 2)}})

    async def stream(
        self,
        params: DetectParams,
        image_bytes: bytes,
        *,
        request_id: str | None = None,
        transport: str = "python",
        timeout_s: float | None = None,
    ) -> AsyncIterator[ServiceEvent]:
        """Typed events: AcceptedEvent, one DetectionEvent per detection as soon as it is
        decoded, then DoneEvent. ``timeout_s`` (e.g. a gRPC deadline) tightens the server's."""
        request_id = request_id or new_request_id()
        arrived = time.perf_counter()
        task = params.task.value
        summary: dict[str, object] = {}
        if self.in_flight >= self.settings.max_queue:
            self.record_rejected(request_id, task, transport, Overloaded.code)
            error = Overloaded(
                f"server is at its limit of {self.settings.max_queue} requests", retry_after_s=1.0
            )
            error.accounted = True
            raise error
        self.in_flight += 1
        self.metrics.in_flight.inc()
        self.metrics.queue_depth.inc()
        queued = [True]  # cleared when generation starts (shared with _run)
        status = "error"
        try:
            if not self.engine.ready:
                raise EngineNotReady("the model is still loading", retry_after_s=5.0)
            sampling = self._sampling(params)
            min_pixels, max_pixels = self._pixel_bounds(params)
            self._check_forced(params)
            image = await asyncio.to_thread(
                load_and_prepare, image_bytes, self._limits, min_pixels, max_pixels
            )
            task_text = build_task_text(
                params.task,
                params.categories,
                keypoint_type=params.keypoint_type,
                visual_prompt_boxes=params.visual_prompt_boxes,
                image_size=(image.width, image.height),
            )
            engine_request = EngineRequest(
                request_id=request_id,
                task_text=task_text,
                image=image.resized,
                sampling=sampling,
                forced_output=params.options.forced_output,
            )
            info = ImageInfo(
                width=image.width,
                height=image.height,
                resized_width=image.resized_size[0],
                resized_height=image.resized_size[1],
            )
            self.metrics.image_pixels.observe(info.resized_width * info.resized_height)
            yield AcceptedEvent(request_id, info)
            timeout = min(self.settings.request_timeout_s, timeout_s or self.settings.request_timeout_s)
            run = _Run(engine_request, params, info, arrived, arrived + timeout, timeout, queued, transport)
            async for event in self._run(run, summary):
                yield event
            status = "ok"
        except (asyncio.CancelledError, GeneratorExit):
            status = "cancelled"
            raise
        except RexOmniError as exc:
            status = exc.code
            exc.accounted = True
            raise
        except Exception:
            status = "internal"
            raise
        finally:
            if queued[0]:
                self.metrics.queue_depth.dec()
            self.in_flight -= 1
            self.metrics.in_flight.dec()
            elapsed = time.perf_counter() - arrived
            self.metrics.requests.labels(task, transport, status).inc()
            self.metrics.latency.labels(task, transport).observe(elapsed)
            self._log(request_id, transport, task, status, summary, elapsed * 1000)

    async def _run(self, run: _Run, summary: dict[str, object]) -> AsyncIterator[ServiceEvent]:
        params, task, m = run.params, run.params.task.value, self.metrics
        parser = StreamParser(params.task, run.image.width, run.image.height)
        started_at: float | None = None
        first_detection_at: float | None = None
        prompt_tokens = completion_tokens = 0
        finish_reason: FinishReason = "stop"
        raw: list[str] = []
        detections: list[DetectionModel] = []

        def emit(parsed: list[Detection]) -> list[DetectionEvent]:
            nonlocal first_detection_at
            events = []
            now = time.perf_counter()
            for detection in parsed:
                if first_detection_at is None:
                    first_detection_at = now
                    m.first_detection.labels(task, run.transport).observe(now - run.arrived)
                model = to_schema(detection)
                events.append(DetectionEvent(len(detections), model, (now - run.arrived) * 1000))
                detections.append(model)
            return events

        stream = self.engine.stream(run.engine_request)
        try:
            while True:
                remaining = run.deadline - time.perf_counter()
                if remaining <= 0:
                    raise RequestTimeout(f"request exceeded {run.timeout_s:g} s")
                try:
                    event: EngineEvent = await asyncio.wait_for(anext(stream), remaining)
                except StopAsyncIteration:
                    break
                except TimeoutError as exc:
                    raise RequestTimeout(f"request exceeded {run.timeout_s:g} s") from exc
                if event.started:
                    started_at = time.perf_counter()
                    prompt_tokens = event.prompt_tokens or 0
                    run.queued[0] = False
                    m.queue_depth.dec()
                    m.queue_wait.labels(task).observe(started_at - run.arrived)
                completion_tokens += event.tokens
                if event.text:
                    raw.append(event.text)
                    for out in emit(parser.feed(event.text)):
                        yield out
                if event.finish_reason is not None:
                    finish_reason = event.finish_reason
        finally:
            await stream.aclose()  # type: ignore[attr-defined]
            m.generated_tokens.labels(task).inc(completion_tokens)
            m.prompt_tokens.labels(task).inc(prompt_tokens)
            summary.update(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)
        for out in emit(parser.finish()):
            yield out
        state = parser.state
        truncated = state.truncated or finish_reason == "length"
        m.detections.labels(task).observe(len(detections))
        m.parse_skipped.labels(task).inc(state.skipped)
        if truncated:
            m.truncated.labels(task).inc()
        finished = time.perf_counter()
        result = DetectResult(
            request_id=run.engine_request.request_id,
            model=self.model_label,
            task=params.task,
            detections=detections,
            image=run.image,
            truncated=truncated,
            finish_reason=finish_reason,
            skipped=state.skipped,
            usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens),
            timings=Timings(
                queue_ms=round(((started_at or finished) - run.arrived) * 1000, 3),
                first_detection_ms=(
                    round((first_detection_at - run.arrived) * 1000, 3) if first_detection_at else None
                ),
                total_ms=round((finished - run.arrived) * 1000, 3),
            ),
            raw_output="".join(raw) if params.options.return_raw_output else None,
        )
        summary.update(
            detections=len(detections),
            finish_reason=finish_reason,
            truncated=truncated,
            queue_ms=result.timings.queue_ms,
            first_detection_ms=result.timings.first_detection_ms,
        )
        yield DoneEvent(result)

    async def detect(
        self,
        params: DetectParams,
        image_bytes: bytes,
        *,
        request_id: str | None = None,
        transport: str = "python",
        timeout_s: float | None = None,
    ) -> DetectResult:
        """Unary: the DoneEvent of the same stream (drained to its end, so it closes cleanly)."""
        result: DetectResult | None = None
        events = self.stream(
            params, image_bytes, request_id=request_id, transport=transport, timeout_s=timeout_s
        )
        async for event in events:
            if isinstance(event, DoneEvent):
                result = event.result
        if result is None:
            raise RuntimeError("detection stream ended without a result")
        return result
