"""benchmarks/ceiling.py --engine vllm runs end to end on the vLLM CPU build: our server and
`vllm serve` answer the same requests with the same tokens (the comparison compares like with
like). No timing is asserted: the numbers live in benchmarks/RESULTS.md."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_ours_and_vllm_serve_answer_the_same_tokens(tmp_path: Path) -> None:
    args = [
        "--engine",
        "vllm",
        "--in-flight",
        "2",
        "--min-requests",
        "2",
        "--boxes",
        "3",
        "--rounds",
        "1",
        "--out",
        str(tmp_path),
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.ceiling", *args], cwd=ROOT, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((tmp_path / "ceiling-vllm.json").read_text())["rows"]
    ours = {r["path"]: r for r in rows if r["server"] == "ours"}
    theirs = {r["path"]: r for r in rows if r["server"] == "vllm serve"}
    assert set(ours) == {"http", "sse", "grpc"} and set(theirs) == {"unary", "stream"}
    tokens = {r["tokens"] for r in rows}
    assert len(tokens) == 1 and tokens.pop() > 4 * 3 * 4  # 4 requests of 3 boxes, same tokens everywhere
    assert all(r["tokens_per_s"] > 0 and r["front_cpu_per_token_us"] > 0 for r in rows)
    for transport in ("http", "sse", "grpc"):
        assert f"| {transport} | " in proc.stdout.split("tokens/s ours / theirs")[1]
