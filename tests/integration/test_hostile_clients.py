"""Hostile clients on real loopback servers: keyless floods, connection floods, slowloris
headers and bodies, readers that stop reading, huge bodies. Each is refused or cut cheaply,
and the server keeps serving."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from rexomni_server._pb.rexomni.v1 import detector_pb2 as pb
from rexomni_server._pb.rexomni.v1 import detector_pb2_grpc as pb_grpc
from rexomni_server.app import create_app
from rexomni_server.engines.scripted import ScriptedEngine
from rexomni_server.runtime import Runtime
from rexomni_server.serve import RunningServers, start_servers
from rexomni_server.settings import Settings
from tests.support import image_bytes, serve_process, wait_until

PNG = image_bytes(64, 48)
B64 = base64.b64encode(PNG).decode()


def answer(boxes: int) -> str:
    coords = ", ".join(f"<{i % 990}><{i % 990}><{i % 990 + 9}><{i % 990 + 9}>" for i in range(boxes))
    return f"<|object_ref_start|>cat<|object_ref_end|><|box_start|>{coords}<|box_end|>"


@contextlib.asynccontextmanager
async def served(token_delay_s: float = 0.0, **settings: object) -> AsyncIterator[tuple[Runtime, RunningServers]]:
    engine = ScriptedEngine(default_output=answer(2), token_delay_s=token_delay_s)
    await engine.start()
    runtime = Runtime(Settings(allow_forced_output=True, **settings), engine=engine, model_label="scripted")  # type: ignore[arg-type]
    servers = await start_servers(runtime, "127.0.0.1", 0, 0)
    try:
        yield runtime, servers
    finally:
        await servers.stop(0)


def request_log(caplog: pytest.LogCaptureFixture) -> list[dict[str, object]]:
    return [getattr(r, "fields", {}) for r in caplog.records if r.name == "rexomni.requests"]


# ---- keys before reading --------------------------------------------------------------------
def peak_growth_mb(pid: int, burst: Iterator[None]) -> float:
    """The server's peak resident memory over ``burst`` minus its resident memory before it."""

    def status(field: str) -> int:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])  # kB
        raise AssertionError(f"no {field} in /proc/{pid}/status")

    Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets the peak (VmHWM) to the current size
    before = status("VmRSS")
    for _ in burst:
        pass
    return (status("VmHWM") - before) / 1024


def http_burst(url: str, body: bytes, calls: int) -> Iterator[None]:
    statuses: list[int] = []

    def post() -> None:
        statuses.append(httpx.post(f"{url}/v1/detect", content=body, timeout=60).status_code)

    threads = [threading.Thread(target=post) for _ in range(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert statuses == [401] * calls
    yield None


def grpc_burst(target: str, image: bytes, calls: int) -> Iterator[None]:
    codes: list[grpc.StatusCode] = []
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.DetectorStub(channel)  # type: ignore[no-untyped-call]
        futures = [stub.Detect.future(pb.DetectRequest(image=image, categories=["cat"])) for _ in range(calls)]
        for future in futures:
            with pytest.raises(grpc.RpcError) as refused:
                future.result(timeout=120)
            codes.append(refused.value.code())  # type: ignore[attr-defined]
    assert codes == [grpc.StatusCode.UNAUTHENTICATED] * calls
    yield None


@pytest.mark.slow
def test_keyless_large_requests_are_refused_before_they_are_read(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("the-key\n")
    calls, size = 8, 15 << 20
    image = b"\0" * size
    body = json.dumps({"image": base64.b64encode(image).decode(), "categories": ["cat"]}).encode()
    args = ["--engine", "scripted", "--model", "scripted", "--api-keys-file", str(keys)]
    for url, proc, health in serve_process(args):
        http_mb = peak_growth_mb(proc.pid, http_burst(url, body, calls))
        grpc_mb = peak_growth_mb(proc.pid, grpc_burst(str(health["grpc_target"]), image, calls))
        print(f"peak growth, {calls} keyless {size >> 20} MB requests: HTTP {http_mb:.1f} MB, gRPC {grpc_mb:.1f} MB")
        # Reading them would take 8 x 15 MB (and parsing as much again). What gRPC buffers of a
        # refused call is its flow-control window (measured: 20 MB for the 8): allowed with room.
        assert http_mb < 60 and grpc_mb < 60


# ---- connection limits ----------------------------------------------------------------------
async def test_http_connections_past_the_cap_get_503_and_the_server_goes_on() -> None:
    async with served(token_delay_s=0.01, http_max_connections=2) as (runtime, servers):
        url = f"http://127.0.0.1:{servers.http_port}"
        slow = {"image": B64, "categories": ["cat"], "options": {"forced_output": answer(100)}}
        async with httpx.AsyncClient(base_url=url, timeout=30) as first, httpx.AsyncClient(base_url=url) as second:
            async with (
                first.stream("POST", "/v1/detect/stream", json=slow),
                second.stream("POST", "/v1/detect/stream", json=slow),
            ):
                async with httpx.AsyncClient(base_url=url) as third:
                    refused = await third.post("/v1/detect", json={"image": B64, "categories": ["cat"]})
                assert refused.status_code == 503
        async with httpx.AsyncClient(base_url=url) as client:
            await wait_until(lambda: runtime.service.in_flight == 0, what="the streams to close")
            assert (await client.post("/v1/detect", json={"image": B64, "categories": ["cat"]})).status_code == 200


def trickle(port: int, head: bytes, every_s: float, for_s: float) -> float | None:
    """Sends ``head`` and then one byte every ``every_s`` (never finishing the headers) for up
    to ``for_s``; returns after how long the server closed the connection, or None."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(head)
        sock.settimeout(every_s)
        while time.monotonic() - started < for_s:
            try:  # a close shows as end of stream, or as a reset when our last byte met it
                if sock.recv(1024) == b"":
                    return time.monotonic() - started
            except TimeoutError:
                pass
            except ConnectionResetError:
                return time.monotonic() - started
            try:
                sock.sendall(b"a")
            except (BrokenPipeError, ConnectionResetError):
                return time.monotonic() - started
    return None


async def test_a_connection_that_trickles_its_headers_is_closed() -> None:
    async with served(http_header_timeout_s=0.5) as (_, servers):
        assert servers.http_port is not None
        head = b"POST /v1/detect HTTP/1.1\r\nHost: x\r\nX-Slow: "
        closed_after = await asyncio.to_thread(trickle, servers.http_port, head, 0.1, 10.0)
        assert closed_after is not None, "the server kept a slowloris connection open for 10 s"
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{servers.http_port}") as client:
            assert (await client.get("/ready")).status_code == 200  # and a normal client is unaffected


async def test_a_body_sent_too_slowly_gets_408(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="rexomni.requests")
    async with served(http_body_timeout_s=0.5) as (_, servers):
        assert servers.http_port is not None

        def slow_body() -> bytes:
            with socket.create_connection(("127.0.0.1", servers.http_port)) as sock:  # type: ignore[arg-type]
                head = b"POST /v1/detect HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                sock.sendall(head + b"Content-Length: 1000\r\n\r\n" + b'{"image": "')
                sock.settimeout(10)
                reply = b""
                while chunk := sock.recv(4096):  # until the server closes the connection
                    reply += chunk
                return reply

        reply = await asyncio.to_thread(slow_body)
    assert reply.startswith(b"HTTP/1.1 408") and b"body_timeout" in reply
    assert [line["status"] for line in request_log(caplog)] == ["body_timeout"]


# ---- the deadline holds when the client stops reading ----------------------------------------
async def test_the_deadline_holds_when_an_sse_client_stops_reading(caplog: pytest.LogCaptureFixture) -> None:
    """A client that stops reading leaves the server blocked in its send once the socket
    buffers are full (megabytes on loopback): here the ASGI send blocks after the first event,
    as the server's own send would."""
    caplog.set_level("INFO", logger="rexomni.requests")
    engine = ScriptedEngine(default_output=answer(50))
    await engine.start()
    runtime = Runtime(Settings(request_timeout_s=0.5), engine=engine, model_label="scripted")
    app = create_app(runtime=runtime)
    body = json.dumps({"image": B64, "categories": ["cat"]}).encode()
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/detect/stream",
        "raw_path": b"/v1/detect/stream",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    received = False
    stuck = asyncio.Event()
    sent: list[dict[str, object]] = []

    async def receive() -> dict[str, object]:
        nonlocal received
        if not received:
            received = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # the client neither sends nor leaves
        raise AssertionError("unreachable")

    async def send(message: dict[str, object]) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and b"event: detection" in message.get("body", b""):  # type: ignore[operator]
            stuck.set()
            await asyncio.Event().wait()  # the socket buffers are full for ever

    answered = asyncio.create_task(app(scope, receive, send))  # type: ignore[arg-type]
    await asyncio.wait_for(stuck.wait(), 10)
    await asyncio.wait_for(answered, 10)  # cut at the deadline (0.5 s + grace), not for ever
    assert runtime.service.in_flight == 0
    assert [line["status"] for line in request_log(caplog)] == ["timeout"]


async def test_the_deadline_holds_when_a_grpc_client_stops_reading(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As for SSE: the server's write blocks for ever after the first detection, as it does once
    the client's flow-control window is full and the client reads no more."""
    import rexomni_server.transport.grpc as grpc_transport

    caplog.set_level("INFO", logger="rexomni.requests")
    send = grpc_transport._send

    async def stuck_after_the_first_detection(context: object, request_id: str, event: object) -> None:
        await send(context, request_id, event)  # type: ignore[arg-type]
        if isinstance(event, grpc_transport.DetectionEvent):
            await asyncio.Event().wait()

    monkeypatch.setattr(grpc_transport, "_send", stuck_after_the_first_detection)
    async with served(request_timeout_s=0.5) as (runtime, servers):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{servers.grpc_port}") as channel:
            request = pb.DetectRequest(
                image=PNG, categories=["cat"], options=pb.DetectOptions(forced_output=answer(50))
            )
            call = pb_grpc.DetectorStub(channel).DetectStream(request)
            await call.read()  # the first detection arrives; the server is then stuck
            with pytest.raises(grpc.aio.AioRpcError) as cut:
                async with asyncio.timeout(10):
                    await call.read()
            assert cut.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert runtime.service.in_flight == 0
    assert [line["status"] for line in request_log(caplog)] == ["timeout"]


# ---- big bodies are parsed off the event loop -------------------------------------------------
async def test_large_bodies_and_messages_are_parsed_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    import rexomni_server.transport.grpc as grpc_transport
    import rexomni_server.transport.http as http_transport

    threads: list[str] = []

    def recording(parse: object) -> object:
        def wrapper(data: bytes) -> object:
            threads.append(threading.current_thread().name)
            return parse(data)  # type: ignore[operator]

        return wrapper

    monkeypatch.setattr(http_transport, "parse_detect_request", recording(http_transport.parse_detect_request))
    monkeypatch.setattr(grpc_transport, "decode_request", recording(grpc_transport.decode_request))
    big = image_bytes(400, 300, "BMP")  # > 64 KiB: a real photo's size class
    loop_thread = threading.current_thread().name
    async with served() as (_, servers):
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{servers.http_port}", timeout=30) as client:
            small = await client.post("/v1/detect", json={"image": B64, "categories": ["cat"]})
            large = await client.post(
                "/v1/detect", json={"image": base64.b64encode(big).decode(), "categories": ["cat"]}
            )
            flood = json.dumps({"image": B64, "categories": [f"c{i}" for i in range(2_000_000)]})
            refused = await client.post("/v1/detect", content=flood, headers={"content-type": "application/json"})
        async with grpc.aio.insecure_channel(f"127.0.0.1:{servers.grpc_port}") as channel:
            await pb_grpc.DetectorStub(channel).Detect(pb.DetectRequest(image=big, categories=["cat"]))
    assert small.status_code == large.status_code == 200
    assert refused.status_code == 422 and "256" in refused.json()["error"]["message"]
    assert threads[0] == loop_thread  # a small body: parsed where it arrived, no thread hop
    assert len(threads) == 4 and all(name != loop_thread for name in threads[1:])


# ---- gRPC call cap and keepalive --------------------------------------------------------------
async def test_grpc_calls_past_the_cap_are_refused_at_once() -> None:
    async with served(token_delay_s=0.01, grpc_max_concurrent_rpcs=2) as (runtime, servers):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{servers.grpc_port}") as channel:
            stub = pb_grpc.DetectorStub(channel)
            slow = pb.DetectRequest(image=PNG, categories=["cat"], options=pb.DetectOptions(forced_output=answer(100)))
            held = [stub.DetectStream(slow) for _ in range(2)]
            for call in held:
                await call.read()
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Detect(pb.DetectRequest(image=PNG, categories=["cat"]))
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            for call in held:
                call.cancel()
            await wait_until(lambda: runtime.service.in_flight == 0, what="the held calls to end")
            assert (await stub.Detect(pb.DetectRequest(image=PNG, categories=["cat"]))).detections


async def test_a_grpc_client_that_pings_too_often_is_disconnected() -> None:
    async with served(token_delay_s=5.0, grpc_min_ping_interval_s=5.0) as (_, servers):
        pinging = [
            ("grpc.keepalive_time_ms", 100),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
        ]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{servers.grpc_port}", options=pinging) as channel:
            slow = pb.DetectRequest(image=PNG, categories=["cat"], options=pb.DetectOptions(forced_output=answer(1000)))
            call = pb_grpc.DetectorStub(channel).DetectStream(slow)  # silent for minutes: no data, only pings
            with pytest.raises(grpc.aio.AioRpcError) as dropped:
                async with asyncio.timeout(30):
                    async for _ in call:
                        pass
    assert dropped.value.code() == grpc.StatusCode.UNAVAILABLE
