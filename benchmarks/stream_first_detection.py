"""Time to first detection vs time to the full result, over SSE and gRPC (tiny model, CPU).

    .venv/bin/python -m benchmarks.stream_first_detection [--boxes 50] [--repeats 5]

Starts a real uvicorn and a real grpc.aio server on loopback over one transformers engine
with the tiny random checkpoint, forces an N-box output, and for each transport reports the
median client-side time to the first detection event and to the final result. The ratio
first/full is what streaming buys: without it a client waits for the full result.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import httpx

from benchmarks.common import jpeg_bytes, single_label_forced, sse_detect
from rexomni_server._pb.rexomni.v1 import detector_pb2_grpc as pb_grpc
from rexomni_server.runtime import Runtime
from rexomni_server.schemas import DetectParams
from rexomni_server.serve import start_servers
from rexomni_server.settings import Settings
from rexomni_server.tiny import make_tiny_model
from rexomni_server.transport.convert import params_to_pb


async def sse_once(client: httpx.AsyncClient, body: dict[str, object]) -> tuple[float, float, int]:
    timing = await sse_detect(client, body)
    return timing.first, timing.total, timing.detections


async def grpc_once(stub: Any, request: object) -> tuple[float, float, int]:
    start = time.perf_counter()
    first = None
    count = 0
    async for event in stub.DetectStream(request):
        if event.WhichOneof("event") == "detection":
            first = first or time.perf_counter()
            count += 1
    return (first or time.perf_counter()) - start, time.perf_counter() - start, count


async def run(n_boxes: int, repeats: int) -> list[tuple[str, float, float, int]]:
    with tempfile.TemporaryDirectory() as tmp:
        make_tiny_model(tmp)
        runtime = Runtime(Settings(model=tmp, engine="transformers", allow_forced_output=True))
        await runtime.engine.start()
        try:
            servers = await start_servers(runtime, "127.0.0.1", 0, 0)
            try:
                assert servers.http_port is not None and servers.grpc_port is not None
                return await measure(servers.http_port, servers.grpc_port, n_boxes, repeats)
            finally:
                await servers.stop(0)
        finally:
            await runtime.stop()


async def measure(http_port: int, grpc_port: int, n_boxes: int, repeats: int) -> list[tuple[str, float, float, int]]:
    image = jpeg_bytes()
    forced = single_label_forced("person", n_boxes)
    body: dict[str, object] = {
        "image": base64.b64encode(image).decode(),
        "categories": ["person"],
        "options": {"forced_output": forced},
    }
    request = params_to_pb(DetectParams.model_validate({k: v for k, v in body.items() if k != "image"}), image)
    rows = []
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{http_port}", timeout=120) as client:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = pb_grpc.DetectorStub(channel)  # type: ignore[no-untyped-call]
            paths: list[tuple[str, Callable[[], Awaitable[tuple[float, float, int]]]]] = [
                ("SSE", lambda: sse_once(client, body)),
                ("gRPC", lambda: grpc_once(stub, request)),
            ]
            for _, once in paths:
                await once()  # warm-up: the connection or channel, and the model
            for name, once in paths:
                samples = [await once() for _ in range(repeats)]
                first = statistics.median(s[0] for s in samples) * 1000
                full = statistics.median(s[1] for s in samples) * 1000
                rows.append((name, first, full, samples[0][2]))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--boxes", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    rows = asyncio.run(run(args.boxes, args.repeats))
    print(f"forced output: {args.boxes} boxes, median of {args.repeats}, tiny model on CPU")
    header = ("transport", "detections", "first detection ms", "full result ms", "first/full")
    print(f"{header[0]:<10} {header[1]:>10} {header[2]:>19} {header[3]:>15} {header[4]:>10}")
    for name, first, full, count in rows:
        print(f"{name:<10} {count:>10} {first:>19.1f} {full:>15.1f} {first / full:>10.3f}")


if __name__ == "__main__":
    main()
