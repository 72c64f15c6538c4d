"""The vLLM engine: ``vllm.v1`` AsyncLLM with continuous batching (the production engine).

Requests are submitted concurrently and never serialised: vLLM schedules them together, so
eight requests take little more than one. Each request streams deltas
(``RequestOutputKind.DELTA``) with the sampled token's log-probability (for scores). Images
arrive already resized by our smart_resize; the multimodal processor is given pixel bounds
wide enough that it leaves them as they are, whatever its own defaults are.

Imported only when vLLM is installed (``engine=vllm`` or ``auto``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, generate_latest

from rexomni_server.engines.base import EngineEvent, EngineRequest
from rexomni_server.engines.forced import forced_token_ids
from rexomni_server.engines.loading import run_abandonable
from rexomni_server.engines.transformers import coordinate_token_ids
from rexomni_server.errors import EngineDead, EngineFailure, EngineNotReady, InvalidRequest, Overloaded, RexOmniError
from rexomni_server.prompts import build_chat_prompt
from rexomni_server.settings import Settings
from rexomni_server.vocabulary import END_MARKER, PIXEL_UNIT, FinishReason

log = logging.getLogger(__name__)

_FINISH: dict[str, FinishReason] = {"stop": "stop", "length": "length", "abort": "abort"}


def _domain_error(exc: Exception) -> RexOmniError:
    """vLLM's refusal of a request (e.g. a prompt longer than the context) is the client's
    error; a full queue is "not now"; anything else is the engine failing."""
    if type(exc).__name__ == "EngineDeadError":
        return EngineDead(f"vLLM's engine core has died: {exc}", retry_after_s=1.0)
    try:
        from vllm.exceptions import GracefulHTTPError, VLLMClientError
    except ImportError:  # older vLLM: validation errors were ValueErrors
        client_errors: tuple[type[Exception], ...] = (ValueError,)
        busy_errors: tuple[type[Exception], ...] = ()
    else:
        client_errors, busy_errors = (ValueError, VLLMClientError), (GracefulHTTPError,)
    if isinstance(exc, client_errors):
        return InvalidRequest(f"vLLM rejected the request: {exc}")
    if isinstance(exc, busy_errors):
        return Overloaded(f"vLLM is at its limit: {exc}", retry_after_s=1.0)
    return EngineFailure(f"vLLM generation failed: {exc}")


def _shutdown_when_built(build: asyncio.Future[Any]) -> None:
    if not build.cancelled() and build.exception() is None:
        build.result().shutdown()


def vllm_usable() -> bool:
    """vLLM is installed and has a device to run on (a GPU, or its CPU build)."""
    try:
        from vllm.platforms import current_platform
    except Exception:  # not installed, or broken: fall back to transformers
        return False
    return not current_platform.is_unspecified()


class _VllmMetrics:
    """Collector view of vLLM's own ``vllm:*`` metrics (it registers them globally)."""

    def collect(self) -> Iterator[Any]:
        for family in REGISTRY.collect():
            if family.name.startswith("vllm:"):
                yield family


def engine_args(model_path: str, settings: Settings) -> Any:
    from vllm.engine.arg_utils import AsyncEngineArgs

    processors = []
    if settings.allow_forced_output:
        from rexomni_server.engines.vllm_forced import ForcedOutputProcessor

        processors.append(ForcedOutputProcessor)
    return AsyncEngineArgs(
        model=model_path,
        tokenizer_mode=settings.vllm_tokenizer_mode,
        dtype=settings.dtype,
        quantization=settings.quantization,
        max_model_len=settings.max_model_len,
        gpu_memory_utilization=settings.gpu_memory_utilization,
        tensor_parallel_size=settings.tensor_parallel_size,
        max_num_seqs=settings.max_num_seqs,
        scheduling_policy=settings.vllm_scheduling_policy,
        enforce_eager=settings.enforce_eager,
        enable_prefix_caching=True,  # fan-out requests share the image prefix
        limit_mm_per_prompt={"image": 1, "video": 0},
        # Our images are already resized; bounds this wide make the processor's resize a no-op.
        # (`size` is the current spelling; min_pixels/max_pixels are deprecated in transformers.)
        mm_processor_kwargs={"size": {"shortest_edge": PIXEL_UNIT, "longest_edge": settings.max_pixels_limit}},
        logits_processors=processors,
        disable_log_stats=False,  # keeps the vllm:* Prometheus metrics
    )


class VllmEngine:
    name = "vllm"
    concurrent_batching = True

    def __init__(self, model_path: str, settings: Settings) -> None:
        self.model_path = model_path
        self._settings = settings
        self.supports_priority = settings.vllm_scheduling_policy == "priority"
        self._engine: Any = None
        self._tokenizer: Any = None
        self._eos_id = -1
        self._coordinate_ids: frozenset[int] = frozenset()
        self._ready = False
        self._active: set[str] = set()  # request ids generating now (aborted on stop)
        self._stopped = False
        # Log-probabilities as flat lists rather than a dict and an object per token, where
        # this vLLM has the option: a third of the front process's CPU per scored token.
        self._flat_logprobs: dict[str, bool] = {}

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def failure(self) -> str | None:
        # AsyncLLM notices its engine-core process exit (or its output loop failing) itself;
        # from then on every request fails with EngineDeadError.
        if self._engine is not None and not self._stopped and self._engine.errored:
            return f"vLLM's engine core has died ({self._engine.dead_error})"
        return None

    async def start(self) -> None:
        from transformers import AutoTokenizer
        from vllm.v1.engine.async_llm import AsyncLLM

        args = engine_args(self.model_path, self._settings)
        self._stopped = False
        # Building the engine blocks for tens of seconds (weights, profiling): off the loop, in a
        # thread a stopping server does not wait for.
        build = asyncio.ensure_future(run_abandonable(lambda: AsyncLLM.from_engine_args(args), "build-vllm"))
        try:
            await asyncio.shield(build)
        except asyncio.CancelledError:
            # Stopped while building: shut the engine (and its engine-core process) down when it
            # is built, rather than leave it running with nobody to stop it.
            build.add_done_callback(_shutdown_when_built)
            raise
        # No local keeps the engine: this frame can outlive the call (libraries keep tracebacks
        # of imports it triggered), and stop() must leave vLLM's engine to be freed.
        self._engine = build.result()
        del build
        if self._stopped:
            await self.stop()
            raise EngineNotReady("the engine was stopped while it started")
        self._tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, self.model_path)
        self._eos_id = self._tokenizer.convert_tokens_to_ids(END_MARKER)
        self._coordinate_ids = coordinate_token_ids(self._tokenizer)
        from vllm import SamplingParams

        if "flat_logprobs" in getattr(SamplingParams, "__struct_fields__", ()):
            self._flat_logprobs = {"flat_logprobs": True}
        self._ready = True
        log.info("vllm engine loaded %s", self.model_path)

    async def stop(self) -> None:
        self._ready = False
        self._stopped = True
        if self._engine is not None and self._active:
            # Aborted before the shutdown, each stream still gets its final ("abort") output;
            # after it, vLLM's output handler is gone and they would wait forever.
            await self._engine.abort(list(self._active))
        if self._engine is not None:
            # On the loop thread: shutdown() cancels vLLM's output-handler task, which is only
            # safe from the loop that owns it (else the handler sees a dead engine and logs it).
            self._engine.shutdown()
            self._engine = None
            # One loop turn for the tasks vLLM woke while shutting down: until they run they keep
            # the engine alive, and a loop closed right after would leave it to the interpreter's
            # exit, too late for vLLM's finalizer.
            await asyncio.sleep(0)

    async def abort(self, request_id: str) -> None:
        if self._engine is not None:
            await self._engine.abort(request_id)

    def metrics_exposition(self) -> bytes:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_VllmMetrics())  # type: ignore[arg-type]
        return generate_latest(registry)

    def _sampling_params(self, request: EngineRequest) -> Any:
        from vllm.sampling_params import RequestOutputKind

        from vllm import SamplingParams

        s = request.sampling
        extra: dict[str, Any] | None = None
        if request.forced_output is not None:
            extra = {
                "forced_token_ids": forced_token_ids(self._tokenizer, request.forced_output),
                "forced_eos_id": self._eos_id,
            }
        return SamplingParams(
            max_tokens=s.max_new_tokens,
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k if s.top_k > 0 else -1,
            repetition_penalty=s.repetition_penalty,
            stop_token_ids=[self._eos_id],
            skip_special_tokens=False,  # the grammar's markers are special tokens
            spaces_between_special_tokens=False,
            output_kind=RequestOutputKind.DELTA,
            logprobs=0 if request.logprobs else None,  # the sampled token's log-probability
            extra_args=extra,
            **self._flat_logprobs,
        )

    def _coordinate_logprobs(self, token_ids: list[int], logprobs: Any) -> tuple[float, ...]:
        if not logprobs:
            return ()
        coordinates = self._coordinate_ids
        if hasattr(logprobs, "start_indices"):
            # FlatLogprobs: flat lists, a position's entries from its start index (the sampled
            # token's first, and only one: we ask for logprobs=0).
            flat_tokens, flat_values = logprobs.token_ids, logprobs.logprobs
            return tuple(
                float(flat_values[start])
                for start, end in zip(logprobs.start_indices, logprobs.end_indices, strict=False)
                if start < end and flat_tokens[start] in coordinates
            )
        return tuple(
            float(step[token].logprob)
            for token, step in zip(token_ids, logprobs, strict=False)
            if token in coordinates and step and token in step
        )

    async def stream(self, request: EngineRequest) -> AsyncIterator[EngineEvent]:
        failure = self.failure
        if failure is not None:
            raise EngineDead(failure, retry_after_s=1.0)
        if not self._ready:
            raise EngineNotReady("the model is still loading")
        prompt = {
            "prompt": build_chat_prompt(request.task_text),
            "multi_modal_data": {"image": request.image},
        }
        generator = self._engine.generate(
            prompt, self._sampling_params(request), request.request_id, priority=request.priority
        )
        started = False
        self._active.add(request.request_id)
        try:
            async for output in generator:
                if not started:
                    started = True
                    yield EngineEvent(started=True, prompt_tokens=len(output.prompt_token_ids or ()))
                completion = output.outputs[0]
                token_ids = list(completion.token_ids)
                yield EngineEvent(
                    text=completion.text,
                    tokens=len(token_ids),
                    coordinate_logprobs=self._coordinate_logprobs(token_ids, completion.logprobs),
                )
                if output.finished:
                    yield EngineEvent(finish_reason=_FINISH.get(str(completion.finish_reason), "stop"))
        except (EngineNotReady, asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as exc:
            failure = self.failure
            raise (EngineDead(failure, retry_after_s=1.0) if failure else _domain_error(exc)) from exc
        finally:
            self._active.discard(request.request_id)
            # Closing vLLM's generator early aborts the request in the engine core.
            await generator.aclose()
