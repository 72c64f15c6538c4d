"""Admission counts work: engine requests (a fanned-out request takes one per category) and
images in the bounded decode pool; refusals are immediate and say when to come back."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field

import pytest

import rexomni_server.service as service_module
from rexomni_server.engines.scripted import ScriptedEngine
from rexomni_server.errors import InvalidRequest, Overloaded, RequestTimeout
from rexomni_server.schemas import DetectParams
from rexomni_server.service import DetectionService
from rexomni_server.settings import Settings
from tests.support import image_bytes, wait_until

OUTPUT = "<|object_ref_start|>a<|object_ref_end|><|box_start|><0><0><9><9><|box_end|>"
IMAGE = image_bytes(64, 48)


async def batching_service(token_delay_s: float = 0.0, **settings: object) -> DetectionService:
    engine = ScriptedEngine(default_output=OUTPUT, token_delay_s=token_delay_s, concurrent_batching=True)
    await engine.start()
    return DetectionService(Settings(**settings), engine, "scripted")  # type: ignore[arg-type]


def params(*categories: str, **options: object) -> DetectParams:
    return DetectParams.model_validate({"categories": list(categories), "options": options})


async def test_a_fanned_out_request_takes_one_slot_per_engine_request() -> None:
    service = await batching_service(token_delay_s=0.02, max_queue=3)
    first = asyncio.create_task(service.detect(params("a", "b", "c"), IMAGE))  # fans out: 3 engine requests
    await wait_until(lambda: service.engine_requests == 3, what="the fan-out to be admitted")
    with pytest.raises(Overloaded) as refused:
        await service.detect(params("d"), IMAGE)
    assert refused.value.retry_after_s is not None and "engine requests" in refused.value.message
    assert len((await first).detections) == 3
    assert service.engine_requests == 0 and service.in_flight == 0
    assert await service.detect(params("d"), IMAGE)  # the slots came back


async def test_a_request_larger_than_the_queue_is_refused_with_advice() -> None:
    service = await batching_service(max_queue=3)
    with pytest.raises(InvalidRequest, match="fan_out=false"):
        await service.detect(params("a", "b", "c", "d"), IMAGE)
    result = await service.detect(params("a", "b", "c", "d", fan_out=False), IMAGE)  # one engine request
    assert result.detections


@dataclass
class HeldDecodes:
    """Image decodes that wait for ``gate``; each records its thread and its image."""

    gate: threading.Event = field(default_factory=threading.Event)
    threads: list[str] = field(default_factory=list)
    images: list[object] = field(default_factory=list)


@pytest.fixture
def held(monkeypatch: pytest.MonkeyPatch) -> HeldDecodes:
    held = HeldDecodes()
    decode = service_module.decode_and_prepare

    def held_decode(image: object, *args: object) -> object:
        held.threads.append(threading.current_thread().name)
        held.images.append(image)
        held.gate.wait(10)
        return decode(image, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(service_module, "decode_and_prepare", held_decode)
    return held


async def test_images_decode_in_the_bounded_pool_and_a_full_decode_queue_refuses_at_once(held: HeldDecodes) -> None:
    gate, threads = held.gate, held.threads
    service = await batching_service(decode_workers=1, decode_queue=2)
    waiting = [asyncio.create_task(service.detect(params("a"), IMAGE)) for _ in range(2)]
    await wait_until(lambda: service.decoding == 2, what="two images in the decode queue")
    with pytest.raises(Overloaded) as refused:
        await service.detect(params("a"), IMAGE)
    assert "decoding" in refused.value.message and refused.value.retry_after_s is not None
    gate.set()
    assert all(result.detections for result in await asyncio.gather(*waiting))
    assert threads and all(name.startswith("decode") for name in threads)  # the pool's one thread
    assert len(set(threads)) == 1
    assert service.decoding == 0


async def test_a_request_whose_budget_runs_out_in_the_decode_queue_is_never_decoded(held: HeldDecodes) -> None:
    gate, decoded = held.gate, held.images
    service = await batching_service(decode_workers=1, request_timeout_s=0.3)
    holder = asyncio.create_task(service.detect(params("a"), IMAGE))
    await wait_until(lambda: len(decoded) == 1, what="the first decode to start")
    late_image = image_bytes(32, 32)
    with pytest.raises(RequestTimeout):
        await service.detect(params("a"), late_image)
    gate.set()
    with pytest.raises(RequestTimeout):  # its own budget ran out while it held the only thread
        await holder
    await asyncio.sleep(0.1)  # the pool would have started the late decode by now
    assert late_image not in decoded
    assert service.decoding == 0 and service.in_flight == 0
