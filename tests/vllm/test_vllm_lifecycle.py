"""The vLLM engine's edges on a real engine: a prompt vLLM refuses is the client's error, and
stopping the engine ends the generations still running instead of leaving them waiting."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from PIL import Image

from rexomni_server.engines.base import EngineEvent, EngineRequest, SamplingConfig
from rexomni_server.errors import InvalidRequest
from rexomni_server.runtime import Runtime
from tests.vllm.conftest import vllm_settings
from tests.vllm.test_vllm_engine import forced_boxes

IMAGE = Image.new("RGB", (224, 168), (30, 60, 90))
SAMPLING = SamplingConfig(max_new_tokens=2048, temperature=0.0, top_p=0.8, top_k=1, repetition_penalty=1.05)


async def test_a_prompt_longer_than_the_context_is_a_client_error(vllm_runtime: Runtime) -> None:
    # Past the service's image-only check: a task text of thousands of tokens (64 long phrases).
    text = "Detect " + ", ".join(f"object number {i} " * 12 for i in range(64)) + "."
    with pytest.raises(InvalidRequest, match="vLLM rejected the request"):
        async for _ in vllm_runtime.engine.stream(EngineRequest("too-long", text, IMAGE, SAMPLING)):
            pass


async def test_stopping_the_engine_ends_running_generations(tiny_model_dir: Path) -> None:
    runtime = Runtime(vllm_settings(tiny_model_dir))
    await runtime.engine.start()
    events: list[EngineEvent] = []
    started = asyncio.Event()

    async def generate() -> None:
        request = EngineRequest("stopped", "Detect person.", IMAGE, SAMPLING, forced_boxes(300))
        async for event in runtime.engine.stream(request):
            events.append(event)
            if event.tokens:
                started.set()

    task = asyncio.create_task(generate())
    try:
        await asyncio.wait_for(started.wait(), 60)
        stopped_at = time.monotonic()
        await runtime.stop()
        await asyncio.wait_for(task, 10)  # it ends, rather than waiting for ever
    finally:
        task.cancel()
    assert events[-1].finish_reason == "abort"
    assert time.monotonic() - stopped_at < 10
