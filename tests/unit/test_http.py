"""The HTTP transport on the scripted engine: wire format, error table, ops endpoints."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator

import httpx
import pytest

from rexomni_server.app import create_app
from rexomni_server.engines.base import EngineEvent, EngineRequest
from rexomni_server.engines.scripted import ScriptedEngine
from rexomni_server.runtime import Runtime
from rexomni_server.settings import Settings
from rexomni_server.tasks import TASKS
from tests.support import image_bytes

OUTPUT = "<|object_ref_start|>cat<|object_ref_end|><|box_start|><0><0><999><999><|box_end|>"
PNG = image_bytes(999, 999)
B64 = base64.b64encode(PNG).decode()


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    engine = ScriptedEngine(default_output=OUTPUT)
    await engine.start()
    settings = Settings(allow_forced_output=True, max_image_bytes=200_000)
    app = create_app(runtime=Runtime(settings, engine=engine, model_label="scripted"))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
        yield c


async def test_json_detect(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/detect", json={"image": B64, "categories": ["cat"]})
    assert r.status_code == 200
    body = r.json()
    assert body["detections"] == [{"label": "cat", "type": "box", "box": [0.0, 0.0, 999.0, 999.0], "score": None}]
    assert body["image"] == {"width": 999, "height": 999, "resized_width": 1008, "resized_height": 1008}
    assert body["request_id"] == r.headers["x-request-id"]


async def test_multipart_detect_with_options_and_request_id(client: httpx.AsyncClient) -> None:
    forced = "<|object_ref_start|>a<|object_ref_end|><|box_start|><500><500><|box_end|>"
    r = await client.post(
        "/detect",
        files={"image": ("x.png", PNG, "image/png")},
        data={"task": "pointing", "categories": "a, b", "options": f'{{"forced_output": "{forced}"}}'},
        headers={"X-Request-ID": "abc-123"},
    )
    assert r.status_code == 200, r.text
    assert r.headers["x-request-id"] == "abc-123" and r.json()["request_id"] == "abc-123"
    assert r.json()["detections"][0]["point"] == [500 / 999 * 999, 500 / 999 * 999]


async def test_multipart_visual_prompt(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/detect",
        files={"image": ("x.png", PNG, "image/png")},
        data={"task": "visual_prompting", "visual_prompt_boxes": "[[10, 10, 100, 100]]"},
    )
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    ("path", "kwargs", "status", "code"),
    [
        ("/v1/detect", {"json": {"image": "%%%", "categories": ["a"]}}, 400, "invalid_image"),
        (
            "/v1/detect",
            {"json": {"image": base64.b64encode(b"nope").decode(), "categories": ["a"]}},
            400,
            "invalid_image",
        ),
        ("/v1/detect", {"json": {"image": B64}}, 422, "invalid_request"),
        ("/v1/detect", {"json": {"image": B64, "categories": ["a"], "task": "x"}}, 422, "invalid_request"),
        (
            "/v1/detect",
            {"content": b"{not json", "headers": {"content-type": "application/json"}},
            422,
            "invalid_request",
        ),
        (
            "/v1/detect",
            {"json": {"image": B64, "categories": ["a"], "options": {"max_new_tokens": 99999}}},
            422,
            "invalid_request",
        ),
        (
            "/v1/detect",
            {"json": {"image": base64.b64encode(image_bytes(600, 600, "ICO")).decode(), "categories": ["a"]}},
            415,
            "unsupported_image_format",
        ),
        (
            "/v1/detect",
            {"json": {"image": base64.b64encode(b"x" * 300_000).decode(), "categories": ["a"]}},
            413,
            "image_too_large",
        ),
        (
            "/detect",
            {"files": {"image": ("x", b"x" * 300_000)}, "data": {"categories": "a"}},
            413,
            "image_too_large",
        ),
        ("/detect", {"data": {"categories": "a"}}, 422, "invalid_request"),
        (
            "/detect",
            {"files": {"image": ("x", PNG)}, "data": {"categories": "a", "visual_prompt_boxes": "[["}},
            422,
            "invalid_request",
        ),
        (
            "/detect",
            {"files": {"image": ("x", PNG)}, "data": {"categories": "a", "options": '{"zzz": 1}'}},
            422,
            "invalid_request",
        ),
    ],
)
async def test_bad_input_gets_a_clear_4xx_and_the_server_keeps_serving(
    client: httpx.AsyncClient, path: str, kwargs: dict[str, object], status: int, code: str
) -> None:
    r = await client.post(path, **kwargs)  # type: ignore[arg-type]
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code and r.json()["error"]["message"]
    ok = await client.post("/v1/detect", json={"image": B64, "categories": ["cat"]})
    assert ok.status_code == 200


async def test_health_ready_and_tasks(client: httpx.AsyncClient) -> None:
    health = (await client.get("/health")).json()
    assert health["ready"] is True and health["engine"] == "scripted"
    assert (await client.get("/ready")).status_code == 200
    tasks = (await client.get("/v1/tasks")).json()
    assert {t["name"] for t in tasks["tasks"]} == {t.value for t in TASKS}
    assert len(tasks["keypoint_sets"]["person"]) == 17
    schema = (await client.get("/openapi.json")).json()
    assert schema["paths"]["/v1/detect"]
    assert "securitySchemes" not in schema["components"]  # no keys configured: nothing to send


async def test_not_ready_is_503_with_retry_after() -> None:
    engine = ScriptedEngine()  # never started
    app = create_app(runtime=Runtime(Settings(), engine=engine, model_label="x"))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        assert (await c.get("/ready")).status_code == 503
        r = await c.post("/v1/detect", json={"image": B64, "categories": ["a"]})
        assert r.status_code == 503 and r.headers["retry-after"] == "5"
        assert r.json()["error"]["code"] == "engine_not_ready"


async def test_oversized_bodies_are_refused_before_being_read(client: httpx.AsyncClient) -> None:
    # max_image_bytes 200_000 in this fixture: the body limit is ~1.3 MB (base64 + fields).
    huge = b"x" * 2_000_000
    r = await client.post("/v1/detect", content=huge, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "image_too_large"
    assert r.headers["x-request-id"]

    async def chunks():  # no Content-Length: counted as it streams
        for _ in range(40):
            yield b"y" * 50_000

    r = await client.post("/v1/detect", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    ok = await client.post("/v1/detect", json={"image": B64, "categories": ["cat"]})
    assert ok.status_code == 200


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("options", '{"max_new_tokens": ' + "9" * 5000 + "}"),  # int() refuses 4300+ digits
        ("options", "[" * 100_000),  # deeper than the JSON decoder recurses
        ("visual_prompt_boxes", "[" * 100_000),
    ],
)
async def test_multipart_json_fields_the_decoder_chokes_on_are_422s(
    client: httpx.AsyncClient, field: str, value: str
) -> None:
    r = await client.post("/detect", files={"image": ("x.png", PNG)}, data={"categories": "cat", field: value})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "invalid_request" and field in r.json()["error"]["message"]
    assert r.headers["x-request-id"] == r.json()["error"]["request_id"]


async def test_multipart_refuses_unknown_and_repeated_fields_like_json_does(client: httpx.AsyncClient) -> None:
    misspelt = await client.post(
        "/detect", files={"image": ("x.png", PNG)}, data={"categories": "cat", "option": '{"max_new_tokens": 3}'}
    )
    assert misspelt.status_code == 422 and "'option'" in misspelt.json()["error"]["message"]
    twice = await client.post(
        "/detect", files=[("image", ("x.png", PNG)), ("categories", (None, "cat")), ("categories", (None, "dog"))]
    )
    assert twice.status_code == 422 and "'categories'" in twice.json()["error"]["message"]
    ok = await client.post("/detect", files={"image": ("x.png", PNG)}, data={"categories": "cat"})
    assert ok.status_code == 200, ok.text


async def test_framework_refusals_use_the_documented_error_body(client: httpx.AsyncClient) -> None:
    bad_utf8 = b'{"image": "\xff\xfe"}'
    cases = [
        (await client.get("/nowhere"), 404, "not_found"),
        (await client.get("/v1/detect"), 405, "method_not_allowed"),
        (await client.post("/detect", content=b"x", headers={"content-type": "multipart/form-data"}), 400, None),
        (await client.post("/v1/detect", content=bad_utf8, headers={"content-type": "application/json"}), 400, None),
    ]
    for response, status, code in cases:
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert error["message"] and error["request_id"] == response.headers["x-request-id"]
        assert error["code"] == (code or "invalid_request")
    assert cases[1][0].headers["allow"] == "POST"
    # Refused detect requests are counted like those our own validation refuses (not /nowhere).
    counted = [
        line for line in (await client.get("/metrics")).text.splitlines() if line.startswith("rexomni_requests_total{")
    ]
    assert sorted(counted) == [
        'rexomni_requests_total{status="invalid_request",task="unknown",transport="http"} 2.0',
        'rexomni_requests_total{status="method_not_allowed",task="unknown",transport="http"} 1.0',
    ]


async def test_line_wrapped_base64_is_accepted(client: httpx.AsyncClient) -> None:
    wrapped = base64.encodebytes(PNG).decode()  # a newline every 76 characters
    assert "\n" in wrapped.strip()
    r = await client.post("/v1/detect", json={"image": wrapped, "categories": ["cat"]})
    assert r.status_code == 200, r.text


class FailingEngine(ScriptedEngine):
    """Fails the way a bug would: a plain exception after the generation started."""

    async def stream(self, request: EngineRequest) -> AsyncIterator[EngineEvent]:
        yield EngineEvent(started=True, prompt_tokens=10)
        raise RuntimeError("CUDA error: an illegal memory access was encountered")


async def test_an_engine_failure_is_a_500_with_the_request_id_and_the_server_goes_on() -> None:
    engine = FailingEngine()
    await engine.start()
    app = create_app(runtime=Runtime(Settings(), engine=engine, model_label="failing"))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        unary = await client.post("/v1/detect", json={"image": B64, "categories": ["cat"]})
        assert unary.status_code == 500, unary.text
        error = unary.json()["error"]
        assert error["code"] == "engine_failure" and error["request_id"] in error["message"]
        async with client.stream("POST", "/v1/detect/stream", json={"image": B64, "categories": ["cat"]}) as stream:
            assert stream.status_code == 200  # accepted: the failure comes as an event
            body = "".join([chunk async for chunk in stream.aiter_text()])
        assert "event: error" in body and '"status": 500' in body and "engine_failure" in body
        health = await client.get("/health")
        assert health.status_code == 200


class UnloadableEngine(ScriptedEngine):
    async def start(self) -> None:
        raise FileNotFoundError("no checkpoint at /models/missing")


async def test_a_model_that_fails_to_load_is_reported_not_hidden() -> None:
    runtime = Runtime(Settings(), engine=UnloadableEngine(), model_label="missing")
    runtime.start_background()
    await asyncio.sleep(0.05)  # the background start has failed by now
    app = create_app(runtime=runtime)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        health = (await client.get("/health")).json()
        ready = await client.get("/ready")
        detect = await client.post("/v1/detect", json={"image": B64, "categories": ["cat"]})
    assert health["ready"] is False and "FileNotFoundError: no checkpoint" in health["error"]
    assert ready.status_code == 503 and "no checkpoint" in ready.json()["error"]
    assert detect.status_code == 503 and detect.json()["error"]["code"] == "engine_not_ready"


async def test_sse_sends_keep_alive_comments_while_the_model_thinks(monkeypatch: pytest.MonkeyPatch) -> None:
    import rexomni_server.transport.http as http_transport

    monkeypatch.setattr(http_transport, "SSE_PING_S", 0.1)
    engine = ScriptedEngine(default_output=OUTPUT, token_delay_s=0.05)  # ~2 s of output
    await engine.start()
    app = create_app(runtime=Runtime(Settings(), engine=engine, model_label="slow"))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        async with client.stream("POST", "/v1/detect/stream", json={"image": B64, "categories": ["cat"]}) as stream:
            lines = [line async for line in stream.aiter_lines()]
    assert any(line.startswith(":") for line in lines)  # comments: ignored by SSE clients, keep proxies open
    assert "event: done" in lines


async def test_a_body_of_millions_of_values_is_refused_before_it_is_parsed(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rexomni_server.schemas import DetectRequest
    from rexomni_server.transport.http import MAX_JSON_SEPARATORS

    def never(*args: object, **kwargs: object) -> object:
        raise AssertionError("the body was parsed")

    values = json.dumps({"image": B64, "categories": [1] * (MAX_JSON_SEPARATORS + 1)}, separators=(",", ":"))
    with monkeypatch.context() as patched:
        patched.setattr(DetectRequest, "model_validate_json", never)
        refused = await client.post("/v1/detect", content=values, headers={"content-type": "application/json"})
    assert refused.status_code == 422 and "JSON values" in refused.json()["error"]["message"]
    # A forced output full of commas is text, not values: still within the count.
    commas = {"image": B64, "categories": ["a"], "options": {"forced_output": "," * 200_000}}
    assert (await client.post("/v1/detect", json=commas)).status_code != 422
