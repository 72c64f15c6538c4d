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
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from PIL import Image

from rexomni_server.accounting import INTERNAL, RequestLedger, RequestRecord, recording
from rexomni_server.engine_streams import Deadline, EngineStreams
from rexomni_server.engines.base import Engine, EngineRequest, SamplingConfig
from rexomni_server.engines.forced import split_forced_by_category
from rexomni_server.errors import (
    EngineDead,
    EngineFailure,
    EngineNotReady,
    InvalidRequest,
    Overloaded,
    RexOmniError,
)
from rexomni_server.images import ImageLimits, decode_base64_image, decode_image, prepare_image, smart_resize
from rexomni_server.metrics import Metrics
from rexomni_server.prompts import build_task_text, task_text_for
from rexomni_server.schemas import (
    DetectionModel,
    DetectParams,
    DetectResult,
    ImageInfo,
    TilingOptions,
    Timings,
    Usage,
)
from rexomni_server.settings import Settings
from rexomni_server.tasks import Task
from rexomni_server.tiled import TiledImage, TileMerge, check_tiling, cut_tiles, forced_per_region, plan_tiles
from rexomni_server.tracking import OutputTracker
from rexomni_server.vocabulary import FINISH_PRECEDENCE, PATCH_SIDE, PIXEL_UNIT, FinishReason

# Room kept for the chat template and task text beside the image tokens.
PROMPT_TEXT_TOKENS = 256

# Tasks whose categories are independent, so one request per category gives the same answer.
FAN_OUT_TASKS = frozenset({Task.DETECTION, Task.POINTING})

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AcceptedEvent:
    """The request passed validation and its image was decoded; generation is next.

    Transports use it to commit to a streaming response: errors before it are plain 4xx."""

    request_id: str
    image: ImageInfo


@dataclass(slots=True)  # one per detection: slots and no frozen-field setters keep it cheap
class DetectionEvent:
    index: int
    detection: DetectionModel
    elapsed_ms: float


@dataclass(frozen=True)
class DoneEvent:
    result: DetectResult


ServiceEvent = AcceptedEvent | DetectionEvent | DoneEvent

# An image as a transport received it: the file's bytes, or base64 text (or a data URI).
EncodedImage = bytes | str


@dataclass(frozen=True)
class DecodedImage:
    """A request's image after the decode pool: its size, the size it is seen at untiled, and
    what its engine requests see (the resized image, or each tile resized)."""

    width: int
    height: int
    resized_size: tuple[int, int]
    inputs: tuple[Image.Image, ...]
    tiled: TiledImage | None = None


def decode_and_prepare(
    image: EncodedImage,
    limits: ImageLimits,
    min_pixels: int,
    max_pixels: int,
    tiling: TilingOptions | None,
    max_tiles: int,
) -> DecodedImage:
    """The whole CPU-side image step of a request (run in the decode pool): decode, then resize,
    or plan the tiles and cut them (the plan needs the image's size)."""
    data = decode_base64_image(image) if isinstance(image, str) else image
    decoded = decode_image(data, limits)
    if tiling is None:
        prepared = prepare_image(decoded, min_pixels, max_pixels)
        return DecodedImage(prepared.width, prepared.height, prepared.resized_size, (prepared.resized,))
    width, height = decoded.size
    tiled = cut_tiles(decoded, plan_tiles(width, height, tiling, max_pixels, max_tiles), min_pixels, max_pixels)
    resized_height, resized_width = smart_resize(height, width, PATCH_SIDE, min_pixels, max_pixels)
    return DecodedImage(width, height, (resized_width, resized_height), tiled.images, tiled)


class _QueueGauge:
    """A request's place in the queue-depth gauge: entered on admission, left once (when its
    generation starts, or when it ends without starting)."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self.waiting = True
        metrics.queue_depth.inc()

    def leave(self) -> None:
        if self.waiting:
            self.waiting = False
            self._metrics.queue_depth.dec()


@dataclass
class _Run:
    """One admitted request, from admission to its result: the record (status, timings, the
    log line), its time budget, admission cost and queue gauge, then its engine requests (one,
    one per category when fanned out, times the tiles when tiled) with a tracker each, the
    merge of a tiled run, and what was streamed."""

    record: RequestRecord
    params: DetectParams
    deadline: Deadline  # the request's time budget, decoding included
    queue: _QueueGauge
    cost: int  # engine requests admission counts for it
    image: ImageInfo | None = None
    engine_requests: list[EngineRequest] = field(default_factory=list)
    trackers: list[OutputTracker] = field(default_factory=list)
    tiles: TileMerge | None = None
    ended: set[int] = field(default_factory=set)  # engine requests whose output was flushed
    # What was streamed, per output slot (engine request; a tiled run has one): the result is
    # exactly these, in slot order (category order when fanned out, stream order when tiled).
    streamed: list[list[DetectionModel]] = field(default_factory=list)
    emitted: int = 0
    stopped: FinishReason | None = None  # the service's own early stop

    def start_generation(
        self,
        engine_requests: list[EngineRequest],
        sizes: Sequence[tuple[int, int]],
        repetition_limit: int | None,
        tiles: TileMerge | None,
    ) -> None:
        """``sizes``: the (width, height) each engine request's coordinates refer to."""
        self.engine_requests = engine_requests
        self.trackers = [OutputTracker(self.params.task, w, h, repetition_limit) for w, h in sizes]
        self.tiles = tiles
        self.streamed = [[]] if tiles is not None else [[] for _ in engine_requests]

    def slot(self, index: int) -> int:
        return 0 if self.tiles is not None else index

    def emit(self, slot: int, detection: DetectionModel) -> DetectionEvent:
        """The next detection of output slot ``slot``, as the event that streams it."""
        now = time.perf_counter()
        if self.record.first_detection is None:
            self.record.first_detection = now
        self.streamed[slot].append(detection)
        self.emitted += 1
        return DetectionEvent(self.emitted - 1, detection, self.record.ms_since_arrival(now))

    @property
    def at_max_detections(self) -> bool:
        return self.emitted == self.params.options.max_detections


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
        self.ledger = RequestLedger(self.metrics)
        self._decode_pool = ThreadPoolExecutor(max_workers=settings.decode_workers, thread_name_prefix="decode")
        self.in_flight = 0  # requests admitted and not finished
        self.engine_requests = 0  # the engine requests they start (what admission counts)
        self.decoding = 0  # images being decoded or waiting for a decode thread

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
        options = params.options
        if (options.forced_output is not None or options.forced_tile_outputs) and not self.settings.allow_forced_output:
            raise InvalidRequest(
                "options.forced_output is a testing facility and is disabled on this server "
                "(start it with --allow-forced-output)"
            )

    def _answer_room(self, resized_size: tuple[int, int]) -> int:
        """Tokens the context leaves for the answer after the prompt. The image alone must fit
        (with room for an answer): say how to make it fit instead of failing later."""
        width, height = resized_size
        image_tokens = (width // PATCH_SIDE) * (height // PATCH_SIDE)
        budget = self.settings.max_model_len - PROMPT_TEXT_TOKENS
        if image_tokens >= budget:
            raise InvalidRequest(
                f"the image needs {image_tokens} tokens at {width}x{height}, more than the context "
                f"(max_model_len {self.settings.max_model_len}) leaves; lower options.max_pixels to at "
                f"most {(budget - 1) * PIXEL_UNIT}"
            )
        return budget - image_tokens

    def fans_out(self, params: DetectParams) -> bool:
        if params.task not in FAN_OUT_TASKS or len(params.categories) < 2:
            return False
        if params.options.fan_out is not None:
            return params.options.fan_out
        return bool(getattr(self.engine, "concurrent_batching", False))

    def _task_texts(
        self, params: DetectParams, image_size: tuple[int, int], forced: str | None
    ) -> list[tuple[str, str | None]]:
        """(task text, forced output) per engine request of one image (or tile): one, or one per
        category when fanned out.

        A forced output that fans out is split on its phrase groups, each going to the request
        for that category (tests and benchmarks of fan-out need per-category outputs)."""
        if not self.fans_out(params):
            return [(task_text_for(params, image_size), forced)]
        per_category = split_forced_by_category(forced, params.categories) if forced is not None else None
        return [
            (build_task_text(params.task, [category]), per_category[i] if per_category else None)
            for i, category in enumerate(params.categories)
        ]

    # -- admission ----------------------------------------------------------------------------
    def engine_requests_for(self, params: DetectParams) -> int:
        """The engine requests a request starts per image or tile: the work admission counts
        before the image is decoded (a tiled request then reserves the rest, _reserve_tiles)."""
        return len(params.categories) if self.fans_out(params) else 1

    def _admit(self, cost: int) -> None:
        """Refuse at once what cannot be served now: a dead or loading engine, a full queue, a
        full decode queue. Raises; admits nothing."""
        failure = self.engine.failure
        if failure is not None:
            raise EngineDead(f"the engine has failed ({failure}); this server is restarting", retry_after_s=1.0)
        if not self.engine.ready:
            raise EngineNotReady("the model is still loading", retry_after_s=5.0)
        limit = self.settings.max_queue
        if cost > limit:
            raise InvalidRequest(
                f"this request starts {cost} engine requests (one per category) and the server admits "
                f"{limit} at once: send fewer categories, or options.fan_out=false"
            )
        if self.engine_requests + cost > limit:
            raise Overloaded(f"server is at its limit of {limit} engine requests", retry_after_s=1.0)
        if self.decoding >= self.settings.decode_queue:
            raise Overloaded(f"server is decoding {self.decoding} images already", retry_after_s=1.0)

    def _reserve_tiles(self, run: _Run, tiles: int) -> None:
        """Admission for the rest of a tiled request's work, once its plan is known: every tile
        starts as many engine requests as the request admitted for one image."""
        per_image = run.cost
        total = per_image * tiles
        limit = self.settings.max_queue
        if total > limit:
            raise InvalidRequest(
                f"this request starts {total} engine requests ({tiles} tiles x {per_image}) and the server "
                f"admits {limit} at once: use fewer or larger tiles, or fewer categories"
            )
        extra = total - per_image
        if self.engine_requests + extra > limit:
            raise Overloaded(f"server is at its limit of {limit} engine requests", retry_after_s=1.0)
        self.engine_requests += extra
        run.cost = total

    async def _prepare_image(
        self, image: EncodedImage, min_pixels: int, max_pixels: int, tiling: TilingOptions | None, deadline: Deadline
    ) -> DecodedImage:
        """Decode and resize (or cut into tiles) in the bounded decode pool, within the request's
        time budget (a request that waited its budget away in the pool's queue is never decoded)."""
        self.decoding += 1
        work = self._decode_pool.submit(
            decode_and_prepare, image, self._limits, min_pixels, max_pixels, tiling, self.settings.max_tiles
        )
        try:
            return await deadline.wait(asyncio.wrap_future(work))
        finally:
            work.cancel()  # not started yet: never started
            self.decoding -= 1

    # -- the pipeline -----------------------------------------------------------------------
    async def stream(
        self,
        params: DetectParams,
        image: EncodedImage,
        *,
        record: RequestRecord | None = None,
        request_id: str | None = None,
        transport: str = "python",
        timeout_s: float | None = None,
    ) -> AsyncIterator[ServiceEvent]:
        """Typed events: AcceptedEvent, one DetectionEvent per detection as soon as it is
        decoded, then DoneEvent. ``image``: the file's bytes, or base64 text (decoded in the
        decode pool). ``timeout_s`` (e.g. a gRPC deadline) tightens the server's budget.

        ``record``: the transport's record of the request, which the service fills in; without
        one the service opens (and logs) its own."""
        scope = (
            contextlib.nullcontext(record)
            if record is not None
            else self.ledger.scope(request_id or new_request_id(), transport)
        )
        with scope as recorded:
            async with contextlib.aclosing(self._stream(params, image, recorded, timeout_s)) as events:
                async for event in events:
                    yield event

    async def _stream(
        self, params: DetectParams, image: EncodedImage, record: RequestRecord, timeout_s: float | None
    ) -> AsyncGenerator[ServiceEvent, None]:
        record.task = params.task.value
        with recording(record), self._admitted(record, params, timeout_s) as run:
            try:
                await self._prepare(run, image)
                assert run.image is not None
                yield AcceptedEvent(record.request_id, run.image)
                # Closed with this stream (a client that leaves), not whenever it is collected.
                async with contextlib.aclosing(self._run(run)) as events:
                    async for event in events:
                        yield event
            except (RexOmniError, asyncio.CancelledError, GeneratorExit):
                raise
            except Exception as exc:
                # A bug of ours, or an engine failing in a way it does not report itself: the
                # client still gets a typed error with its request id, and the traceback is logged.
                record.fail(INTERNAL)
                log.exception("request failed", extra={"fields": {"request_id": record.request_id}})
                raise EngineFailure(
                    f"internal error ({type(exc).__name__}); see the server log for request {record.request_id}"
                ) from exc

    @contextlib.contextmanager
    def _admitted(self, record: RequestRecord, params: DetectParams, timeout_s: float | None) -> Iterator[_Run]:
        """Admission (raises a refusal), then the request's place in the counts and gauges
        and its time budget, until it ends."""
        cost = self.engine_requests_for(params)
        self._admit(cost)
        record.admitted = True
        self.in_flight += 1
        self.engine_requests += cost
        self.metrics.in_flight.inc()
        timeout = min(self.settings.request_timeout_s, timeout_s or self.settings.request_timeout_s)
        record.start_deadline(timeout)
        run = _Run(record, params, Deadline(record.arrived + timeout, timeout), _QueueGauge(self.metrics), cost)
        try:
            yield run
        finally:
            run.deadline.cancel()
            run.queue.leave()
            self.in_flight -= 1
            self.engine_requests -= run.cost
            self.metrics.in_flight.dec()

    async def _prepare(self, run: _Run, image: EncodedImage) -> None:
        """Options checked, image decoded and resized (or cut into tiles), engine requests built."""
        params = run.params
        sampling = self._sampling(params)
        min_pixels, max_pixels = self._pixel_bounds(params)
        self._check_forced(params)
        self._check_priority(params)
        check_tiling(params)
        decoded = await self._prepare_image(image, min_pixels, max_pixels, params.options.tiling, run.deadline)
        run.image = ImageInfo(
            width=decoded.width,
            height=decoded.height,
            resized_width=decoded.resized_size[0],
            resized_height=decoded.resized_size[1],
        )
        tiled = decoded.tiled
        if tiled is not None:
            self._reserve_tiles(run, len(tiled.plan.tiles))
        engine_requests, sizes, tile_of = self._engine_requests(run, decoded, sampling)
        merge = None
        if tiled is not None:
            assert params.options.tiling is not None
            merge = TileMerge(tiled, tile_of, params.options.tiling.iou_threshold)
            run.record.fields["tiles"] = len(tiled.plan.tiles)
            self.metrics.tiles.labels(params.task.value).inc(len(tiled.plan.tiles))
        repetition_limit = self.settings.repetition_limit if params.options.stop_on_repetition else None
        run.start_generation(engine_requests, sizes, repetition_limit, merge)

    def _engine_requests(
        self, run: _Run, decoded: DecodedImage, sampling: SamplingConfig
    ) -> tuple[list[EngineRequest], list[tuple[int, int]], list[int]]:
        """The engine requests of each region (the image, or each tile: one, or one per category
        when fanned out), the size their coordinates refer to, and the region of each."""
        params, tiled = run.params, decoded.tiled
        regions = (
            [(decoded.width, decoded.height)] if tiled is None else [(t.width, t.height) for t in tiled.plan.tiles]
        )
        forced = forced_per_region(params.options, len(regions))
        # The whole-image pass first: the engine starts it first, and the detections cut by tile
        # edges wait for it.
        whole = tiled.plan.whole_index if tiled is not None else None
        order = sorted(range(len(regions)), key=lambda i: i != whole)
        engine_token = uuid.uuid4().hex[:12]
        engine_requests: list[EngineRequest] = []
        sizes: list[tuple[int, int]] = []
        region_of: list[int] = []
        for i in order:
            view = decoded.inputs[i]
            self.metrics.image_pixels.observe(view.width * view.height)
            # An answer longer than the context leaves would be cut there anyway (vLLM ends it);
            # asking for no more keeps the transformers engine inside the trained context too.
            room = self._answer_room(view.size)
            view_sampling = dataclasses.replace(sampling, max_new_tokens=min(sampling.max_new_tokens, room))
            for text, forced_text in self._task_texts(params, regions[i], forced[i]):
                engine_requests.append(
                    EngineRequest(
                        # The engine's own id: unique even when clients reuse X-Request-ID (vLLM
                        # refuses a running duplicate); the client's id stays in logs and headers.
                        request_id=f"{run.record.request_id}~{engine_token}-{len(engine_requests)}",
                        task_text=text,
                        image=view,
                        sampling=view_sampling,
                        forced_output=forced_text,
                        logprobs=params.options.scores,
                        priority=params.options.priority,
                    )
                )
                sizes.append(regions[i])
                region_of.append(i)
        return engine_requests, sizes, region_of

    async def _run(self, run: _Run) -> AsyncGenerator[ServiceEvent, None]:
        """Engine events in, detection events out (as each is final), then the result."""
        trackers = run.trackers
        streams = EngineStreams(self.engine, run.engine_requests, run.deadline)
        try:
            # The hot loop: once per engine event (a token, or a few).
            while (arrived := await streams.next()) is not None:
                index, event = arrived
                if event is None:  # one of several streams ended
                    for detection_event in self._ended(run, index):
                        yield detection_event
                    self._stop_at_max_detections(run, streams)
                    continue
                if event.started:
                    self._generation_started(run)
                tracker = trackers[index]
                if found := tracker.on_event(event):
                    for detection_event in self._deliver(run, run.slot(index), self._final(run, index, found)):
                        yield detection_event
                    self._stop_at_max_detections(run, streams)  # then no stream is active
                if tracker.runaway and streams.active(index):
                    tracker.finish_reason = "repetition"
                    streams.stop(index)
                    for detection_event in self._ended(run, index):
                        yield detection_event
                    self._stop_at_max_detections(run, streams)
        finally:
            await streams.close()
            self._count_tokens(run)
        if run.stopped is None:
            for index in range(len(trackers)):
                if index not in run.ended:
                    for detection_event in self._ended(run, index):
                        yield detection_event
            if run.tiles is not None:
                for detection_event in self._deliver(run, 0, run.tiles.finish()):
                    yield detection_event
        yield DoneEvent(self._result(run))

    @staticmethod
    def _stop_at_max_detections(run: _Run, streams: EngineStreams) -> None:
        if run.at_max_detections and run.stopped is None:
            run.stopped = "max_detections"
            for i in range(len(run.trackers)):
                streams.stop(i)

    @staticmethod
    def _final(run: _Run, index: int, found: Sequence[DetectionModel]) -> Sequence[DetectionModel]:
        """Of what engine request ``index`` found, what may stream now (all of it, untiled)."""
        return found if run.tiles is None else run.tiles.found(index, found)

    def _ended(self, run: _Run, index: int) -> Iterator[DetectionEvent]:
        """Engine request ``index`` ended: its parser flushed, and a tiled run's tile maybe done."""
        run.ended.add(index)
        yield from self._deliver(run, run.slot(index), self._final(run, index, run.trackers[index].finish()))
        if run.tiles is not None:
            yield from self._deliver(run, 0, run.tiles.ended(index))

    def _deliver(self, run: _Run, slot: int, detections: Sequence[DetectionModel]) -> Iterator[DetectionEvent]:
        """Stream these detections, up to max_detections."""
        for detection in detections:
            if run.at_max_detections:
                return
            yield self._emitted(run, slot, detection)

    def _generation_started(self, run: _Run) -> None:
        if run.record.started is None:
            run.record.started = time.perf_counter()
            run.queue.leave()
            self.metrics.queue_wait.labels(run.params.task.value).observe(run.record.started - run.record.arrived)

    def _emitted(self, run: _Run, index: int, detection: DetectionModel) -> DetectionEvent:
        first = run.record.first_detection is None
        event = run.emit(index, detection)
        if first:
            self.metrics.first_detection.labels(run.params.task.value, run.record.transport).observe(
                event.elapsed_ms / 1000
            )
        return event

    def _count_tokens(self, run: _Run) -> None:
        task = run.params.task.value
        prompt = sum(t.prompt_tokens for t in run.trackers)
        completion = sum(t.completion_tokens for t in run.trackers)
        run.record.fields.update(prompt_tokens=prompt, completion_tokens=completion)
        self.metrics.generated_tokens.labels(task).inc(completion)
        self.metrics.prompt_tokens.labels(task).inc(prompt)

    def _result(self, run: _Run) -> DetectResult:
        task, trackers, record = run.params.task.value, run.trackers, run.record
        assert run.image is not None
        finish_reason = run.stopped or overall_finish_reason(t.finish_reason for t in trackers)
        truncated = run.stopped is None and any(t.truncated for t in trackers)
        detections = [d for per_request in run.streamed for d in per_request]
        skipped = sum(t.parser.state.skipped for t in trackers)
        duplicates = sum(t.duplicates for t in trackers)
        m = self.metrics
        m.detections.labels(task).observe(len(detections))
        m.parse_skipped.labels(task).inc(skipped)
        m.finish_reasons.labels(task, finish_reason).inc()
        if truncated:
            m.truncated.labels(task).inc()
        finished = time.perf_counter()
        timings = Timings(
            queue_ms=round(record.ms_since_arrival(record.started or finished), 3),
            first_detection_ms=(
                round(record.ms_since_arrival(record.first_detection), 3) if record.first_detection else None
            ),
            total_ms=round(record.ms_since_arrival(finished), 3),
        )
        record.fields.update(
            detections=len(detections),
            engine_requests=len(trackers),
            finish_reason=finish_reason,
            truncated=truncated,
            duplicates=duplicates,
            queue_ms=timings.queue_ms,
            first_detection_ms=timings.first_detection_ms,
        )
        return DetectResult(
            request_id=record.request_id,
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
            timings=timings,
            raw_output=self._raw_output(run) if run.params.options.return_raw_output else None,
            tiles=run.tiles.tiled.infos() if run.tiles is not None else None,
        )

    @staticmethod
    def _raw_output(run: _Run) -> str:
        """Each engine request's text, joined by ', ': in category order, and for a tiled run in
        tile order (grid tiles row by row, then the whole-image pass; the engine got that first)."""
        order: Sequence[int] = range(len(run.trackers))
        if run.tiles is not None:
            order = sorted(order, key=run.tiles.tile_of.__getitem__)
        return ", ".join("".join(run.trackers[i].raw) for i in order)

    async def detect(
        self,
        params: DetectParams,
        image: EncodedImage,
        *,
        record: RequestRecord | None = None,
        request_id: str | None = None,
        transport: str = "python",
        timeout_s: float | None = None,
    ) -> DetectResult:
        """Unary: the DoneEvent of the same stream (drained to its end, so it closes cleanly)."""
        result: DetectResult | None = None
        events = self.stream(
            params, image, record=record, request_id=request_id, transport=transport, timeout_s=timeout_s
        )
        async for event in events:
            if isinstance(event, DoneEvent):
                result = event.result
        if result is None:
            raise RuntimeError("detection stream ended without a result")
        return result


def overall_finish_reason(reasons: Iterable[FinishReason | None]) -> FinishReason:
    """The finish reason of a request from those of its engine requests (None: still "stop")."""
    seen = set(reasons)
    return next((r for r in FINISH_PRECEDENCE if r in seen), "stop")
