"""The proxy of compose's multi-gpu profile (deploy/nginx/) in front of two real servers on
loopback, run by the real nginx as this user in a temporary prefix: unary HTTP, server-sent events
that pass as they are made, and gRPC, all answered right and spread over both servers; a replica
that is down costs no request, and with none reachable clients get a 503 they retry."""

from __future__ import annotations

import base64
import contextlib
import json
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from rexomni_client.grpc import RexOmniGrpcClient
from rexomni_client.http import RETRY_STATUSES
from rexomni_server.schemas import DetectResult
from rexomni_server.settings import Settings
from tests.support import free_port, image_bytes, required_program, serve_process, stop_process

pytestmark = pytest.mark.slow

NGINX_DIR = Path(__file__).resolve().parents[2] / "deploy" / "nginx"
SERVER = Settings()
TOKEN_DELAY_S = 0.02
SCRIPTED = [
    "--engine",
    "scripted",
    "--model",
    "scripted",
    "--allow-forced-output",
    "--scripted-token-delay-s",
    str(TOKEN_DELAY_S),
]
PNG = image_bytes(64, 48)
CALLS = 6
# One upstream `server` line: address, port, parameters, the rest of the line.
SERVER_LINE = re.compile(r"^[ \t]*server[ \t]+[^\s:;]+:(\d+)([^;\n]*);[^\n]*\n", re.MULTILINE)
UPSTREAM = re.compile(r"upstream\s+\w+\s*\{.*?\}", re.DOTALL)


def nginx_binary() -> str:
    return required_program("nginx", "`make system-deps` installs it")


def render_upstreams(text: str, replicas: dict[int, list[str]]) -> str:
    """upstreams.conf with each upstream's servers replaced by ``replicas[container port]`` (with
    the parameters the file gives them)."""

    def block(match: re.Match[str]) -> str:
        lines = SERVER_LINE.findall(match.group(0))
        assert lines, match.group(0)
        port, params = lines[0]
        indent = "    "
        rendered = "".join(f"{indent}server {address}{params};\n" for address in replicas[int(port)])
        first = True

        def server(_: re.Match[str]) -> str:
            nonlocal first
            keep, first = (rendered if first else ""), False
            return keep

        return SERVER_LINE.sub(server, match.group(0))

    rendered, count = UPSTREAM.subn(block, text)
    assert count == 2, "upstreams.conf should define rexomni_http and rexomni_grpc"
    return rendered


def render_main(text: str, http_port: int, grpc_port: int) -> str:
    """nginx.conf listening on the given loopback ports instead of the server's."""
    text, http = re.subn(rf"listen\s+{SERVER.port};", f"listen 127.0.0.1:{http_port};", text)
    text, grpc = re.subn(rf"listen\s+{SERVER.grpc_port}\s+http2;", f"listen 127.0.0.1:{grpc_port} http2;", text)
    assert http == grpc == 1, "nginx.conf should listen on the server's two ports"
    return text


def accepts(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


@contextlib.contextmanager
def run_proxy(http_upstreams: list[str], grpc_upstreams: list[str]) -> Iterator[tuple[str, str]]:
    """The real nginx on the deploy config with these upstreams, on free loopback ports, until the
    block ends. Yields (HTTP base URL, gRPC target)."""
    nginx = nginx_binary()
    prefix = Path(tempfile.mkdtemp(prefix="rexomni-proxy-"))
    # Started as root, nginx runs its workers as an unprivileged user, which must reach the
    # temporary directories under the prefix.
    prefix.chmod(0o755)
    http_port, grpc_port = free_port(), free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(render_main((NGINX_DIR / "nginx.conf").read_text(), http_port, grpc_port))
    upstreams = render_upstreams(
        (NGINX_DIR / "upstreams.conf").read_text(), {SERVER.port: http_upstreams, SERVER.grpc_port: grpc_upstreams}
    )
    (prefix / "upstreams.conf").write_text(upstreams)
    log = prefix / "output.log"
    try:
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [nginx, "-p", f"{prefix}/", "-c", str(conf), "-e", "stderr", "-g", "daemon off;"],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
            )
        try:
            deadline = time.monotonic() + 20
            while not (accepts(http_port) and accepts(grpc_port)):
                if proc.poll() is not None:
                    raise AssertionError(f"nginx exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
                if time.monotonic() > deadline:
                    raise AssertionError(f"nginx did not listen:\n{log.read_text()[-4000:]}")
                time.sleep(0.05)
            yield f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}"
        finally:
            stop_process(proc, timeout_s=10)
    finally:
        shutil.rmtree(prefix, ignore_errors=True)


@pytest.fixture(scope="module")
def servers() -> Iterator[list[dict[str, Any]]]:
    """Two servers, as two GPUs' replicas would be: each one's URL and gRPC target."""
    nginx_binary()  # skip (or fail in CI) before starting anything
    with contextlib.ExitStack() as stack:
        started = []
        for _ in range(2):
            url, _, health = stack.enter_context(contextlib.contextmanager(serve_process)(SCRIPTED))
            started.append({"url": url, "grpc": str(health["grpc_target"])})
        yield started


@pytest.fixture(scope="module")
def proxy(servers: list[dict[str, Any]]) -> Iterator[tuple[str, str]]:
    http = [s["url"].removeprefix("http://") for s in servers]
    with run_proxy(http, [s["grpc"] for s in servers]) as endpoints:
        yield endpoints


def forced_boxes(n: int) -> str:
    boxes = ", ".join(f"<{10 * i}><{10 * i + 5}><{10 * i + 200}><{10 * i + 300}>" for i in range(n))
    return f"<|object_ref_start|>cat<|object_ref_end|><|box_start|>{boxes}<|box_end|>"


def body(boxes: int) -> dict[str, Any]:
    image = base64.b64encode(PNG).decode()
    return {"image": image, "categories": ["cat"], "options": {"forced_output": forced_boxes(boxes)}}


def served(servers: list[dict[str, Any]], transport: str) -> list[int]:
    """Requests each server finished over ``transport``, from its own metrics."""
    counts = []
    for server in servers:
        text = httpx.get(f"{server['url']}/metrics", timeout=5).text
        counts.append(
            sum(
                int(sample.value)
                for family in text_string_to_metric_families(text)
                for sample in family.samples
                if sample.name == "rexomni_requests_total" and sample.labels["transport"] == transport
            )
        )
    return counts


def direct_result(servers: list[dict[str, Any]], boxes: int) -> DetectResult:
    """The answer a server gives without the proxy: what every proxied answer must equal."""
    response = httpx.post(f"{servers[0]['url']}/v1/detect", json=body(boxes), timeout=30)
    assert response.status_code == 200, response.text
    result = DetectResult.model_validate(response.json())
    assert len(result.detections) == boxes and {d.label for d in result.detections} == {"cat"}
    return result


def test_unary_http_through_the_proxy_reaches_both_servers(
    servers: list[dict[str, Any]], proxy: tuple[str, str]
) -> None:
    url, _ = proxy
    expected = direct_result(servers, 3).detections
    before = served(servers, "http")
    with httpx.Client(base_url=url, timeout=30) as client:
        for _ in range(CALLS):
            response = client.post("/v1/detect", json=body(3))
            assert response.status_code == 200, response.text
            assert response.headers["x-request-id"] == response.json()["request_id"]
            assert DetectResult.model_validate(response.json()).detections == expected
        # Refusals pass through as the server gives them (its status and error body).
        refused = client.post("/v1/detect", json={**body(1), "categories": []})
        assert refused.status_code == 422 and refused.json()["error"]["code"] == "invalid_request"
    added = [after - earlier for after, earlier in zip(served(servers, "http"), before, strict=True)]
    assert sum(added) == CALLS + 1, added  # each request reached one server, once
    assert min(added) >= 1, added  # both replicas served


def test_server_sent_events_pass_through_unbuffered(servers: list[dict[str, Any]], proxy: tuple[str, str]) -> None:
    url, _ = proxy
    boxes = 12  # ~7 tokens each: over a second from the first detection to the last
    expected = direct_result(servers, boxes).detections
    events: list[tuple[str, dict[str, Any], float]] = []
    with httpx.Client(base_url=url, timeout=30) as client:
        with client.stream("POST", "/v1/detect/stream", json=body(boxes)) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            kind = ""
            for line in response.iter_lines():
                if line.startswith("event:"):
                    kind = line.split(":", 1)[1].strip()
                elif line.startswith("data:") and kind:
                    events.append((kind, json.loads(line.split(":", 1)[1]), time.monotonic()))
                    kind = ""
    assert [kind for kind, _, _ in events] == ["detection"] * boxes + ["done"]
    done = DetectResult.model_validate(events[-1][1])
    assert done.detections == expected
    assert [data["detection"] for _, data, _ in events[:-1]] == [d.model_dump(mode="json") for d in expected]
    # Each detection arrived as it was made, not held back until the answer was whole: the
    # replay takes TOKEN_DELAY_S per token, so the last box comes well after the first.
    first_at, done_at = events[0][2], events[-1][2]
    assert done_at - first_at > 0.5 * (boxes - 1) * 4 * TOKEN_DELAY_S, done_at - first_at


def test_grpc_through_the_proxy_reaches_both_servers(servers: list[dict[str, Any]], proxy: tuple[str, str]) -> None:
    _, target = proxy
    expected = direct_result(servers, 3).detections
    before = served(servers, "grpc")
    with RexOmniGrpcClient(target, timeout=30, retries=0) as client:
        for _ in range(CALLS):
            result = client.detect(PNG, categories=["cat"], forced_output=forced_boxes(3))
            assert result.detections == expected
        events = list(client.detect_stream(PNG, categories=["cat"], forced_output=forced_boxes(3)))
    assert events[:-1] == expected
    assert isinstance(events[-1], DetectResult) and events[-1].detections == expected
    added = [after - earlier for after, earlier in zip(served(servers, "grpc"), before, strict=True)]
    assert sum(added) == CALLS + 1, added
    assert min(added) >= 1, added


def test_a_replica_that_is_down_costs_no_request(servers: list[dict[str, Any]]) -> None:
    down_http, down_grpc = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"  # nothing listens there
    up = servers[0]
    with run_proxy([down_http, up["url"].removeprefix("http://")], [down_grpc, up["grpc"]]) as (url, target):
        with httpx.Client(base_url=url, timeout=30) as client:
            for _ in range(4):
                assert client.post("/v1/detect", json=body(1)).status_code == 200
        with RexOmniGrpcClient(target, timeout=30, retries=0) as grpc_client:
            for _ in range(4):
                assert len(grpc_client.detect(PNG, categories=["cat"], forced_output=forced_boxes(1)).detections) == 1


def test_no_replica_reachable_is_an_answer_clients_retry() -> None:
    down = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    with run_proxy(down, down) as (url, target):
        response = httpx.post(f"{url}/v1/detect", json=body(1), timeout=30)
        with RexOmniGrpcClient(target, timeout=30, retries=0) as client:
            with pytest.raises(grpc.RpcError) as refused:
                client.detect(PNG, categories=["cat"])
    # HTTP: 503 with Retry-After in the server's error body, as a loading server answers.
    assert response.status_code == 503 and response.status_code in RETRY_STATUSES
    assert response.headers["retry-after"] == "5"
    assert response.json()["error"]["code"] == "unavailable"
    # gRPC: UNAVAILABLE, which the client's retry policy retries.
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
