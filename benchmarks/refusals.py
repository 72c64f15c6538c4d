"""What hostile input costs the server: how long it takes to refuse it, and how much it delays
everyone else (the event loop's answers to a probe while it is being refused).

    python -m benchmarks.refusals [--rounds 5]

A real server process on the scripted engine (no model) on loopback, with API keys and room for
two engine requests. For each kind of bad request: the time to its refusal (median and worst of
``--rounds``) and the latency of /health probes sent every 20 ms meanwhile, against the same
probes with nothing else going on (the baseline of the same run)."""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from benchmarks.common import b64, jpeg_bytes, single_label_forced, start_scripted_server
from benchmarks.load import percentile

KEY = "bench-key"
AUTH = {"authorization": f"Bearer {KEY}"}
PROBE_EVERY_S = 0.02


def start_server(keys_file: Path) -> tuple[subprocess.Popen[bytes], str]:
    # 1 ms per token: admitted requests take a while (as on a real engine) and leave the loop idle.
    proc, url, _ = start_scripted_server(
        "--no-grpc",
        "--api-keys-file",
        str(keys_file),
        "--max-queue",
        "2",
        "--scripted-token-delay-s",
        "0.001",
        "--log-level",
        "WARNING",
    )
    return proc, url


def timed(send: Callable[[], object]) -> float:
    started = time.perf_counter()
    send()
    return (time.perf_counter() - started) * 1000


def probe_while(url: str, work: Callable[[], float], rounds: int) -> tuple[list[float], list[float]]:
    """Runs ``work`` (which returns the milliseconds its refusal took) ``rounds`` times while
    another thread probes /health every 20 ms; returns (the refusal times, the probes'
    latencies), in milliseconds."""
    stop = threading.Event()
    probes: list[float] = []

    def probe() -> None:
        with httpx.Client(base_url=url, timeout=30) as client:
            while not stop.is_set():
                probes.append(timed(lambda: client.get("/health")))
                stop.wait(PROBE_EVERY_S)

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        refusals = []
        for _ in range(rounds):
            refusals.append(work())
            time.sleep(0.1)
    finally:
        stop.set()
        prober.join()
    return refusals, probes


def hostile_requests(url: str) -> dict[str, Callable[[], float]]:
    """Each: send one bad request, check its answer, return the milliseconds it took."""
    image = b64(jpeg_bytes(320, 240))
    categories_26mb = json.dumps({"image": image, "categories": [f"c{i:07d}" for i in range(2_200_000)]}).encode()
    comma_string = json.dumps({"image": image, "categories": ",".join(f"c{i}" for i in range(1_000_000))}).encode()
    boxes = json.dumps({"image": image, "categories": ["a"], "visual_prompt_boxes": [[1, 2, 3, 4]] * 500_000}).encode()
    keyless = json.dumps({"image": base64.b64encode(os.urandom(15 << 20)).decode(), "categories": ["a"]}).encode()
    markers = "<|object_ref_start|>" * 12_000  # the old splitter's worst case, at the schema's limit
    forced = {"image": image, "categories": ["a", "b"], "options": {"forced_output": markers, "fan_out": True}}
    long_answer = {"image": image, "categories": ["a"], "options": {"forced_output": single_label_forced("a", 100)}}
    client = httpx.Client(base_url=url, timeout=120)
    json_headers = {**AUTH, "content-type": "application/json"}

    def post(body: bytes, expected: int, headers: dict[str, str] = json_headers) -> Callable[[], float]:
        def send() -> None:
            status = client.post("/v1/detect", content=body, headers=headers).status_code
            assert status == expected, status

        return lambda: timed(send)

    def full_queue() -> float:
        """32 requests at once at a server that admits two: the median time of the refusals."""
        answers: list[tuple[int, float]] = []

        def send() -> None:
            started = time.perf_counter()
            response = client.post("/v1/detect", json=long_answer, headers=AUTH)
            assert response.status_code == 200 or response.headers["retry-after"], response.status_code
            answers.append((response.status_code, (time.perf_counter() - started) * 1000))

        senders = [threading.Thread(target=send) for _ in range(32)]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join()
        refused = [ms for status, ms in answers if status == 429]
        assert refused, "nothing was refused"
        return statistics.median(refused)

    return {
        "26 MB JSON body, 2.2M categories (422)": post(categories_26mb, 422),
        "1M categories as one comma string (422)": post(comma_string, 422),
        "500k visual prompt boxes (422)": post(boxes, 422),
        "15 MB image without a key (401)": post(keyless, 401, {"content-type": "application/json"}),
        "256 kB of start markers as forced output (200)": post(json.dumps(forced).encode(), 200),
        "32 at once, 2 admitted (429 + Retry-After)": full_queue,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    rounds = parser.parse_args().rounds
    with tempfile.TemporaryDirectory() as tmp:
        keys = Path(tmp) / "keys"
        keys.write_text(KEY + "\n")
        proc, url = start_server(keys)
        try:
            _, idle = probe_while(url, lambda: timed(lambda: time.sleep(0.2)), rounds)
            rows = [("nothing (baseline)", [0.0], idle)]
            for name, work in hostile_requests(url).items():
                rows.append((name, *probe_while(url, work, rounds)))
        finally:
            proc.terminate()
            proc.wait(30)
    print(f"\nrounds: {rounds}; /health probed every {PROBE_EVERY_S * 1000:g} ms meanwhile (ms)\n")
    print(f"| {'request':48} | refused in, median | worst | probe p50 | probe p99 | probe max |")
    print(f"|{'-' * 50}|---|---|---|---|---|")
    for name, refusals, probes in rows:
        print(
            f"| {name:48} | {statistics.median(refusals):8.1f} | {max(refusals):8.1f} | "
            f"{percentile(probes, 50):6.1f} | {percentile(probes, 99):6.1f} | {max(probes):6.1f} |"
        )


if __name__ == "__main__":
    main()
