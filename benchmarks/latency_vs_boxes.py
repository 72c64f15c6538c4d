"""Latency as a function of the number of boxes (forced outputs), on the engine directly and
through the real HTTP (SSE) and gRPC servers. Prints a table; writes JSON and a PNG plot.

    .venv/bin/python benchmarks/latency_vs_boxes.py --engine transformers            # tiny, CPU
    .venv-vllm/bin/python benchmarks/latency_vs_boxes.py --engine vllm               # tiny, CPU
    python benchmarks/latency_vs_boxes.py --model 3b --out out/gpu                    # 3B on a GPU

Each N writes a realistic output: boxes grouped 1-6 per label, groups joined by ', '
(~6-7 tokens per box). The fitted slope is the cost of one more box; the plot also marks the
paper's two anchors (A100, vLLM, BF16): 0-29 boxes under 2 s and 410-419 boxes over 16 s.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np

from benchmarks.common import Bench, b64, jpeg_bytes, realistic_forced, sse_detect, start_bench, write_json
from rexomni_server._pb.rexomni.v1 import detector_pb2_grpc as pb_grpc
from rexomni_server.engines.base import EngineRequest, SamplingConfig
from rexomni_server.images import prepare_image
from rexomni_server.parsing import StreamParser
from rexomni_server.schemas import DetectParams
from rexomni_server.serve import start_servers
from rexomni_server.tasks import Task
from rexomni_server.transport.convert import params_to_pb

PAPER_ANCHORS = ((15, 2.0, "paper: 0-29 boxes < 2 s"), (415, 16.0, "paper: 410-419 boxes > 16 s"))
Sample = dict[str, float]


async def engine_once(bench: Bench, image: bytes, forced: str) -> Sample:
    import io

    from PIL import Image

    prepared = prepare_image(Image.open(io.BytesIO(image)).convert("RGB"), 16 * 784, 2560 * 784)
    request = EngineRequest(
        "bench", "Detect objects.", prepared.resized, SamplingConfig(4096, 0.0, 0.8, 1, 1.05), forced
    )
    parser = StreamParser(Task.DETECTION, prepared.width, prepared.height)
    start = time.perf_counter()
    first = None
    tokens = 0
    async for event in bench.runtime.engine.stream(request):
        tokens += event.tokens
        if event.text and parser.feed(event.text) and first is None:
            first = time.perf_counter()
    total = time.perf_counter() - start
    return {"first": (first or start + total) - start, "total": total, "tokens": tokens}


async def http_once(client: httpx.AsyncClient, body: dict[str, Any]) -> Sample:
    timing = await sse_detect(client, body)
    return {"first": timing.first, "total": timing.total, "tokens": timing.tokens}


async def grpc_once(stub: Any, request: Any) -> Sample:
    start = time.perf_counter()
    first = None
    tokens = 0
    async for event in stub.DetectStream(request):
        if event.WhichOneof("event") == "detection" and first is None:
            first = time.perf_counter()
        elif event.WhichOneof("event") == "done":
            tokens = event.done.usage.completion_tokens
    total = time.perf_counter() - start
    return {"first": (first or start + total) - start, "total": total, "tokens": tokens}


def median_sample(samples: list[Sample]) -> Sample:
    return {key: statistics.median(s[key] for s in samples) for key in samples[0]}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    bench = await start_bench(args.engine, args.model, max_new_tokens=4096, max_new_tokens_limit=8192)
    servers = await start_servers(bench.runtime, "127.0.0.1", 0, 0)
    image = jpeg_bytes()
    results: dict[str, dict[int, Sample]] = {"engine": {}, "http": {}, "grpc": {}}
    try:
        async with (
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{servers.http_port}", timeout=600) as client,
            grpc.aio.insecure_channel(f"127.0.0.1:{servers.grpc_port}") as channel,
        ):
            stub = pb_grpc.DetectorStub(channel)
            await engine_once(bench, image, realistic_forced(5))  # warm-up (and compile, on a GPU)
            for n in args.boxes:
                forced = realistic_forced(n)
                params = DetectParams.model_validate({"categories": ["objects"], "options": {"forced_output": forced}})
                body = {"image": b64(image), **params.model_dump(mode="json")}
                request = params_to_pb(params, image)
                runs: dict[str, list[Sample]] = {"engine": [], "http": [], "grpc": []}
                for _ in range(args.repeats):
                    runs["engine"].append(await engine_once(bench, image, forced))
                    runs["http"].append(await http_once(client, body))
                    runs["grpc"].append(await grpc_once(stub, request))
                for path, samples in runs.items():
                    results[path][n] = median_sample(samples)
    finally:
        await servers.stop(0)
        await bench.close()
    fits = {}
    for path, by_n in results.items():
        ns = np.array(sorted(by_n))
        totals = np.array([by_n[n]["total"] * 1000 for n in ns])
        slope, intercept = np.polyfit(ns, totals, 1)
        tokens = sum(by_n[n]["tokens"] for n in ns)
        fits[path] = {
            "ms_per_box": float(slope),
            "intercept_ms": float(intercept),
            "ms_per_token": float(sum(by_n[n]["total"] for n in ns) * 1000 / max(tokens, 1)),
        }
    return {"bench": bench.description, "weight_bytes": bench.weight_bytes, "results": results, "fits": fits}


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, by_n in report["results"].items():
        ns = sorted(by_n)
        ax.plot(ns, [by_n[n]["total"] for n in ns], marker="o", label=f"{name} (total)")
        ax.plot(ns, [by_n[n]["first"] for n in ns], linestyle=":", label=f"{name} (first detection)")
    for x, y, label in PAPER_ANCHORS:
        ax.scatter([x], [y], marker="*", s=160, color="black", zorder=5)
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(5 if x < 200 else -150, 8), fontsize=8)
    ax.set_xlabel("boxes in the output")
    ax.set_ylabel("seconds")
    ax.set_title(f"Latency vs boxes: {report['bench']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", default="transformers", choices=["transformers", "vllm"])
    ap.add_argument("--model", default="tiny", choices=["tiny", "3b", "3b-small"])
    ap.add_argument("--boxes", type=int, nargs="+", default=[0, 1, 5, 10, 25, 50, 100, 200, 400])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("out/latency_vs_boxes"))
    args = ap.parse_args()
    report = asyncio.run(run(args))
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "latency_vs_boxes.json", report)
    print(f"{report['bench']}: latency vs boxes (median of {args.repeats})")
    print(f"{'boxes':>6} {'tokens':>7} " + " ".join(f"{p + ' first/total ms':>24}" for p in report["results"]))
    for n in args.boxes:
        cells = [f"{r[n]['first'] * 1000:>10.0f} / {r[n]['total'] * 1000:>10.0f}" for r in report["results"].values()]
        print(f"{n:>6} {report['results']['engine'][n]['tokens']:>7.0f} " + " ".join(f"{c:>24}" for c in cells))
    print()
    for path, fit in report["fits"].items():
        print(
            f"{path:<7} slope {fit['ms_per_box']:.2f} ms/box, intercept {fit['intercept_ms']:.0f} ms, "
            f"{fit['ms_per_token']:.2f} ms/token"
        )
    try:
        plot(report, args.out / "latency_vs_boxes.png")
    except ImportError:
        print("matplotlib is not installed: no plot (pip install 'rexomni[bench]')")
    print(f"\nwrote {args.out}/latency_vs_boxes.json (+ .png)")


if __name__ == "__main__":
    main()
