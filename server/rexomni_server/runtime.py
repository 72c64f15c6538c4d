"""Composition root shared by every transport: settings -> model -> engine -> service.

The engine loads in a background task so the HTTP server answers /health (and /ready with
503) while a multi-GB model loads. With ``fallback_to_tiny`` a model that cannot be loaded is
replaced by the tiny random-weight checkpoint, and every response says so in ``model``.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
from pathlib import Path

from rexomni_server.auth import ApiKeys
from rexomni_server.engines.base import Engine
from rexomni_server.errors import InvalidRequest
from rexomni_server.service import DetectionService
from rexomni_server.settings import TINY_MODEL, Settings
from rexomni_server.tiny import is_tiny_model

log = logging.getLogger(__name__)

TINY_LABEL = "tiny-random (RANDOM WEIGHTS: detections are meaningless)"
# A random model rarely writes its end token: cap its default budget so demo requests return
# in about a second instead of running to 4096 tokens (a request may still ask for more).
TINY_DEFAULT_MAX_NEW_TOKENS = 256


def ensure_tiny_model(directory: Path) -> Path:
    from rexomni_server.tiny import make_tiny_model

    if not is_tiny_model(directory):
        log.warning("generating the tiny random-weight checkpoint in %s", directory)
        make_tiny_model(directory)
    return directory


def model_reachable(model: str, timeout_s: float = 5.0) -> bool:
    """Cheap check that a checkpoint can be had: a local folder, the hub cache, or the hub.

    transformers retries an unreachable hub for about a minute before failing; with
    ``fallback_to_tiny`` this check lets an offline machine fall back at once.
    """
    if Path(model).expanduser().is_dir():
        return True
    try:
        import huggingface_hub
    except ImportError:
        return False
    if isinstance(huggingface_hub.try_to_load_from_cache(model, "config.json"), str):
        return True
    try:
        huggingface_hub.HfApi().model_info(model, timeout=timeout_s)
    except Exception:  # any failure means "not reachable now"
        return False
    return True


def choose_engine_name(settings: Settings) -> str:
    if settings.engine != "auto":
        return settings.engine
    if settings.device != "auto":  # a device to run on is a transformers setting: vLLM takes them all
        return "transformers"
    if importlib.util.find_spec("vllm") is not None:
        from rexomni_server.engines.vllm import vllm_usable

        if vllm_usable():  # installed with a device to run on (a GPU, or its CPU build)
            return "vllm"
    return "transformers"


def build_engine(settings: Settings, model_path: str) -> Engine:
    name = choose_engine_name(settings)
    if name == "transformers":
        from rexomni_server.engines.transformers import TransformersEngine

        return TransformersEngine(
            model_path,
            device=settings.device,
            dtype=settings.dtype,
            max_concurrency=settings.max_concurrency,
            fast_decode=settings.fast_decode,
        )
    if name == "vllm":
        if importlib.util.find_spec("vllm") is None:
            raise InvalidRequest("engine 'vllm' needs vLLM installed (pip install 'rexomni[vllm]')")
        if settings.device != "auto":
            # vLLM takes every GPU it is shown: choose them with CUDA_VISIBLE_DEVICES instead.
            raise InvalidRequest(
                f"device {settings.device!r} applies to the transformers engine; vLLM uses the GPUs in "
                "CUDA_VISIBLE_DEVICES (e.g. CUDA_VISIBLE_DEVICES=1 for the second GPU)"
            )
        from rexomni_server.engines.vllm import VllmEngine

        return VllmEngine(model_path, settings)
    if name == "scripted":
        from rexomni_server.engines.scripted import ScriptedEngine

        return ScriptedEngine(token_delay_s=settings.scripted_token_delay_s)
    raise InvalidRequest(f"engine {name!r} is not available in this installation")


class LoadFailed(Exception):
    """The model and its fallback both failed to load (the message names both reasons)."""


ENGINE_WATCH_S = 0.25  # how often the engine's health is looked at


class Runtime:
    """Owns the engine's life: build, start in the background, fall back, watch, stop.

    Two failures are fatal: a model that cannot be loaded (and no working fallback), and an
    engine that dies while serving. Either sets ``error`` and ``fatal``: the server stops being
    ready at once, and ``serve`` exits non-zero shortly after, so the orchestrator restarts it.
    """

    def __init__(self, settings: Settings, engine: Engine | None = None, model_label: str | None = None) -> None:
        self.settings = settings
        self.api_keys = ApiKeys.from_settings(settings)
        self.random_weights = False
        self.error: str | None = None  # why this server cannot serve (fatal), for /health and /ready
        self.fatal = asyncio.Event()
        if engine is None:
            model_path = settings.model
            if model_path == TINY_MODEL:
                model_path = str(ensure_tiny_model(settings.tiny_model_dir))
            # The tiny checkpoint however it is named (`tiny`, or its directory): its answers
            # must say they come from random weights.
            self.random_weights = is_tiny_model(model_path)
            engine = build_engine(settings, model_path)
        if model_label is None:
            model_label = TINY_LABEL if self.random_weights else settings.model
        self.service = DetectionService(settings, engine, model_label)
        if settings.model == TINY_MODEL:
            self._serve_the_demo_model()
        self._boot: asyncio.Task[None] | None = None

    @property
    def engine(self) -> Engine:
        return self.service.engine

    @property
    def problem(self) -> str | None:
        """Why this server cannot serve, as soon as it is known: a failed load, or an engine that
        reports itself dead (before the watcher has turned that into ``error``)."""
        if self.error is not None:
            return self.error
        failure = self.engine.failure
        return None if failure is None else describe_death(failure)

    @property
    def ready(self) -> bool:
        return self.problem is None and self.engine.ready

    def start_background(self) -> None:
        self._boot = asyncio.create_task(self._start())

    async def _start(self) -> None:
        try:
            await self._start_engine()
        except Exception as exc:
            self._fail(f"the model could not be loaded: {exc if isinstance(exc, LoadFailed) else describe(exc)}")
            return
        log.info("engine ready", extra={"fields": {"engine": self.engine.name, "model": self.service.model_label}})
        await self._watch_engine()

    async def _start_engine(self) -> None:
        """The configured model, else (with ``fallback_to_tiny``) the tiny random-weight one.
        Raises with every reason when nothing could be started."""
        try:
            if self.settings.fallback_to_tiny and not self.random_weights:
                reachable = await asyncio.to_thread(model_reachable, self.settings.model)
                if not reachable:
                    raise FileNotFoundError(f"{self.settings.model!r} is neither a folder nor reachable on the hub")
            await self.engine.start()
        except Exception as exc:
            if not self.settings.fallback_to_tiny or self.random_weights:
                raise
            await self._start_fallback(describe(exc))

    async def _start_fallback(self, why: str) -> None:
        log.warning(
            "model %r could not be loaded (%s); serving the tiny RANDOM-WEIGHT model instead", self.settings.model, why
        )
        try:
            path = await asyncio.to_thread(ensure_tiny_model, self.settings.tiny_model_dir)
            self._serve_the_demo_model()
            self.service.engine = build_engine(self.settings.model_copy(update={"engine": "transformers"}), str(path))
            await self.engine.start()
        except Exception as exc:
            raise LoadFailed(f"{why}; the tiny fallback failed too: {describe(exc)}") from exc

    async def _watch_engine(self) -> None:
        while True:
            await asyncio.sleep(ENGINE_WATCH_S)
            failure = self.engine.failure
            if failure is not None:
                self._fail(describe_death(failure))
                return

    def _fail(self, error: str) -> None:
        self.error = error
        log.error(error, extra={"fields": {"engine": self.engine.name, "model": self.service.model_label}})
        self.fatal.set()

    def _serve_the_demo_model(self) -> None:
        """The tiny model as the demo (`--model tiny`, or the fallback): labelled, and with a short
        default budget. Named by its directory (tests, benchmarks) it is labelled too, but keeps
        the normal budget: forced answers there are long."""
        self.random_weights = True
        self.service.model_label = TINY_LABEL
        budget = min(self.settings.max_new_tokens, TINY_DEFAULT_MAX_NEW_TOKENS)
        self.service.settings = self.settings.model_copy(update={"max_new_tokens": budget})

    async def stop(self) -> None:
        if self._boot is not None and not self._boot.done():
            self._boot.cancel()
        await self.engine.stop()


def describe_death(failure: str) -> str:
    return f"the engine died: {failure}"


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"
