"""vLLM's engine core dies (kill -9) under a real server: within seconds the server stops being
ready, says why, fails the request in flight and new ones with 503 engine_dead (gRPC
UNAVAILABLE), and exits non-zero after a short drain, so its orchestrator starts a new one."""

from __future__ import annotations

import base64
import json
import os
import signal
import threading
import time
from pathlib import Path

import grpc
import httpx
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rexomni_server._pb.rexomni.v1 import detector_pb2 as pb
from rexomni_server._pb.rexomni.v1 import detector_pb2_grpc as pb_grpc
from rexomni_server.serve import EXIT_FATAL
from tests.support import image_bytes, serve_process
from tests.vllm.test_vllm_engine import forced_boxes

pytestmark = pytest.mark.slow
PNG = image_bytes(224, 168)


def engine_core(server_pid: int) -> psutil.Process:
    for child in psutil.Process(server_pid).children(recursive=True):
        if "EngineCore" in child.name() or "EngineCore" in " ".join(child.cmdline()):
            return child
    raise AssertionError("no EngineCore process under the server")


def read_stream(url: str, body: dict[str, object], lines: list[str], first_detection: threading.Event) -> None:
    with httpx.stream("POST", f"{url}/v1/detect/stream", json=body, timeout=60) as response:
        for line in response.iter_lines():
            lines.append(line)
            if line.startswith("event: detection"):
                first_detection.set()


def health_status(target: str) -> int:
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)  # type: ignore[no-untyped-call]
        return int(stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status)


def test_killing_the_engine_core_makes_the_server_say_so_and_exit(tiny_model_dir: Path) -> None:
    args = [
        "--model",
        str(tiny_model_dir),
        "--engine",
        "vllm",
        "--enforce-eager",
        "--max-model-len",
        "4096",
        "--allow-forced-output",
        "--engine-failure-exit-s",
        "10",  # room for every check below before the server stops listening, on a busy machine
    ]
    env = {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    for url, proc, health in serve_process(args, env, timeout_s=300):
        target = str(health["grpc_target"])
        assert health_status(target) == health_pb2.HealthCheckResponse.SERVING
        body = {
            "image": base64.b64encode(PNG).decode(),
            "categories": ["person"],
            "options": {"forced_output": forced_boxes(400)},  # seconds of generation
        }
        first_detection, lines = threading.Event(), list[str]()
        reader = threading.Thread(target=read_stream, args=(url, body, lines, first_detection))
        reader.start()
        assert first_detection.wait(120), "the generation did not start"
        os.kill(engine_core(proc.pid).pid, signal.SIGKILL)
        reader.join(30)
        assert not reader.is_alive(), "the request in flight was left waiting"
        errors = [json.loads(line[6:]) for line in lines if line.startswith("data: ") and "engine_dead" in line]
        assert errors and errors[0]["error"]["status"] == 503

        refused = httpx.post(f"{url}/v1/detect", json=body, timeout=10)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "engine_dead"
        ready = httpx.get(f"{url}/ready", timeout=5)
        assert ready.status_code == 503 and "engine" in ready.json()["error"]
        described = httpx.get(f"{url}/health", timeout=5)
        assert described.status_code == 503 and described.json()["status"] == "error"
        deadline = time.monotonic() + 10  # gRPC health follows readiness within a fraction of a second
        while health_status(target) != health_pb2.HealthCheckResponse.NOT_SERVING:
            assert time.monotonic() < deadline, "gRPC health still SERVING"
            time.sleep(0.1)
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.DetectorStub(channel)  # type: ignore[no-untyped-call]
            with pytest.raises(grpc.RpcError) as unavailable:
                stub.Detect(pb.DetectRequest(image=PNG, categories=["person"]), timeout=10)
        assert unavailable.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]

        exit_deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < exit_deadline:
            time.sleep(0.2)
        assert proc.returncode == EXIT_FATAL
