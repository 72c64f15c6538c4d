"""DetectionService: the one place that knows the order of a request's steps.

validate options -> decode + resize image (worker thread) -> build prompt -> engine stream ->
incremental parse -> typed events. Unary results are collected from the same stream, so both
paths return identical detections. Transports only translate wire formats and map errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass

from rexomni_server.engines.base import Engine, EngineEvent, EngineRequest, FinishReason, SamplingConfig
from rexomni_server.engines.forced import split_forced_by_category
from rexomni_server.errors import (
    EngineFailure,
    EngineNotReady,
    InvalidRequest,
    Overloaded,
    RequestTimeout,
    RexOmniError,
)
from rexomni_server.images import FACTOR, ImageLimits, load_and_prepare
from rexomni_server.metrics import Metrics
from rexomni_server.prompts import build_task_text, task_text_for
from rexomni_server.schemas import (
    DetectionModel,
    DetectParams,
    DetectResult,
    ImageInfo,
    Timings,
    Usage,
)
from rexomni_server.settings import Settings
from rexomni_server.tasks import Task
from rexomni_server.tracking import OutputTracker

# Room kept for the chat template and task text beside the image tokens.
PROMPT_TEXT_TOKENS = 256

# Tasks whose categories are independent, so one request per category gives the same answer.
FAN_OUT_TASKS = frozenset({Task.DETECTION, Task.POINTING})

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
    """One admitted request on its way through the engine (one engine request per category
    when fanned out)."""

    request_id: str
    engine_requests: list[EngineRequest]
    params: DetectParams
    image: ImageInfo
    arrived: float
    deadline: float
    timeout_s: float
    queued: list[bool]  # [True] until generation starts; shared with stream() for the gauge
    transport: str


def new_request_id() -> str:
    return uuid.uuid4().hex


class DetectionService:
    def __init__(self, settings: Settings, engine: Engine, model_label: str, metrics: Metrics | None = None) -> None:
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

    def _check_priority(self, params: DetectParams) -> None:
        if params.options.priority != 0 and not getattr(self.engine, "supports_priority", False):
            raise InvalidRequest(
                "options.priority needs a server that schedules by priority (the vLLM engine with "
                "REXOMNI_VLLM_SCHEDULING_POLICY=priority); leave it at 0 here"
            )

    def _check_forced(self, params: DetectParams) -> None:
        if params.options.forced_output is not None and not self.settings.allow_forced_output:
            raise InvalidRequest(
                "options.forced_output is a testing facility and is disabled on this server "
                "(start it with --allow-forced-output)"
            )

    def _answer_room(self, resized_size: tuple[int, int]) -> int:
        """Tokens the context leaves for the answer after the prompt. The image alone must fit
        (with room for an answer): say how to make it fit instead of failing later."""
        width, height = resized_size
        image_tokens = (width // FACTOR) * (height // FACTOR)
        budget = self.settings.max_model_len - PROMPT_TEXT_TOKENS
        if image_tokens >= budget:
            raise InvalidRequest(
                f"the image needs {image_tokens} tokens at {width}x{height}, more than the context "
                f"(max_model_len {self.settings.max_model_len}) leaves; lower options.max_pixels to at "
                f"most {(budget - 1) * FACTOR * FACTOR}"
            )
        return budget - image_tokens

    def fans_out(self, params: DetectParams) -> bool:
        if params.task not in FAN_OUT_TASKS or len(params.categories) < 2:
            return False
        if params.options.fan_out is not None:
            return params.options.fan_out
        return bool(getattr(self.engine, "concurrent_batching", False))

    def _task_texts(self, params: DetectParams, image_size: tuple[int, int]) -> list[tuple[str, str | None]]:
        """(task text, forced output) per engine request: one, or one per category when fanned out.

        A forced output that fans out is split on its phrase groups, each going to the request
        for that category (tests and benchmarks of fan-out need per-category outputs)."""
        forced = params.options.forced_output
        if not self.fans_out(params):
            return [(task_text_for(params, image_size), forced)]
        per_category = split_forced_by_category(forced, params.categories) if forced is not None else None
        return [
            (build_task_text(params.task, [category]), per_category[i] if per_category else None)
            for i, category in enumerate(params.categories)
        ]

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
            error = Overloaded(f"server is at its limit of {self.settings.max_queue} requests", retry_after_s=1.0)
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
            self._check_priority(params)
            image = await asyncio.to_thread(load_and_prepare, image_bytes, self._limits, min_pixels, max_pixels)
            # An answer longer than the context leaves would be cut there anyway (vLLM ends it);
            # asking for no more keeps the transformers engine inside the trained context too.
            room = self._answer_room(image.resized_size)
            if sampling.max_new_tokens > room:
                sampling = dataclasses.replace(sampling, max_new_tokens=room)
            texts = self._task_texts(params, (image.width, image.height))
            engine_token = uuid.uuid4().hex[:12]
            engine_requests = [
                EngineRequest(
                    # The engine's own id: unique even when clients reuse X-Request-ID (vLLM
                    # refuses a running duplicate); the client's id stays in logs and headers.
                    request_id=f"{request_id}~{engine_token}" + (f"-{i}" if len(texts) > 1 else ""),
                    task_text=text,
                    image=image.resized,
                    sampling=sampling,
                    forced_output=forced,
                    logprobs=params.options.scores,
                    priority=params.options.priority,
                )
                for i, (text, forced) in enumerate(texts)
            ]
            info = ImageInfo(
                width=image.width,
                height=image.height,
                resized_width=image.resized_size[0],
                resized_height=image.resized_size[1],
            )
            self.metrics.image_pixels.observe(info.resized_width * info.resized_height)
            yield AcceptedEvent(request_id, info)
            timeout = min(self.settings.request_timeout_s, timeout_s or self.settings.request_timeout_s)
            run = _Run(
                request_id,
                engine_requests,
                params,
                info,
                arrived,
                arrived + timeout,
                timeout,
                queued,
                transport,
            )
            # Closed with this stream (a client that leaves), not whenever it is collected.
            async with contextlib.aclosing(self._run(run, summary)) as events:
                async for event in events:
                    yield event
            status = "ok"
        except (asyncio.CancelledError, GeneratorExit):
            status = "cancelled"
            raise
        except RexOmniError as exc:
            status = exc.code
            exc.accounted = True
            raise
        except Exception as exc:
            # A bug of ours, or an engine failing in a way it does not report itself: the
            # client still gets a typed error with its request id, and the traceback is logged.
            status = "internal"
            log.exception("request failed", extra={"fields": {"request_id": request_id}})
            failure = EngineFailure(
                f"internal error ({type(exc).__name__}); see the server log for request {request_id}"
            )
            failure.accounted = True
            raise failure from exc
        finally:
            if queued[0]:
                self.metrics.queue_depth.dec()
            self.in_flight -= 1
            self.metrics.in_flight.dec()
            elapsed = time.perf_counter() - arrived
            self.metrics.requests.labels(task, transport, status).inc()
            self.metrics.latency.labels(task, transport).observe(elapsed)
            self._log(request_id, transport, task, status, summary, elapsed * 1000)

    async def _run(self, run: _Run, summary: dict[str, object]) -> AsyncGenerator[ServiceEvent, None]:
        params, task, m = run.params, run.params.task.value, self.metrics
        options = params.options
        repetition_limit = self.settings.repetition_limit if options.stop_on_repetition else None
        trackers = [
            OutputTracker(params.task, run.image.width, run.image.height, repetition_limit) for _ in run.engine_requests
        ]
        queue: asyncio.Queue[tuple[int, EngineEvent | BaseException | None]] = asyncio.Queue()

        async def pump(index: int, request: EngineRequest) -> None:
            stream = self.engine.stream(request)
            try:
                async for event in stream:
                    queue.put_nowait((index, event))
                queue.put_nowait((index, None))
            except Exception as exc:
                queue.put_nowait((index, exc))
            finally:
                await stream.aclose()  # type: ignore[attr-defined]  # aborts an unfinished generation

        pumps = [asyncio.create_task(pump(i, r)) for i, r in enumerate(run.engine_requests)]
        active = set(range(len(pumps)))
        started_at: float | None = None
        first_detection_at: float | None = None
        stopped: FinishReason | None = None
        emitted = 0
        # What was streamed, per engine request: the result is exactly these, in category order.
        streamed: list[list[DetectionModel]] = [[] for _ in run.engine_requests]

        def stop_pump(index: int) -> None:
            pumps[index].cancel()
            active.discard(index)

        try:
            while active:
                remaining = run.deadline - time.perf_counter()
                try:
                    # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancel
                    # that arrives as queue.get() completes, and a left client's generation ran on.
                    async with asyncio.timeout(max(remaining, 0)):
                        index, item = await queue.get()
                except TimeoutError as exc:
                    raise RequestTimeout(f"request exceeded {run.timeout_s:g} s") from exc
                if item is None:
                    active.discard(index)
                    continue
                if isinstance(item, BaseException):
                    raise item
                if item.started and started_at is None:
                    started_at = time.perf_counter()
                    run.queued[0] = False
                    m.queue_depth.dec()
                    m.queue_wait.labels(task).observe(started_at - run.arrived)
                tracker = trackers[index]
                for detection in tracker.on_event(item):
                    now = time.perf_counter()
                    if first_detection_at is None:
                        first_detection_at = now
                        m.first_detection.labels(task, run.transport).observe(now - run.arrived)
                    yield DetectionEvent(emitted, detection, (now - run.arrived) * 1000)
                    streamed[index].append(detection)
                    emitted += 1
                    if options.max_detections is not None and emitted >= options.max_detections:
                        stopped = "max_detections"
                        break
                if stopped:
                    for i in list(active):
                        stop_pump(i)
                elif tracker.runaway and index in active:
                    tracker.finish_reason = "repetition"
                    stop_pump(index)
        finally:
            for p in pumps:
                if not p.cancelling():  # a pump already stopped is left to close its engine stream
                    p.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            summary.update(
                prompt_tokens=sum(t.prompt_tokens for t in trackers),
                completion_tokens=sum(t.completion_tokens for t in trackers),
            )
            m.generated_tokens.labels(task).inc(sum(t.completion_tokens for t in trackers))
            m.prompt_tokens.labels(task).inc(sum(t.prompt_tokens for t in trackers))
        if stopped is None:
            for index, tracker in enumerate(trackers):
                for detection in tracker.finish():
                    yield DetectionEvent(emitted, detection, (time.perf_counter() - run.arrived) * 1000)
                    streamed[index].append(detection)
                    emitted += 1
        detections = [d for per_request in streamed for d in per_request]
        yield DoneEvent(self._result(run, trackers, detections, stopped, started_at, first_detection_at, summary))

    def _result(
        self,
        run: _Run,
        trackers: list[OutputTracker],
        detections: list[DetectionModel],
        stopped: FinishReason | None,
        started_at: float | None,
        first_detection_at: float | None,
        summary: dict[str, object],
    ) -> DetectResult:
        task, m = run.params.task.value, self.metrics
        reasons = {t.finish_reason or "stop" for t in trackers}
        precedence: tuple[FinishReason, ...] = ("repetition", "length", "abort")
        finish_reason: FinishReason = next((r for r in precedence if r in reasons), "stop")
        if stopped is not None:
            finish_reason = stopped
        truncated = stopped is None and any(t.truncated for t in trackers)
        skipped = sum(t.parser.state.skipped for t in trackers)
        duplicates = sum(t.duplicates for t in trackers)
        m.detections.labels(task).observe(len(detections))
        m.parse_skipped.labels(task).inc(skipped)
        m.finish_reasons.labels(task, finish_reason).inc()
        if truncated:
            m.truncated.labels(task).inc()
        finished = time.perf_counter()
        result = DetectResult(
            request_id=run.request_id,
            model=self.model_label,
            task=run.params.task,
            detections=detections,
            image=run.image,
            truncated=truncated,
            finish_reason=finish_reason,
            skipped=skipped,
            duplicates=duplicates,
            usage=Usage(
                prompt_tokens=sum(t.prompt_tokens for t in trackers),
                completion_tokens=sum(t.completion_tokens for t in trackers),
            ),
            timings=Timings(
                queue_ms=round(((started_at or finished) - run.arrived) * 1000, 3),
                first_detection_ms=(
                    round((first_detection_at - run.arrived) * 1000, 3) if first_detection_at else None
                ),
                total_ms=round((finished - run.arrived) * 1000, 3),
            ),
            raw_output=", ".join("".join(t.raw) for t in trackers) if run.params.options.return_raw_output else None,
        )
        summary.update(
            detections=len(detections),
            engine_requests=len(trackers),
            finish_reason=finish_reason,
            truncated=truncated,
            duplicates=duplicates,
            queue_ms=result.timings.queue_ms,
            first_detection_ms=result.timings.first_detection_ms,
        )
        return result

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
        events = self.stream(params, image_bytes, request_id=request_id, transport=transport, timeout_s=timeout_s)
        async for event in events:
            if isinstance(event, DoneEvent):
                result = event.result
        if result is None:
            raise RuntimeError("detection stream ended without a result")
        return result
