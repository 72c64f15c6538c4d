"""A server whose engine dies, or whose model cannot be loaded, says so at once (not ready,
health names the error, requests get 503 engine_dead / UNAVAILABLE) and exits non-zero, so the
orchestrator replaces it. The vLLM lane kills a real engine-core process (tests/vllm)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rexomni_server._pb.rexomni.v1 import detector_pb2 as pb
from rexomni_server._pb.rexomni.v1 import detector_pb2_grpc as pb_grpc
from rexomni_server.engines.scripted import ScriptedEngine
from rexomni_server.errors import EngineDead
from rexomni_server.runtime import Runtime
from rexomni_server.serve import EXIT_FATAL, serve
from rexomni_server.settings import Settings
from tests.support import free_port, image_bytes, wait_serving, wait_until

PNG = image_bytes(64, 48)
BOXES = ", ".join(f"<{i}><{i}><{i + 9}><{i + 9}>" for i in range(300))
SLOW_ANSWER = f"<|object_ref_start|>cat<|object_ref_end|><|box_start|>{BOXES}<|box_end|>"


def body() -> dict[str, object]:
    import base64

    return {"image": base64.b64encode(PNG).decode(), "categories": ["cat"]}


async def grpc_health(target: str) -> int:
    async with grpc.aio.insecure_channel(target) as channel:
        answer = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
        return int(answer.status)


async def test_a_dead_engine_is_reported_at_once_and_the_server_exits_non_zero() -> None:
    engine = ScriptedEngine(default_output=SLOW_ANSWER, token_delay_s=0.01)  # ~15 s per answer
    settings = Settings(engine="scripted", port=free_port(), grpc_port=free_port(), engine_failure_exit_s=10.0)
    runtime = Runtime(settings, engine=engine, model_label="scripted")
    server = asyncio.create_task(serve(settings, runtime))
    url, target = f"http://127.0.0.1:{settings.port}", f"127.0.0.1:{settings.grpc_port}"
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        await wait_serving(url)
        assert await grpc_health(target) == health_pb2.HealthCheckResponse.SERVING
        unary = asyncio.create_task(client.post("/v1/detect", json=body()))
        async with client.stream("POST", "/v1/detect/stream", json=body()) as stream:
            lines = stream.aiter_lines()
            async for line in lines:  # the first detection: the generation is running
                if line.startswith("event: detection"):
                    break
            engine.fail("device lost")
            rest = [line async for line in lines]
        error = json.loads(next(line for line in rest if line.startswith("data: ") and "engine_dead" in line)[6:])
        assert error["error"]["status"] == 503 and "device lost" in error["error"]["message"]
        in_flight = await unary
        assert in_flight.status_code == 503 and in_flight.json()["error"]["code"] == "engine_dead"
        await wait_until(lambda: runtime.error is not None, timeout_s=5, what="the failure to be noticed")
        late = await client.post("/v1/detect", json=body())
        assert late.status_code == 503 and late.json()["error"]["code"] == "engine_dead"
        assert late.headers["retry-after"]
        ready = await client.get("/ready")
        health = await client.get("/health")
        assert ready.status_code == 503 and "device lost" in ready.json()["error"]
        assert health.status_code == 503 and health.json()["status"] == "error"
        assert "device lost" in health.json()["error"]
    deadline = time.monotonic() + 5
    while await grpc_health(target) != health_pb2.HealthCheckResponse.NOT_SERVING:
        assert time.monotonic() < deadline, "gRPC health still SERVING"
        await asyncio.sleep(0.1)
    async with grpc.aio.insecure_channel(target) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await pb_grpc.DetectorStub(channel).Detect(pb.DetectRequest(image=PNG, categories=["cat"]))
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE and "device lost" in (refused.value.details() or "")
    assert await asyncio.wait_for(server, 30) == EXIT_FATAL
    assert runtime.service.in_flight == 0


async def test_a_fallback_that_fails_too_reports_both_reasons_and_is_fatal(tmp_path: Path) -> None:
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    settings = Settings(
        model=str(tmp_path / "missing-model"),
        engine="transformers",
        fallback_to_tiny=True,
        tiny_model_dir=not_a_folder / "tiny",  # cannot be created: the fallback fails
    )
    runtime = Runtime(settings)
    runtime.start_background()
    await asyncio.wait_for(runtime.fatal.wait(), 60)
    await runtime.stop()
    assert runtime.error is not None and not runtime.ready
    assert "missing-model" in runtime.error and "the tiny fallback failed too" in runtime.error
    assert "NotADirectoryError" in runtime.error or "FileExistsError" in runtime.error


@pytest.mark.slow
def test_a_model_that_cannot_be_loaded_exits_non_zero_and_says_why(tmp_path: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "rexomni_server.cli",
        "serve",
        "--model",
        str(tmp_path / "nonexistent-model"),
        "--engine",
        "transformers",
        "--port",
        str(free_port()),
        "--grpc-port",
        str(free_port()),
        "--engine-failure-exit-s",
        "0.5",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert done.returncode == EXIT_FATAL
    logged = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    errors = [line["msg"] for line in logged if line["level"] == "error"]
    assert any("could not be loaded" in msg and "nonexistent-model" in msg for msg in errors), done.stderr[-2000:]


async def test_engines_raise_engine_dead_once_failed() -> None:
    engine = ScriptedEngine(default_output=SLOW_ANSWER)
    await engine.start()
    engine.fail("gone")
    assert engine.failure == "gone"
    from rexomni_server.schemas import DetectParams
    from rexomni_server.service import DetectionService

    service = DetectionService(Settings(), engine, "scripted")
    with pytest.raises(EngineDead, match="gone"):
        await service.detect(DetectParams(categories=["cat"]), PNG)
