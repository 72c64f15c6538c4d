"""The transformers engine for real on the tiny checkpoint."""

from __future__ import annotations

import asyncio
import inspect
import time
from typing import Any

import pytest
from PIL import Image

from rexomni_server.engines.base import EngineEvent, EngineRequest, SamplingConfig
from rexomni_server.engines.detokenize import IncrementalDetokenizer
from rexomni_server.engines.transformers import TransformersEngine
from rexomni_server.runtime import Runtime
from rexomni_server.tiny import TINY_TEXT, TINY_VISION, architecture_config, random_components

SAMPLING = SamplingConfig(max_new_tokens=64, temperature=0.0, top_p=0.8, top_k=1, repetition_penalty=1.05)
IMAGE = Image.new("RGB", (112, 84), (200, 30, 30))
FORCED = "<|object_ref_start|>dog<|object_ref_end|><|box_start|><1><2><3><4>, <5><6><7><8><|box_end|>"


def request(rid: str, forced: str | None = FORCED, max_new_tokens: int = 64) -> EngineRequest:
    sampling = SamplingConfig(**{**SAMPLING.__dict__, "max_new_tokens": max_new_tokens})
    return EngineRequest(
        rid,
        "Detect dog. Output the bounding box coordinates in [x0, y0, x1, y1] format.",
        IMAGE,
        sampling,
        forced,
    )


async def collect(engine: TransformersEngine, req: EngineRequest) -> list[EngineEvent]:
    return [event async for event in engine.stream(req)]


def engine_of(runtime: Runtime) -> TransformersEngine:
    assert isinstance(runtime.engine, TransformersEngine)
    return runtime.engine


async def test_forced_output_streams_token_by_token(tiny_runtime: Runtime) -> None:
    events = await collect(engine_of(tiny_runtime), request("a"))
    assert events[0].started and events[0].prompt_tokens and events[0].prompt_tokens > 12
    deltas = [e.text for e in events[1:] if e.text]
    assert "".join(deltas) == FORCED
    assert len(deltas) >= 12  # one delta per token: specials and coordinates arrive separately
    assert events[-1].finish_reason == "stop"
    assert sum(e.tokens for e in events) == len(deltas) + 1  # + the end-of-turn token


async def test_max_new_tokens_stops_with_length(tiny_runtime: Runtime) -> None:
    events = await collect(engine_of(tiny_runtime), request("b", max_new_tokens=5))
    assert events[-1].finish_reason == "length"
    assert sum(e.tokens for e in events) == 5


async def test_unforced_random_model_generates_something(tiny_runtime: Runtime) -> None:
    events = await collect(engine_of(tiny_runtime), request("c", forced=None, max_new_tokens=8))
    assert events[-1].finish_reason in ("stop", "length")
    assert 1 <= sum(e.tokens for e in events) <= 8


async def test_concurrent_requests_all_complete_and_do_not_block_the_loop(tiny_runtime: Runtime) -> None:
    engine = engine_of(tiny_runtime)
    ticks = 0
    stop = asyncio.Event()

    async def heartbeat() -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            await asyncio.sleep(0.005)

    beat = asyncio.create_task(heartbeat())
    start = time.perf_counter()
    results = await asyncio.gather(*[collect(engine, request(f"c{i}", max_new_tokens=40)) for i in range(4)])
    elapsed = time.perf_counter() - start
    stop.set()
    await beat
    assert all("".join(e.text for e in r) == FORCED for r in results)
    # The loop kept running while four generations ran in worker threads.
    assert ticks >= elapsed / 0.005 * 0.2


async def test_abort_and_early_close_stop_the_generation(tiny_runtime: Runtime) -> None:
    engine = engine_of(tiny_runtime)
    long_forced = FORCED * 20
    stream = engine.stream(request("d", forced=long_forced, max_new_tokens=400))
    events = [await anext(stream), await anext(stream)]
    await engine.abort("d")
    events += [e async for e in stream]
    assert events[-1].finish_reason == "abort"
    assert sum(e.tokens for e in events) < 400
    # Closing the iterator early also frees the worker: the next request runs normally.
    stream2 = engine.stream(request("e", forced=long_forced, max_new_tokens=400))
    await anext(stream2)
    await stream2.aclose()  # type: ignore[attr-defined]
    assert "".join(e.text for e in await collect(engine, request("f"))) == FORCED


def test_detokenizer_never_splits_a_character(tiny_runtime: Runtime) -> None:
    tokenizer = engine_of(tiny_runtime)._tokenizer
    text = "Größe 東京 <12><|box_end|> ok"
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.add([i]) for i in ids] + [detok.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


@pytest.mark.slow
async def test_compiled_fast_decode_matches_eager_decoding() -> None:
    """On CUDA, fast decode (static KV cache) makes transformers compile the decode step. That
    compile is forced here on the CPU, so a torch or transformers change that breaks it for
    Qwen2.5-VL fails CI instead of the GPU run. Same weights: same text, same log-probabilities."""
    import torch
    from transformers import CompileConfig

    arch = {**architecture_config("qwen2_5_vl_3b"), **TINY_TEXT, "vision_config": TINY_VISION, "vocab_size": 4096}
    components = random_components(arch, "cpu", "float32")
    compile_everywhere = CompileConfig(fullgraph=False)
    compile_everywhere._compile_all_devices = True  # transformers compiles only on accelerators by default
    components[0].generation_config.compile_config = compile_everywhere

    torch._dynamo.utils.counters.clear()
    streams = {}
    for mode in ("off", "on"):
        engine = TransformersEngine.from_loaded(*components, label="tiny-3b-shape", fast_decode=mode)
        await engine.start()
        streams[mode] = await collect(engine, request(f"compiled-{mode}"))
        await engine.stop()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the decode step really was compiled
    eager, compiled = streams["off"], streams["on"]
    assert "".join(e.text for e in compiled) == "".join(e.text for e in eager) == FORCED
    assert compiled[-1].finish_reason == "stop"
    eager_lp = [lp for e in eager for lp in e.coordinate_logprobs]
    compiled_lp = [lp for e in compiled for lp in e.coordinate_logprobs]
    assert len(compiled_lp) == 8
    assert compiled_lp == pytest.approx(eager_lp, abs=1e-3)


async def test_image_tokens_get_their_2d_positions_in_generation(
    tiny_runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Qwen2.5-VL places image tokens by (t, h, w). The engine must mark them as image tokens
    so the model computes those positions, as its own processor's inputs would make it."""
    engine = engine_of(tiny_runtime)
    model: Any = engine._model
    if "mm_token_type_ids" not in inspect.signature(model.forward).parameters:
        pytest.skip("this transformers places image tokens from input_ids alone")
    wide = Image.new("RGB", (224, 112), (9, 9, 9))  # an 8x4 grid of merged patches
    inputs = engine.model_inputs(EngineRequest("p", "Detect dog.", wide, SAMPLING, FORCED))
    marked = inputs["mm_token_type_ids"][0]
    pads = inputs["input_ids"][0] == engine._tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert marked.tolist() == pads.int().tolist() and int(marked.sum()) == 8 * 4

    computed: list[Any] = []
    rope_index = model.model.get_rope_index

    def spy(*args: Any, **kwargs: Any) -> Any:
        positions, deltas = rope_index(*args, **kwargs)
        computed.append(positions)
        return positions, deltas

    monkeypatch.setattr(model.model, "get_rope_index", spy)
    events = await collect(engine, EngineRequest("p", "Detect dog.", wide, SAMPLING, FORCED))
    assert "".join(e.text for e in events) == FORCED
    assert computed, "generation did not compute the (t, h, w) positions"
    t, h, w = (axis[0][marked.bool()] for axis in computed[0])
    assert t.unique().numel() == 1  # one frame
    assert h.unique().numel() == 4 and w.unique().numel() == 8  # rows and columns, not a line


async def test_the_checkpoints_own_end_tokens_also_end_the_answer() -> None:
    arch = {**architecture_config("qwen2_5_vl_3b"), **TINY_TEXT, "vision_config": TINY_VISION, "vocab_size": 4096}
    model, tokenizer, image_processor = random_components(arch, "cpu", "float32")
    end_of_text = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    model.generation_config.eos_token_id = [tokenizer.convert_tokens_to_ids("<|im_end|>"), end_of_text]
    engine = TransformersEngine.from_loaded(model, tokenizer, image_processor, label="two-ends")
    await engine.start()
    try:
        events = await collect(engine, request("ends", forced=FORCED + "<|endoftext|><|box_start|><9>"))
    finally:
        await engine.stop()
    assert "".join(e.text for e in events) == FORCED  # stopped at <|endoftext|>, which is not shown
    assert events[-1].finish_reason == "stop"


async def test_a_sticky_device_error_kills_the_engine_and_a_plain_failure_does_not(
    tiny_runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CUDA errors such as an illegal memory access leave the device unusable: the engine reports
    itself failed (the server then exits) and refuses further work. Out of memory, or any other
    error, fails one request only."""
    from rexomni_server.errors import EngineDead, EngineFailure

    loaded = engine_of(tiny_runtime)
    engine = TransformersEngine.from_loaded(loaded._model, loaded._tokenizer, loaded._image_processor, label="tiny")
    await engine.start()
    failures = iter(
        [
            RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"),
            RuntimeError("CUDA error: an illegal memory access was encountered"),
        ]
    )

    def failing_generate(**kwargs: Any) -> Any:
        raise next(failures)

    monkeypatch.setattr(engine._model, "generate", failing_generate)
    with pytest.raises(EngineFailure):
        await collect(engine, request("oom"))
    assert engine.failure is None  # out of memory: the next, smaller request may succeed
    with pytest.raises(EngineDead, match="illegal memory access"):
        await collect(engine, request("sticky"))
    assert engine.failure is not None and "illegal memory access" in engine.failure
    with pytest.raises(EngineDead):  # refused at once, the model is not touched again
        await collect(engine, request("after"))
    await engine.stop()
