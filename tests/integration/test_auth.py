"""API keys on real HTTP (uvicorn) and gRPC servers: detection needs a key, probes and
metrics stay open, refusals are counted, and the clients and CLI send the key."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rexomni_client.cli import main as client_main
from rexomni_client.grpc import RexOmniGrpcClient
from rexomni_client.http import RexOmniClient
from rexomni_server.auth import ApiKeys
from rexomni_server.engines.scripted import ScriptedEngine
from rexomni_server.errors import Unauthenticated
from rexomni_server.runtime import Runtime
from rexomni_server.serve import start_servers
from rexomni_server.settings import Settings
from tests.support import image_bytes

OUTPUT = "<|object_ref_start|>cat<|object_ref_end|><|box_start|><0><0><999><999><|box_end|>"
PNG = image_bytes(64, 48)
BODY = {"image": base64.b64encode(PNG).decode(), "categories": ["cat"]}


@pytest.fixture(scope="module")
async def keyed(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[Runtime, str, str]]:
    key_file = tmp_path_factory.mktemp("secrets") / "keys"
    key_file.write_text("file-key\n\n")
    settings = Settings(model="scripted", engine="scripted", api_keys=" alpha-key,beta-key ", api_keys_file=key_file)
    runtime = Runtime(settings, engine=ScriptedEngine(default_output=OUTPUT))
    await runtime.engine.start()
    servers = await start_servers(runtime, "127.0.0.1", 0, 0)
    yield runtime, f"http://127.0.0.1:{servers.http_port}", f"127.0.0.1:{servers.grpc_port}"
    await servers.stop(0)
    await runtime.stop()


def test_keys_come_from_both_settings_and_are_checked() -> None:
    keys = ApiKeys.from_settings(Settings(api_keys="a, b"))
    keys.check("Bearer a", None)
    keys.check("bearer  b ", None)  # scheme case and spacing do not matter
    keys.check(None, "a")
    for authorization, api_key, message in [
        (None, None, "required"),
        ("Basic a", None, "required"),
        ("Bearer c", None, "not valid"),
        (None, "ab", "not valid"),
    ]:
        with pytest.raises(Unauthenticated, match=message):
            keys.check(authorization, api_key)
    ApiKeys.from_settings(Settings()).check(None, None)  # no keys: open


def test_an_unreadable_or_empty_key_file_stops_the_start(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="No such file"):
        ApiKeys.from_settings(Settings(api_keys_file=tmp_path / "missing"))
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="holds no key"):
        ApiKeys.from_settings(Settings(api_keys_file=tmp_path / "empty"))


async def test_http_detection_needs_a_key_and_probes_do_not(keyed: tuple[Runtime, str, str]) -> None:
    runtime, url, _ = keyed
    async with httpx.AsyncClient(base_url=url) as client:
        for path in ("/v1/detect", "/v1/detect/stream"):
            missing = await client.post(path, json=BODY)
            assert missing.status_code == 401, path
            assert missing.json()["error"]["code"] == "unauthenticated"
            assert missing.headers["www-authenticate"] == "Bearer" and missing.headers["x-request-id"]
        wrong = await client.post("/v1/detect", json=BODY, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and "not valid" in wrong.json()["error"]["message"]
        # The key is checked before the body is read: an oversized body without one is a 401, not a 413.
        huge = await client.post("/detect", content=b"x" * (40 << 20), headers={"content-type": "multipart/form-data"})
        assert huge.status_code == 401
        for headers in ({"Authorization": "Bearer alpha-key"}, {"x-api-key": "beta-key"}, {"x-api-key": "file-key"}):
            ok = await client.post("/v1/detect", json=BODY, headers=headers)
            assert ok.status_code == 200 and ok.json()["detections"][0]["label"] == "cat"
        for path in ("/health", "/ready", "/metrics", "/v1/tasks", "/docs", "/openapi.json"):
            assert (await client.get(path)).status_code == 200, path
        # Deny by default: any other path needs the key before anything else is said about it.
        assert (await client.get("/v1/nothing-here")).status_code == 401
        assert (await client.get("/v1/nothing-here", headers={"x-api-key": "alpha-key"})).status_code == 404
        metrics = (await client.get("/metrics")).text
    assert 'rexomni_requests_total{status="unauthenticated",task="unknown",transport="http"} 4.0' in metrics
    assert runtime.service.in_flight == 0


async def test_grpc_detection_needs_a_key_and_health_does_not(keyed: tuple[Runtime, str, str]) -> None:
    _, _, target = keyed

    def detect(api_key: str | None) -> str:
        with RexOmniGrpcClient(target, api_key=api_key) as client:
            return client.detect(PNG, "detection", ["cat"]).detections[0].label

    for api_key in (None, "wrong"):
        with pytest.raises(grpc.RpcError) as refused:
            await asyncio.to_thread(detect, api_key)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
    assert await asyncio.to_thread(detect, "alpha-key") == "cat"
    async with grpc.aio.insecure_channel(target) as channel:
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
    assert health.status == health_pb2.HealthCheckResponse.SERVING


async def test_clients_and_cli_send_the_key(
    keyed: tuple[Runtime, str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _, url, _ = keyed

    def http_detect() -> list[object]:
        with RexOmniClient(url, api_key="beta-key") as client:
            return [item for item in client.detect_stream(PNG, "detection", ["cat"])]

    assert len(await asyncio.to_thread(http_detect)) == 2  # the detection, then the result
    image = tmp_path / "cat.png"
    image.write_bytes(PNG)
    assert await asyncio.to_thread(client_main, ["--url", url, "detect", str(image), "--categories", "cat"]) == 1
    assert "401 unauthenticated" in capsys.readouterr().err
    monkeypatch.setenv("REXOMNI_API_KEY", "file-key")
    assert await asyncio.to_thread(client_main, ["--url", url, "detect", str(image), "--categories", "cat"]) == 0
    assert json.loads(capsys.readouterr().out)["detections"][0]["label"] == "cat"


async def test_openapi_declares_the_key_where_it_is_needed(keyed: tuple[Runtime, str, str]) -> None:
    _, url, _ = keyed
    async with httpx.AsyncClient(base_url=url) as client:
        schema = (await client.get("/openapi.json")).json()
    assert set(schema["components"]["securitySchemes"]) == {"bearer", "apiKeyHeader", "basic"}
    assert schema["paths"]["/v1/detect"]["post"]["security"] == [{"bearer": []}, {"apiKeyHeader": []}, {"basic": []}]
    assert "security" not in schema["paths"]["/health"]["get"]


def test_open_paths_are_matched_below_a_proxy_prefix() -> None:
    from rexomni_server.app import route_path

    assert route_path({"path": "/api/health", "root_path": "/api"}) == "/health"
    assert route_path({"path": "/v1/detect", "root_path": ""}) == "/v1/detect"
    assert route_path({"path": "/health-not", "root_path": "/api"}) == "/health-not"


async def test_http_basic_with_the_key_as_the_password_is_a_key(keyed: tuple[Runtime, str, str]) -> None:
    _, url, _ = keyed
    async with httpx.AsyncClient(base_url=url) as client:
        right = await client.post("/v1/detect", json=BODY, auth=("any-user", "file-key"))
        wrong = await client.post("/v1/detect", json=BODY, auth=("any-user", "not-the-key"))
        garbled = await client.post("/v1/detect", json=BODY, headers={"authorization": "Basic %%%"})
    assert right.status_code == 200
    assert wrong.status_code == 401 and garbled.status_code == 401
