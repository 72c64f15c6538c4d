"""Every detect request is logged and counted exactly once, whatever answers it: the key check,
the body guard, validation, the image decoder, the service, or a finished generation."""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import AsyncIterator

import httpx
import pytest

from rexomni_server.accounting import RequestRecord, recording
from rexomni_server.app import create_app
from rexomni_server.engines.scripted import ScriptedEngine
from rexomni_server.errors import Overloaded
from rexomni_server.runtime import Runtime
from rexomni_server.settings import Settings
from tests.support import image_bytes

KEY = {"authorization": "Bearer secret"}
PNG = image_bytes(64, 48)
B64 = base64.b64encode(PNG).decode()
OUTPUT = "<|object_ref_start|>cat<|object_ref_end|><|box_start|><0><0><9><9><|box_end|>"


@pytest.fixture
async def served() -> AsyncIterator[tuple[httpx.AsyncClient, Runtime]]:
    engine = ScriptedEngine(default_output=OUTPUT)
    await engine.start()
    settings = Settings(api_keys="secret", max_image_bytes=100_000)
    runtime = Runtime(settings, engine=engine, model_label="scripted")
    app = create_app(runtime=runtime)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        yield client, runtime


async def chunks(data: bytes) -> AsyncIterator[bytes]:
    for start in range(0, len(data), 65536):
        yield data[start : start + 65536]


@pytest.mark.parametrize(
    ("send", "status", "logged"),
    [
        (lambda c: c.post("/v1/detect", json={"image": B64, "categories": ["cat"]}), 401, "unauthenticated"),
        (
            lambda c: c.post(
                "/v1/detect", content=b"{" * 2_000_000, headers={**KEY, "content-type": "application/json"}
            ),
            413,
            "image_too_large",
        ),
        (  # no Content-Length: refused while it streams in
            lambda c: c.post("/v1/detect", content=chunks(b"{" * 2_000_000), headers=KEY),
            413,
            "image_too_large",
        ),
        (lambda c: c.post("/v1/detect", json={"image": B64}, headers=KEY), 422, "invalid_request"),
        (lambda c: c.post("/v1/detect", content=b"\xff{", headers=KEY), 400, "invalid_request"),
        (
            lambda c: c.post("/v1/detect", json={"image": "aGVsbG8=", "categories": ["cat"]}, headers=KEY),
            400,
            "invalid_image",
        ),
        (
            lambda c: c.post("/detect", files={"image": ("x.png", PNG)}, data={"zzz": "1"}, headers=KEY),
            422,
            "invalid_request",
        ),
        (lambda c: c.post("/v1/detect", json={"image": B64, "categories": ["cat"]}, headers=KEY), 200, "ok"),
        (lambda c: c.post("/v1/detect/stream", json={"image": B64, "categories": ["cat"]}, headers=KEY), 200, "ok"),
        (
            lambda c: c.post("/detect", files={"image": ("x.png", PNG)}, data={"categories": "cat"}, headers=KEY),
            200,
            "ok",
        ),
    ],
)
async def test_each_request_is_logged_and_counted_once(
    served: tuple[httpx.AsyncClient, Runtime],
    caplog: pytest.LogCaptureFixture,
    send: object,
    status: int,
    logged: str,
) -> None:
    client, runtime = served
    caplog.set_level("INFO", logger="rexomni.requests")
    response = await send(client)  # type: ignore[operator]
    assert response.status_code == status, response.text
    lines = [getattr(r, "fields", {}) for r in caplog.records if r.name == "rexomni.requests"]
    assert [line["status"] for line in lines] == [logged]
    assert lines[0]["request_id"] == response.headers["x-request-id"] and lines[0]["transport"] == "http"
    samples = [
        (s.labels["status"], s.value)
        for family in runtime.service.metrics.registry.collect()
        if family.name == "rexomni_requests"
        for s in family.samples
        if s.name == "rexomni_requests_total"
    ]
    assert samples == [(logged, 1.0)]


async def test_probes_and_unknown_paths_are_not_counted_as_detect_requests(
    served: tuple[httpx.AsyncClient, Runtime], caplog: pytest.LogCaptureFixture
) -> None:
    client, _ = served
    caplog.set_level("INFO", logger="rexomni.requests")
    for path in ("/health", "/ready", "/metrics", "/nowhere"):
        await client.get(path)
    assert not [r for r in caplog.records if r.name == "rexomni.requests"]


async def test_a_client_that_leaves_mid_body_is_cancelled_not_an_error(
    served: tuple[httpx.AsyncClient, Runtime], caplog: pytest.LogCaptureFixture
) -> None:
    _, runtime = served
    caplog.set_level("INFO")
    app = create_app(runtime=runtime)
    headers = [(b"content-type", b"application/json"), (b"content-length", b"100000"), (b"x-api-key", b"secret")]
    scope = {"type": "http", "method": "POST", "path": "/v1/detect", "headers": headers, "query_string": b""}
    scope |= {"asgi": {"version": "3.0"}, "http_version": "1.1", "scheme": "http", "root_path": ""}
    scope |= {"raw_path": b"/v1/detect", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    messages = iter([{"type": "http.request", "body": b'{"image": "', "more_body": True}])

    async def receive() -> dict[str, object]:
        return next(messages, {"type": "http.disconnect"})

    async def send(message: dict[str, object]) -> None:
        pass

    await app(scope, receive, send)
    lines = [getattr(r, "fields", {}) for r in caplog.records if r.name == "rexomni.requests"]
    assert [line["status"] for line in lines] == ["cancelled"]
    assert not [r for r in caplog.records if r.levelname == "ERROR"]  # no traceback: nothing failed


@pytest.mark.parametrize(
    ("raised", "status"),
    [
        (None, "ok"),
        (asyncio.CancelledError(), "cancelled"),
        (GeneratorExit(), "cancelled"),
        (TimeoutError(), "timeout"),
        (Overloaded("full"), "overloaded"),
        (KeyError("bug"), "internal"),
    ],
)
def test_recording_names_how_a_request_ended(raised: BaseException | None, status: str) -> None:
    record = RequestRecord("r", "python")
    with contextlib.suppress(BaseException), recording(record):
        if raised is not None:
            raise raised
    assert record.status == status


def test_recording_keeps_the_first_word() -> None:
    record = RequestRecord("r", "python")
    record.fail("unauthenticated")
    with recording(record):
        pass
    assert record.status == "unauthenticated"
