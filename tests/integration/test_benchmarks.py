"""The benchmark scripts run end to end (tiny sizes, CPU) and write what they promise.
No timing is asserted: speed claims live in benchmarks/RESULTS.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def run(args: list[str], env: dict[str, str] | None = None, timeout: int = 300) -> str:
    proc = subprocess.run(
        args, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def test_latency_vs_boxes_writes_json_and_plot(tmp_path: Path) -> None:
    out = run([sys.executable, "-m", "benchmarks.latency_vs_boxes", "--boxes", "0", "2", "6", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "latency_vs_boxes.json").read_text())
    assert set(report["results"]) == {"engine", "http", "grpc"}
    assert report["results"]["http"]["6"]["tokens"] > report["results"]["http"]["2"]["tokens"]
    # The three paths make the same request: same prompt, same output, nothing cut by the budget.
    for n in ("0", "2", "6"):
        samples = [report["results"][path][n] for path in ("engine", "http", "grpc")]
        assert len({(s["prompt"], s["tokens"]) for s in samples}) == 1 and samples[0]["prompt"] > 0
        assert not any(s["cut"] for s in samples)
    assert all(fit["ms_per_box"] > 0 and fit["ms_per_token"] > 0 for fit in report["fits"].values())
    assert (tmp_path / "latency_vs_boxes.png").stat().st_size > 10_000
    assert "ms/box" in out


def test_gpu_script_dry_run_on_cpu(tmp_path: Path) -> None:
    env = {"OUT": str(tmp_path), "MODEL": "3b-small", "DEVICE": "cpu", "BOXES": "0 1 3", "PYTHON": sys.executable}
    run(["bash", "benchmarks/gpu/run.sh"], env=env, timeout=600)
    decode = json.loads((tmp_path / "decode_limit.json").read_text())
    assert decode["device"] == "cpu" and decode["limit_ms_per_token"] > 0
    assert decode["fast_decode_on"]["tokens"] > 10 and decode["fast_decode_off"]["ratio_to_limit"] > 0
    assert (tmp_path / "latency_vs_boxes.json").exists()
    assert "skipped" in (tmp_path / "pytest-gpu.txt").read_text()  # no CUDA here: the gpu tests skip


@pytest.mark.parametrize(
    ("module", "args", "expected"),
    [
        ("core_latency", ["--boxes", "3", "--repeats", "1"], ["HTTP / engine ratio", "parse whole"]),
        ("stream_first_detection", ["--boxes", "3", "--repeats", "1"], ["SSE ", "gRPC "]),
        (
            "load",
            [
                "--engine",
                "transformers",
                "--concurrency",
                "2",
                "--requests",
                "2",
                "--boxes",
                "2",
                "--fan-boxes",
                "1",
                "--fan-repeats",
                "1",
            ],
            ["one at a time (reference)", "2 in flight", "fan-out (one per category)"],
        ),
        (
            "overhead",
            ["--engine", "transformers", "--boxes", "3", "--repeats", "1"],
            ["engine direct (+ parse)", "our HTTP /v1/detect", "our gRPC Detect"],
        ),
        (
            "ceiling",
            ["--in-flight", "2", "--min-requests", "4", "--boxes", "20", "--out", "out/ceiling-test"],
            ["| http | 2 | 4 |", "| sse | 2 | 4 |", "| grpc | 2 | 4 |"],
        ),
        ("refusals", ["--rounds", "1"], ["26 MB JSON body", "without a key (401)", "(429 + Retry-After)"]),
        (
            "tiling",
            [
                *("--engine", "scripted", "--width", "1200", "--height", "900", "--max-pixels", "200000"),
                *("--rounds", "1", "--boxes", "2", "--out", "out/tiling-test"),
            ],
            [
                "| mode | engine requests | wall (s) |",
                "| one pass | 1 |",
                "| tiled (server) | 10 |",
                "| one at a time (client) | 10 |",
            ],
        ),
    ],
)
def test_the_other_benchmarks_print_their_tables(module: str, args: list[str], expected: list[str]) -> None:
    out = run([sys.executable, "-m", f"benchmarks.{module}", *args])
    for label in expected:
        assert label in out, out
