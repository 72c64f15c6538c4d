"""Helpers shared by the tests (fixtures live in conftest.py; helpers are imported from here)."""

from __future__ import annotations

import asyncio
import io
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families


def image_bytes(width: int = 640, height: int = 480, fmt: str = "PNG", mode: str = "RGB", **save: object) -> bytes:
    colour: object = (30, 120, 200) if mode in ("RGB", "RGBA") else 128
    buf = io.BytesIO()
    Image.new(mode, (width, height), colour).save(buf, fmt, **save)  # type: ignore[arg-type]
    return buf.getvalue()


def noise_png(width: int, height: int, seed: int = 0) -> bytes:
    """A PNG of random pixels: it does not compress, so its size is about width * height * 3."""
    import random

    pixels = random.Random(seed).randbytes(width * height * 3)
    buf = io.BytesIO()
    Image.frombytes("RGB", (width, height), pixels).save(buf, "PNG")
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_until(condition: Callable[[], bool], timeout_s: float = 10.0, what: str = "the condition") -> None:
    """Polls ``condition`` until it holds; fails the test after ``timeout_s`` (a hang guard, not
    a speed claim)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def wait_serving(url: str, timeout_s: float = 60.0) -> None:
    """Until the HTTP server at ``url`` answers /ready with 200 (a hang guard, not a timing)."""
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(timeout=2) as client:
        while True:
            try:
                if (await client.get(f"{url}/ready")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"{url} did not become ready")
            await asyncio.sleep(0.05)


def wait_ready(
    url: str, proc: subprocess.Popen[bytes], timeout: float = 120, log: Path | None = None
) -> dict[str, object]:
    """Until the server process answers /ready with 200; returns its /health. ``log``: the file
    its output goes to, quoted when it exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            said = f":\n{log.read_text()[-4000:]}" if log is not None else ""
            raise AssertionError(f"server exited with {proc.returncode}{said}")
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                health: dict[str, object] = httpx.get(f"{url}/health", timeout=2).json()
                return health
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise AssertionError("server did not become ready")


def serve_process(
    args: list[str], env: dict[str, str] | None = None, timeout_s: float = 120
) -> Iterator[tuple[str, subprocess.Popen[bytes], dict[str, object]]]:
    """``rexomni-server serve ARGS`` on free loopback ports, until it is ready; yields (url, the
    process, /health plus ``grpc_target``); terminated afterwards. For ``yield from``."""
    port, grpc_port = free_port(), free_port()
    cmd = [
        sys.executable,
        "-m",
        "rexomni_server.cli",
        "serve",
        "--port",
        str(port),
        "--grpc-port",
        str(grpc_port),
        *args,
    ]
    proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        health = wait_ready(url, proc, timeout_s)
        yield url, proc, {**health, "grpc_target": f"127.0.0.1:{grpc_port}"}
    finally:
        stop_process(proc)


def stop_process(proc: subprocess.Popen[bytes], timeout_s: float = 30) -> None:
    """SIGTERM, and SIGKILL if it has not exited within ``timeout_s``: never left running."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout_s)


def required_program(name: str, hint: str) -> str:
    """The path of a program a test runs for real (the system directories searched too). Missing:
    the test fails where CI is set (CI must have it) and is skipped elsewhere."""
    import shutil

    import pytest

    path = shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))
    if path:
        return path
    why = f"{name} is not installed ({hint}; CI runs this test)"
    if os.environ.get("CI"):
        pytest.fail(why)
    pytest.skip(why)


def detect_result(
    detections: list[dict[str, Any]],
    width: int = 200,
    height: int = 100,
    task: str = "detection",
    model: str = "rex-omni-test",
) -> Any:
    """A DetectResult as a server would answer, with ``detections`` (dicts) on a WxH image."""
    from rexomni_server.schemas import DetectResult

    return DetectResult.model_validate(
        {
            "request_id": "r",
            "model": model,
            "task": task,
            "detections": detections,
            "image": {"width": width, "height": height, "resized_width": 28, "resized_height": 28},
            "finish_reason": "stop",
            "truncated": False,
            "skipped": 0,
            "usage": {"prompt_tokens": 1, "completion_tokens": 1},
            "timings": {"queue_ms": 0.0, "first_detection_ms": 1.0, "total_ms": 1.0},
        }
    )


# Label Studio's "Object Detection with Bounding Boxes" template, as a project's label config.
LABEL_STUDIO_DETECTION_CONFIG = """
<View>
  <Image name="image" value="$image"/>
  <RectangleLabels name="label" toName="image">
    <Label value="Airplane" background="green"/>
    <Label value="Car" background="blue"/>
  </RectangleLabels>
</View>
"""


async def sse_events(response: httpx.Response) -> AsyncIterator[tuple[str, dict[str, Any], float]]:
    """(event name, its JSON data, when it arrived) for each server-sent event of a response."""
    event = ""
    async for line in response.aiter_lines():
        if line.startswith("event:"):
            event = line.split(":", 1)[1].strip()
        elif line.startswith("data:") and event:
            yield event, json.loads(line.split(":", 1)[1]), time.perf_counter()
            event = ""


def metric_value(text: str, name: str, labels: dict[str, str] | None = None) -> float:
    """The sum of a metric's samples (those with these labels) in a Prometheus exposition."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in (labels or {}).items()):
                total += sample.value
    return total


def phrase_group(label: str, *bins: int) -> str:
    """One phrase group of a forced answer: ``label`` and the coordinate bins of its group (four
    per box, two per point, one pair per polygon vertex)."""
    return (
        f"<|object_ref_start|>{label}<|object_ref_end|><|box_start|>" + "".join(f"<{b}>" for b in bins) + "<|box_end|>"
    )
