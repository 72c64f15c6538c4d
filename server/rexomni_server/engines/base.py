"""The engine protocol: start, ready, failure, stream, abort, stop. Everything else is the service's."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from PIL import Image

from rexomni_server.vocabulary import FinishReason


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0 or self.top_k == 1


@dataclass(frozen=True)
class EngineRequest:
    request_id: str
    task_text: str  # the user text; engines wrap it in the chat template with the image
    image: Image.Image  # already resized to the smart_resize size
    sampling: SamplingConfig
    forced_output: str | None = None  # tests/benchmarks: the exact output to produce
    logprobs: bool = True  # report coordinate-token log-probabilities (for scores)
    priority: int = 0  # lower first, on engines that schedule by priority


@dataclass(slots=True)  # not frozen: made once per token, and a frozen dataclass is slower to make
class EngineEvent:
    """One step of a generation stream.

    The first event of a stream has ``started=True`` and ``prompt_tokens`` (the generation left
    the queue); then text deltas; the last event carries ``finish_reason``.
    """

    text: str = ""
    tokens: int = 0
    started: bool = False
    prompt_tokens: int | None = None
    finish_reason: FinishReason | None = None
    # Log-probabilities of the coordinate tokens (<0>..<999>) among this event's tokens, in
    # order; empty where the engine cannot compute them.
    coordinate_logprobs: tuple[float, ...] = ()


class Engine(Protocol):
    name: str
    # True when concurrent requests share decode steps (continuous batching): then splitting a
    # multi-category request into one request per category costs about one request's time.
    concurrent_batching: bool
    # True when the engine orders waiting requests by EngineRequest.priority.
    supports_priority: bool

    @property
    def ready(self) -> bool: ...

    @property
    def failure(self) -> str | None:
        """Why the engine can serve no more (its process died, a sticky device error), or None
        while it is healthy. Permanent: the server stops being ready and exits."""
        ...

    async def start(self) -> None:
        """Load the model; ``ready`` turns true when this returns."""

    def stream(self, request: EngineRequest) -> AsyncIterator[EngineEvent]:
        """Generate; closing the iterator early aborts the generation."""
        ...

    async def abort(self, request_id: str) -> None:
        """Stop a running generation (no-op for unknown ids)."""

    async def stop(self) -> None:
        """Release the model; in-flight generations end with finish_reason 'abort'."""
