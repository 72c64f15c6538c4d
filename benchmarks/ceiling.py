"""The server's own cost: CPU per request and per generated token, by transport and load, so
that one process never limits a GPU; and its throughput against `vllm serve`'s.

    python -m benchmarks.ceiling [--in-flight 1 16 64 256] [--transports http sse grpc]
    .venv-vllm/bin/python -m benchmarks.ceiling --engine vllm [--in-flight 1 8 32]

Scripted engine (the default): a real server process on the scripted engine (no model: its
answers are the forced outputs, so every CPU cycle the process spends is the server's own). For
each transport and number of requests in flight, the same number of requests is sent twice:
answers of 0 boxes and answers of ``--boxes`` boxes. The server process's CPU time (user +
system, from /proc) of each batch gives the cost per request (the 0-box batch) and the cost per
token (the difference divided by the extra tokens): per-request work cancels out. ``tokens/s``
is the ceiling one process could feed at that cost per token. The client runs in this process,
on the same machine: its CPU is not counted, but it shares the cores, so wall times are only
indicative.

vLLM engine (vLLM's CPU build, the tiny checkpoint): our server on the vLLM engine and
`vllm serve` on the same checkpoint, running side by side and taking turns (``--rounds`` each,
the median reported), answer the same requests (same image, task text and forced output, so
the same tokens) at each number in flight:
tokens/s end to end (scores on: `vllm serve` is asked for the sampled tokens'
log-probabilities, which scoring needs), the front process's CPU per token (ours: HTTP, gRPC, parsing and vLLM's
output processing; theirs: HTTP and output processing; the engine core is another process in
both), and the ratio of the two throughputs. Our unary HTTP and gRPC are compared with its
plain chat completions, our SSE with its streamed ones.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx

from benchmarks.common import b64, jpeg_bytes, realistic_forced, start_server, write_json
from rexomni_server._pb.rexomni.v1 import detector_pb2_grpc as pb_grpc
from rexomni_server.schemas import DetectParams
from rexomni_server.transport.convert import params_to_pb

TRANSPORTS = ("http", "sse", "grpc")
CATEGORY = "person"
SCRIPTED_IMAGE = jpeg_bytes(64, 48)  # small: decoding is per-request work, not what this measures
# A smart_resize size already (8 x 8 image tokens): both servers give the model the same image.
VLLM_IMAGE = jpeg_bytes(224, 224)
# Which of `vllm serve`'s answers each of our transports is compared with.
VLLM_COUNTERPART = {"http": "unary", "grpc": "unary", "sse": "stream"}


@dataclass(frozen=True)
class Batch:
    cpu_s: float  # the server's front process's CPU time over the batch
    wall_s: float
    requests: int
    tokens: int  # completion tokens, as the server reported them


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


Send = Callable[[str], Awaitable[int]]  # forced output -> completion tokens


def senders(http: httpx.AsyncClient, channel: grpc.aio.Channel, image: bytes, scores: bool = True) -> dict[str, Send]:
    """Our server's three ways to answer a request, each returning its completion tokens."""
    stub = pb_grpc.DetectorStub(channel)  # type: ignore[no-untyped-call]

    def options(forced: str) -> dict[str, Any]:
        return {"forced_output": forced, "scores": scores}

    def body(forced: str) -> dict[str, Any]:
        return {"image": b64(image), "categories": [CATEGORY], "options": options(forced)}

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
        params = DetectParams(categories=[CATEGORY], options=options(forced))  # type: ignore[arg-type]
        tokens = 0
        async for event in stub.DetectStream(params_to_pb(params, image)):
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


def client_limits(args: argparse.Namespace) -> httpx.Limits:
    # Idle connections are dropped before the server's keep-alive timeout (5 s) can close one
    # under a request.
    most = max(args.in_flight)
    return httpx.Limits(max_connections=most, max_keepalive_connections=most, keepalive_expiry=2.0)


def requests_at(args: argparse.Namespace, in_flight: int) -> int:
    return int(max(args.min_requests, 2 * in_flight))


def room_for(args: argparse.Namespace) -> list[str]:
    """Server flags that admit every request the benchmark has in flight (the defaults would
    answer some with 429)."""
    most = max(args.in_flight) * 2
    return ["--max-queue", str(most), "--decode-queue", str(most), "--http-max-connections", str(2 * most)]


# ---- scripted engine: the server's own cost ---------------------------------------------------
async def measure_scripted(args: argparse.Namespace) -> list[dict[str, Any]]:
    proc, url, target = start_server(*room_for(args))
    rows: list[dict[str, Any]] = []
    try:
        async with (
            httpx.AsyncClient(base_url=url, timeout=600, limits=client_limits(args)) as http,
            grpc.aio.insecure_channel(target) as channel,
        ):
            sends = senders(http, channel, SCRIPTED_IMAGE)
            long_answer, empty = realistic_forced(args.boxes), ""
            for transport in args.transports:
                await batch(sends[transport], long_answer, 8, min(args.in_flight), proc.pid)  # warm-up
                for in_flight in args.in_flight:
                    requests = requests_at(args, in_flight)
                    short = await batch(sends[transport], empty, requests, in_flight, proc.pid)
                    long = await batch(sends[transport], long_answer, requests, in_flight, proc.pid)
                    rows.append(cost_row(transport, in_flight, short, long))
                    print_cost_row(rows[-1])
    finally:
        proc.terminate()
        proc.wait(30)
    return rows


def cost_row(transport: str, in_flight: int, short: Batch, long: Batch) -> dict[str, Any]:
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


COST_HEADER = (
    "| transport | in flight | requests | CPU per request (ms) | CPU per token (µs) | tokens/s ceiling | wall (s) |\n"
    "|---|---|---|---|---|---|---|"
)


def print_cost_row(r: dict[str, Any]) -> None:
    print(
        f"| {r['transport']} | {r['in_flight']} | {r['requests']} | {r['per_request_ms']:.2f} | "
        f"{r['per_token_us']:.1f} | {r['tokens_per_s']:,.0f} | {r['wall_s']:.1f} |",
        flush=True,
    )


# ---- vLLM engine: ours against `vllm serve` -------------------------------------------------
def vllm_senders(http: httpx.AsyncClient, body: dict[str, Any]) -> dict[str, Send]:
    """`vllm serve`'s plain and streamed chat completions of ``body`` (its forced output is in
    the body already), each returning its completion tokens."""

    async def unary(forced: str) -> int:
        response = await http.post("/v1/chat/completions", json=body)
        response.raise_for_status()
        return int(response.json()["usage"]["completion_tokens"])

    async def stream(forced: str) -> int:
        streamed = {**body, "stream": True, "stream_options": {"include_usage": True}}
        tokens = 0
        async with http.stream("POST", "/v1/chat/completions", json=streamed) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    usage = json.loads(line[6:]).get("usage")
                    tokens = int(usage["completion_tokens"]) if usage else tokens
        return tokens

    return {"unary": unary, "stream": stream}


THROUGHPUT_HEADER = (
    "| server | path | in flight | requests | tokens | tokens/s | front CPU per token (µs) | wall (s) |\n"
    "|---|---|---|---|---|---|---|---|"
)


@dataclass(frozen=True)
class Contender:
    """One server's way of answering (ours over a transport, or `vllm serve`'s counterpart)."""

    server: str
    path: str
    send: Send
    pid: int  # the front process, whose CPU is counted


def throughput_row(contender: Contender, in_flight: int, batches: list[Batch]) -> dict[str, Any]:
    """The median batch of a contender at one number in flight (batches alternate with the
    other server's, so drift on a shared machine hits both alike)."""
    rates = sorted(batches, key=lambda b: b.tokens / b.wall_s)
    done = rates[len(rates) // 2]
    r = {
        "server": contender.server,
        "path": contender.path,
        "in_flight": in_flight,
        "requests": done.requests,
        "tokens": done.tokens,
        "wall_s": done.wall_s,
        "tokens_per_s": done.tokens / done.wall_s,
        "front_cpu_per_token_us": done.cpu_s / done.tokens * 1e6 if done.tokens else float("nan"),
        "rounds": len(batches),
    }
    print(
        f"| {r['server']} | {r['path']} | {in_flight} | {done.requests} | {done.tokens} | {r['tokens_per_s']:,.0f} | "
        f"{r['front_cpu_per_token_us']:.0f} | {done.wall_s:.1f} |",
        flush=True,
    )
    return r


async def alternate(
    args: argparse.Namespace, pairs: list[tuple[Contender, Contender]], forced: str
) -> list[dict[str, Any]]:
    """Each of our transports and its `vllm serve` counterpart take turns, ``--rounds`` times at
    each number in flight; the median round of each is reported."""
    rows = []
    for ours, theirs in pairs:
        for contender in (ours, theirs):
            await batch(contender.send, forced, 2, min(args.in_flight), contender.pid)  # warm-up
        for in_flight in args.in_flight:
            runs: dict[str, list[Batch]] = {ours.server: [], theirs.server: []}
            for _ in range(args.rounds):
                for c in (ours, theirs):
                    runs[c.server].append(await batch(c.send, forced, requests_at(args, in_flight), in_flight, c.pid))
            rows += [throughput_row(c, in_flight, runs[c.server]) for c in (ours, theirs)]
    return rows


async def measure_vllm(args: argparse.Namespace) -> list[dict[str, Any]]:
    from transformers import AutoTokenizer

    from benchmarks.vllm_serve import MAX_MODEL_LEN, chat_body, running_vllm_serve
    from rexomni_server.prompts import build_task_text
    from rexomni_server.tasks import Task
    from rexomni_server.tiny import make_tiny_model

    forced = realistic_forced(args.boxes)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(make_tiny_model(tmp))
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        body = chat_body(model_dir, tokenizer, VLLM_IMAGE, build_task_text(Task.DETECTION, [CATEGORY]), forced)
        if args.scores:  # what a client of `vllm serve` needs to score detections as we do
            body["logprobs"] = True
        # Both servers run at once (each with its own engine core; an idle one takes no CPU),
        # so their batches can alternate.
        flags = ["--enforce-eager", "--max-model-len", str(MAX_MODEL_LEN), *room_for(args)]
        proc, url, target = start_server(
            *flags, engine="vllm", model=model_dir, timeout_s=300, log=args.out / "server.log"
        )
        try:
            async with (
                running_vllm_serve(model_dir, args.out / "vllm_serve.log") as served,
                httpx.AsyncClient(base_url=url, timeout=600, limits=client_limits(args)) as http,
                httpx.AsyncClient(base_url=served.url, timeout=600, limits=client_limits(args)) as their_http,
                grpc.aio.insecure_channel(target) as channel,
            ):
                ours = senders(http, channel, VLLM_IMAGE, args.scores)
                theirs = vllm_senders(their_http, body)
                pairs = [
                    (
                        Contender("ours", t, ours[t], proc.pid),
                        Contender("vllm serve", VLLM_COUNTERPART[t], theirs[VLLM_COUNTERPART[t]], served.process.pid),
                    )
                    for t in args.transports
                ]
                print(THROUGHPUT_HEADER)
                rows = await alternate(args, pairs, forced)
        finally:
            proc.terminate()
            proc.wait(60)
    print_ratios(rows)
    return rows


def print_ratios(rows: list[dict[str, Any]]) -> None:
    print("\n| ours | vllm serve | in flight | tokens/s ours / theirs | same tokens |\n|---|---|---|---|---|")
    for ours, theirs in zip(rows[::2], rows[1::2], strict=True):
        ratio = ours["tokens_per_s"] / theirs["tokens_per_s"]
        same = "yes" if ours["tokens"] == theirs["tokens"] else f"no ({ours['tokens']} vs {theirs['tokens']})"
        print(f"| {ours['path']} | {theirs['path']} | {ours['in_flight']} | {ratio:.2f} | {same} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", choices=["scripted", "vllm"], default="scripted")
    parser.add_argument("--in-flight", type=int, nargs="+", help="default: 1 16 64 256 (vllm: 1 8 32)")
    parser.add_argument("--transports", nargs="+", choices=TRANSPORTS, default=list(TRANSPORTS))
    parser.add_argument("--boxes", type=int, help="boxes per long answer (default: 200; vllm: 30)")
    parser.add_argument("--min-requests", type=int, help="requests per batch at least (default: 32; vllm: 8)")
    parser.add_argument(
        "--no-scores",
        dest="scores",
        action="store_false",
        help="vllm: our requests without scores, theirs without log-probabilities (default: with)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="vllm: turns each server takes per point (median)")
    parser.add_argument("--out", type=Path, default=Path("out/ceiling"))
    args = parser.parse_args()
    vllm = args.engine == "vllm"
    args.in_flight = args.in_flight or ([1, 8, 32] if vllm else [1, 16, 64, 256])
    args.boxes = args.boxes if args.boxes is not None else (30 if vllm else 200)
    args.min_requests = args.min_requests or (8 if vllm else 32)
    if vllm:
        print(f"vLLM engine (tiny checkpoint), {args.boxes}-box answers: our server vs `vllm serve`\n")
        rows = asyncio.run(measure_vllm(args))
    else:
        print(f"scripted engine, {args.boxes}-box answers vs empty ones; server CPU from /proc\n")
        print(COST_HEADER)
        rows = asyncio.run(measure_scripted(args))
    write_json(args.out / f"ceiling-{args.engine}.json", {"engine": args.engine, "boxes": args.boxes, "rows": rows})


if __name__ == "__main__":
    main()
