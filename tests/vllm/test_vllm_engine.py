"""The vLLM engine for real (CPU build) on the tiny checkpoint, behind real HTTP and gRPC."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from PIL import Image

from rexomni_server._pb.rexomni.v1 import detector_pb2_grpc as pb_grpc
from rexomni_server.engines.base import EngineRequest, SamplingConfig
from rexomni_server.runtime import Runtime
from rexomni_server.schemas import DetectParams
from rexomni_server.serve import RunningServers
from rexomni_server.transport.convert import params_to_pb, result_from_pb
from tests.support import image_bytes
from tests.unit.test_deploy import dashboard_series

pytestmark = pytest.mark.vllm
W, H = 640, 480
PNG = image_bytes(W, H)


def forced_boxes(n: int, label: str = "person", offset: int = 0) -> str:
    boxes = ", ".join(f"<{i + offset}><{i + 1}><{i + 50}><{i + 60}>" for i in range(n))
    return f"<|object_ref_start|>{label}<|object_ref_end|><|box_start|>{boxes}<|box_end|>"


def body(forced: str, categories: list[str] | None = None, **options: Any) -> dict[str, Any]:
    return {
        "image": base64.b64encode(PNG).decode(),
        "categories": categories or ["person"],
        "options": {"forced_output": forced, **options},
    }


def expected_boxes(n: int, offset: int = 0) -> list[list[float]]:
    return [[(i + offset) / 999 * W, (i + 1) / 999 * H, (i + 50) / 999 * W, (i + 60) / 999 * H] for i in range(n)]


async def test_engine_streams_forced_output_with_logprobs(vllm_runtime: Runtime) -> None:
    sampling = SamplingConfig(64, 0.0, 0.8, 1, 1.05)
    forced = forced_boxes(2)
    request = EngineRequest("direct-1", "Detect person.", Image.new("RGB", (112, 84)), sampling, forced)
    events = [e async for e in vllm_runtime.engine.stream(request)]
    assert events[0].started and (events[0].prompt_tokens or 0) > 12
    assert "".join(e.text for e in events) == forced
    assert events[-1].finish_reason == "stop"
    logprobs = [lp for e in events for lp in e.coordinate_logprobs]
    assert len(logprobs) == 8 and all(lp <= 0 for lp in logprobs)


async def test_http_and_grpc_return_exact_detections_with_scores(vllm_servers: RunningServers) -> None:
    forced = forced_boxes(5)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{vllm_servers.http_port}", timeout=120) as client:
        result = (await client.post("/v1/detect", json=body(forced))).json()
    assert [d["box"] for d in result["detections"]] == expected_boxes(5)
    assert all(0 < d["score"] <= 1 for d in result["detections"])
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{vllm_servers.http_port}", timeout=120) as client:
        unscored = (await client.post("/v1/detect", json=body(forced, scores=False))).json()
    assert [d["score"] for d in unscored["detections"]] == [None] * 5
    assert [d["box"] for d in unscored["detections"]] == expected_boxes(5)
    assert result["finish_reason"] == "stop" and not result["truncated"]
    params = DetectParams.model_validate({"categories": ["person"], "options": {"forced_output": forced}})
    async with grpc.aio.insecure_channel(f"127.0.0.1:{vllm_servers.grpc_port}") as channel:
        response = await pb_grpc.DetectorStub(channel).Detect(params_to_pb(params, PNG))
    assert [d.model_dump() for d in result_from_pb(response).detections] == result["detections"]


async def test_concurrent_requests_run_in_one_batch(vllm_servers: RunningServers, vllm_runtime: Runtime) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    engine = vllm_runtime.engine

    def running() -> float:
        text = engine.metrics_exposition().decode()  # type: ignore[attr-defined]
        return sum(
            s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == "vllm:num_requests_running"
        )

    peak = 0.0
    done = asyncio.Event()

    async def watch() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, running())
            await asyncio.sleep(0.01)

    watcher = asyncio.create_task(watch())
    url = f"http://127.0.0.1:{vllm_servers.http_port}"
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        results = await asyncio.gather(*[client.post("/v1/detect", json=body(forced_boxes(40))) for _ in range(8)])
    done.set()
    await watcher
    assert all(len(r.json()["detections"]) == 40 for r in results)
    assert peak >= 4  # the engine had several of our requests in flight at the same step


def vllm_metric(runtime: Runtime, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = runtime.engine.metrics_exposition().decode()  # type: ignore[attr-defined]
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)


async def test_disconnect_aborts_in_vllm(vllm_servers: RunningServers, vllm_runtime: Runtime) -> None:
    url = f"http://127.0.0.1:{vllm_servers.http_port}"
    generated_before = vllm_metric(vllm_runtime, "vllm:generation_tokens_total")
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        async with client.stream("POST", "/v1/detect/stream", json=body(forced_boxes(500))) as response:
            async for line in response.aiter_lines():
                if line.startswith("event: detection"):
                    break
    deadline = time.monotonic() + 20
    running = 1.0
    while time.monotonic() < deadline:
        running = vllm_metric(vllm_runtime, "vllm:num_requests_running")
        if vllm_runtime.service.in_flight == 0 and running == 0:
            break
        await asyncio.sleep(0.1)
    assert vllm_runtime.service.in_flight == 0 and running == 0  # vLLM itself stopped generating
    await asyncio.sleep(1.0)
    # 500 boxes are ~3,500 tokens; the aborted request stopped after a small part of them.
    assert vllm_metric(vllm_runtime, "vllm:generation_tokens_total") - generated_before < 1500
    metrics = vllm_runtime.service.metrics.exposition().decode()
    assert 'status="cancelled"' in metrics


async def test_fan_out_merges_categories_in_order(vllm_servers: RunningServers) -> None:
    forced = forced_boxes(6, "person") + ", " + forced_boxes(2, "car", offset=100)
    url = f"http://127.0.0.1:{vllm_servers.http_port}"
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        fanned = (await client.post("/v1/detect", json=body(forced, ["person", "car"]))).json()
        single = (await client.post("/v1/detect", json=body(forced, ["person", "car"], fan_out=False))).json()
    labels = [d["label"] for d in fanned["detections"]]
    assert labels == ["person"] * 6 + ["car"] * 2
    assert [d["box"] for d in fanned["detections"]] == expected_boxes(6) + expected_boxes(2, offset=100)
    assert [d["box"] for d in single["detections"]] == [d["box"] for d in fanned["detections"]]
    # Two engine requests, each with the whole image prompt.
    assert fanned["usage"]["prompt_tokens"] > 1.8 * single["usage"]["prompt_tokens"]


async def test_metrics_endpoint_includes_vllm_metrics(vllm_servers: RunningServers) -> None:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{vllm_servers.http_port}") as client:
        text = (await client.get("/metrics")).text
    assert "rexomni_requests_total" in text and "vllm:num_requests_running" in text
    # The Grafana dashboard's vLLM panels query series this vLLM really exports.
    queried = dashboard_series("vllm:")
    assert queried and all(re.search(rf"^{re.escape(name)}[{{ ]", text, re.MULTILINE) for name in queried), queried
    assert (
        json.loads((await httpx.AsyncClient().get(f"http://127.0.0.1:{vllm_servers.http_port}/health")).text)["engine"]
        == "vllm"
    )


async def test_the_model_sees_our_resize_not_the_processors(
    vllm_servers: RunningServers, vllm_runtime: Runtime
) -> None:
    """An image larger than the checkpoint's own max_pixels (2560*28*28) must reach the model at
    the size our smart_resize chose: vLLM's processor must not resize it again."""
    from rexomni_server.prompts import build_chat_prompt, build_task_text
    from rexomni_server.tasks import Task

    big = image_bytes(2240, 1680, "JPEG")
    request = {
        "image": base64.b64encode(big).decode(),
        "categories": ["person"],
        "options": {"forced_output": forced_boxes(1), "max_pixels": 4_000_000},
    }
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{vllm_servers.http_port}", timeout=120) as client:
        too_long = await client.post("/v1/detect", json=request)
        request["options"]["max_pixels"] = 2_600_000  # type: ignore[index]
        result = (await client.post("/v1/detect", json=request)).json()
    # 4.0 M pixels need ~4800 image tokens: more than max_model_len 4096, a clear 422.
    assert too_long.status_code == 422 and "max_pixels" in too_long.json()["error"]["message"]
    rw, rh = result["image"]["resized_width"], result["image"]["resized_height"]
    assert rw * rh > 2560 * 28 * 28, result
    image_tokens = (rw // 28) * (rh // 28)
    tokenizer = vllm_runtime.engine._tokenizer  # type: ignore[attr-defined]
    prompt = build_chat_prompt(build_task_text(Task.DETECTION, ["person"]), image_tokens=image_tokens)
    assert result["usage"]["prompt_tokens"] == len(tokenizer.encode(prompt, add_special_tokens=False))


def test_auto_picks_vllm_where_it_is_usable(monkeypatch: pytest.MonkeyPatch) -> None:
    from rexomni_server.runtime import choose_engine_name
    from rexomni_server.settings import Settings

    assert choose_engine_name(Settings(engine="auto")) == "vllm"
    assert choose_engine_name(Settings(engine="auto", device="cpu")) == "transformers"  # a device: not vLLM's
    # Installed but with no device to run on (a CUDA build on a machine without a GPU).
    monkeypatch.setattr("rexomni_server.engines.vllm.vllm_usable", lambda: False)
    assert choose_engine_name(Settings(engine="auto")) == "transformers"


def test_a_device_setting_is_refused_for_vllm(tiny_model_dir: Path) -> None:
    from rexomni_server.errors import InvalidRequest
    from rexomni_server.runtime import build_engine
    from rexomni_server.settings import Settings

    with pytest.raises(InvalidRequest, match="CUDA_VISIBLE_DEVICES"):
        build_engine(Settings(engine="vllm", device="cuda:1"), str(tiny_model_dir))
