"""The transformers engine: any Qwen2.5-VL checkpoint on any machine (CPU or GPU).

Each generation runs ``model.generate`` in a worker thread of a bounded pool (torch releases
the GIL in its kernels), streaming token ids back to the event loop; no lock is held across
generations. Cancellation is a stopping criterion polled after every token.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from rexomni_server.coords import bin_token
from rexomni_server.engines.base import EngineEvent, EngineRequest
from rexomni_server.engines.detokenize import IncrementalDetokenizer
from rexomni_server.engines.forced import ForcedOutputLogitsProcessor, forced_token_ids
from rexomni_server.engines.loading import run_abandonable
from rexomni_server.errors import EngineDead, EngineFailure, EngineNotReady
from rexomni_server.prompts import IMAGE_PAD, build_chat_prompt
from rexomni_server.vocabulary import END_MARKER, NUM_BINS, FinishReason

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Started:
    prompt_tokens: int


@dataclass(frozen=True)
class _Tokens:
    ids: list[int]
    coordinate_logprobs: tuple[float, ...] = ()


@dataclass(frozen=True)
class _Finished:
    reason: FinishReason


@dataclass(frozen=True)
class _Failed:
    error: BaseException


_Item = _Started | _Tokens | _Finished | _Failed


class _LogprobRecorder:
    """LogitsProcessor that keeps the step's log-probabilities (after the repetition penalty,
    before any forcing) so the streamer can report the chosen token's."""

    def __init__(self) -> None:
        self.last: Any = None

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        self.last = scores.float().log_softmax(dim=-1)
        return scores


class _QueueStreamer:
    """transformers streamer that forwards new token ids (and coordinate log-probabilities)
    to the event loop."""

    def __init__(
        self, emit: Callable[[_Item], None], recorder: _LogprobRecorder, coordinate_ids: frozenset[int]
    ) -> None:
        self._emit = emit
        self._recorder = recorder
        self._coordinate_ids = coordinate_ids
        self._prompt_seen = False

    def put(self, value: Any) -> None:
        if not self._prompt_seen:  # generate() first puts the prompt
            self._prompt_seen = True
            return
        ids = value.reshape(-1).tolist()
        logprobs: tuple[float, ...] = ()
        if self._recorder.last is not None:
            logprobs = tuple(float(self._recorder.last[0, i]) for i in ids if i in self._coordinate_ids)
        self._emit(_Tokens(ids, logprobs))

    def end(self) -> None:
        pass


class _CancelCriteria:
    """Stopping criterion: ends the generation once the request's event is set."""

    def __init__(self, event: threading.Event) -> None:
        self._event = event

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        return torch.full((input_ids.shape[0],), self._event.is_set(), dtype=torch.bool, device=input_ids.device)


# CUDA reports these once the context is corrupt (an illegal memory access, a device-side
# assert): every later kernel fails too, so the process must be replaced. Out-of-memory is
# not among them: the next, smaller request can succeed.
STICKY_DEVICE_ERRORS = ("CUDA error", "CUBLAS_STATUS_", "CUDNN_STATUS_", "device-side assert")


def is_sticky_device_error(exc: BaseException) -> bool:
    text = str(exc)
    return type(exc).__name__ == "AcceleratorError" or any(marker in text for marker in STICKY_DEVICE_ERRORS)


def coordinate_token_ids(tokenizer: Any) -> frozenset[int]:
    """Ids of <0>..<999> in this tokenizer (absent ones skipped)."""
    vocab = tokenizer.get_vocab()
    return frozenset(vocab[t] for t in (bin_token(i) for i in range(NUM_BINS)) if t in vocab)


def resolve_device_and_dtype(device: str, dtype: str) -> tuple[str, Any]:
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    return device, getattr(torch, dtype)


class TransformersEngine:
    name = "transformers"
    # Concurrent generate() calls interleave but do not share decode steps.
    concurrent_batching = False
    supports_priority = False

    def __init__(
        self,
        model_path: str,
        *,
        device: str = "auto",
        dtype: str = "auto",
        max_concurrency: int = 4,
        fast_decode: str = "auto",
    ) -> None:
        self.model_path = model_path
        self._device_setting = device
        self._dtype_setting = dtype
        self._fast_decode_setting = fast_decode
        self._fast_decode = False
        self._max_concurrency = max_concurrency
        self._pool = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="generate")
        self._cancel: dict[str, threading.Event] = {}
        self._ready = False
        self._failure: str | None = None
        self._model: Any = None
        self._tokenizer: Any = None
        self._image_processor: Any = None
        self._device = "cpu"
        self._eos_id = -1
        self._stop_ids: list[int] = []
        self._coordinate_ids: frozenset[int] = frozenset()

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def failure(self) -> str | None:
        return self._failure

    @classmethod
    def from_loaded(
        cls,
        model: Any,
        tokenizer: Any,
        image_processor: Any,
        *,
        label: str,
        fast_decode: str = "auto",
        max_concurrency: int = 4,
    ) -> TransformersEngine:
        """An engine over components already in memory (benchmarks build random 3B models)."""
        engine = cls(label, fast_decode=fast_decode, max_concurrency=max_concurrency)
        engine._model, engine._tokenizer, engine._image_processor = model.eval(), tokenizer, image_processor
        engine._device = str(next(model.parameters()).device)
        return engine

    async def start(self) -> None:
        await run_abandonable(self._load, "load-model")
        self._ready = True

    def _load(self) -> None:
        from transformers import AutoImageProcessor, AutoTokenizer, Qwen2_5_VLForConditionalGeneration

        if self._model is None:
            self._device, torch_dtype = resolve_device_and_dtype(self._device_setting, self._dtype_setting)
            self._tokenizer = AutoTokenizer.from_pretrained(self.model_path)
            self._image_processor = AutoImageProcessor.from_pretrained(self.model_path)
            model_class: Any = Qwen2_5_VLForConditionalGeneration
            model = model_class.from_pretrained(self.model_path, dtype=torch_dtype)
            self._model = model.to(self._device).eval()
        self._eos_id = self._tokenizer.convert_tokens_to_ids(END_MARKER)
        # <|im_end|> ends the answer; the checkpoint's own end tokens (e.g. <|endoftext|>) too,
        # as vLLM and the reference wrapper honour them.
        configured = getattr(getattr(self._model, "generation_config", None), "eos_token_id", None)
        extra = configured if isinstance(configured, list) else [configured] if configured is not None else []
        self._stop_ids = [self._eos_id, *(int(i) for i in extra if int(i) != self._eos_id)]
        self._coordinate_ids = coordinate_token_ids(self._tokenizer)
        fast = self._fast_decode_setting
        self._fast_decode = fast == "on" or (fast == "auto" and self._device.startswith("cuda"))
        if self._fast_decode and self._max_concurrency > 1:
            # The static KV cache (and its compiled decode graphs) is one per model: one generation
            # at a time. Requests still queue asynchronously; vLLM is the engine for concurrency.
            self._pool.shutdown(wait=False)
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")
        log.info(
            "transformers engine loaded %s on %s (%s), fast decode %s",
            self.model_path,
            self._device,
            self._model.dtype,
            "on" if self._fast_decode else "off",
        )

    async def stop(self) -> None:
        self._ready = False
        for event in self._cancel.values():
            event.set()
        await asyncio.to_thread(self._pool.shutdown, wait=True)
        self._model = None

    async def abort(self, request_id: str) -> None:
        event = self._cancel.get(request_id)
        if event is not None:
            event.set()

    async def stream(self, request: EngineRequest) -> AsyncIterator[EngineEvent]:
        if self._failure is not None:
            raise EngineDead(f"the device failed: {self._failure}")
        if not self._ready:
            raise EngineNotReady("the model is still loading")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[_Item] = asyncio.Queue()
        cancel = threading.Event()
        self._cancel[request.request_id] = cancel

        def emit(item: _Item) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        future = loop.run_in_executor(self._pool, self._generate, request, cancel, emit)
        detokenizer = IncrementalDetokenizer(self._tokenizer, skip_ids=frozenset(self._stop_ids))
        try:
            while True:
                item = await queue.get()
                if isinstance(item, _Started):
                    yield EngineEvent(started=True, prompt_tokens=item.prompt_tokens)
                elif isinstance(item, _Tokens):
                    yield EngineEvent(
                        text=detokenizer.add(item.ids),
                        tokens=len(item.ids),
                        coordinate_logprobs=item.coordinate_logprobs,
                    )
                elif isinstance(item, _Failed):
                    if is_sticky_device_error(item.error):
                        self._failure = f"{type(item.error).__name__}: {item.error}"
                        raise EngineDead(f"the device failed: {item.error}") from item.error
                    raise EngineFailure(f"generation failed: {item.error}") from item.error
                else:
                    tail = detokenizer.flush()
                    yield EngineEvent(text=tail, finish_reason=item.reason)
                    break
            await future
        finally:
            cancel.set()  # a consumer that stopped early aborts the generation
            self._cancel.pop(request.request_id, None)

    # -- worker thread ----------------------------------------------------------------------
    def _generate(self, request: EngineRequest, cancel: threading.Event, emit: Callable[[_Item], None]) -> None:
        try:
            if cancel.is_set():
                emit(_Finished("abort"))
                return
            emit(self._run(request, cancel, emit))
        except BaseException as exc:
            log.exception("generation %s failed", request.request_id)
            emit(_Failed(exc))

    def model_inputs(self, request: EngineRequest) -> dict[str, Any]:
        """The tensors ``generate`` takes for a request, as Qwen2.5-VL's processor makes them:
        the chat prompt with one image pad per merged patch, the patches, their grid, and which
        tokens are image tokens (``mm_token_type_ids``, 1 = image). Without the last, recent
        transformers give image tokens plain 1-D positions instead of their (t, h, w) ones, and
        the model loses the image's layout."""
        import torch

        vision = self._image_processor(images=[request.image], do_resize=False, return_tensors="pt")
        grid = vision["image_grid_thw"]
        merge = int(getattr(self._image_processor, "merge_size", 2))
        image_tokens = int(grid.prod().item()) // (merge * merge)
        prompt = build_chat_prompt(request.task_text, image_tokens=image_tokens)
        input_ids = self._tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        inputs: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "pixel_values": vision["pixel_values"].to(self._model.dtype),
            "image_grid_thw": grid,
        }
        if "mm_token_type_ids" in inspect.signature(self._model.forward).parameters:
            image_pad = self._tokenizer.convert_tokens_to_ids(IMAGE_PAD)
            inputs["mm_token_type_ids"] = (input_ids == image_pad).to(torch.int32)
        return inputs

    def _run(self, request: EngineRequest, cancel: threading.Event, emit: Callable[[_Item], None]) -> _Finished:
        import torch
        from transformers import LogitsProcessorList, StoppingCriteriaList

        inputs = self.model_inputs(request)
        prompt_length = int(inputs["input_ids"].shape[1])
        emit(_Started(prompt_length))

        recorder = _LogprobRecorder()
        processors = LogitsProcessorList([recorder] if request.logprobs else [])
        if request.forced_output is not None:
            forced = forced_token_ids(self._tokenizer, request.forced_output)
            processors.append(ForcedOutputLogitsProcessor(forced, prompt_length, self._eos_id))
        sampling = request.sampling
        kwargs: dict[str, Any] = {
            "max_new_tokens": sampling.max_new_tokens,
            "repetition_penalty": sampling.repetition_penalty,
            "do_sample": not sampling.greedy,
        }
        if not sampling.greedy:
            kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k)
        if self._fast_decode:
            # Static KV cache: on CUDA transformers compiles the decode step into CUDA graphs,
            # removing the per-token Python and launch overhead that dominates batch-1 decode.
            kwargs["cache_implementation"] = "static"
        with torch.inference_mode():
            output = self._model.generate(
                **{k: v.to(self._device) for k, v in inputs.items()},
                eos_token_id=self._stop_ids,
                pad_token_id=self._tokenizer.pad_token_id,
                logits_processor=processors,
                stopping_criteria=StoppingCriteriaList([_CancelCriteria(cancel)]),
                streamer=_QueueStreamer(emit, recorder, self._coordinate_ids),
                **kwargs,
            )
        generated = output[0, prompt_length:].tolist()
        if cancel.is_set():
            return _Finished("abort")
        if generated and generated[-1] in self._stop_ids:
            return _Finished("stop")
        return _Finished("length")
