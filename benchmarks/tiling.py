"""Tiled detection on a large image: one pass, the server's tiling, and the same tiles sent one
at a time by the client. Prints a table; writes JSON.

    .venv/bin/python -m benchmarks.tiling --engine scripted               # the server's own cost
    .venv-vllm/bin/python -m benchmarks.tiling --engine vllm              # tiny checkpoint, CPU
    .venv/bin/python -m benchmarks.tiling --engine transformers --rounds 1
    python -m benchmarks.tiling --engine transformers --model 3b --device cuda   # GPU, random 3B

One server process answers three ways of detecting on a ``--width`` x ``--height`` photo-like
JPEG (smooth colour gradients, a few hundred flat shapes, sensor grain: ~3 MB at 4000 x 3000):

1. one pass: the image untiled, resized into max_pixels as usual (one engine request);
2. tiled: ``options.tiling = "auto"``, the server cuts the tiles and runs them as engine
   requests of their own at once (vLLM batches them), then merges;
3. one at a time: the client cuts the same tiles (``plan_auto`` at the same max_pixels, whole-image
   pass included, as SAHI runs a full-image prediction too) and sends each crop as an untiled
   request, waiting for each answer before sending the next: a SAHI-style loop around a
   one-request-at-a-time wrapper. No merge is timed. Cutting and encoding the crops is done
   before the clock starts (it is reported apart).

Every engine request answers the same forced output of ``--boxes`` boxes, so tokens compare like
for like; the budget (max_new_tokens) leaves room for it, and an answer cut by it fails the run.
All requests go through ``/v1/detect/stream`` (SSE): wall time is until the result, first
detection until the first `detection` event (for 3: of the first crop that has one). Each round
runs the three modes in a rotated order (drift on a shared machine hits all alike); the table
shows medians over ``--rounds`` (the JSON is rewritten after every round). Each mode of each
round gets an image of its own (the base image with its brightness shifted by one more level,
re-encoded), so vLLM's prefix cache never serves one request's image from another's: like
different photos, every prefill is paid. ``--max-pixels`` is sent with every request (default:
the server's default) and is what the client's plan uses.

``--model``: a checkpoint directory or hub id (default: the tiny random checkpoint, made if
missing; ``scripted`` for the scripted engine), served by ``rexomni-server serve`` in a process of
its own; or ``3b`` / ``3b-small`` (transformers only): Rex-Omni's architecture with random weights,
built in this process (no checkpoint on disk) and served here on loopback ports.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import statistics
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image, ImageDraw

from benchmarks.common import b64, realistic_forced, sse_stream, start_bench, start_server, write_json
from rexomni_server.settings import Settings, default_tiny_dir
from rexomni_server.tiling import TilingPlan, crop_box, plan_auto

MODES = ("one pass", "tiled (server)", "one at a time (client)")
RANDOM_MODELS = ("3b", "3b-small")
CATEGORIES = ["objects"]
JPEG_QUALITY = 90


class Failed(Exception):
    """A request failed or its answer was not the one asked for: the run stops here."""


# ---- the image ----------------------------------------------------------------------------
def photo(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A deterministic photo-like RGB array: a sky-to-ground gradient with soft colour waves, a
    few hundred flat shapes (objects), and luminance grain (so JPEG has detail to keep)."""
    rng = np.random.default_rng(seed)
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None]
    x = np.linspace(0, 1, width, dtype=np.float32)[None, :]
    base = np.empty((height, width, 3), np.float32)
    for channel, (top, bottom) in enumerate(((110, 90), (150, 110), (200, 70))):
        base[..., channel] = top + (bottom - top) * y + 18 * np.sin(7 * x + 3 * y + rng.uniform(0, 6.3))
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(max(10, width * height // 80_000)):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        w, h = int(rng.integers(8, max(9, width // 8))), int(rng.integers(8, max(9, height // 8)))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((x0, y0, x0 + w, y0 + h), fill=colour)
    grain = rng.normal(0, 6, (height, width, 1)).astype(np.int16)
    pixels: np.ndarray = np.clip(np.asarray(image, dtype=np.int16) + grain, 0, 255).astype(np.uint8)
    return pixels


def jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


class Variants:
    """The base photo with its brightness shifted by 1, 2, 3... levels: an image of its own for
    every request (no prefix-cache hit between requests), all of the same size and content."""

    def __init__(self, width: int, height: int) -> None:
        self._base = photo(width, height).astype(np.int16)
        self._next = 0

    def next(self) -> Image.Image:
        self._next += 1
        level = self._next % 200 + 1  # a shift of up to 200 levels keeps the image as it was
        return Image.fromarray(np.clip(self._base + level, 0, 255).astype(np.uint8))


# ---- requests -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Sample:
    """One mode's run: client-side times (s) and what the server reported."""

    wall_s: float
    first_s: float  # to the first detection (= wall when there was none)
    requests: int  # engine requests: 1 untiled, one per tile when tiled
    prompt_tokens: int
    completion_tokens: int
    detections: int


@dataclass(frozen=True)
class Answer:
    first: float | None  # perf_counter of the first detection event
    result: dict[str, Any]


async def detect(client: httpx.AsyncClient, body: dict[str, Any], what: str) -> Answer:
    """POST /v1/detect/stream; the result, once checked: no error, the whole forced answer."""
    try:
        first, result = await sse_stream(client, body)
    except (httpx.HTTPError, RuntimeError) as exc:
        raise Failed(f"{what}: {type(exc).__name__}: {exc}") from exc
    if result["truncated"] or result["finish_reason"] != "stop":
        raise Failed(
            f"{what}: the answer ended with finish_reason {result['finish_reason']!r} "
            f"(truncated: {result['truncated']}); it should have been the whole forced output"
        )
    return Answer(first, result)


def body(image: bytes, options: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"image": b64(image), "categories": CATEGORIES, "options": {**options, **extra}}


def sample(start: float, answers: list[Answer], requests: int) -> Sample:
    end = time.perf_counter()
    firsts = [a.first for a in answers if a.first is not None]
    return Sample(
        wall_s=end - start,
        first_s=(min(firsts) if firsts else end) - start,
        requests=requests,
        prompt_tokens=sum(a.result["usage"]["prompt_tokens"] for a in answers),
        completion_tokens=sum(a.result["usage"]["completion_tokens"] for a in answers),
        detections=sum(len(a.result["detections"]) for a in answers),
    )


async def one_pass(client: httpx.AsyncClient, image: bytes, options: dict[str, Any]) -> Sample:
    start = time.perf_counter()
    answer = await detect(client, body(image, options), "one pass")
    return sample(start, [answer], 1)


def plan_tiles(plan: TilingPlan) -> list[tuple[int, int, int, int, bool]]:
    return [(t.x0, t.y0, t.x1, t.y1, t.whole) for t in plan.tiles]


async def tiled(client: httpx.AsyncClient, image: bytes, options: dict[str, Any], plan: TilingPlan) -> Sample:
    start = time.perf_counter()
    answer = await detect(client, body(image, options, tiling="auto"), "tiled")
    done = sample(start, [answer], len(answer.result.get("tiles") or []))
    got = [(t["x0"], t["y0"], t["x1"], t["y1"], t["whole"]) for t in answer.result.get("tiles") or []]
    if len(got) != len(plan.tiles):
        raise Failed(f"tiled: the server ran {len(got)} tiles, the client's plan has {len(plan.tiles)}")
    if got != plan_tiles(plan):
        raise Failed(f"tiled: the server's tiles {got} are not the client's plan {plan_tiles(plan)}")
    return done


async def one_at_a_time(client: httpx.AsyncClient, crops: list[bytes], options: dict[str, Any]) -> Sample:
    start = time.perf_counter()
    answers = []
    for index, crop in enumerate(crops):
        answers.append(await detect(client, body(crop, options), f"one at a time, tile {index}"))
    return sample(start, answers, len(crops))


def cut(image: Image.Image, plan: TilingPlan) -> list[bytes]:
    """The client's crops, each encoded as the JPEG it sends (the whole-image pass: the image)."""
    full = (0, 0, image.width, image.height)
    return [jpeg(image if crop_box(t) == full else image.crop(crop_box(t))) for t in plan.tiles]


# ---- the server ---------------------------------------------------------------------------
def model_of(args: argparse.Namespace) -> str:
    if args.model is None:
        return "scripted" if args.engine == "scripted" else str(default_tiny_dir())
    return str(default_tiny_dir()) if args.model == "tiny" else str(args.model)


@contextlib.asynccontextmanager
async def serving(args: argparse.Namespace) -> AsyncIterator[tuple[str, str]]:
    """The server's URL and a description of it, stopped on the way out (also on an error)."""
    model = model_of(args)
    if model in RANDOM_MODELS:
        if args.engine != "transformers":
            raise SystemExit(f"--model {model} runs on the transformers engine only (vLLM needs a checkpoint)")
        from rexomni_server.serve import start_servers

        bench = await start_bench("transformers", model, args.device)
        try:
            servers = await start_servers(bench.runtime, "127.0.0.1", 0, None)
            try:
                yield f"http://127.0.0.1:{servers.http_port}", bench.description + " (server in this process)"
            finally:
                await servers.stop(0)
        finally:
            await bench.close()
        return
    tiny = model == str(default_tiny_dir())
    if tiny and args.engine != "scripted":
        from rexomni_server.runtime import ensure_tiny_model

        ensure_tiny_model(default_tiny_dir())
    flags: list[str] = []
    if tiny and args.engine == "vllm":
        flags.append("--enforce-eager")  # the tiny model runs on CPUs: no compilation, a faster start
    if args.engine == "transformers" and args.device != "auto":
        flags += ["--device", args.device]
    proc, url, _ = start_server(
        *flags, engine=args.engine, model=model, timeout_s=args.start_timeout, log=args.out / "server.log"
    )
    try:
        yield url, f"{args.engine} engine, model {model}"
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


# ---- the run ------------------------------------------------------------------------------
def median(samples: list[Sample]) -> dict[str, float]:
    return {key: float(statistics.median(getattr(s, key) for s in samples)) for key in asdict(samples[0])}


def report_of(
    args: argparse.Namespace, description: str, max_pixels: int, plan: TilingPlan, samples: dict[str, list[Sample]]
) -> dict[str, Any]:
    done = [mode for mode in MODES if samples[mode]]
    return {
        "bench": description,
        "image": {"width": args.width, "height": args.height, "max_pixels": max_pixels},
        "plan": {
            "tiles": len(plan.tiles),
            "grid": len(plan.grid),
            "tile_width": plan.grid[0].width,
            "tile_height": plan.grid[0].height,
            "overlap_px": plan.overlap,
        },
        "boxes": args.boxes,
        "rounds": min(len(samples[mode]) for mode in MODES),
        "medians": {mode: median(samples[mode]) for mode in done},
        "samples": {mode: [asdict(s) for s in runs] for mode, runs in samples.items()},
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    settings = Settings()
    max_pixels = args.max_pixels or settings.max_pixels
    plan = plan_auto(args.width, args.height, max_pixels, max_tiles=settings.max_tiles)  # as the server plans
    forced = realistic_forced(args.boxes)
    # ~8 tokens a box: twice that, and room for the labels, so the budget never cuts the answer.
    options = {"forced_output": forced, "max_new_tokens": 16 * args.boxes + 64, "max_pixels": max_pixels}
    variants = Variants(args.width, args.height)
    samples: dict[str, list[Sample]] = {mode: [] for mode in MODES}
    cut_s: list[float] = []
    out_json = args.out / "tiling.json"
    async with serving(args) as (url, description):
        async with httpx.AsyncClient(base_url=url, timeout=args.request_timeout) as client:
            # Warm-up (not counted): one whole image and one tile, the two shapes the model sees.
            warm = variants.next()
            await detect(client, body(jpeg(warm), options), "warm-up")
            await detect(client, body(cut(warm, plan)[0], options), "warm-up tile")
            for round_index in range(args.rounds):
                order = MODES[round_index % 3 :] + MODES[: round_index % 3]
                for mode in order:
                    image = variants.next()
                    if mode == "one pass":
                        result = await one_pass(client, jpeg(image), options)
                    elif mode == "tiled (server)":
                        result = await tiled(client, jpeg(image), options, plan)
                    else:
                        start = time.perf_counter()
                        crops = cut(image, plan)
                        cut_s.append(time.perf_counter() - start)
                        result = await one_at_a_time(client, crops, options)
                    samples[mode].append(result)
                print(
                    f"round {round_index + 1}/{args.rounds}: "
                    + ", ".join(f"{mode} {samples[mode][-1].wall_s:.2f} s" for mode in MODES),
                    flush=True,
                )
                # Rewritten after every round: a run cut short keeps what it measured.
                report = report_of(args, description, max_pixels, plan, samples)
                report["client_cut_s"] = statistics.median(cut_s)
                write_json(out_json, report)
    return report


def ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}x" if base else "-"


def table(report: dict[str, Any]) -> str:
    medians = report["medians"]
    base = medians["one pass"]
    lines = [
        "| mode | engine requests | wall (s) | vs one pass | first detection (s) | vs one pass | "
        "prompt tokens | vs one pass | completion tokens | vs one pass |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for mode in MODES:
        m = medians[mode]
        lines.append(
            f"| {mode} | {m['requests']:.0f} | {m['wall_s']:.2f} | {ratio(m['wall_s'], base['wall_s'])} | "
            f"{m['first_s']:.2f} | {ratio(m['first_s'], base['first_s'])} | "
            f"{m['prompt_tokens']:.0f} | {ratio(m['prompt_tokens'], base['prompt_tokens'])} | "
            f"{m['completion_tokens']:.0f} | {ratio(m['completion_tokens'], base['completion_tokens'])} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", default="vllm", choices=["scripted", "vllm", "transformers"])
    ap.add_argument(
        "--model",
        default=None,
        help="checkpoint dir or hub id, 'tiny' (the default for vllm/transformers), 'scripted' (the default "
        "for scripted), or 3b / 3b-small (random weights, transformers, in this process)",
    )
    ap.add_argument("--device", default="auto", help="transformers engine: auto, cpu, cuda, cuda:1 ...")
    ap.add_argument("--boxes", type=int, default=10, help="boxes in every engine request's forced answer")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--width", type=int, default=4000)
    ap.add_argument("--height", type=int, default=3000)
    ap.add_argument("--max-pixels", type=int, default=None, help="per request (default: the server's default)")
    ap.add_argument("--start-timeout", type=float, default=300, help="seconds the server may take to start")
    ap.add_argument("--request-timeout", type=float, default=900, help="seconds one request may take")
    ap.add_argument("--out", type=Path, default=Path("out/tiling"))
    args = ap.parse_args()
    if args.rounds < 1 or args.boxes < 0:
        ap.error("--rounds must be at least 1 and --boxes at least 0")
    started = time.perf_counter()
    try:
        report = asyncio.run(run(args))
    except Failed as exc:
        raise SystemExit(f"tiling benchmark failed: {exc}") from None
    report["run_s"] = time.perf_counter() - started
    plan, image = report["plan"], report["image"]
    print(
        f"\n{report['bench']}: a {image['width']}x{image['height']} JPEG, max_pixels {image['max_pixels']}: "
        f"{plan['grid']} tiles of {plan['tile_width']}x{plan['tile_height']} (overlap >= {plan['overlap_px']} px)"
        f"{' + the whole image' if plan['tiles'] > plan['grid'] else ''}; {report['boxes']} forced boxes per "
        f"engine request; median of {report['rounds']} rounds\n"
    )
    print(table(report))
    medians = report["medians"]
    tiled_wall = medians["tiled (server)"]["wall_s"]
    if tiled_wall:
        print(
            f"\none at a time / tiled: {medians['one at a time (client)']['wall_s'] / tiled_wall:.2f}x wall time; "
            f"the client cut and encoded its {plan['tiles']} crops in {report['client_cut_s'] or 0:.2f} s "
            "before each timed run (not counted)"
        )
    tiled_prompt = medians["tiled (server)"]["prompt_tokens"]
    client_prompt = medians["one at a time (client)"]["prompt_tokens"]
    if tiled_prompt != client_prompt:
        print(
            f"note: the server's tiles took {tiled_prompt:.0f} prompt tokens, the client's crops {client_prompt:.0f}: "
            "they were not resized alike"
        )
    out_json = args.out / "tiling.json"
    write_json(out_json, report)
    print(f"\nwrote {out_json} ({report['run_s']:.0f} s in all)")


if __name__ == "__main__":
    main()
