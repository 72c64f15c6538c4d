"""Bounded loopback load: throughput and latency percentiles at rising concurrency, against
the reference behaviour (requests served one at a time, as the official wrapper and the
wrappers with a global lock do), plus category fan-out vs one prompt.

    .venv-vllm/bin/python -m benchmarks.load --engine vllm
    .venv/bin/python -m benchmarks.load --engine transformers --concurrency 1 4

Every request goes through the real HTTP server (SSE, so the time to first detection is
measured) with a forced output of ``--boxes`` boxes. Each level sends ``--requests`` requests
and stops; nothing runs longer than the requests it was given.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import time
from typing import Any

import httpx

from benchmarks.common import b64, jpeg_bytes, realistic_forced, single_label_forced, sse_detect, start_bench
from rexomni_server.serve import start_servers

CATEGORIES = ["person", "car", "dog", "chair"]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def level(client: httpx.AsyncClient, body: dict[str, Any], total: int, concurrency: int) -> dict[str, float]:
    queue = list(range(total))
    latencies: list[float] = []
    firsts: list[float] = []
    boxes = 0

    async def worker() -> None:
        nonlocal boxes
        while queue:
            queue.pop()
            timing = await sse_detect(client, body)
            latencies.append(timing.total)
            firsts.append(timing.first)
            boxes += timing.detections

    start = time.perf_counter()
    await asyncio.gather(*[worker() for _ in range(concurrency)])
    wall = time.perf_counter() - start
    return {
        "rps": total / wall,
        "boxes_s": boxes / wall,
        **{f"p{q}": percentile(latencies, q) * 1000 for q in (50, 95, 99)},
        "ttfd_p50": statistics.median(firsts) * 1000,
    }


async def run(args: argparse.Namespace) -> None:
    image = b64(jpeg_bytes())
    body = {
        "image": image,
        "categories": ["objects"],
        "options": {"forced_output": realistic_forced(args.boxes)},
    }
    rows: list[tuple[str, dict[str, float]]] = []
    fan: dict[str, list[float]] = {"single prompt": [], "fan-out": []}
    async with contextlib.AsyncExitStack() as stack:  # stops what started, also on an error
        bench = await start_bench(args.engine, args.model, max_concurrency=max(args.concurrency))
        stack.push_async_callback(bench.close)
        servers = await start_servers(bench.runtime, "127.0.0.1", 0, None)
        stack.push_async_callback(servers.stop, 0)
        client = await stack.enter_async_context(
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{servers.http_port}", timeout=900)
        )
        await level(client, body, 2, 2)  # warm-up
        rows.append(("one at a time (reference)", await level(client, body, args.requests, 1)))
        for concurrency in args.concurrency:
            rows.append((f"{concurrency} in flight", await level(client, body, args.requests, concurrency)))
        forced = ", ".join(single_label_forced(c, args.fan_boxes, offset=i * 100) for i, c in enumerate(CATEGORIES))
        for _ in range(args.fan_repeats):
            for name, fan_out in (("single prompt", False), ("fan-out", True)):
                options = {"forced_output": forced, "fan_out": fan_out}
                timing = await sse_detect(client, {"image": image, "categories": CATEGORIES, "options": options})
                assert timing.detections == args.fan_boxes * len(CATEGORIES), timing
                fan[name].append(timing.total)

    print(f"{bench.description}; {args.requests} requests per level, {args.boxes} forced boxes each, HTTP SSE")
    columns = ("req/s", "boxes/s", "p50 ms", "p95 ms", "p99 ms", "TTFD p50", "vs ref")
    print(f"{'mode':<27} " + " ".join(f"{c:>8}" for c in columns))
    base = rows[0][1]["rps"]
    for name, r in rows:
        cells = (
            f"{r['rps']:.2f}",
            f"{r['boxes_s']:.1f}",
            *(f"{r[k]:.0f}" for k in ("p50", "p95", "p99", "ttfd_p50")),
        )
        print(f"{name:<27} " + " ".join(f"{c:>8}" for c in cells) + f" {r['rps'] / base:>7.2f}x")
    single, fanned = statistics.median(fan["single prompt"]), statistics.median(fan["fan-out"])
    print(f"\n{len(CATEGORIES)} categories x {args.fan_boxes} boxes, median of {args.fan_repeats}")
    print(f"{'single prompt':<27} {single * 1000:>8.0f} ms   1.00x")
    print(f"{'fan-out (one per category)':<27} {fanned * 1000:>8.0f} ms   {single / fanned:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", default="vllm", choices=["vllm", "transformers"])
    ap.add_argument("--model", default="tiny", choices=["tiny", "3b", "3b-small"])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--boxes", type=int, default=30)
    ap.add_argument("--fan-boxes", type=int, default=25)
    ap.add_argument("--fan-repeats", type=int, default=3)
    asyncio.run(run(ap.parse_args()))


if __name__ == "__main__":
    main()
