"""``rexomni-server serve`` as a real process on loopback: uvicorn, the tiny model, the Python
client and the ``rexomni`` CLI against it, and the offline fallback to the tiny model."""

from __future__ import annotations

import base64
import concurrent.futures
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from rexomni_client import RexOmniClient, RexOmniGrpcClient, RexOmniHTTPError
from tests.support import free_port, image_bytes, serve_process

pytestmark = pytest.mark.slow
FORCED = "<|object_ref_start|>cat<|object_ref_end|><|box_start|><0><0><499><999><|box_end|>"


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path) -> Iterator[tuple[str, subprocess.Popen[bytes], dict[str, object]]]:
    yield from serve_process(["--model", str(tiny_model_dir), "--engine", "transformers", "--allow-forced-output"])


def test_client_against_real_server(
    server: tuple[str, subprocess.Popen[bytes], dict[str, object]], tmp_path: Path
) -> None:
    url, _, health = server
    # The tiny checkpoint named by its directory says what it is, like `--model tiny`.
    assert health["engine"] == "transformers" and health["random_weights"] is True
    assert "RANDOM WEIGHTS" in str(health["model"])
    photo = tmp_path / "cat.png"
    photo.write_bytes(image_bytes(400, 300))
    with RexOmniClient(url) as client:
        result = client.detect(photo, "detection", ["cat"], forced_output=FORCED)
        assert [d.model_dump()["box"] for d in result.detections] == [[0.0, 0.0, 499 / 999 * 400, 300.0]]
        with pytest.raises(RexOmniHTTPError) as err:
            client.detect(b"not an image", "detection", ["cat"])
        assert err.value.status == 400 and err.value.code == "invalid_image"
        # still serving after the bad request
        assert client.detect(photo, "pointing", "cat", forced_output=FORCED).task.value == "pointing"


def test_cli_detect_and_annotate(
    server: tuple[str, subprocess.Popen[bytes], dict[str, object]], tmp_path: Path
) -> None:
    url, _, _ = server
    photo = tmp_path / "in.jpg"
    photo.write_bytes(image_bytes(200, 100, "JPEG"))
    out = tmp_path / "out.png"
    cmd = [
        sys.executable,
        "-m",
        "rexomni_client.cli",
        "--url",
        url,
        "detect",
        str(photo),
        "--categories",
        "cat",
        "--options",
        json.dumps({"forced_output": FORCED}),  # one cat box: x 0..100, the full height
        "--annotate",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["task"] == "detection"
    from PIL import Image, ImageChops

    before, after = Image.open(photo).convert("RGB"), Image.open(out).convert("RGB")
    assert after.size == before.size
    changed = ImageChops.difference(before, after).convert("L").point(lambda v: 255 if v > 40 else 0)
    assert changed.crop((0, 0, 110, 100)).getbbox() is not None  # the box is drawn on its side
    assert changed.crop((120, 0, 200, 100)).getbbox() is None  # and nothing beyond it


def test_cli_streams_over_grpc(server: tuple[str, subprocess.Popen[bytes], dict[str, object]], tmp_path: Path) -> None:
    _, _, info = server
    photo = tmp_path / "in.png"
    photo.write_bytes(image_bytes(100, 100))
    cmd = [
        sys.executable,
        "-m",
        "rexomni_client.cli",
        "--grpc",
        str(info["grpc_target"]),
        "detect",
        str(photo),
    ]
    cmd += ["--categories", "cat", "--stream", "--max-new-tokens", "6"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert lines[-1]["usage"]["completion_tokens"] == 6 and lines[-1]["truncated"] is True
    bad = subprocess.run([*cmd[:-2], "--task", "keypoint"], capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "keypoint_type" in bad.stderr


def test_one_structured_log_line_per_request(
    server: tuple[str, subprocess.Popen[bytes], dict[str, object]],
) -> None:
    url, proc, _ = server
    body = {"image": "aGVsbG8=", "categories": ["cat"]}
    assert httpx.post(f"{url}/v1/detect", json=body, headers={"X-Request-ID": "log-me"}).status_code == 400
    proc.terminate()
    assert proc.wait(timeout=30) == 0  # SIGTERM: both servers drain, the engine stops, exit 0
    assert proc.stderr is not None
    lines = [json.loads(line) for line in proc.stderr.read().decode().splitlines() if line.startswith("{")]
    mine = [entry for entry in lines if entry.get("request_id") == "log-me"]
    assert len(mine) == 1
    assert mine[0]["status"] == "invalid_image" and mine[0]["task"] == "detection" and mine[0]["transport"] == "http"


def test_offline_fallback_serves_the_labelled_tiny_model(tiny_model_dir: Path) -> None:
    env = {"REXOMNI_TINY_MODEL_DIR": str(tiny_model_dir), "HF_HUB_OFFLINE": "1"}
    for url, _, health in serve_process(["--model", "no-such-org/no-such-model", "--fallback-to-tiny"], env):
        assert health["random_weights"] is True
        assert "RANDOM WEIGHTS" in str(health["model"])
        with RexOmniClient(url) as client:  # and every result says so too
            result = client.detect(image_bytes(64, 48), "detection", ["cat"], max_new_tokens=4)
        assert "RANDOM WEIGHTS" in result.model


def _stream_until_done(url: str, forced: str, first: threading.Event) -> list[str]:
    """The SSE event names of one streamed request; sets ``first`` at the first detection."""
    body = {"image": base64.b64encode(image_bytes(64, 48)).decode(), "categories": ["cat"]}
    body["options"] = {"forced_output": forced}
    events = []
    try:
        with httpx.stream("POST", f"{url}/v1/detect/stream", json=body, timeout=60) as response:
            for line in response.iter_lines():
                if line.startswith("event:"):
                    events.append(line.split(":", 1)[1].strip())
                    first.set()
    except httpx.HTTPError:
        events.append("connection-lost")
    first.set()
    return events


def _grpc_stream_until_done(target: str, forced: str, first: threading.Event) -> list[str]:
    """The kinds of the items of one gRPC DetectStream; sets ``first`` at the first detection."""
    kinds = []
    try:
        with RexOmniGrpcClient(target, timeout=60, retries=0) as client:
            for item in client.detect_stream(image_bytes(64, 48), "detection", ["cat"], forced_output=forced):
                kinds.append("done" if hasattr(item, "detections") else "detection")
                first.set()
    except grpc.RpcError:
        kinds.append("connection-lost")
    first.set()
    return kinds


@pytest.mark.parametrize(("drain_s", "boxes", "finishes"), [("30", 60, True), ("0.2", 800, False)])
def test_sigterm_drains_in_flight_requests_within_the_drain_timeout(
    tiny_model_dir: Path, drain_s: str, boxes: int, finishes: bool
) -> None:
    forced = "<|object_ref_start|>cat<|object_ref_end|><|box_start|>"
    forced += ", ".join(f"<{i}><{i}><{i + 9}><{i + 9}>" for i in range(boxes)) + "<|box_end|>"
    args = ["--model", str(tiny_model_dir), "--engine", "transformers", "--allow-forced-output"]
    for url, proc, health in serve_process(args, {"REXOMNI_DRAIN_TIMEOUT_S": drain_s}):
        first, grpc_first = threading.Event(), threading.Event()
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            streamed = pool.submit(_stream_until_done, url, forced, first)
            grpc_streamed = pool.submit(_grpc_stream_until_done, str(health["grpc_target"]), forced, grpc_first)
            assert first.wait(60) and grpc_first.wait(60)
            sent = time.monotonic()
            proc.terminate()  # SIGTERM while the answer is being generated
            if finishes:  # while HTTP drains, gRPC has stopped accepting too (both stop at once)
                time.sleep(0.3)
                with RexOmniGrpcClient(str(health["grpc_target"]), timeout=10, retries=0) as late:
                    with pytest.raises(grpc.RpcError) as refused:
                        late.detect(image_bytes(64, 48), "detection", ["cat"], forced_output=forced)
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
                assert not streamed.done()  # ...and the HTTP stream is still being answered
            events = streamed.result(timeout=90)
            grpc_events = grpc_streamed.result(timeout=90)
            assert proc.wait(timeout=60) == 0
            took = time.monotonic() - sent
        with pytest.raises(httpx.TransportError):  # no longer accepting
            httpx.get(f"{url}/health", timeout=2)
        if finishes:  # both streams, SSE and gRPC, were answered to the end
            assert events.count("detection") == boxes and events[-1] == "done"
            assert grpc_events.count("detection") == boxes and grpc_events[-1] == "done"
        else:  # cut at the drain timeout, long before the 800 boxes (~15 s of work) were written
            assert "done" not in events and "done" not in grpc_events and took < 10


@pytest.mark.parametrize("taken_flag", ["--port", "--grpc-port"])
def test_a_taken_port_stops_the_server_at_once_even_while_the_model_loads(
    tiny_model_dir: Path, taken_flag: str
) -> None:
    """The model load (made to take 60 s here) is abandoned, not waited for."""
    slow_load = (
        "import sys, time\n"
        "from rexomni_server.engines.transformers import TransformersEngine as E\n"
        "load = E._load\n"
        "E._load = lambda self: (time.sleep(60), load(self))[1]\n"
        "from rexomni_server.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        other_flag = "--grpc-port" if taken_flag == "--port" else "--port"
        args = ["serve", "--model", str(tiny_model_dir), "--engine", "transformers", taken_flag, str(port)]
        started = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-c", slow_load, *args, other_flag, str(free_port())],
            capture_output=True,
            text=True,
            timeout=50,
        )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert ("error: the HTTP server" if taken_flag == "--port" else "error: the gRPC server") in proc.stderr
    assert time.monotonic() - started < 30
