"""Batch-1 decode speed of the transformers engine vs the memory-bandwidth limit, same device,
same run. Each decode step must read every LLM weight once, so

    limit ms/token = LLM weight bytes / measured copy bandwidth

    python -m benchmarks.gpu.decode_limit --model 3b --out out/gpu       # on a GPU
    python -m benchmarks.gpu.decode_limit --model 3b-small --device cpu  # dry run

Decode ms/token excludes prefill: (total - time to first token) / (tokens - 1), for a forced
output of ``--tokens`` tokens, with the fast decode path (static cache + compiled decode) off
and on.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from benchmarks.common import realistic_forced, start_bench, write_json
from rexomni_server.engines.base import EngineRequest, SamplingConfig
from rexomni_server.prompts import build_task_text
from rexomni_server.tasks import Task


def copy_bandwidth(device: str, gib: float = 1.0, repeats: int = 10) -> float:
    """Bytes/s of a device-to-device copy (read + write counted)."""
    n = int(gib * (1 << 30)) // 2
    x = torch.empty(n, dtype=torch.bfloat16, device=device)
    y = torch.empty_like(x)
    y.copy_(x)  # warm-up
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        y.copy_(x)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return 2 * x.numel() * x.element_size() * repeats / elapsed


async def decode_ms_per_token(bench: Any, tokens: int, repeats: int) -> dict[str, float]:
    forced = realistic_forced(max(1, tokens // 7))
    image = Image.new("RGB", (644, 476), (10, 20, 30))
    sampling = SamplingConfig(tokens + 16, 0.0, 0.8, 1, 1.05)
    samples = []
    for i in range(repeats + 1):  # the first run warms up (and compiles, on a GPU)
        request = EngineRequest(f"decode-{i}", build_task_text(Task.DETECTION, ["objects"]), image, sampling, forced)
        start = time.perf_counter()
        first = None
        count = 0
        async for event in bench.runtime.engine.stream(request):
            if event.tokens and first is None:
                first = time.perf_counter()
            count += event.tokens
        end = time.perf_counter()
        if i and first is not None and count > 1:
            samples.append(((end - first) * 1000 / (count - 1), (first - start) * 1000, count))
    samples.sort()
    ms, prefill, count = samples[len(samples) // 2]
    return {"ms_per_token": ms, "prefill_ms": prefill, "tokens": count}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """Both modes, then the limit; the JSON is rewritten after each step (a run cut short
    keeps what it measured)."""
    report: dict[str, Any] = {"model": args.model}
    for mode in ("off", "on"):
        bench = await start_bench("transformers", args.model, device=args.device, fast_decode=mode)
        device = str(next(bench.runtime.engine._model.parameters()).device)  # type: ignore[attr-defined]
        report["device"] = torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu"
        report["weight_bytes"] = bench.weight_bytes
        report[f"fast_decode_{mode}"] = await decode_ms_per_token(bench, args.tokens, args.repeats)
        write_json(args.out / "decode_limit.json", report)
        print(f"fast decode {mode}: {report[f'fast_decode_{mode}']}", flush=True)
        await bench.close()
        del bench
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    bandwidth = copy_bandwidth(device)
    limit = report["weight_bytes"] / bandwidth * 1000
    report.update(copy_bandwidth_gbs=bandwidth / 1e9, limit_ms_per_token=limit)
    for mode in ("off", "on"):
        report[f"fast_decode_{mode}"]["ratio_to_limit"] = report[f"fast_decode_{mode}"]["ms_per_token"] / limit
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="3b", choices=["3b", "3b-small"])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--tokens", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("out/gpu"))
    args = ap.parse_args()
    report = asyncio.run(run(args))
    write_json(args.out / "decode_limit.json", report)
    print()
    print(f"device: {report['device']}; LLM weights {report['weight_bytes'] / 1e9:.2f} GB")
    print(
        f"copy bandwidth {report['copy_bandwidth_gbs']:.0f} GB/s -> limit {report['limit_ms_per_token']:.2f} ms/token"
    )
    print(f"{'fast decode':<12} {'ms/token':>9} {'x limit':>8} {'prefill ms':>11} {'tokens':>7}")
    for mode in ("off", "on"):
        r = report[f"fast_decode_{mode}"]
        ms, ratio = r["ms_per_token"], r["ratio_to_limit"]
        print(f"{mode:<12} {ms:>9.2f} {ratio:>8.2f} {r['prefill_ms']:>11.0f} {r['tokens']:>7}")


if __name__ == "__main__":
    main()
