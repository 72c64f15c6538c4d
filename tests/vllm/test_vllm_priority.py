"""options.priority on a real vLLM engine that schedules by priority, with room for one
sequence at a time: of two requests waiting behind a long one, the more urgent is served
first even though it came second; with equal priorities arrival order holds."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from rexomni_server.runtime import Runtime
from rexomni_server.schemas import DetectParams
from tests.support import image_bytes
from tests.vllm.conftest import vllm_settings
from tests.vllm.test_vllm_engine import forced_boxes

PNG = image_bytes(320, 240)


@pytest.fixture(scope="module")
async def one_at_a_time(tiny_model_dir: Path) -> AsyncIterator[Runtime]:
    runtime = Runtime(vllm_settings(tiny_model_dir, max_num_seqs=1, vllm_scheduling_policy="priority"))
    await runtime.engine.start()
    yield runtime
    await runtime.stop()


async def finishing_order(runtime: Runtime, second_priority: int, third_priority: int) -> list[str]:
    finished: list[str] = []

    async def run(name: str, boxes: int, priority: int) -> None:
        options = {"forced_output": forced_boxes(boxes), "priority": priority}
        params = DetectParams.model_validate({"categories": ["person"], "options": options})
        await runtime.service.detect(params, PNG)
        finished.append(name)

    long = asyncio.create_task(run("long", 150, 0))  # holds the only slot for seconds
    await asyncio.sleep(0.5)
    second = asyncio.create_task(run("second", 3, second_priority))
    await asyncio.sleep(0.2)
    third = asyncio.create_task(run("third", 3, third_priority))
    await asyncio.gather(long, second, third)
    return finished


async def test_the_more_urgent_waiting_request_is_served_first(one_at_a_time: Runtime) -> None:
    order = await finishing_order(one_at_a_time, second_priority=5, third_priority=-5)
    assert order.index("third") < order.index("second"), order


async def test_equal_priorities_keep_arrival_order(one_at_a_time: Runtime) -> None:
    order = await finishing_order(one_at_a_time, second_priority=0, third_priority=0)
    assert order.index("second") < order.index("third"), order
