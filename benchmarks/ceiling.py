"""The server's own cost: CPU per request and per generated token, by transport and load, so
that one process never limits a GPU.

    python -m benchmarks.ceiling [--in-flight 1 16 64 256] [--transports http sse grpc]

A real server process on the scripted engine (no model: its answers are the forced outputs, so
every CPU cycle the process spends is the server's own). For each transport and number of
requests in flight, the same number of requests is sent twice: answers of 0 boxes and answers
of ``--boxes`` boxes. The server process's CPU time (user + system, from /proc) of each batch
gives the cost per request (the 0-box batch) and the cost per token (the difference divided by
the extra tokens): per-request work cancels out. ``tokens/s`` is the ceiling one process could
feed at that cost per token. The client runs in this process, on the same machine: its CPU is
not counted, but it shares the cores, so wall times are only indicative.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx

from benchmarks.common import b64, jpeg_bytes, realistic_forced, start_scripted_server, write_json
from rexomni_server._pb.rexomni.v1 import detector_pb2_grpc as pb_grpc
from rexomni_server.schemas import DetectParams
from rexomni_server.transport.convert import params_to_pb

TRANSPORTS = ("http", "sse", "grpc")
IMAGE = jpeg_bytes(64, 48)  # small: decoding is per-request work, not what this measures


@dataclass(frozen=True)
class Batch:
    cpu_s: float  # the server process's CPU time over the batch
    wall_s: float
    requests: int
    tokens: int  # completion tokens, as the server reported them


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


Send = Callable[[str], Awaitable[int]]  # forced output -> completion tokens


def senders(http: httpx.AsyncClient, channel: grpc.aio.Channel) -> dict[str, Send]:
    stub = pb_grpc.DetectorStub(channel)  # type: ignore[no-untyped-call]

    def body(forced: str) -> dict[str, Any]:
        return {"image": b64(IMAGE), "categories": ["person"], "options": {"forced_output": forced}}

    async def unary(forced: str) -> int:
        response = await http.post("/v1/detect", json=body(forced))
        response.raise_for_status()
        return int(response.json()["usage"]["completion_tokens"])

    async def sse(forced: str) -> int:
        async with http.stream("POST", "/v1/detect/stream", json=body(forced)) as response:
            response.raise_for_status()
            last = ""
            async for line in response.aiter_lines():
                if line.startswith("data:"):
                    last = line
        return int(json.loads(last[5:])["usage"]["completion_tokens"])

    async def over_grpc(forced: str) -> int:
        params = DetectParams(categories=["person"], options={"forced_output": forced})  # type: ignore[arg-type]
        tokens = 0
        async for event in stub.DetectStream(params_to_pb(params, IMAGE)):
            if event.WhichOneof("event") == "done":
                tokens = event.done.usage.completion_tokens
        return tokens

    return {"http": unary, "sse": sse, "grpc": over_grpc}


async def batch(send: Send, forced: str, requests: int, in_flight: int, pid: int) -> Batch:
    slots = asyncio.Semaphore(in_flight)
    tokens = 0

    async def one() -> None:
        nonlocal tokens
        async with slots:
            answered = await send(forced)
        tokens += answered  # not `tokens += await ...`: that reads tokens before the wait

    cpu, wall = cpu_seconds(pid), time.perf_counter()
    await asyncio.gather(*(one() for _ in range(requests)))
    return Batch(cpu_seconds(pid) - cpu, time.perf_counter() - wall, requests, tokens)


async def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    most = max(args.in_flight) * 2
    proc, url, target = start_scripted_server(
        "--max-queue", str(most), "--decode-queue", str(most), "--http-max-connections", str(2 * most)
    )
    rows: list[dict[str, Any]] = []
    # Idle connections are dropped before the server's keep-alive timeout (5 s) can close one
    # under a request.
    limits = httpx.Limits(
        max_connections=max(args.in_flight), max_keepalive_connections=max(args.in_flight), keepalive_expiry=2.0
    )
    try:
        async with (
            httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http,
            grpc.aio.insecure_channel(target) as channel,
        ):
            sends = senders(http, channel)
            long_answer, empty = realistic_forced(args.boxes), ""
            for transport in args.transports:
                await batch(sends[transport], long_answer, 8, min(args.in_flight), proc.pid)  # warm-up
                for in_flight in args.in_flight:
                    requests = max(args.min_requests, 2 * in_flight)
                    short = await batch(sends[transport], empty, requests, in_flight, proc.pid)
                    long = await batch(sends[transport], long_answer, requests, in_flight, proc.pid)
                    rows.append(row(transport, in_flight, short, long))
                    print_row(rows[-1])
    finally:
        proc.terminate()
        proc.wait(30)
    return rows


def row(transport: str, in_flight: int, short: Batch, long: Batch) -> dict[str, Any]:
    extra_tokens = long.tokens - short.tokens
    per_token_us = (long.cpu_s - short.cpu_s) / extra_tokens * 1e6 if extra_tokens > 0 else float("nan")
    return {
        "transport": transport,
        "in_flight": in_flight,
        "requests": short.requests,
        "per_request_ms": short.cpu_s / short.requests * 1000,
        "per_token_us": per_token_us,
        "tokens_per_s": 1e6 / per_token_us if per_token_us > 0 else float("nan"),
        "tokens_per_request": long.tokens / long.requests,
        "wall_s": short.wall_s + long.wall_s,
    }


HEADER = (
    "| transport | in flight | requests | CPU per request (ms) | CPU per token (µs) | tokens/s ceiling | wall (s) |"
)


def print_row(r: dict[str, Any]) -> None:
    print(
        f"| {r['transport']} | {r['in_flight']} | {r['requests']} | {r['per_request_ms']:.2f} | "
        f"{r['per_token_us']:.1f} | {r['tokens_per_s']:,.0f} | {r['wall_s']:.1f} |",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--in-flight", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--transports", nargs="+", choices=TRANSPORTS, default=list(TRANSPORTS))
    parser.add_argument("--boxes", type=int, default=200, help="boxes per long answer")
    parser.add_argument("--min-requests", type=int, default=32, help="requests per batch at least")
    parser.add_argument("--out", type=Path, default=Path("out/ceiling"))
    args = parser.parse_args()
    print(f"scripted engine, {args.boxes}-box answers vs empty ones; server CPU from /proc\n")
    print(HEADER)
    print("|---|---|---|---|---|---|---|")
    rows = asyncio.run(measure(args))
    write_json(args.out / "ceiling.json", {"boxes": args.boxes, "rows": rows})


if __name__ == "__main__":
    main()
