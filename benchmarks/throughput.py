"""Throughput under concurrency vs one-at-a-time serving, and category fan-out vs one prompt.

    .venv-vllm/bin/python benchmarks/throughput.py --engine vllm          # vLLM (CPU build here)
    .venv/bin/python benchmarks/throughput.py --engine transformers       # the fallback engine

Everything runs through the real HTTP server (uvicorn on loopback) on the tiny random model
with forced outputs, so each request writes the same tokens whatever the engine:

1. ``--requests`` requests of ``--boxes`` boxes each, sent one at a time (what the reference
   wrapper and every wrapper with a global lock do) and then with 1, 4 and 16 in flight.
   Reports requests/s, boxes/s, median latency and the speed-up over one-at-a-time.
2. A 4-category request (``--fan-boxes`` boxes per category) as one prompt vs fanned out to
   one request per category.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import statistics
import tempfile
import time
from typing import Any

import httpx
from PIL import Image

from rexomni_server.runtime import Runtime
from rexomni_server.serve import start_servers
from rexomni_server.settings import Settings
from rexomni_server.tiny import make_tiny_model

CATEGORIES = ["person", "car", "dog", "chair"]


def group(label: str, n: int, offset: int = 0) -> str:
    boxes = ", ".join(
        f"<{(i + offset) % 900}><{i % 800}><{(i + offset) % 900 + 40}><{i % 800 + 90}>" for i in range(n)
    )
    return f"<|object_ref_start|>{label}<|object_ref_end|><|box_start|>{boxes}<|box_end|>"


def image_b64() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (640, 480), (90, 60, 30)).save(buf, "JPEG")
    return base64.b64encode(buf.getvalue()).decode()


async def timed_post(client: httpx.AsyncClient, body: dict[str, Any]) -> tuple[float, int]:
    start = time.perf_counter()
    response = await client.post("/v1/detect", json=body)
    response.raise_for_status()
    return time.perf_counter() - start, len(response.json()["detections"])


async def run_load(
    client: httpx.AsyncClient, body: dict[str, Any], total: int, concurrency: int
) -> dict[str, float]:
    pending = list(range(total))
    latencies: list[float] = []
    boxes = 0

    async def worker() -> None:
        nonlocal boxes
        while pending:
            pending.pop()
            latency, n = await timed_post(client, body)
            latencies.append(latency)
            boxes += n

    start = time.perf_counter()
    await asyncio.gather(*[worker() for _ in range(concurrency)])
    wall = time.perf_counter() - start
    return {"rps": total / wall, "boxes_s": boxes / wall, "p50": statistics.median(latencies), "wall": wall}


async def main_async(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        make_tiny_model(tmp)
        settings = Settings(
            model=tmp, engine=args.engine, allow_forced_output=True, enforce_eager=True, max_concurrency=16
        )
        runtime = Runtime(settings)
        t = time.perf_counter()
        await runtime.engine.start()
        load_s = time.perf_counter() - t
        servers = await start_servers(runtime, "127.0.0.1", 0, None)
        image = image_b64()
        body = {
            "image": image,
            "categories": ["person"],
            "options": {"forced_output": group("person", args.boxes)},
        }
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{servers.http_port}", timeout=600) as client:
            await run_load(client, body, 2, 2)  # warm-up
            # "sequential" is the reference behaviour: one request at a time, whoever sends them.
            rows = [("one at a time (reference)", await run_load(client, body, args.requests, 1))]
            for concurrency in (1, 4, 16):
                rows.append(
                    (f"{concurrency} in flight", await run_load(client, body, args.requests, concurrency))
                )
            forced = ", ".join(group(c, args.fan_boxes, offset=i * 100) for i, c in enumerate(CATEGORIES))
            fan: dict[str, list[float]] = {"single prompt": [], "fan-out": []}
            for _ in range(args.fan_repeats):
                for name, fan_out in (("single prompt", False), ("fan-out", True)):
                    options = {"forced_output": forced, "fan_out": fan_out}
                    latency, n = await timed_post(
                        client, {"image": image, "categories": CATEGORIES, "options": options}
                    )
                    assert n == args.fan_boxes * len(CATEGORIES), n
                    fan[name].append(latency)
        await servers.stop(0)
        await runtime.stop()

    print(f"engine: {args.engine} on the tiny model ({os.cpu_count()} CPUs), load {load_s:.1f} s")
    print(f"\n{args.requests} requests x {args.boxes} boxes (forced), HTTP /v1/detect")
    print(f"{'mode':<27} {'req/s':>8} {'boxes/s':>9} {'p50 ms':>9} {'vs one-at-a-time':>17}")
    base = rows[0][1]["rps"]
    for name, r in rows:
        speedup = r["rps"] / base
        print(f"{name:<27} {r['rps']:>8.2f} {r['boxes_s']:>9.1f} {r['p50'] * 1000:>9.0f} {speedup:>16.2f}x")
    single, fanned = statistics.median(fan["single prompt"]), statistics.median(fan["fan-out"])
    print(f"\n4 categories x {args.fan_boxes} boxes, median of {args.fan_repeats}")
    print(f"{'mode':<27} {'latency ms':>10} {'vs single':>10}")
    print(f"{'single prompt':<27} {single * 1000:>10.0f} {1.0:>9.2f}x")
    print(f"{'fan-out (4 requests)':<27} {fanned * 1000:>10.0f} {single / fanned:>9.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", default="vllm", choices=["vllm", "transformers"])
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--boxes", type=int, default=30)
    ap.add_argument("--fan-boxes", type=int, default=25)
    ap.add_argument("--fan-repeats", type=int, default=3)
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
