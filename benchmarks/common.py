"""Shared pieces of the benchmarks: forced outputs with Rex-Omni's token pattern, test images,
and a runtime on the requested engine and model size."""

from __future__ import annotations

import base64
import contextlib
import io
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

from rexomni_server.runtime import Runtime
from rexomni_server.settings import Settings
from rexomni_server.tiny import (
    TINY_TEXT,
    TINY_VISION,
    architecture_config,
    make_tiny_model,
    random_components,
)

# COCO-like labels: real outputs group boxes per phrase, so label tokens are amortised over a
# few boxes (the paper measures ~7.6 tokens per box on COCO).
LABELS = ("person", "car", "chair", "cup", "dog", "bottle", "book", "traffic light", "bicycle", "bus")


def group(label: str, boxes: list[tuple[int, int, int, int]]) -> str:
    body = ", ".join("".join(f"<{v}>" for v in box) for box in boxes)
    return f"<|object_ref_start|>{label}<|object_ref_end|><|box_start|>{body}<|box_end|>"


def realistic_forced(n_boxes: int, seed: int = 0) -> str:
    """N distinct boxes in groups of 1-6 per label, groups joined by ', ' as the model writes."""
    rng = random.Random(seed)
    groups, made, label_index = [], 0, 0
    while made < n_boxes:
        size = min(rng.randint(1, 6), n_boxes - made)
        boxes = []
        for _ in range(size):
            x0, y0 = rng.randint(0, 900), rng.randint(0, 900)
            boxes.append((x0, y0, x0 + rng.randint(10, 99), y0 + rng.randint(10, 99)))
        groups.append(group(LABELS[label_index % len(LABELS)] + f" {label_index // len(LABELS)}", boxes))
        made += size
        label_index += 1
    return ", ".join(groups)


def single_label_forced(label: str, n_boxes: int, offset: int = 0) -> str:
    boxes = [((i + offset) % 900, i % 800, (i + offset) % 900 + 40, i % 800 + 90) for i in range(n_boxes)]
    return group(label, boxes)


def jpeg_bytes(width: int = 640, height: int = 480) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (90, 60, 30)).save(buf, "JPEG")
    return buf.getvalue()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(
    *flags: str, engine: str = "scripted", model: str = "scripted", timeout_s: float = 60, log: Path | None = None
) -> tuple[subprocess.Popen[bytes], str, str]:
    """``rexomni-server serve --engine ENGINE --model MODEL --allow-forced-output FLAGS`` on free
    loopback ports, once it is ready: (the process, its HTTP URL, its gRPC target). Its output
    goes to ``log`` (nowhere without one)."""
    port, grpc_port = free_port(), free_port()
    cmd = [sys.executable, "-m", "rexomni_server.cli", "serve", "--engine", engine, "--model", model]
    cmd += ["--allow-forced-output", "--port", str(port), "--grpc-port", str(grpc_port), *flags]
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", **os.environ}  # GiB: vLLM's CPU build would take far more
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") if log is not None else contextlib.nullcontext() as sink:
        output = sink if sink is not None else subprocess.DEVNULL
        proc = subprocess.Popen(cmd, stdout=output, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                return proc, url, f"127.0.0.1:{grpc_port}"
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"the server did not start ({engine} engine, model {model}; see {log or 'no log'})")


def start_scripted_server(*flags: str) -> tuple[subprocess.Popen[bytes], str, str]:
    """The server on the scripted engine (no model: every CPU cycle it spends is its own)."""
    return start_server(*flags)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@dataclass
class Bench:
    runtime: Runtime
    description: str
    weight_bytes: int  # bytes of LLM weights each decode step reads (0 if unknown)
    _tmp: tempfile.TemporaryDirectory[str] | None = None

    async def close(self) -> None:
        if self.runtime.engine.ready:
            await self.runtime.stop()
        if self._tmp is not None:
            self._tmp.cleanup()


async def start_bench(engine: str, model: str = "tiny", device: str = "auto", **settings: object) -> Bench:
    """A started runtime with forced outputs allowed.

    model: ``tiny`` (generated checkpoint), ``3b`` (Rex-Omni's real sizes, random BF16 weights,
    transformers engine on a GPU), or ``3b-small`` (the same code path at tiny sizes, for a dry
    run on a CPU).
    """
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if model == "tiny":
        tmp = tempfile.TemporaryDirectory()
        make_tiny_model(tmp.name)
        fields = {"model": tmp.name, "engine": engine, "allow_forced_output": True, "enforce_eager": True}
        config = Settings.model_validate({**fields, **settings})
        runtime = Runtime(config)
        await runtime.engine.start()
        return Bench(runtime, f"{engine}, tiny random model", 0, tmp)
    if engine != "transformers":
        raise SystemExit(f"--model {model} runs on the transformers engine only (vLLM needs a checkpoint on disk)")
    from rexomni_server.engines.transformers import TransformersEngine, resolve_device_and_dtype

    arch = architecture_config("qwen2_5_vl_3b")
    if model == "3b-small":
        arch = {**arch, **TINY_TEXT, "vision_config": TINY_VISION, "vocab_size": 4096}
    resolved_device, dtype = resolve_device_and_dtype(device, "auto")
    dtype_name = str(dtype).removeprefix("torch.")
    components = random_components(arch, resolved_device, dtype_name)
    # What one decode step reads: every LLM weight, the (possibly tied) LM head counted once.
    tensors = {p.data_ptr(): p for p in components[0].model.language_model.parameters()}
    tensors.setdefault(components[0].lm_head.weight.data_ptr(), components[0].lm_head.weight)
    weight_bytes = sum(p.numel() * p.element_size() for p in tensors.values())
    engine_obj = TransformersEngine.from_loaded(
        *components,
        label=f"random-{model}",
        fast_decode=str(settings.pop("fast_decode", "auto")),
        max_concurrency=int(settings.get("max_concurrency", 4)),  # type: ignore[call-overload]
    )
    config = Settings(model=f"random-{model}", allow_forced_output=True, **settings)  # type: ignore[arg-type]
    runtime = Runtime(config, engine=engine_obj, model_label=f"random-{model} ({dtype_name})")
    await runtime.engine.start()
    return Bench(runtime, f"transformers, {model} random {dtype_name} on {resolved_device}", weight_bytes)


@dataclass(frozen=True)
class Timing:
    """Client-side timing of one streamed request (seconds)."""

    first: float  # to the first detection (= total when there was none)
    total: float
    detections: int
    tokens: int
    finish_reason: str = "stop"
    prompt_tokens: int = 0


async def sse_stream(client: Any, body: dict[str, Any]) -> tuple[float | None, dict[str, Any]]:
    """POST /v1/detect/stream: when its first `detection` event arrived (``time.perf_counter()``,
    None without one) and the `done` event's result. RuntimeError, with the server's words, for
    a refusal, an error event or a stream that ends without its result."""
    import json

    first = None
    done: dict[str, Any] | None = None
    async with client.stream("POST", "/v1/detect/stream", json=body) as response:
        if response.status_code != 200:
            await response.aread()
            raise RuntimeError(f"HTTP {response.status_code}: {response.text[:500]}")
        event = ""
        async for line in response.aiter_lines():
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:") and event == "detection":
                first = first or time.perf_counter()
            elif line.startswith("data:") and event == "done":
                done = json.loads(line[5:])
            elif line.startswith("data:") and event == "error":
                raise RuntimeError(f"the server failed the request: {line[5:].strip()}")
    if done is None:
        raise RuntimeError("the stream ended without its result")
    return first, done


async def sse_detect(client: Any, body: dict[str, Any]) -> Timing:
    """POST /v1/detect/stream and time the first `detection` event and the `done` event."""
    start = time.perf_counter()
    first, done = await sse_stream(client, body)
    end = time.perf_counter()
    return Timing(
        (first or end) - start,
        end - start,
        len(done["detections"]),
        done["usage"]["completion_tokens"],
        done["finish_reason"],
        done["usage"]["prompt_tokens"],
    )


def write_json(path: Path, payload: object) -> None:
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
