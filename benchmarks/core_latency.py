"""Parser throughput and tiny-model end-to-end latency (CPU). Prints a table.

    .venv/bin/python -m benchmarks.core_latency [--boxes 50] [--repeats 5]

1. Parser: 400-box outputs (phrase groups of 1-6 boxes per label as real outputs have them, and
   one label with all 400) parsed whole, in tokens/s, and fed token by token as an engine
   streams them, in ms for the whole answer (targets: >= 1M tokens/s, < 3 ms).
2. End to end on the tiny random model with forced outputs: HTTP app (in-process ASGI) vs the
   service called directly vs the engine called directly, same requests, same run, so the
   ratios are the overheads of each layer.
3. The same without a model (scripted engine): the server's own cost per output piece.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import re
import statistics
import tempfile
import time

import httpx
from PIL import Image

from benchmarks.common import realistic_forced, single_label_forced
from rexomni_server.app import create_app
from rexomni_server.engines.base import EngineRequest, SamplingConfig
from rexomni_server.engines.scripted import ScriptedEngine
from rexomni_server.images import prepare_image
from rexomni_server.parsing import StreamParser, parse_output
from rexomni_server.prompts import build_task_text
from rexomni_server.runtime import Runtime
from rexomni_server.schemas import DetectParams
from rexomni_server.settings import Settings
from rexomni_server.tasks import Task
from rexomni_server.tiny import make_tiny_model
from rexomni_server.vocabulary import END_MARKER

TOKEN = re.compile(r"<\|[a-z_]+\|>|<\d+>|[^<]+")
PARSER_BOXES = 400
PARSER_RUNS = 30  # a parse takes milliseconds: more runs than --repeats keep its median steady


def time_parser(text: str) -> tuple[int, float, float]:
    """(tokens, median s to parse whole, median s to feed token by token and finish)."""
    pieces = TOKEN.findall(text)
    whole_times, stream_times = [], []
    for _ in range(PARSER_RUNS):
        t = time.perf_counter()
        parse_output(Task.DETECTION, text, 1000, 1000)
        whole_times.append(time.perf_counter() - t)
        t = time.perf_counter()
        parser = StreamParser(Task.DETECTION, 1000, 1000)
        for piece in pieces:
            parser.feed(piece)
        parser.finish()
        stream_times.append(time.perf_counter() - t)
    return len(pieces), statistics.median(whole_times), statistics.median(stream_times)


def bench_parser() -> list[tuple[str, str]]:
    outputs = {
        "groups of 1-6": realistic_forced(PARSER_BOXES) + END_MARKER,
        "one label": single_label_forced("person", PARSER_BOXES) + END_MARKER,
    }
    rows = []
    for name, text in outputs.items():
        tokens, whole, stream = time_parser(text)
        rows += [
            (f"parse whole, {PARSER_BOXES} boxes {name} ({tokens} tokens), tokens/s", f"{tokens / whole:,.0f}"),
            (f"parse streamed token by token, {PARSER_BOXES} boxes {name}, ms", f"{stream * 1000:.2f}"),
        ]
    return rows


async def engine_direct(runtime: Runtime, request: EngineRequest) -> tuple[float, float, int]:
    """(total s, decode s per token after the first, tokens) of one engine request."""
    start = time.perf_counter()
    first = None
    tokens = 0
    async for event in runtime.engine.stream(request):
        if event.tokens and first is None:
            first = time.perf_counter()
        tokens += event.tokens
    end = time.perf_counter()
    per_token = (end - first) / (tokens - 1) if first is not None and tokens > 1 else float("nan")
    return end - start, per_token, tokens


async def bench_end_to_end(n_boxes: int, repeats: int) -> list[tuple[str, str]]:
    with tempfile.TemporaryDirectory() as tmp:
        make_tiny_model(tmp)
        settings = Settings(model=tmp, engine="transformers", allow_forced_output=True)
        runtime = Runtime(settings)
        await runtime.engine.start()
        try:
            app = create_app(runtime=runtime)
            buf = io.BytesIO()
            Image.new("RGB", (640, 480), (20, 90, 160)).save(buf, "JPEG")
            forced = single_label_forced("person", n_boxes)
            body = {"image": base64.b64encode(buf.getvalue()).decode(), "categories": ["person"]}
            body["options"] = {"forced_output": forced}  # type: ignore[assignment]
            # The request the service makes for that body: same prompt, image size and budget.
            prepared = prepare_image(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"), 16 * 784, 2560 * 784)
            sampling = SamplingConfig(settings.max_new_tokens, 0.0, 0.8, 1, 1.05)
            task_text = build_task_text(Task.DETECTION, ["person"])
            params = DetectParams.model_validate({"categories": ["person"], "options": {"forced_output": forced}})
            image = buf.getvalue()
            direct, per_token, via_service, via_http, first = [], [], [], [], []
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://b") as client:
                await client.post("/v1/detect", json=body)  # warm-up, both paths
                await engine_direct(runtime, EngineRequest("warm", task_text, prepared.resized, sampling, forced))
                for i in range(repeats):
                    request = EngineRequest(f"d{i}", task_text, prepared.resized, sampling, forced)
                    total, decode, tokens = await engine_direct(runtime, request)
                    direct.append(total)
                    per_token.append(decode)
                    t = time.perf_counter()
                    await runtime.service.detect(params, image)  # the service without a transport
                    via_service.append(time.perf_counter() - t)
                    t = time.perf_counter()
                    result = (await client.post("/v1/detect", json=body)).json()
                    via_http.append(time.perf_counter() - t)
                    first.append(result["timings"]["first_detection_ms"])
        finally:
            await runtime.stop()
    d, h, sv = statistics.median(direct), statistics.median(via_http), statistics.median(via_service)
    return [
        (f"engine direct, {n_boxes} boxes ({tokens} tokens), ms", f"{d * 1000:.1f}"),
        ("service (image, parsing, tracking; no transport), ms", f"{sv * 1000:.1f}"),
        ("HTTP /v1/detect end to end, ms", f"{h * 1000:.1f}"),
        ("HTTP time to first detection, ms", f"{statistics.median(first):.1f}"),
        ("HTTP / engine ratio", f"{h / d:.2f}"),
        ("engine decode ms per token (after the first; tiny model)", f"{statistics.median(per_token) * 1000:.2f}"),
    ]


async def bench_server_cost(n_boxes: int, repeats: int) -> list[tuple[str, str]]:
    """The server's own CPU cost per output token, without a model: the scripted engine replays
    the output at once, so what remains is image handling, parsing, tracking and transport."""
    forced = single_label_forced("person", n_boxes)
    engine = ScriptedEngine(default_output=forced)
    await engine.start()
    runtime = Runtime(Settings(allow_forced_output=True, engine="scripted"), engine=engine, model_label="scripted")
    buf = io.BytesIO()
    Image.new("RGB", (640, 480), (20, 90, 160)).save(buf, "JPEG")
    params = DetectParams.model_validate({"categories": ["person"], "options": {"forced_output": forced}})
    body = {"image": base64.b64encode(buf.getvalue()).decode(), **params.model_dump(mode="json")}
    via_service, via_http = [], []
    transport = httpx.ASGITransport(app=create_app(runtime=runtime))
    async with httpx.AsyncClient(transport=transport, base_url="http://b") as client:
        result = await runtime.service.detect(params, buf.getvalue())  # warm-up
        for _ in range(repeats):
            t = time.perf_counter()
            await runtime.service.detect(params, buf.getvalue())
            via_service.append(time.perf_counter() - t)
            t = time.perf_counter()
            (await client.post("/v1/detect", json=body)).raise_for_status()
            via_http.append(time.perf_counter() - t)
    tokens = result.usage.completion_tokens
    service, http = statistics.median(via_service), statistics.median(via_http)
    return [
        (f"no model: service, {n_boxes} boxes ({tokens} pieces), ms", f"{service * 1000:.1f}"),
        ("no model: HTTP /v1/detect, ms", f"{http * 1000:.1f}"),
        ("no model: server cost per output piece, µs (HTTP)", f"{http / tokens * 1e6:.1f}"),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--boxes", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    rows = bench_parser() + asyncio.run(bench_end_to_end(args.boxes, args.repeats))
    rows += asyncio.run(bench_server_cost(args.boxes, args.repeats))
    width = max(len(k) for k, _ in rows)
    print(f"{'measure':<{width}}  value")
    print(f"{'-' * width}  -----")
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
