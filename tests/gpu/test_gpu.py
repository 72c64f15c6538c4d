"""GPU checks (marked ``gpu``; skipped without CUDA): Rex-Omni's real 3B architecture with
random BF16 weights on the transformers engine, eager and fast decode."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from PIL import Image

from rexomni_server.engines.base import EngineRequest, SamplingConfig
from rexomni_server.engines.transformers import TransformersEngine
from rexomni_server.tiny import architecture_config, random_components

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
FORCED = "<|object_ref_start|>person<|object_ref_end|><|box_start|><1><2><3><4>, <5><6><7><8><|box_end|>"


@pytest.fixture(scope="module")
async def components() -> AsyncIterator[tuple[object, object, object]]:
    yield random_components(architecture_config("qwen2_5_vl_3b"), "cuda", "bfloat16")
    torch.cuda.empty_cache()


@pytest.mark.parametrize("fast_decode", ["off", "on"])
async def test_3b_forced_output_on_gpu(components: tuple[object, object, object], fast_decode: str) -> None:
    engine = TransformersEngine.from_loaded(*components, label="random-3b", fast_decode=fast_decode)
    await engine.start()
    request = EngineRequest(
        f"gpu-{fast_decode}",
        "Detect person.",
        Image.new("RGB", (644, 476)),
        SamplingConfig(64, 0.0, 0.8, 1, 1.05),
        FORCED,
    )
    events = [e async for e in engine.stream(request)]
    assert "".join(e.text for e in events) == FORCED
    assert events[-1].finish_reason == "stop"
    assert len([lp for e in events for lp in e.coordinate_logprobs]) == 8
    assert engine._model.dtype == torch.bfloat16  # type: ignore[attr-defined]
