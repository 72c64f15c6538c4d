"""Fault and soak suite: thousands of good and hostile requests over HTTP, SSE and gRPC, storms
of dropped streams, SIGTERM under load and an engine killed under load, all on the scripted
engine, on loopback. Every request must be answered exactly once, nothing may stay in flight,
and the server's resident memory must stay flat once warmed up.

    .venv/bin/python -m benchmarks.soak                     # 4000 mixed requests: ~2 min on 2 cores
    .venv/bin/python -m benchmarks.soak --requests 400 --storm-streams 50 --storm-rounds 1   # ~20 s

Phases, each bounded in requests and in time (``--seconds``), and each stopping by itself:

a. mixed load: ``rexomni-server serve --engine scripted`` in its own process, with API keys on
   and small limits (``--max-queue 32``: requests are refused for overload too), gets
   ``--requests`` requests at ``--concurrency``: unary JSON, multipart, SSE, gRPC unary and
   stream, fan-out, and hostile ones (bad JSON and types, too many categories, oversized and
   slow bodies, non-images, a truncated PNG, a decompression bomb header, bad base64, unknown
   fields, pathological forced outputs, missing keys, bytes that are not a protobuf, clients
   that leave mid-stream). Resident memory is read after a warm-up slice and at the end.
b. disconnect storms: hundreds of SSE and gRPC streams opened at once and dropped: within a
   second of being sent, or all together once their headers or first detection came; then
   nothing may stay in flight and the server must serve a good request.
c. SIGTERM under load: a fresh server process is sent SIGTERM while loaded; it must drain and
   exit 0 within its drain timeout.
d. engine killed under load: in-process (a scripted engine cannot be killed from outside its
   process), ``ScriptedEngine.fail`` mid-load; requests get ``engine_dead`` and ``serve`` exits 1.

How a request is accounted: the client sends its own ``X-Request-ID`` / ``x-request-id``, and
the server logs every request its handlers see exactly once (logger ``rexomni.requests``). A
request whose id came back (response header, gRPC metadata) must be in the log exactly once; one
refused at connect must not be in it; one whose connection broke off, at most once. A request's
outcome is the status of its log line (what the server decided), checked against its kind.

Prints one table per phase and a summary,
writes ``soak.json`` (and the server processes' logs) under ``--out``, and exits 1 when any
invariant failed. Linux only: resident memory is read from /proc.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import logging
import os
import random
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from functools import cache, partial
from pathlib import Path
from typing import Any

import grpc
import httpx
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.common import b64, group, jpeg_bytes, write_json
from rexomni_server._pb.rexomni.v1 import detector_pb2 as pb
from rexomni_server.app import max_body_bytes
from rexomni_server.auth import API_KEY_HEADER
from rexomni_server.engines.scripted import ScriptedEngine
from rexomni_server.runtime import Runtime
from rexomni_server.schemas import MAX_FORCED_OUTPUT_CHARS
from rexomni_server.serve import EXIT_FATAL, serve, start_servers
from rexomni_server.settings import Settings
from rexomni_server.transport.grpc import REQUEST_ID_KEY

HOST = "127.0.0.1"
API_KEY = "soak-key"
REQUEST_ID = REQUEST_ID_KEY  # the HTTP header (any case) and the gRPC metadata key alike
MiB = 1 << 20

# Hang guards (never speed claims): a request past REQUEST_TIMEOUT_S counts as hung.
REQUEST_TIMEOUT_S = 30.0
SETTLE_TIMEOUT_S = 15.0  # for in-flight and queue depth to return to 0
START_TIMEOUT_S = 60.0
EXIT_MARGIN_S = 10.0  # past the drain timeout (or the engine-failure exit), a server that has not exited hangs

# The mixed-load server's limits: small, so that overload refusals, oversized bodies and slow
# bodies are cheap to provoke.
MAX_QUEUE = 32
MAX_IMAGE_BYTES = MiB
MAX_BODY_BYTES = max_body_bytes(Settings.model_construct(max_image_bytes=MAX_IMAGE_BYTES))
BODY_TIMEOUT_S = 2.0
SLOW_BODY_S = 3.0  # a slow client sends its body for this long: past BODY_TIMEOUT_S
# The memory baseline is read after a warm-up slice of the mixed load: WARMUP_FRACTION of it,
# and at least MIN_WARMUP requests, enough to fill the scripted engine's record of its last 64
# requests (images included, bounded by design) and the allocator's steady state.
WARMUP_FRACTION = 0.2
MIN_WARMUP = 200
RSS_SAMPLES = 10  # resident memory is also read each tenth of the measured requests

# In-process servers (storm, engine kill) get an engine that takes this long per token, so a
# stream is really mid-generation when its client drops it or the engine dies; the server
# process has no such setting and answers a scripted request at once.
TOKEN_DELAY_S = 0.002
STORM_BOXES = 1000  # ~6000 tokens: 12 s or more per stream, dropped long before its end
KILL_BOXES = 20
KILL_REASON = "killed under load"
EARLY_DROP_S = 1.0

IMAGE_SIZE = (320, 240)  # the size of the images of the earlier leak (each kept by the engine)
LONG_BOXES = 300  # answers long enough that a client can leave in the middle
GIVE_UP_S = 0.02  # a unary client that gives up this soon leaves during its generation
FAN_CATEGORIES = ("person", "car", "dog", "chair")

# What a client saw of its request.
ANSWERED = "answered"  # a whole answer (result or error) from the server's handlers
LEFT = "left"  # the client went away on purpose, after its request id came back
LEFT_EARLY = "left early"  # the client went away on purpose before any answer
REFUSED = "refused"  # never reached a handler (connection refused, or refused at the door)
BROKEN = "broken"  # the connection broke off, or gRPC ended the call without our request id
HUNG = "hung"  # nothing within REQUEST_TIMEOUT_S

# Codes of requests that never reached a handler: documented outcomes while a server is
# stopping or at its connection limit (the Python clients send such requests again). A gRPC
# call the stopping server dropped before any handler took it ends CANCELLED, trailers only.
NOT_ACCEPTED = frozenset({"refused", "connection lost", "grpc:UNAVAILABLE", "grpc:CANCELLED", "http_503"})
OVERLOADED = "overloaded"
# A server error is never an accepted outcome (503 engine_dead is, where the engine was killed).
SERVER_ERROR_CODES = frozenset({"internal", "engine_failure", "timeout"})
SERVER_ERROR_GRPC = frozenset({"INTERNAL", "UNKNOWN", "DATA_LOSS"})
EXAMPLES = 5  # request ids named per violation
WARNING_KINDS = 3  # the most frequent warning messages of the server's log, reported with their counts


# ---- payloads -----------------------------------------------------------------------------
def boxes_output(label: str, n: int, offset: int = 0) -> str:
    """A forced output of ``n`` distinct boxes of one label (the answer the engine replays)."""
    boxes = [
        ((i * 7 + offset) % 900, (i * 13) % 900, (i * 7 + offset) % 900 + 50, (i * 13) % 900 + 60) for i in range(n)
    ]
    return group(label, boxes)


def png_bytes(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (30, 120, 200)).save(buf, "PNG")
    return buf.getvalue()


def bomb_png(side: int = 100_000) -> bytes:
    """A valid PNG header that declares ``side`` x ``side`` pixels (10 G), with almost no data:
    a decompression bomb as the server sees it before decoding."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 1024))
        + chunk(b"IEND", b"")
    )


# Forced outputs that stress the parser: unclosed groups, markers without content, a lone '<'
# repeated, coordinates outside any box, and an output at the server's length limit.
PATHOLOGICAL_OUTPUTS = (
    "<|box_start|>" * 4000,
    "<" * 20000,
    "<|object_ref_start|>" + "x" * 20000,
    "<1>" * 20000,
    "<|object_ref_start|>a<|object_ref_end|><|box_start|>" + "<1><2><3>, " * 5000,
    "<|object_ref_end|><|box_end|><|box_start|><|object_ref_start|>" * 1000,
    "<0>" * (MAX_FORCED_OUTPUT_CHARS // 3),
)


@dataclass(frozen=True)
class Payloads:
    """Every body the soak sends, built once."""

    image: bytes
    image_b64: str
    png_truncated_b64: str
    bomb_b64: str
    oversized_image_b64: str  # decodes to more than MAX_IMAGE_BYTES, within the body limit
    oversized_body: bytes  # over the body limit


@cache
def payloads() -> Payloads:
    image = jpeg_bytes(*IMAGE_SIZE)
    return Payloads(
        image=image,
        image_b64=b64(image),
        png_truncated_b64=b64(png_bytes(*IMAGE_SIZE)[:300]),
        bomb_b64=b64(bomb_png()),
        oversized_image_b64=b64(b"\0" * (MAX_IMAGE_BYTES + 64 * 1024)),
        oversized_body=b'{"image": "' + b"A" * (MAX_BODY_BYTES + 64 * 1024) + b'"}',
    )


# ---- clients and what they saw ----------------------------------------------------------------
@dataclass
class Reply:
    """What a client saw of one request."""

    seen: str  # ANSWERED, LEFT, ...
    code: str  # "ok", the error code the server named, or what the transport said
    ours: bool = False  # our request id came back: the server's handlers had the request
    status: int | str | None = None  # HTTP status or gRPC status name
    detections: int | None = None  # in the result
    streamed: int | None = None  # detection events before the result (streams)
    detail: str = ""  # what the transport said, for the report


@dataclass
class Clients:
    """One HTTP client and one gRPC channel, shared by every request of a phase."""

    http: httpx.AsyncClient
    channel: grpc.aio.Channel
    api_key: str | None

    def headers(self, request_id: str, key: bool = True) -> dict[str, str]:
        headers = {REQUEST_ID: request_id}
        if key and self.api_key:
            headers[API_KEY_HEADER] = self.api_key
        return headers

    def metadata(self, request_id: str, key: bool = True) -> tuple[tuple[str, str], ...]:
        return tuple(self.headers(request_id, key).items())

    def detect(self) -> Any:
        """Detect on raw bytes, both ways: hostile requests need not be valid protobuf."""
        return self.channel.unary_unary("/rexomni.v1.Detector/Detect")

    def detect_stream(self) -> Any:
        return self.channel.unary_stream("/rexomni.v1.Detector/DetectStream")


@contextlib.asynccontextmanager
async def open_clients(url: str, grpc_target: str, api_key: str | None, connections: int) -> AsyncIterator[Clients]:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    # gRPC's own retries are off: the soak counts what the server did, not what a retry hid.
    options = [("grpc.enable_retries", 0), ("grpc.max_receive_message_length", 64 * MiB)]
    async with (
        httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT_S + 5, limits=limits) as http,
        grpc.aio.insecure_channel(grpc_target, options=options) as channel,
    ):
        yield Clients(http, channel, api_key)


Sender = Callable[[Clients, str], Awaitable[Reply]]


async def attempt(send: Sender, clients: Clients, request_id: str) -> Reply:
    """One request, whatever happens to it: never raises, never runs past REQUEST_TIMEOUT_S."""
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT_S):
            return await send(clients, request_id)
    except TimeoutError:
        return Reply(HUNG, "hung")
    except httpx.ConnectError:
        return Reply(REFUSED, "refused")
    except httpx.TransportError as exc:
        return Reply(BROKEN, "connection lost", detail=f"{type(exc).__name__}: {exc}")


def error_code(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return f"http_{response.status_code}"


def http_reply(response: httpx.Response, request_id: str) -> Reply:
    if response.headers.get(REQUEST_ID) != request_id:  # answered before our app (uvicorn)
        return Reply(REFUSED, f"http_{response.status_code}", status=response.status_code)
    if response.status_code != 200:
        return Reply(ANSWERED, error_code(response), True, response.status_code)
    return Reply(ANSWERED, "ok", True, 200, len(response.json()["detections"]))


async def post(clients: Clients, request_id: str, path: str, *, key: bool = True, **kwargs: Any) -> Reply:
    headers = {**clients.headers(request_id, key), **kwargs.pop("headers", {})}
    return http_reply(await clients.http.post(path, headers=headers, **kwargs), request_id)


async def sse_events(response: httpx.Response) -> AsyncIterator[tuple[str, str]]:
    """(event, data) pairs of a text/event-stream response."""
    event = ""
    async for line in response.aiter_lines():
        if line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            yield event, line[5:].strip()


async def sse(clients: Clients, request_id: str, path: str, *, leave_after_first: bool = False, **kwargs: Any) -> Reply:
    headers = clients.headers(request_id)
    async with clients.http.stream("POST", path, headers=headers, **kwargs) as response:
        if response.headers.get(REQUEST_ID) != request_id or response.status_code != 200:
            await response.aread()
            return http_reply(response, request_id)
        streamed = 0
        async for event, data in sse_events(response):
            if event == "detection":
                streamed += 1
                if leave_after_first:
                    return Reply(LEFT, "left", True, 200)
            elif event == "done":
                return Reply(ANSWERED, "ok", True, 200, len(json.loads(data)["detections"]), streamed)
            elif event == "error":
                error = json.loads(data)["error"]
                return Reply(ANSWERED, str(error["code"]), True, int(error["status"]))
        return Reply(BROKEN, "stream cut", True, 200)


def metadata_id(*metadata: Any) -> str | None:
    for md in metadata:
        for key, value in md or ():
            if key == REQUEST_ID:
                return str(value)
    return None


def grpc_error(exc: grpc.aio.AioRpcError, request_id: str) -> Reply:
    status, details = exc.code().name, exc.details() or ""
    if metadata_id(exc.initial_metadata(), exc.trailing_metadata()) == request_id:
        return Reply(ANSWERED, f"grpc:{status}", True, status, detail=details)
    if status == "UNAVAILABLE" and ("failed to connect" in details.lower() or "connection refused" in details.lower()):
        return Reply(REFUSED, "refused", status=status, detail=details)
    return Reply(BROKEN, f"grpc:{status}", status=status, detail=details)


async def grpc_unary(clients: Clients, request_id: str, message: bytes, *, key: bool = True) -> Reply:
    call = clients.detect()(message, metadata=clients.metadata(request_id, key), timeout=REQUEST_TIMEOUT_S + 5)
    try:
        answer = await call
    except grpc.aio.AioRpcError as exc:
        return grpc_error(exc, request_id)
    ours = metadata_id(await call.initial_metadata()) == request_id
    return Reply(ANSWERED, "ok", ours, "OK", len(pb.DetectResponse.FromString(answer).detections))


async def grpc_stream(clients: Clients, request_id: str, message: bytes, *, leave_after_first: bool = False) -> Reply:
    call = clients.detect_stream()(message, metadata=clients.metadata(request_id), timeout=REQUEST_TIMEOUT_S + 5)
    streamed = 0
    try:
        async for raw in call:
            event = pb.DetectEvent.FromString(raw)
            if event.HasField("detection"):
                streamed += 1
                if leave_after_first:
                    ours = metadata_id(await call.initial_metadata()) == request_id
                    call.cancel()
                    return Reply(LEFT, "left", ours, "CANCELLED")
            elif event.HasField("done"):
                ours = metadata_id(await call.initial_metadata()) == request_id
                return Reply(ANSWERED, "ok", ours, "OK", len(event.done.detections), streamed)
    except grpc.aio.AioRpcError as exc:
        return grpc_error(exc, request_id)
    return Reply(BROKEN, "stream cut", metadata_id(await call.initial_metadata()) == request_id, "OK")


# ---- request kinds --------------------------------------------------------------------------
@dataclass(frozen=True)
class Kind:
    """One sort of request, what it may be answered, and how often the mixed load sends it."""

    name: str
    transport: str  # http, sse, grpc, grpc-stream
    send: Sender
    expect: frozenset[str]  # acceptable outcomes (log status, or what the client saw when unlogged)
    weight: int = 1
    admitted: bool = False  # reaches admission, so it may also be refused as overloaded
    detections: int | None = None  # a good request's answer has exactly this many

    def accepts(self, outcome: str) -> bool:
        documented = outcome in self.expect or outcome in NOT_ACCEPTED or (self.admitted and outcome == OVERLOADED)
        return documented


OK = frozenset({"ok"})
OK_OR_LEFT = frozenset({"ok", "cancelled", "left"})  # a client that leaves may still have had it all
INVALID_REQUEST = frozenset({"invalid_request"})
INVALID_IMAGE = frozenset({"invalid_image"})
TOO_LARGE = frozenset({"image_too_large"})
UNAUTHENTICATED = frozenset({"unauthenticated"})
GOOD_BOXES = 5
V1 = "/v1/detect"
JSON_TYPE = {"content-type": "application/json"}


def json_body(image: str, **fields: Any) -> dict[str, Any]:
    return {"image": image, "categories": ["cat"], **fields}


def forced(output: str, **options: Any) -> dict[str, Any]:
    return {"forced_output": output, **options}


def grpc_message(image: bytes, categories: Iterable[str] = ("cat",), output: str | None = None) -> bytes:
    options = pb.DetectOptions(forced_output=output) if output is not None else pb.DetectOptions()
    return bytes(pb.DetectRequest(image=image, categories=list(categories), options=options).SerializeToString())


def multipart(image: bytes, **fields: str) -> dict[str, Any]:
    return {"files": {"image": ("image.jpg", image, "image/jpeg")}, "data": {"categories": "cat", **fields}}


async def slow_body() -> AsyncIterator[bytes]:
    """A body that arrives a byte at a time, for longer than the server's body timeout."""
    yield b'{"image": "'
    end = time.monotonic() + SLOW_BODY_S
    while time.monotonic() < end:
        await asyncio.sleep(0.25)
        yield b"A"
    yield b'"}'


async def chunked(data: bytes, size: int = 256 * 1024) -> AsyncIterator[bytes]:
    """``data`` without a Content-Length: the server must count it as it arrives."""
    for start in range(0, len(data), size):
        yield data[start : start + size]


def via_http(path: str = V1, *, key: bool = True, body: Callable[[], Any] | None = None, **request: Any) -> Sender:
    """POST with httpx's ``request`` arguments; ``body`` makes a fresh streamed body per request."""

    async def send(clients: Clients, request_id: str) -> Reply:
        fresh = {"content": body()} if body is not None else {}
        return await post(clients, request_id, path, key=key, **request, **fresh)

    return send


def via_sse(path: str, *, leave_after_first: bool = False, **request: Any) -> Sender:
    return lambda c, r: sse(c, r, path, leave_after_first=leave_after_first, **request)


def via_grpc(message: bytes, *, key: bool = True) -> Sender:
    return lambda c, r: grpc_unary(c, r, message, key=key)


def via_grpc_stream(message: bytes, *, leave_after_first: bool = False) -> Sender:
    return lambda c, r: grpc_stream(c, r, message, leave_after_first=leave_after_first)


def transport_kinds(boxes: int) -> list[Kind]:
    """A good request over every transport, answered with ``boxes`` boxes (weights: the mix)."""
    p = payloads()
    out = boxes_output("cat", boxes)
    body = json_body(p.image_b64, options=forced(out))
    form = multipart(p.image, options=json.dumps(forced(out)))
    message = grpc_message(p.image, output=out)
    return [
        Kind("json", "http", via_http(json=body), OK, weight=14, admitted=True, detections=boxes),
        Kind("multipart", "http", via_http("/detect", **form), OK, weight=8, admitted=True, detections=boxes),
        Kind("sse", "sse", via_sse("/v1/detect/stream", json=body), OK, weight=8, admitted=True, detections=boxes),
        Kind("sse-multipart", "sse", via_sse("/detect/stream", **form), OK, weight=4, admitted=True, detections=boxes),
        Kind("grpc", "grpc", via_grpc(message), OK, weight=10, admitted=True, detections=boxes),
        Kind("grpc-stream", "grpc-stream", via_grpc_stream(message), OK, weight=8, admitted=True, detections=boxes),
    ]


def good_kinds() -> list[Kind]:
    """Requests that must get their result (or an overload refusal)."""
    fan = ", ".join(boxes_output(c, 2, offset=i * 100) for i, c in enumerate(FAN_CATEGORIES))
    body = json_body(payloads().image_b64, categories=list(FAN_CATEGORIES), options=forced(fan, fan_out=True))
    pathological = [
        Kind(
            f"forced-odd-{i}",
            "http",
            via_http(json=json_body(payloads().image_b64, options=forced(out))),
            OK,
            admitted=True,
        )
        for i, out in enumerate(PATHOLOGICAL_OUTPUTS)
    ]
    fan_out = Kind(
        "fan-out", "http", via_http(json=body), OK, weight=4, admitted=True, detections=2 * len(FAN_CATEGORIES)
    )
    return [*transport_kinds(GOOD_BOXES), fan_out, *pathological]


def hostile_http_kinds() -> list[Kind]:
    p = payloads()
    image = p.image_b64
    too_long = "x" * (MAX_FORCED_OUTPUT_CHARS + 1)
    return [
        Kind("invalid-json", "http", via_http(content=b'{"image": "', headers=JSON_TYPE), INVALID_REQUEST, 2),
        Kind("not-utf8", "http", via_http(content=b"\xff\xfe{", headers=JSON_TYPE), INVALID_REQUEST),
        Kind("wrong-types", "http", via_http(json={"image": 5, "categories": 7, "task": []}), INVALID_REQUEST, 2),
        Kind(
            "65-categories",
            "http",
            via_http(json=json_body(image, categories=[f"c{i}" for i in range(65)])),
            INVALID_REQUEST,
            2,
        ),
        Kind("257-entries", "http", via_http(json=json_body(image, categories=["cat"] * 257)), INVALID_REQUEST, 2),
        Kind("unknown-field", "http", via_http(json=json_body(image, bogus=1)), INVALID_REQUEST, 2),
        Kind("forced-too-long", "http", via_http(json=json_body(image, options=forced(too_long))), INVALID_REQUEST),
        Kind("non-image", "http", via_http(json=json_body(b64(b"not an image"))), INVALID_IMAGE, 2, admitted=True),
        Kind("truncated-png", "http", via_http(json=json_body(p.png_truncated_b64)), INVALID_IMAGE, 2, admitted=True),
        Kind("bomb-png", "http", via_http(json=json_body(p.bomb_b64)), TOO_LARGE, 2, admitted=True),
        Kind("bad-base64", "http", via_http(json=json_body("!!not*base64")), INVALID_IMAGE, 2, admitted=True),
        Kind("oversized-image", "http", via_http(json=json_body(p.oversized_image_b64)), TOO_LARGE, 1, admitted=True),
        Kind("oversized-body", "http", via_http(content=p.oversized_body, headers=JSON_TYPE), TOO_LARGE),
        Kind(
            "oversized-chunked", "http", via_http(body=lambda: chunked(p.oversized_body), headers=JSON_TYPE), TOO_LARGE
        ),
        Kind("slow-body", "http", via_http(body=slow_body, headers=JSON_TYPE), frozenset({"body_timeout"})),
        Kind("no-key", "http", via_http(key=False, json=json_body(image)), UNAUTHENTICATED, 2),
        Kind(
            "wrong-key",
            "http",
            via_http(key=False, json=json_body(image), headers={API_KEY_HEADER: "nope"}),
            UNAUTHENTICATED,
        ),
        Kind("multipart-unknown-field", "http", via_http("/detect", **multipart(p.image, bogus="1")), INVALID_REQUEST),
        Kind("multipart-broken", "http", via_http("/detect", content=BROKEN_FORM, headers=FORM_TYPE), INVALID_REQUEST),
    ]


# A multipart body whose part is never closed.
FORM_TYPE = {"content-type": "multipart/form-data; boundary=soak"}
BROKEN_FORM = b'--soak\r\nContent-Disposition: form-data; name="image"; filename="a"\r\n\r\nabc'


def leaving_kinds() -> list[Kind]:
    """Clients that go away before their answer is complete."""
    p = payloads()
    out = boxes_output("cat", LONG_BOXES)
    body = json_body(p.image_b64, options=forced(out))
    message = grpc_message(p.image, output=out)
    sse_leaves = via_sse("/v1/detect/stream", json=body, leave_after_first=True)
    grpc_cancels = via_grpc_stream(message, leave_after_first=True)
    gives_up = via_http(json=body)
    return [
        Kind("sse-leaves", "sse", sse_leaves, OK_OR_LEFT, 3, admitted=True),
        Kind("grpc-stream-cancels", "grpc-stream", grpc_cancels, OK_OR_LEFT, 3, admitted=True),
        Kind(
            "http-gives-up",
            "http",
            lambda c, r: abandoned(gives_up(c, r), GIVE_UP_S),
            OK_OR_LEFT,
            2,
            admitted=True,
        ),
    ]


async def abandoned(request: Awaitable[Reply], after_s: float) -> Reply:
    """A unary request whose client gives up after ``after_s`` (the server must notice)."""
    try:
        async with asyncio.timeout(after_s):
            return await request
    except TimeoutError:
        return Reply(LEFT_EARLY, "left")


def hostile_grpc_kinds() -> list[Kind]:
    image = payloads().image
    oversized = grpc_message(b"\0" * (MAX_IMAGE_BYTES + 2 * MiB))
    return [
        Kind("grpc-not-protobuf", "grpc", via_grpc(b"\xff\xff\xff\xff\x0f\x01"), INVALID_REQUEST, 2),
        Kind("grpc-no-key", "grpc", via_grpc(grpc_message(image), key=False), UNAUTHENTICATED),
        Kind(
            "grpc-300-categories", "grpc", via_grpc(grpc_message(image, [f"c{i}" for i in range(300)])), INVALID_REQUEST
        ),
        Kind("grpc-non-image", "grpc", via_grpc(grpc_message(b"not an image")), INVALID_IMAGE, admitted=True),
        # Over the receive limit: gRPC itself refuses it, before any handler (so never logged).
        Kind("grpc-oversized", "grpc", via_grpc(oversized), frozenset({"grpc:RESOURCE_EXHAUSTED"})),
    ]


def mixed_kinds() -> list[Kind]:
    return good_kinds() + hostile_http_kinds() + leaving_kinds() + hostile_grpc_kinds()


def schedule(kinds: list[Kind], total: int, seed: int, prefix: str) -> list[tuple[str, Kind]]:
    """``total`` (request id, kind) pairs: decks of every kind ``weight`` times, each shuffled,
    so that every kind is sent once ``total`` reaches a deck's size."""
    rng = random.Random(seed)
    deck = [kind for kind in kinds for _ in range(kind.weight)]
    plan: list[Kind] = []
    while len(plan) < total:
        rng.shuffle(deck)
        plan.extend(deck)
    return [(f"{prefix}{i:06d}-{kind.name}", kind) for i, kind in enumerate(plan[:total])]


# ---- driving load -----------------------------------------------------------------------------
@dataclass
class Outcome:
    """One request: what the client saw and, once the log is read, what the server logged."""

    request_id: str
    kind: Kind
    sent_at: float  # time.monotonic()
    reply: Reply
    finished_at: float = 0.0
    logged: int = 0
    log_status: str | None = None

    @property
    def result(self) -> str:
        """The server's word when it logged the request once, else what the client saw."""
        if self.logged == 1 and self.log_status is not None:
            return self.log_status
        return self.reply.code if self.logged == 0 else f"logged {self.logged} times"


StopRule = Callable[[Reply], bool]


async def drive(
    clients: Clients,
    plan: Iterable[tuple[str, Kind]],
    concurrency: int,
    deadline: float,
    stop: StopRule = lambda reply: False,
    outcomes: list[Outcome] | None = None,
) -> list[Outcome]:
    """Send ``plan`` with ``concurrency`` requests in flight until it is done or ``deadline``
    (time.monotonic()) passes; a worker also stops at a reply ``stop`` names. Outcomes are
    appended to ``outcomes`` as they come (when given: others may watch the progress)."""
    todo = iter(plan)
    outcomes = [] if outcomes is None else outcomes

    async def worker() -> None:
        for request_id, kind in todo:  # shared: each request is taken by one worker
            if time.monotonic() > deadline:
                return
            sent = time.monotonic()
            reply = await attempt(kind.send, clients, request_id)
            outcomes.append(Outcome(request_id, kind, sent, reply, time.monotonic()))
            if stop(reply):
                return

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return outcomes


def not_served(reply: Reply) -> bool:
    """The server no longer takes requests (it is stopping or gone)."""
    return reply.seen in (REFUSED, BROKEN)


def load_plan(kinds: list[Kind], prefix: str, limit: int) -> Iterator[tuple[str, Kind]]:
    """Up to ``limit`` requests cycling through ``kinds`` (the loads of the fault phases)."""
    for i in range(limit):
        kind = kinds[i % len(kinds)]
        yield f"{prefix}{i:06d}-{kind.name}", kind


# ---- the server's side ------------------------------------------------------------------------
def metric_values(text: str) -> dict[str, float]:
    """Sample name -> value, labelled samples summed (enough for gauges and totals)."""
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[sample.name] = values.get(sample.name, 0.0) + sample.value
    return values


@dataclass
class Settled:
    in_flight: float
    queue_depth: float
    waited_ms: float
    requests_total: float


async def settle(clients: Clients, timeout_s: float = SETTLE_TIMEOUT_S) -> Settled:
    """Polls /metrics until nothing is in flight or queued (or ``timeout_s``, a hang guard)."""
    start = time.monotonic()
    while True:
        values = metric_values((await clients.http.get("/metrics")).text)
        in_flight = values.get("rexomni_in_flight_requests", -1.0)
        queued = values.get("rexomni_queue_depth", -1.0)
        waited = time.monotonic() - start
        if (in_flight == 0 and queued == 0) or waited > timeout_s:
            total = values.get("rexomni_requests_total", 0.0)
            return Settled(in_flight, queued, round(waited * 1000, 1), total)
        await asyncio.sleep(0.05)


def server_env() -> dict[str, str]:
    """The environment without REXOMNI_* settings: the soak sets every setting it relies on."""
    return {k: v for k, v in os.environ.items() if not k.upper().startswith("REXOMNI_")}


def rss_mib(pid: int) -> float:
    """Resident memory of a process (Linux /proc), MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


@dataclass
class ServerProcess:
    """``rexomni-server serve --engine scripted`` on loopback, its stderr (the JSON log) in a file."""

    proc: subprocess.Popen[bytes]
    log_path: Path
    http_port: int = 0
    grpc_port: int = 0

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.http_port}"

    @property
    def grpc_target(self) -> str:
        return f"{HOST}:{self.grpc_port}"

    @classmethod
    async def start(cls, flags: list[str], log_path: Path) -> ServerProcess:
        cmd = [sys.executable, "-m", "rexomni_server.cli", "serve", "--engine", "scripted", "--model", "scripted"]
        cmd += ["--allow-forced-output", "--host", HOST, "--port", "0", "--grpc-port", "0", *flags]
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("wb") as stderr:
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=stderr, env=server_env())
        server = cls(proc, log_path)
        try:
            await server._wait_ready()
        except BaseException:
            server.proc.kill()
            server.proc.wait()
            raise
        return server

    async def _wait_ready(self) -> None:
        """Until both listeners are logged (port 0: the log names the bound ports) and /ready
        answers 200."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while not (self.http_port and self.grpc_port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start (status {self.proc.poll()}); see {self.log_path}")
            for entry in self.log_entries():
                if entry.get("msg") == "HTTP listening":
                    self.http_port = int(entry["port"])
                elif entry.get("msg") == "gRPC listening":
                    self.grpc_port = int(entry["port"])
            await asyncio.sleep(0.05)
        async with httpx.AsyncClient(timeout=5) as client:
            while (await client.get(f"{self.url}/ready")).status_code != 200:
                if time.monotonic() > deadline:
                    raise RuntimeError("the server did not become ready")
                await asyncio.sleep(0.05)

    def rss_mib(self) -> float:
        return rss_mib(self.proc.pid)

    def terminate(self) -> float:
        """SIGTERM; returns when it was sent (time.monotonic())."""
        self.proc.send_signal(signal.SIGTERM)
        return time.monotonic()

    async def wait_exit(self, timeout_s: float) -> int | None:
        """The exit status, or None (and the process killed) when it did not exit in time."""
        deadline = time.monotonic() + timeout_s
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                self.proc.kill()
                self.proc.wait()
                return None
            await asyncio.sleep(0.02)
        return self.proc.returncode

    def log_entries(self) -> list[dict[str, Any]]:
        return parse_log(self.log_path.read_text(errors="replace").splitlines())


def parse_log(lines: Iterable[str]) -> list[dict[str, Any]]:
    """The server's JSON log lines; anything else on stderr becomes an entry of its own (a
    traceback printed past the logger is worth seeing)."""
    entries: list[dict[str, Any]] = []
    for line in lines:
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            entry = None
        entries.append(entry if isinstance(entry, dict) else {"level": "raw", "msg": line[:300]})
    return entries


class LogCapture(logging.Handler):
    """The in-process server's log records in the shape of its JSON lines."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.entries: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        fields = getattr(record, "fields", None)
        entry = {"logger": record.name, "level": record.levelname.lower(), "msg": record.getMessage()}
        if record.exc_info:
            entry["exc"] = logging.Formatter().formatException(record.exc_info)
        self.entries.append({**entry, **(fields if isinstance(fields, dict) else {})})


# The loggers of an in-process server: its request log, its own modules, and uvicorn's.
SERVER_LOGGERS = ("rexomni", "rexomni_server", "uvicorn")


@contextlib.contextmanager
def captured_logs() -> Iterator[LogCapture]:
    """Captures the in-process server's log at INFO (and keeps it off the console)."""
    capture = LogCapture()
    saved = []
    for name in SERVER_LOGGERS:
        logger = logging.getLogger(name)
        saved.append((logger, logger.level, logger.propagate))
        logger.setLevel(logging.INFO)
        logger.propagate = False
        logger.addHandler(capture)
    try:
        yield capture
    finally:
        for logger, level, propagate in saved:
            logger.removeHandler(capture)
            logger.setLevel(level)
            logger.propagate = propagate


# ---- accounting -------------------------------------------------------------------------------
def request_lines(entries: Iterable[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    by_id: dict[str, list[dict[str, Any]]] = {}
    for entry in entries:
        if entry.get("logger") == "rexomni.requests" and entry.get("msg") == "request":
            by_id.setdefault(str(entry.get("request_id")), []).append(entry)
    return by_id


def log_bounds(reply: Reply) -> tuple[int, int]:
    """How many log lines a request must have: once its id came back, exactly one; refused at
    the connection, none; otherwise (it broke off, the client left first) at most one."""
    if reply.ours:
        return 1, 1
    if reply.seen == REFUSED:
        return 0, 0
    return 0, 1


@dataclass
class Violations:
    """Broken invariants, each with the request ids that broke it."""

    found: dict[str, list[str]] = field(default_factory=dict)
    details: dict[str, str] = field(default_factory=dict)  # the first one's, per violation

    def add(self, what: str, request_id: str = "", detail: str = "") -> None:
        self.found.setdefault(what, []).append(request_id)
        if detail:
            self.details.setdefault(what, detail)

    def lines(self) -> list[str]:
        out = []
        for what, ids in self.found.items():
            named = [i for i in ids if i]
            example = f": {', '.join(named[:EXAMPLES])}{', ...' if len(named) > EXAMPLES else ''}" if named else ""
            detail = f" [{self.details[what][:200]}]" if what in self.details else ""
            out.append(f"{what} ({len(ids)}){example}{detail}")
        return out


def check_outcome(outcome: Outcome, violations: Violations) -> None:
    reply, kind, rid = outcome.reply, outcome.kind, outcome.request_id
    low, high = log_bounds(reply)
    if not low <= outcome.logged <= high:
        violations.add(f"logged {outcome.logged} times, expected {low}..{high} ({reply.seen})", rid)
    if reply.seen == HUNG:
        violations.add("no answer within the client's hang guard", rid)
    if not kind.accepts(outcome.result):
        violations.add(f"{kind.name}: unexpected outcome {outcome.result!r}", rid, reply.detail)
    # Over HTTP the answer names the code the log has.
    http_answer = reply.seen == ANSWERED and isinstance(reply.status, int) and outcome.logged == 1
    if http_answer and reply.code != outcome.log_status:
        violations.add(f"client saw {reply.code!r}, log says {outcome.log_status!r}", rid)
    if outcome.log_status == "ok" and reply.seen in (BROKEN, REFUSED):
        violations.add("the log says answered, the client got no answer", rid)
    if reply.code == "ok" and kind.detections is not None and reply.detections != kind.detections:
        violations.add(f"{kind.name}: {reply.detections} detections instead of {kind.detections}", rid)
    if reply.streamed is not None and reply.code == "ok" and reply.streamed != reply.detections:
        violations.add("streamed detections differ from the result's", rid)
    if is_server_error(outcome):
        violations.add(f"server error {outcome.result!r} (status {reply.status})", rid)


def is_server_error(outcome: Outcome) -> bool:
    status = outcome.reply.status
    http_5xx = isinstance(status, int) and status >= 500 and status != 503
    return http_5xx or status in SERVER_ERROR_GRPC or outcome.result in SERVER_ERROR_CODES


def account(
    outcomes: list[Outcome],
    entries: list[dict[str, Any]],
    violations: Violations,
    expected_error: str = "",
) -> dict[str, Any]:
    """Joins what the clients saw with the server's log; checks every outcome, and that the
    server logged no error but those that name ``expected_error``."""
    lines = request_lines(entries)
    sent = {o.request_id for o in outcomes}
    for outcome in outcomes:
        mine = lines.get(outcome.request_id, [])
        outcome.logged = len(mine)
        outcome.log_status = str(mine[0]["status"]) if mine else None
        check_outcome(outcome, violations)
    for request_id in sorted(set(lines) - sent):
        violations.add("a log line for a request never sent", request_id)
    errors = [error_text(e) for e in entries if e.get("level") in ("error", "critical", "raw")]
    for error in errors:
        if not (expected_error and expected_error in error):
            violations.add(f"the server logged an error: {error[:200]}")
    warnings = Counter(str(e.get("msg"))[:80] for e in entries if e.get("level") == "warning")
    answered = [o for o in outcomes if o.reply.ours]
    return {
        "requests": len(outcomes),
        "answered": len(answered),
        "answered_logged_once": sum(o.logged == 1 for o in answered),
        "logged_twice_or_more": sum(o.logged > 1 for o in outcomes),
        "not_accepted": sum(o.logged == 0 and o.reply.code in NOT_ACCEPTED for o in outcomes),
        "hung": sum(o.reply.seen == HUNG for o in outcomes),
        "server_errors": sum(is_server_error(o) for o in outcomes),
        "log_request_lines": sum(len(v) for v in lines.values()),
        "log_errors": len(errors),
        "log_warnings": dict(warnings.most_common(WARNING_KINDS)),
        "outcomes": dict(Counter(o.result for o in outcomes).most_common()),
    }


def error_text(entry: dict[str, Any]) -> str:
    """An error log entry as one line: its message, and its exception's last line."""
    exc = str(entry.get("exc") or "").strip().splitlines()
    return f"{str(entry.get('msg', '')).strip()}{': ' + exc[-1] if exc else ''}"


def by_kind(outcomes: list[Outcome], kinds: Iterable[Kind]) -> dict[str, dict[str, int]]:
    """Outcome counts per kind, in the order of ``kinds`` (good requests first)."""
    table: dict[str, Counter[str]] = {kind.name: Counter() for kind in kinds}
    for outcome in outcomes:
        table.setdefault(outcome.kind.name, Counter())[outcome.result] += 1
    return {name: dict(counts.most_common()) for name, counts in table.items() if counts}


@dataclass
class PhaseReport:
    name: str
    title: str
    figures: dict[str, Any]
    kinds: dict[str, dict[str, int]]
    violations: list[str]

    @property
    def passed(self) -> bool:
        return not self.violations

    def as_json(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "passed": self.passed,
            **self.figures,
            "by_kind": self.kinds,
            "violations": self.violations,
        }


def expect_equal(violations: Violations, what: str, value: object, expected: object) -> None:
    if value != expected:
        violations.add(f"{what} is {value!r}, expected {expected!r}")


# ---- phases -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class SoakConfig:
    requests: int = 4000
    seconds: float = 300.0  # each phase's load stops sending past this
    concurrency: int = 48
    storm_streams: int = 200  # per transport and round
    storm_rounds: int = 3
    fault_load_s: float = 2.0  # load before SIGTERM / the engine kill
    fault_requests: int = 20_000  # at most, per fault phase (the time bounds stop them first)
    drain_timeout_s: float = 5.0
    engine_failure_exit_s: float = 2.0
    seed: int = 0
    work_dir: Path = Path("out/soak")


async def phase_mixed(config: SoakConfig) -> PhaseReport:
    """a. Mixed good and hostile load on a server process; memory before and after."""
    violations = Violations()
    with tempfile.TemporaryDirectory() as tmp:
        keys = Path(tmp) / "keys"
        keys.write_text(API_KEY + "\n")
        flags = ["--api-keys-file", str(keys), "--max-queue", str(MAX_QUEUE), "--max-image-bytes", str(MAX_IMAGE_BYTES)]
        flags += ["--http-body-timeout-s", str(BODY_TIMEOUT_S), "--drain-timeout-s", str(config.drain_timeout_s)]
        server = await ServerProcess.start(flags, config.work_dir / "mixed-server.log")
        try:
            figures, outcomes = await mixed_load(server, config, violations)
        finally:
            sent = server.terminate()
            status = await server.wait_exit(config.drain_timeout_s + EXIT_MARGIN_S)
            figures["exit_s"] = round(time.monotonic() - sent, 2)
        figures["exit_status"] = status
        expect_equal(violations, "exit status after SIGTERM", status, 0)
        figures.update(account(outcomes, server.log_entries(), violations))
        expect_equal(
            violations, "requests counted on /metrics", figures["metrics_requests_total"], figures["log_request_lines"]
        )
    return PhaseReport(
        "mixed", "a. mixed good and hostile load", figures, by_kind(outcomes, mixed_kinds()), violations.lines()
    )


async def mixed_load(
    server: ServerProcess, config: SoakConfig, violations: Violations
) -> tuple[dict[str, Any], list[Outcome]]:
    plan = schedule(mixed_kinds(), config.requests, config.seed, "a")
    warm = min(len(plan) // 2, max(MIN_WARMUP, int(len(plan) * WARMUP_FRACTION)))
    deadline = time.monotonic() + config.seconds
    figures: dict[str, Any] = {"concurrency": config.concurrency, "rss_start_mib": round(server.rss_mib(), 1)}
    async with open_clients(server.url, server.grpc_target, API_KEY, config.concurrency + 8) as clients:
        outcomes = await drive(clients, plan[:warm], config.concurrency, deadline)
        await check_settled(clients, violations, "after the warm-up")
        measured: list[Outcome] = []
        series = [(0, round(server.rss_mib(), 1))]
        sampler = asyncio.create_task(sample_rss(server, measured, max(1, (len(plan) - warm) // RSS_SAMPLES), series))
        start = time.monotonic()
        try:
            await drive(clients, plan[warm:], config.concurrency, deadline, outcomes=measured)
        finally:
            sampler.cancel()
        wall = time.monotonic() - start
        settled = await check_settled(clients, violations, "at the end")
        series.append((len(measured), round(server.rss_mib(), 1)))
    if len(outcomes) + len(measured) < len(plan):
        violations.add(f"only {len(outcomes) + len(measured)} of {len(plan)} requests sent within {config.seconds:g} s")
    baseline, end = series[0][1], series[-1][1]
    figures.update(
        warmup_requests=warm,
        measured_requests=len(measured),
        measured_wall_s=round(wall, 2),
        measured_requests_per_s=round(len(measured) / wall, 1) if wall else None,
        rss_after_warmup_mib=baseline,
        rss_end_mib=end,
        rss_growth_mib=round(end - baseline, 1),
        rss_max_mib=max(rss for _, rss in series),
        rss_by_measured_requests=series,
        in_flight_end=settled.in_flight,
        queue_depth_end=settled.queue_depth,
        settle_ms=settled.waited_ms,
        metrics_requests_total=int(settled.requests_total),
    )
    return figures, outcomes + measured


async def sample_rss(server: ServerProcess, done: list[Outcome], every: int, series: list[tuple[int, float]]) -> None:
    """Appends (requests done, resident MiB) each time another ``every`` requests are done."""
    while True:
        if len(done) >= series[-1][0] + every:
            series.append((len(done), round(server.rss_mib(), 1)))
        await asyncio.sleep(0.05)


async def check_settled(clients: Clients, violations: Violations, when: str) -> Settled:
    settled = await settle(clients)
    expect_equal(violations, f"in-flight requests {when}", settled.in_flight, 0)
    expect_equal(violations, f"queue depth {when}", settled.queue_depth, 0)
    return settled


@contextlib.asynccontextmanager
async def in_process_server(settings: Settings, engine: ScriptedEngine) -> AsyncIterator[tuple[Runtime, str, str]]:
    """HTTP and gRPC on ``engine`` in this process, on free ports: (runtime, url, gRPC target)."""
    runtime = Runtime(settings, engine=engine, model_label="scripted")
    await engine.start()
    servers = await start_servers(runtime, HOST, 0, 0)
    try:
        yield runtime, f"http://{HOST}:{servers.http_port}", f"{HOST}:{servers.grpc_port}"
    finally:
        await servers.stop(settings.drain_timeout_s)
        await runtime.stop()


def in_process_settings(config: SoakConfig, **overrides: Any) -> Settings:
    fields: dict[str, Any] = {
        "engine": "scripted",
        "model": "scripted",
        "allow_forced_output": True,
        "host": HOST,
        "port": 0,
        "grpc_port": 0,
        "drain_timeout_s": config.drain_timeout_s,
        "engine_failure_exit_s": config.engine_failure_exit_s,
    }
    return Settings.model_validate({**fields, **overrides})


class Barrier:
    """Streams gather here until all ``parties`` have arrived (or a hang guard passes), so that
    they are dropped together."""

    def __init__(self, parties: int) -> None:
        self.parties = parties
        self.arrived = 0
        self._all = asyncio.Event()

    def arrive(self) -> None:
        self.arrived += 1
        if self.arrived >= self.parties:
            self._all.set()

    async def wait(self) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(REQUEST_TIMEOUT_S / 2):
                await self._all.wait()


class Arrival:
    """A stream's one arrival at its barrier, also when it ends before its drop stage."""

    def __init__(self, barrier: Barrier) -> None:
        self.barrier = barrier
        self.done = False

    def __call__(self) -> None:
        if not self.done:
            self.done = True
            self.barrier.arrive()


# Where a storm's stream is dropped: within EARLY_DROP_S of being sent (alone), or together with
# the others once its request id came back (response headers) or after its first detection.
DROP_STAGES = ("sent", "headers", "first")


def early_drop_s(request_id: str) -> float:
    """How long a stream dropped at "sent" lives: spread over EARLY_DROP_S, the same for the
    same request id, so that drops fall before, during and after the request reaches the server."""
    return random.Random(request_id).uniform(0, EARLY_DROP_S)


async def dropped_early(request: Awaitable[Reply], request_id: str) -> Reply:
    task = asyncio.ensure_future(request)
    await asyncio.wait([task], timeout=early_drop_s(request_id))
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return Reply(LEFT_EARLY, "left")


async def sse_dropped(clients: Clients, request_id: str, stage: str, barrier: Barrier, body: dict[str, Any]) -> Reply:
    arrive = Arrival(barrier)
    try:
        if stage == "sent":
            arrive()
            return await dropped_early(sse(clients, request_id, "/v1/detect/stream", json=body), request_id)
        headers = clients.headers(request_id)
        async with clients.http.stream("POST", "/v1/detect/stream", headers=headers, json=body) as response:
            if response.status_code != 200:
                await response.aread()
                return http_reply(response, request_id)
            if stage == "first":
                async for event, _ in sse_events(response):
                    if event == "detection":
                        break
            arrive()
            await barrier.wait()
            return Reply(LEFT, "left", response.headers.get(REQUEST_ID) == request_id, 200)
    finally:
        arrive()


async def grpc_dropped(clients: Clients, request_id: str, stage: str, barrier: Barrier, message: bytes) -> Reply:
    arrive = Arrival(barrier)
    if stage == "sent":
        arrive()
        return await dropped_early(grpc_stream(clients, request_id, message), request_id)
    call = clients.detect_stream()(message, metadata=clients.metadata(request_id), timeout=REQUEST_TIMEOUT_S + 5)
    try:
        ours = metadata_id(await call.initial_metadata()) == request_id
        if stage == "first" and await call.read() is grpc.aio.EOF:
            return Reply(BROKEN, "stream cut", ours, "OK")
        arrive()
        await barrier.wait()
        call.cancel()
        return Reply(LEFT if ours else LEFT_EARLY, "left", ours, "CANCELLED")
    except grpc.aio.AioRpcError as exc:
        return grpc_error(exc, request_id)
    finally:
        arrive()


def storm_kinds(barrier: Barrier) -> list[Kind]:
    p = payloads()
    out = boxes_output("cat", STORM_BOXES)
    body = json_body(p.image_b64, options=forced(out))
    message = grpc_message(p.image, output=out)

    def sse_kind(stage: str) -> Kind:
        send = partial(sse_dropped, stage=stage, barrier=barrier, body=body)
        return Kind(
            f"sse-drop-{stage}",
            "sse",
            send,
            OK_OR_LEFT,
        )

    def grpc_kind(stage: str) -> Kind:
        send = partial(grpc_dropped, stage=stage, barrier=barrier, message=message)
        return Kind(f"grpc-drop-{stage}", "grpc-stream", send, OK_OR_LEFT)

    return [make(stage) for stage in DROP_STAGES for make in (sse_kind, grpc_kind)]


def storm_order() -> list[Kind]:
    """The storm's kinds, then the good requests sent after each storm (for the table)."""
    return storm_kinds(Barrier(0)) + transport_kinds(GOOD_BOXES)


async def storm_round(
    clients: Clients, config: SoakConfig, index: int, violations: Violations
) -> tuple[list[Outcome], dict[str, Any]]:
    """Every stream opened at once and dropped (see DROP_STAGES); then nothing may stay in flight
    and a good request must be served over every transport."""
    streams = 2 * config.storm_streams
    barrier = Barrier(streams)
    plan = list(load_plan(storm_kinds(barrier), f"b{index}-", streams))
    outcomes = await drive(clients, plan, streams, time.monotonic() + config.seconds)
    settled = await check_settled(clients, violations, f"after storm {index + 1}")
    after = [(f"b{index}-after-{kind.name}", kind) for kind in transport_kinds(GOOD_BOXES)]
    served = await drive(clients, after, len(after), time.monotonic() + config.seconds)
    for outcome in served:
        if outcome.reply.code != "ok":
            violations.add(f"the good request after storm {index + 1} got {outcome.reply.code!r}", outcome.request_id)
    figures = {"streams": streams, "in_flight_back_to_0_ms": settled.waited_ms}
    return outcomes + served, figures


async def phase_storm(config: SoakConfig) -> PhaseReport:
    """b. Disconnect storms on an in-process server whose engine takes time per token."""
    violations = Violations()
    capacity = 4 * config.storm_streams + 64
    settings = in_process_settings(
        config,
        max_queue=capacity,
        decode_queue=capacity,
        http_max_connections=capacity,
        grpc_max_concurrent_rpcs=capacity,
    )
    outcomes: list[Outcome] = []
    rounds: list[dict[str, Any]] = []
    with captured_logs() as logs:
        async with in_process_server(settings, ScriptedEngine(token_delay_s=TOKEN_DELAY_S)) as (runtime, url, target):
            async with open_clients(url, target, None, capacity) as clients:
                for index in range(config.storm_rounds):
                    round_outcomes, figures = await storm_round(clients, config, index, violations)
                    outcomes += round_outcomes
                    rounds.append(figures)
    figures = {"rounds": rounds, "streams_per_round": 2 * config.storm_streams, "token_delay_s": TOKEN_DELAY_S}
    figures.update(nothing_held(runtime, violations))
    figures.update(account(outcomes, logs.entries, violations))
    figures["dropped_mid_stream"] = sum(o.result == "cancelled" for o in outcomes)
    return PhaseReport("storm", "b. disconnect storms", figures, by_kind(outcomes, storm_order()), violations.lines())


def fault_kinds(boxes: int, also: frozenset[str]) -> list[Kind]:
    """A good request over every transport, answering ``boxes`` boxes, that may also end in
    ``also`` (the fault's documented outcomes)."""
    return [replace(kind, expect=kind.expect | also) for kind in transport_kinds(boxes)]


def in_flight_at(outcomes: list[Outcome], moment: float) -> list[Outcome]:
    """The requests a client was waiting on at ``moment`` (sent, and not yet answered)."""
    return [o for o in outcomes if o.sent_at < moment < o.finished_at]


@dataclass
class FaultRun:
    """A load, the fault put on it, and how the server ended."""

    outcomes: list[Outcome]
    fault_at: float  # time.monotonic()
    status: int | None  # the server's exit status (None: it did not exit within its bound)
    exit_s: float  # from the fault to the exit


async def under_load(
    clients: Clients, kinds: list[Kind], prefix: str, config: SoakConfig, fault: Callable[[], Awaitable[int | None]]
) -> FaultRun:
    """Load on every transport; after ``fault_load_s``, ``fault`` (which returns once the server
    exited, with its status). Each client goes on until the server stops taking requests."""
    plan = load_plan(kinds, prefix, config.fault_requests)
    deadline = time.monotonic() + config.seconds
    load = asyncio.ensure_future(drive(clients, plan, config.concurrency, deadline, not_served))
    await asyncio.wait([load], timeout=config.fault_load_s)
    fault_at = time.monotonic()
    status = await fault()
    exit_s = time.monotonic() - fault_at
    return FaultRun(await load, fault_at, status, exit_s)


def fault_figures(run: FaultRun, moment: str) -> dict[str, Any]:
    """What became of the requests the clients were waiting on at the fault."""
    waiting = in_flight_at(run.outcomes, run.fault_at)
    return {
        "exit_status": run.status,
        "exit_s": round(run.exit_s, 2),
        f"sent_before_{moment}": sum(o.sent_at < run.fault_at for o in run.outcomes),
        f"in_flight_at_{moment}": len(waiting),
        f"in_flight_at_{moment}_outcomes": dict(Counter(o.result for o in waiting).most_common()),
    }


async def phase_sigterm(config: SoakConfig) -> PhaseReport:
    """c. SIGTERM to a loaded server process: it drains and exits 0 within its drain timeout."""
    violations = Violations()
    flags = ["--drain-timeout-s", str(config.drain_timeout_s)]
    server = await ServerProcess.start(flags, config.work_dir / "sigterm-server.log")
    kinds = fault_kinds(LONG_BOXES, frozenset({"cancelled"}))  # cut at the drain timeout: documented
    exit_limit = config.drain_timeout_s + EXIT_MARGIN_S

    async def terminate() -> int | None:
        server.terminate()
        return await server.wait_exit(exit_limit)

    try:
        async with open_clients(server.url, server.grpc_target, None, config.concurrency + 8) as clients:
            run = await under_load(clients, kinds, "c", config, terminate)
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()
    expect_equal(violations, "exit status after SIGTERM", run.status, 0)
    figures: dict[str, Any] = {"concurrency": config.concurrency, "drain_timeout_s": config.drain_timeout_s}
    figures.update(account(run.outcomes, server.log_entries(), violations))
    figures.update(fault_figures(run, "signal"))
    figures["cut_at_drain_timeout"] = sum(o.result == "cancelled" for o in run.outcomes)
    return PhaseReport("sigterm", "c. SIGTERM under load", figures, by_kind(run.outcomes, kinds), violations.lines())


async def wait_listening(logs: LogCapture, serving: asyncio.Task[int]) -> tuple[str, str]:
    """The URL and gRPC target an in-process ``serve`` logged (it binds port 0)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        ports = {e["msg"]: e["port"] for e in logs.entries if e.get("msg") in ("HTTP listening", "gRPC listening")}
        if len(ports) == 2:
            break
        if serving.done() or time.monotonic() > deadline:
            raise RuntimeError(
                f"the in-process server did not start: {serving.exception() if serving.done() else 'timeout'}"
            )
        await asyncio.sleep(0.02)
    url = f"http://{HOST}:{ports['HTTP listening']}"
    async with httpx.AsyncClient(timeout=5) as client:
        while (await client.get(f"{url}/ready")).status_code != 200:
            if time.monotonic() > deadline:
                raise RuntimeError("the in-process server did not become ready")
            await asyncio.sleep(0.02)
    return url, f"{HOST}:{ports['gRPC listening']}"


async def until_unready(clients: Clients, since: float) -> float | None:
    """Milliseconds from ``since`` until /ready answers 503 (None: not within the hang guard)."""
    while time.monotonic() - since < SETTLE_TIMEOUT_S:
        with contextlib.suppress(httpx.TransportError):
            if (await clients.http.get("/ready")).status_code == 503:
                return round((time.monotonic() - since) * 1000, 1)
        await asyncio.sleep(0.02)
    return None


async def phase_engine_kill(config: SoakConfig) -> PhaseReport:
    """d. The engine dies under load (in-process): engine_dead answers, then ``serve`` exits 1."""
    violations = Violations()
    engine = ScriptedEngine(token_delay_s=TOKEN_DELAY_S)
    settings = in_process_settings(config)
    runtime = Runtime(settings, engine=engine, model_label="scripted")
    kinds = fault_kinds(KILL_BOXES, frozenset({"engine_dead"}))
    unready_ms: float | None = None
    with captured_logs() as logs:
        serving = asyncio.ensure_future(serve(settings, runtime))

        async def kill() -> int | None:
            nonlocal unready_ms
            engine.fail(KILL_REASON)
            unready_ms = await until_unready(clients, time.monotonic())
            await asyncio.wait([serving], timeout=config.engine_failure_exit_s + config.drain_timeout_s + EXIT_MARGIN_S)
            return serving.result() if serving.done() else None

        try:
            url, target = await wait_listening(logs, serving)
            async with open_clients(url, target, None, config.concurrency + 8) as clients:
                run = await under_load(clients, kinds, "d", config, kill)
        finally:
            if not serving.done():
                serving.cancel()
    expect_equal(violations, "serve() exit status", run.status, EXIT_FATAL)
    if unready_ms is None:
        violations.add("/ready did not turn 503 after the engine died")
    figures: dict[str, Any] = {"concurrency": config.concurrency, "engine_failure_exit_s": config.engine_failure_exit_s}
    figures.update(account(run.outcomes, logs.entries, violations, expected_error=KILL_REASON))
    figures.update(fault_figures(run, "kill"), unready_after_ms=unready_ms)
    figures.update(nothing_held(runtime, violations))
    for outcome in run.outcomes:
        if outcome.sent_at > run.fault_at and outcome.result == "ok":
            violations.add("a request sent after the engine died got a result", outcome.request_id)
    return PhaseReport(
        "engine_kill", "d. engine killed under load", figures, by_kind(run.outcomes, kinds), violations.lines()
    )


def nothing_held(runtime: Runtime, violations: Violations) -> dict[str, Any]:
    """After an in-process server exited: nothing in flight or queued, by the service's own
    count and by its gauges."""
    gauges = metric_values(runtime.service.metrics.exposition().decode())
    figures = {
        "in_flight_end": gauges.get("rexomni_in_flight_requests"),
        "queue_depth_end": gauges.get("rexomni_queue_depth"),
    }
    expect_equal(violations, "requests the service holds after exit", runtime.service.in_flight, 0)
    expect_equal(violations, "in-flight gauge after exit", figures["in_flight_end"], 0.0)
    expect_equal(violations, "queue depth gauge after exit", figures["queue_depth_end"], 0.0)
    return figures


PHASES: dict[str, Callable[[SoakConfig], Awaitable[PhaseReport]]] = {
    "mixed": phase_mixed,
    "storm": phase_storm,
    "sigterm": phase_sigterm,
    "engine_kill": phase_engine_kill,
}


# ---- report -----------------------------------------------------------------------------------
def print_phase(report: PhaseReport) -> None:
    print(f"\n== {report.title} ==")
    width = max([len(name) for name in report.kinds] + [4])
    print(f"{'kind':<{width}} {'sent':>6}  outcomes (the server's logged status, else what the client saw)")
    for name, counts in report.kinds.items():
        cells = ", ".join(f"{outcome} {n}" for outcome, n in counts.items())
        print(f"{name:<{width}} {sum(counts.values()):>6}  {cells}")
    for key, value in report.figures.items():
        print(f"  {key}: {value}")
    print("  PASS" if report.passed else "  FAIL:\n    " + "\n    ".join(report.violations))


def print_summary(reports: list[PhaseReport]) -> None:
    print("\n== summary ==")
    columns = ("requests", "answered", "logged once", "not accepted", "hung", "5xx", "verdict")
    print(f"{'phase':<30} " + " ".join(f"{c:>12}" for c in columns))
    for r in reports:
        f = r.figures
        cells = (
            f["requests"],
            f["answered"],
            f["answered_logged_once"],
            f["not_accepted"],
            f["hung"],
            f["server_errors"],
        )
        print(f"{r.title:<30} " + " ".join(f"{c:>12}" for c in cells) + f" {'PASS' if r.passed else 'FAIL':>12}")


def machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "python": sys.version.split()[0], "platform": sys.platform}


async def run(config: SoakConfig, phases: list[str]) -> list[PhaseReport]:
    reports = []
    for name in phases:
        report = await PHASES[name](config)
        print_phase(report)
        reports.append(report)
    return reports


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = SoakConfig()
    ap.add_argument("--requests", type=int, default=defaults.requests, help="mixed-load requests")
    ap.add_argument("--seconds", type=float, default=defaults.seconds, help="time limit of each phase's load")
    ap.add_argument("--concurrency", type=int, default=defaults.concurrency)
    ap.add_argument("--storm-streams", type=int, default=defaults.storm_streams, help="per transport and storm")
    ap.add_argument("--storm-rounds", type=int, default=defaults.storm_rounds)
    ap.add_argument("--seed", type=int, default=defaults.seed)
    ap.add_argument("--phases", nargs="+", choices=list(PHASES), default=list(PHASES))
    ap.add_argument("--out", type=Path, default=defaults.work_dir)
    args = ap.parse_args()
    config = SoakConfig(
        requests=args.requests,
        seconds=args.seconds,
        concurrency=args.concurrency,
        storm_streams=args.storm_streams,
        storm_rounds=args.storm_rounds,
        seed=args.seed,
        work_dir=args.out,
    )
    started = time.monotonic()
    reports = asyncio.run(run(config, args.phases))
    print_summary(reports)
    payload = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "config": {**vars(args), "out": str(args.out)},
        "wall_s": round(time.monotonic() - started, 1),
        "phases": {r.name: r.as_json() for r in reports},
    }
    write_json(args.out / "soak.json", payload)
    print(f"\nwrote {args.out / 'soak.json'} (server logs alongside); {payload['wall_s']} s")
    sys.exit(0 if all(r.passed for r in reports) else 1)


if __name__ == "__main__":
    main()
