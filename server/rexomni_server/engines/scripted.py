"""A scripted engine: no model, replays a given output token by token (unit tests, demos).

It streams ``forced_output`` (or the engine's default script) split into the same pieces a
tokenizer would produce for specials and coordinates, so parser and transport behaviour can
be tested fast and deterministically. It is never picked by ``engine=auto``.
"""

from __future__ import annotations

import asyncio
import collections
import re
from collections.abc import AsyncIterator, Sequence

from rexomni_server.engines.base import EngineEvent, EngineRequest
from rexomni_server.errors import EngineDead, EngineNotReady

KEEP_REQUESTS = 64
# Without a token delay the replay would never wait, and so never let the event loop run: other
# requests, disconnects and probes would wait for a whole answer. A real engine's stream waits
# for every token; this one lets the loop run every few tokens.
YIELD_EVERY_TOKENS = 16
_PIECES = re.compile(r"<\|[a-z_]+\|>|<\d+>|[^<]|<")


def split_like_tokens(text: str) -> list[str]:
    return _PIECES.findall(text)


class ScriptedEngine:
    name = "scripted"

    def __init__(
        self,
        default_output: str = "",
        token_delay_s: float = 0.0,
        prompt_tokens: int = 100,
        coordinate_logprob: float | Sequence[float] | None = None,
        concurrent_batching: bool = False,
    ) -> None:
        self.concurrent_batching = concurrent_batching
        self.supports_priority = False
        self._default = default_output
        # One value for every coordinate token, or one per coordinate token in turn (cycled).
        if coordinate_logprob is None or isinstance(coordinate_logprob, float):
            self._coordinate_logprobs: Sequence[float] = () if coordinate_logprob is None else (coordinate_logprob,)
        else:
            self._coordinate_logprobs = coordinate_logprob
        self._delay = token_delay_s
        self._prompt_tokens = prompt_tokens
        self._ready = False
        self._failure: str | None = None
        self._running: set[str] = set()
        self._aborted: set[str] = set()
        # The latest requests it was asked (tests inspect them); bounded, so a server or a
        # benchmark on this engine does not keep every image it was sent.
        self.requests: collections.deque[EngineRequest] = collections.deque(maxlen=KEEP_REQUESTS)

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def failure(self) -> str | None:
        return self._failure

    def fail(self, reason: str) -> None:
        """Die as a real engine can: every stream, running or new, ends with EngineDead."""
        self._failure = reason

    async def start(self) -> None:
        self._ready = True

    async def stop(self) -> None:
        self._ready = False

    async def abort(self, request_id: str) -> None:
        if request_id in self._running:  # unknown ids are not kept (nothing would remove them)
            self._aborted.add(request_id)

    async def stream(self, request: EngineRequest) -> AsyncIterator[EngineEvent]:
        if not self._ready:
            raise EngineNotReady("the scripted engine is not started")
        self.requests.append(request)
        self._running.add(request.request_id)
        # One generator, no inner one: a benchmark on this engine measures the server, and a
        # generator layer per token would be the harness's cost counted as the server's.
        try:
            text = request.forced_output if request.forced_output is not None else self._default
            pieces = split_like_tokens(text)
            budget = request.sampling.max_new_tokens
            self._check_alive()
            yield EngineEvent(started=True, prompt_tokens=self._prompt_tokens)
            coordinates = 0
            scored = request.logprobs and bool(self._coordinate_logprobs)
            for index, piece in enumerate(pieces[:budget]):
                if request.request_id in self._aborted:
                    yield EngineEvent(finish_reason="abort")
                    return
                if self._delay:
                    await asyncio.sleep(self._delay)
                elif index % YIELD_EVERY_TOKENS == 0:
                    await asyncio.sleep(0)
                if self._failure is not None:
                    self._check_alive()
                logprobs: tuple[float, ...] = ()
                if scored and piece.startswith("<") and piece[1:-1].isdigit():
                    logprobs = (self._coordinate_logprobs[coordinates % len(self._coordinate_logprobs)],)
                    coordinates += 1
                yield EngineEvent(text=piece, tokens=1, coordinate_logprobs=logprobs)
            yield EngineEvent(finish_reason="length" if len(pieces) > budget else "stop")
        finally:
            self._running.discard(request.request_id)
            self._aborted.discard(request.request_id)

    def _check_alive(self) -> None:
        if self._failure is not None:
            raise EngineDead(f"the scripted engine has failed: {self._failure}")
