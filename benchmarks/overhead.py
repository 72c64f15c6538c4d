"""Per-request overhead of our servers: HTTP and gRPC vs calling the engine directly, and (with
vLLM installed) vs vLLM's own OpenAI-compatible server plus client-side parsing.

    .venv-vllm/bin/python -m benchmarks.overhead --engine vllm
    .venv/bin/python -m benchmarks.overhead --engine transformers      # no `vllm serve` column

Same forced output (``--boxes`` boxes), same pre-resized image, unary calls, median of
``--repeats``. `vllm serve` runs on the same tiny checkpoint with our forced-output logits
processor (passed through ``vllm_xargs``) after our engine has been stopped, so the two never
share the CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

import grpc
import httpx

from benchmarks.common import Bench, b64, jpeg_bytes, realistic_forced, start_bench
from benchmarks.vllm_serve import chat_body, running_vllm_serve
from rexomni_server._pb.rexomni.v1 import detector_pb2_grpc as pb_grpc
from rexomni_server.engines.base import EngineRequest, SamplingConfig
from rexomni_server.parsing import parse_output
from rexomni_server.prompts import build_task_text
from rexomni_server.schemas import DetectParams
from rexomni_server.serve import start_servers
from rexomni_server.tasks import Task
from rexomni_server.transport.convert import params_to_pb

W, H = 644, 476  # already a smart_resize size: no path resizes again


async def timed(repeats: int, calls: Mapping[str, Callable[[], Awaitable[int]]]) -> dict[str, tuple[float, int]]:
    """Median ms per path; paths take turns within each repeat so drift hits them alike."""
    for call in calls.values():
        await call()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in calls}
    counts: dict[str, int] = {}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            counts[name] = await call()
            times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(t) * 1000, counts[name]) for name, t in times.items()}


async def our_paths(args: argparse.Namespace, bench: Bench, image: bytes, forced: str) -> dict[str, tuple[float, int]]:
    servers = await start_servers(bench.runtime, "127.0.0.1", 0, 0)
    params = DetectParams.model_validate({"categories": ["objects"], "options": {"forced_output": forced}})
    body = {"image": b64(image), **params.model_dump(mode="json")}
    unscored_body = {**body, "options": {**body["options"], "scores": False}}
    import io

    from PIL import Image

    pil = Image.open(io.BytesIO(image)).convert("RGB")
    text = build_task_text(Task.DETECTION, ["objects"])

    async def engine() -> int:
        request = EngineRequest("overhead", text, pil, SamplingConfig(4096, 0.0, 0.8, 1, 1.05), forced)
        out = "".join([e.text async for e in bench.runtime.engine.stream(request)])
        return len(parse_output(Task.DETECTION, out, W, H)[0])

    try:
        async with (
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{servers.http_port}", timeout=300) as client,
            grpc.aio.insecure_channel(f"127.0.0.1:{servers.grpc_port}") as channel,
        ):
            stub = pb_grpc.DetectorStub(channel)  # type: ignore[no-untyped-call]

            async def http() -> int:
                return len((await client.post("/v1/detect", json=body)).json()["detections"])

            async def http_unscored() -> int:
                return len((await client.post("/v1/detect", json=unscored_body)).json()["detections"])

            async def grpc_call() -> int:
                return len((await stub.Detect(params_to_pb(params, image))).detections)

            calls = {
                "engine direct (+ parse)": engine,
                "our HTTP /v1/detect": http,
                "our gRPC Detect": grpc_call,
                "our HTTP, scores off": http_unscored,
            }
            results = await timed(args.repeats, calls)
    finally:
        await servers.stop(0)
        await bench.runtime.stop()  # the engine goes; its checkpoint stays for `vllm serve`
    return results


async def vllm_serve_path(args: argparse.Namespace, model_dir: str, image: bytes, forced: str) -> tuple[float, int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    body = chat_body(model_dir, tokenizer, image, build_task_text(Task.DETECTION, ["objects"]), forced)
    async with (
        running_vllm_serve(model_dir, Path(args.out) / "vllm_serve.log") as served,
        httpx.AsyncClient(base_url=served.url, timeout=300) as client,
    ):

        async def call() -> int:
            response = await client.post("/v1/chat/completions", json=body)
            response.raise_for_status()
            text = response.json()["choices"][0]["message"]["content"]
            return len(parse_output(Task.DETECTION, text, W, H)[0])  # the client's parsing

        return (await timed(args.repeats, {"vllm serve": call}))["vllm serve"]


async def run(args: argparse.Namespace) -> None:
    image = jpeg_bytes(W, H)
    forced = realistic_forced(args.boxes)
    bench = await start_bench(args.engine, "tiny")
    try:
        results = await our_paths(args, bench, image, forced)
        if args.engine == "vllm":
            model_dir = str(bench.runtime.settings.model)
            results["vllm serve + client parse"] = await vllm_serve_path(args, model_dir, image, forced)
    finally:
        await bench.close()
    base = results["engine direct (+ parse)"][0]
    print(f"{args.engine} engine, tiny model; {args.boxes} forced boxes, unary, median of {args.repeats}")
    print(f"{'path':<28} {'ms':>8} {'boxes':>6} {'overhead ms':>12} {'share':>7}")
    for name, (ms, boxes) in results.items():
        print(f"{name:<28} {ms:>8.1f} {boxes:>6} {ms - base:>12.1f} {(ms - base) / ms:>7.1%}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", default="vllm", choices=["vllm", "transformers"])
    ap.add_argument("--boxes", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--out", type=Path, default=Path("out/overhead"), help="where `vllm serve` logs")
    asyncio.run(run(ap.parse_args()))


if __name__ == "__main__":
    main()
