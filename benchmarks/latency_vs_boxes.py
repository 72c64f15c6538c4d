"""Latency as a function of the number of boxes (forced outputs), on the engine directly and
through the real HTTP (SSE) and gRPC servers. Prints a table; writes JSON and a PNG plot.

    .venv/bin/python -m benchmarks.latency_vs_boxes --engine transformers            # tiny, CPU
    .venv-vllm/bin/python -m benchmarks.latency_vs_boxes --engine vllm               # tiny, CPU
    python -m benchmarks.latency_vs_boxes --model 3b --out out/gpu                    # 3B on a GPU

Each N writes a realistic output: boxes grouped 1-6 per label, groups joined by ', '
(~8 tokens per box). All three paths send the same prompt with the same token budget, and each
is warmed up first (on a GPU the first request of a new shape compiles). The fitted slope of
total latency vs boxes is the cost of one more box; ms/token is the slope vs tokens (prefill
excluded). The JSON is rewritten after every N, so a run cut short keeps what it measured. The
plot also marks the paper's two anchors (A100, vLLM, BF16): 0-29 boxes under 2 s and 410-419
boxes over 16 s.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Callable
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
from rexomni_server.prompts import build_task_text
from rexomni_server.schemas import DetectParams
from rexomni_server.serve import start_servers
from rexomni_server.tasks import Task
from rexomni_server.transport.convert import params_to_pb

PAPER_ANCHORS = ((15, 2.0, "paper: 0-29 boxes < 2 s"), (415, 16.0, "paper: 410-419 boxes > 16 s"))
CATEGORIES = ["objects"]
# Room for ~900 boxes: a forced output must never be cut by the budget (a cut point is not fitted).
MAX_NEW_TOKENS = 8192
PATHS = ("engine", "http", "grpc")
# first, total (s); tokens, prompt (tokens); cut (1.0 when max_new_tokens cut the output)
Sample = dict[str, float]


def as_sample(first_s: float, total_s: float, tokens: int, prompt: int, finish_reason: str) -> Sample:
    cut = float(finish_reason == "length")
    return {"first": first_s, "total": total_s, "tokens": tokens, "prompt": prompt, "cut": cut}


def timed_sample(start: float, first: float | None, tokens: int, prompt: int, finish_reason: str) -> Sample:
    """A request that began at ``start`` and ends now; ``first``: its first detection, if any."""
    total = time.perf_counter() - start
    return as_sample((first or start + total) - start, total, tokens, prompt, finish_reason)


async def engine_once(bench: Bench, image: bytes, forced: str) -> Sample:
    """The engine alone, with the request the service would make (same prompt and budget)."""
    import io

    from PIL import Image

    prepared = prepare_image(Image.open(io.BytesIO(image)).convert("RGB"), 16 * 784, 2560 * 784)
    task_text = build_task_text(Task.DETECTION, CATEGORIES)
    sampling = SamplingConfig(MAX_NEW_TOKENS, 0.0, 0.8, 1, 1.05)
    request = EngineRequest("bench", task_text, prepared.resized, sampling, forced)
    parser = StreamParser(Task.DETECTION, prepared.width, prepared.height)
    start = time.perf_counter()
    first = None
    tokens = prompt = 0
    finish = "stop"
    async for event in bench.runtime.engine.stream(request):
        tokens += event.tokens
        prompt = event.prompt_tokens or prompt
        finish = event.finish_reason or finish
        if event.text and parser.feed(event.text) and first is None:
            first = time.perf_counter()
    return timed_sample(start, first, tokens, prompt, finish)


async def http_once(client: httpx.AsyncClient, body: dict[str, Any]) -> Sample:
    t = await sse_detect(client, body)
    return as_sample(t.first, t.total, t.tokens, t.prompt_tokens, t.finish_reason)


async def grpc_once(stub: Any, request: Any) -> Sample:
    start = time.perf_counter()
    first = None
    tokens = prompt = 0
    finish = "stop"
    async for event in stub.DetectStream(request):
        if event.WhichOneof("event") == "detection" and first is None:
            first = time.perf_counter()
        elif event.WhichOneof("event") == "done":
            tokens, prompt = event.done.usage.completion_tokens, event.done.usage.prompt_tokens
            finish = event.done.finish_reason
    return timed_sample(start, first, tokens, prompt, finish)


def median_sample(samples: list[Sample]) -> Sample:
    return {key: statistics.median(s[key] for s in samples) for key in samples[0]}


def fit(by_n: dict[int, Sample]) -> dict[str, float]:
    """Slope and intercept of total ms vs boxes, and ms per token as the slope vs tokens (so
    prefill, in the intercept, is not counted as decode); points cut by the budget left out."""
    whole = {n: s for n, s in by_n.items() if not s["cut"]}
    if len(whole) < 2:
        return {}
    ns = np.array(sorted(whole), dtype=float)
    totals = np.array([whole[int(n)]["total"] * 1000 for n in ns])
    tokens = np.array([whole[int(n)]["tokens"] for n in ns], dtype=float)
    slope, intercept = np.polyfit(ns, totals, 1)
    per_token = np.polyfit(tokens, totals, 1)[0] if len(set(tokens)) > 1 else float("nan")
    return {"ms_per_box": float(slope), "intercept_ms": float(intercept), "ms_per_token": float(per_token)}


def row(n: int, by_path: dict[str, Sample]) -> str:
    cells = [f"{s['first'] * 1000:>10.0f} / {s['total'] * 1000:>10.0f}" for s in by_path.values()]
    cut = "  (cut by max_new_tokens: not fitted)" if any(s["cut"] for s in by_path.values()) else ""
    return f"{n:>6} {by_path['engine']['tokens']:>7.0f} " + " ".join(f"{c:>24}" for c in cells) + cut


async def run(args: argparse.Namespace, on_progress: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    bench = await start_bench(
        args.engine, args.model, max_new_tokens=MAX_NEW_TOKENS, max_new_tokens_limit=MAX_NEW_TOKENS
    )
    image = jpeg_bytes()
    results: dict[str, dict[int, Sample]] = {path: {} for path in PATHS}
    report: dict[str, Any] = {"bench": bench.description, "weight_bytes": bench.weight_bytes, "results": results}
    try:
        servers = await start_servers(bench.runtime, "127.0.0.1", 0, 0)
        try:
            async with (
                httpx.AsyncClient(base_url=f"http://127.0.0.1:{servers.http_port}", timeout=600) as client,
                grpc.aio.insecure_channel(f"127.0.0.1:{servers.grpc_port}") as channel,
            ):
                stub = pb_grpc.DetectorStub(channel)  # type: ignore[no-untyped-call]

                def requests(n: int) -> tuple[str, dict[str, Any], Any]:
                    forced = realistic_forced(n)
                    options = {"forced_output": forced, "max_new_tokens": MAX_NEW_TOKENS}
                    params = DetectParams.model_validate({"categories": CATEGORIES, "options": options})
                    return forced, {"image": b64(image), **params.model_dump(mode="json")}, params_to_pb(params, image)

                # Warm every path (connections, and on a GPU the compiled decode step).
                forced, body, request = requests(5)
                await engine_once(bench, image, forced)
                await http_once(client, body)
                await grpc_once(stub, request)
                print(f"{bench.description}: latency vs boxes (median of {args.repeats})", flush=True)
                print(f"{'boxes':>6} {'tokens':>7} " + " ".join(f"{p + ' first/total ms':>24}" for p in PATHS))
                for n in args.boxes:
                    forced, body, request = requests(n)
                    runs: dict[str, list[Sample]] = {path: [] for path in PATHS}
                    for _ in range(args.repeats):
                        runs["engine"].append(await engine_once(bench, image, forced))
                        runs["http"].append(await http_once(client, body))
                        runs["grpc"].append(await grpc_once(stub, request))
                    for path, samples in runs.items():
                        results[path][n] = median_sample(samples)
                    print(row(n, {path: results[path][n] for path in PATHS}), flush=True)
                    report["fits"] = {path: fit(by_n) for path, by_n in results.items()}
                    on_progress(report)
        finally:
            await servers.stop(0)
    finally:
        await bench.close()
    return report


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
    out_json = args.out / "latency_vs_boxes.json"
    report = asyncio.run(run(args, lambda partial: write_json(out_json, partial)))
    print()
    for path, fitted in report["fits"].items():
        if fitted:
            print(
                f"{path:<7} slope {fitted['ms_per_box']:.2f} ms/box, intercept {fitted['intercept_ms']:.0f} ms, "
                f"{fitted['ms_per_token']:.2f} ms/token"
            )
    written = [str(out_json)]
    try:
        plot(report, args.out / "latency_vs_boxes.png")
        written.append(str(args.out / "latency_vs_boxes.png"))
    except ImportError:
        print("matplotlib is not installed: no plot (pip install 'rexomni[bench]')")
    print(f"\nwrote {', '.join(written)}")


if __name__ == "__main__":
    main()
