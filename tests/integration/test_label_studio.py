"""The Label Studio ML backend end to end: Label Studio's calls (health, setup, predict,
webhook) against the app on a scripted engine, with images as data URIs and on a stand-in
Label Studio served over loopback (its tokens checked, uploads, local files, cloud storage)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import math
import threading
import time
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from rexomni_server.app import create_app
from rexomni_server.auth import ApiKeys
from rexomni_server.engines.base import EngineEvent, EngineRequest
from rexomni_server.engines.scripted import ScriptedEngine
from rexomni_server.errors import Unauthenticated
from rexomni_server.runtime import Runtime
from rexomni_server.settings import Settings
from rexomni_server.transport.label_studio import label_studio_router
from tests.support import LABEL_STUDIO_DETECTION_CONFIG, image_bytes, noise_png, phrase_group, wait_until

KEY = {"authorization": "Bearer secret"}
LEGACY_TOKEN = "9f8e7d6c5b4a39281706f5e4d3c2b1a098765432"
ACCESS_TOKEN = "access-token-from-refresh"

DETECTION_CONFIG = LABEL_STUDIO_DETECTION_CONFIG
POSE_CONFIG = """
<View>
  <Image name="image" value="$image"/>
  <RectangleLabels name="bbox" toName="image"><Label value="Person"/></RectangleLabels>
  <KeyPointLabels name="keypoints" toName="image">
    <Label value="nose"/><Label value="left_eye"/><Label value="right_eye"/>
  </KeyPointLabels>
</View>
"""
OCR_CONFIG = """
<View>
  <Image name="image" value="$ocr"/>
  <PolygonLabels name="label" toName="image"><Label value="Text"/></PolygonLabels>
  <TextArea name="transcription" toName="image" editable="true" perRegion="true" displayMode="region-list"/>
</View>
"""


CAR = phrase_group("Car", 100, 100, 500, 500)
POSE = (
    '```json\n{"person1": {"bbox": " <100> <100> <500> <900> ", "keypoints": {"nose": " <300> <200> ", '
    '"left eye": "unvisible", "right eye": " <320> <190> "}}}\n```'
)
TEXT = phrase_group("EXIT", 100, 100, 400, 100, 400, 300, 100, 300)
# What the engine answers, by a piece of the task text it is asked.
OUTPUTS = {"Detect Airplane, Car.": CAR, "detect each person": POSE, "polygon format": TEXT}
SCORE = 0.8  # every coordinate token's probability, so every detection's score


def percent(bin_index: int) -> float:
    return bin_index / 999 * 100


class PromptedEngine(ScriptedEngine):
    """The scripted engine answering by task text, and counting the generations it runs at once."""

    def __init__(self, token_delay_s: float = 0.0) -> None:
        super().__init__(default_output=CAR, token_delay_s=token_delay_s, coordinate_logprob=math.log(SCORE))
        self.active = 0
        self.peak = 0

    async def stream(self, request: EngineRequest) -> AsyncIterator[EngineEvent]:
        output = next((out for key, out in OUTPUTS.items() if key in request.task_text), None)
        if output is not None and request.forced_output is None:
            request = dataclasses.replace(request, forced_output=output)
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            async for event in super().stream(request):
                yield event
        finally:
            self.active -= 1


def jwt(payload: dict[str, object]) -> str:
    def part(value: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")

    return f"{part({'alg': 'HS256', 'typ': 'JWT'})}.{part(payload)}.c2lnbmF0dXJl"


PERSONAL_TOKEN = jwt({"token_type": "refresh", "exp": int(time.time()) + 3600})


class FakeLabelStudio:
    """A stand-in Label Studio on loopback: files that need its token, public files, redirects
    (cloud storage presigning), and the personal access token exchange. It records each request's
    path and Authorization header."""

    def __init__(self) -> None:
        self.private: dict[str, bytes] = {}  # path with query -> bytes, needs a token
        self.public: dict[str, bytes] = {}
        self.redirects: dict[str, str] = {}
        self.seen: list[tuple[str, str | None]] = []
        self.refreshes = 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(length) or b"{}")
                if self.path == "/api/token/refresh/" and body.get("refresh") == PERSONAL_TOKEN:
                    fake.refreshes += 1
                    self._send(200, json.dumps({"access": ACCESS_TOKEN}).encode(), {"Content-Type": "application/json"})
                else:
                    self._send(401, b'{"detail": "Token is invalid or expired"}')

            def do_GET(self) -> None:
                authorization = self.headers.get("Authorization")
                fake.seen.append((self.path, authorization))
                if self.path in fake.redirects:
                    self._send(302, headers={"Location": fake.redirects[self.path]})
                elif self.path in fake.public:
                    self._send(200, fake.public[self.path], {"Content-Type": "image/png"})
                elif self.path in fake.private:
                    if authorization in (f"Token {LEGACY_TOKEN}", f"Bearer {ACCESS_TOKEN}"):
                        self._send(200, fake.private[self.path], {"Content-Type": "image/png"})
                    else:
                        self._send(401, b'{"detail": "Authentication credentials were not provided."}')
                else:
                    self._send(404, b"not found")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    def authorizations(self, path: str) -> list[str | None]:
        return [auth for seen, auth in self.seen if seen == path]


@pytest.fixture(autouse=True)
def no_proxies(monkeypatch: pytest.MonkeyPatch) -> None:
    """Downloads go straight to loopback, whatever proxy the machine running the tests has."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)


@contextlib.contextmanager
def running(fake: FakeLabelStudio) -> Iterator[FakeLabelStudio]:
    fake.thread.start()
    try:
        yield fake
    finally:
        fake.server.shutdown()
        fake.server.server_close()


@pytest.fixture
def label_studio() -> Iterator[FakeLabelStudio]:
    with running(FakeLabelStudio()) as fake:
        yield fake


@pytest.fixture
def image_host() -> Iterator[FakeLabelStudio]:
    """Another origin, serving public images (an image on the web, not on Label Studio)."""
    with running(FakeLabelStudio()) as fake:
        yield fake


@contextlib.asynccontextmanager
async def serve(
    engine: ScriptedEngine | None = None, **settings: Any
) -> AsyncIterator[tuple[httpx.AsyncClient, Runtime]]:
    """The app as the server composes it, with the Label Studio routes included."""
    engine = engine or PromptedEngine()
    await engine.start()
    merged: dict[str, Any] = {"api_keys": "secret", "max_image_bytes": 200_000, **settings}
    runtime = Runtime(Settings(**merged), engine=engine, model_label="scripted")
    app = create_app(runtime=runtime)
    app.include_router(label_studio_router())
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test", headers=KEY, timeout=30) as client:
        yield client, runtime


def data_uri(width: int, height: int) -> str:
    return "data:image/png;base64," + base64.b64encode(image_bytes(width, height)).decode()


def predict_body(images: list[str], config: str = DETECTION_CONFIG, key: str = "image") -> dict[str, Any]:
    """A /predict body as Label Studio 1.x sends it (TaskSimpleSerializer's tasks)."""
    return {
        "tasks": [
            {
                "id": 100 + index,
                "data": {key: image},
                "meta": {},
                "created_at": "2024-05-02T10:00:00.000000Z",
                "updated_at": "2024-05-02T10:00:00.000000Z",
                "is_labeled": False,
                "overlap": 1,
                "inner_id": index + 1,
                "total_annotations": 0,
                "cancelled_annotations": 0,
                "total_predictions": 0,
                "project": 3,
                "updated_by": None,
                "file_upload": None,
            }
            for index, image in enumerate(images)
        ],
        "project": "3.1714644000",
        "label_config": config,
        "params": {"login": None, "password": None, "context": None},
    }


def requests_counted(runtime: Runtime, task: str, status: str) -> float:
    value = runtime.service.metrics.registry.get_sample_value(
        "rexomni_requests_total", {"task": task, "transport": "label-studio", "status": status}
    )
    return value or 0.0


# ---- health, setup, webhook ---------------------------------------------------------------------
async def test_health_says_up_with_the_model_class() -> None:
    async with serve() as (client, runtime):
        for path in ("/label-studio/health", "/label-studio/"):
            r = await client.get(path)
            assert (r.status_code, r.json()) == (200, {"status": "UP", "model_class": "RexOmni"})
        runtime.engine.fail("device lost")  # type: ignore[attr-defined]
        r = await client.get("/label-studio/health")
        assert r.status_code == 503
        assert r.json()["status"] == "DOWN" and "device lost" in r.json()["error"]


async def test_setup_checks_the_label_config_and_answers_the_model_version() -> None:
    async with serve() as (client, _):
        body = {
            "project": "3.1714644000",
            "schema": DETECTION_CONFIG,
            "hostname": "http://localhost:8080",
            "access_token": LEGACY_TOKEN,
            "extra_params": None,
        }
        r = await client.post("/label-studio/setup", json=body)
        assert (r.status_code, r.json()) == (200, {"model_version": "scripted", "warnings": []})
        bad = await client.post(
            "/label-studio/setup",
            json={**body, "schema": '<View><Image name="i" value="$image"/><Choices name="c" toName="i"/></View>'},
        )
        assert bad.status_code == 422
        error = bad.json()["error"]
        assert error["code"] == "invalid_request" and "nothing Rex-Omni can predict" in error["message"]
        broken = await client.post("/label-studio/setup", json={**body, "schema": "<View><Image"})
        assert broken.status_code == 422 and "not valid XML" in broken.json()["error"]["message"]
        checked = await client.post("/label-studio/validate", json={"config": DETECTION_CONFIG})
        assert (checked.status_code, checked.json()) == (200, {"status": "ok", "warnings": []})
        assert (await client.post("/label-studio/validate", json={"config": "<View/>"})).status_code == 422


async def test_training_events_are_acknowledged_and_ignored() -> None:
    async with serve() as (client, _):
        for path in ("/label-studio/webhook", "/label-studio/train"):
            r = await client.post(path, json={"action": "ANNOTATION_CREATED", "project": {"id": 3}})
            assert r.status_code == 200 and r.json()["status"] == "ignored"


# ---- predictions --------------------------------------------------------------------------------
async def test_predict_data_uri_gives_rectangles_in_percent() -> None:
    async with serve() as (client, runtime):
        r = await client.post("/label-studio/predict", json=predict_body([data_uri(640, 480)]))
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model_version"] == "scripted"
        (prediction,) = body["results"]
        assert prediction["model_version"] == "scripted"
        assert prediction["score"] == pytest.approx(SCORE)
        (region,) = prediction["result"]
        assert {k: v for k, v in region.items() if k not in ("value", "score")} == {
            "id": "r1",
            "from_name": "label",
            "to_name": "image",
            "type": "rectanglelabels",
            "original_width": 640,
            "original_height": 480,
            "image_rotation": 0,
        }
        assert region["score"] == pytest.approx(SCORE)
        value = region["value"]
        assert value["rectanglelabels"] == ["Car"] and value["rotation"] == 0
        expected = (percent(100), percent(100), percent(400), percent(400))
        assert (value["x"], value["y"], value["width"], value["height"]) == pytest.approx(expected)
        assert requests_counted(runtime, "detection", "ok") == 1


async def test_pose_config_gives_person_boxes_and_their_keypoints() -> None:
    async with serve() as (client, _):
        r = await client.post("/label-studio/predict", json=predict_body([data_uri(300, 200)], POSE_CONFIG))
        assert r.status_code == 200, r.text
        box, nose, right_eye = r.json()["results"][0]["result"]
        assert (box["type"], box["from_name"], box["value"]["rectanglelabels"]) == (
            "rectanglelabels",
            "bbox",
            ["Person"],
        )
        assert box["value"]["height"] == pytest.approx(percent(800))
        assert [nose["value"]["keypointlabels"], right_eye["value"]["keypointlabels"]] == [["nose"], ["right_eye"]]
        assert nose["parentID"] == right_eye["parentID"] == box["id"]
        assert (nose["value"]["x"], nose["value"]["y"]) == pytest.approx((percent(300), percent(200)))


async def test_ocr_polygons_carry_their_text() -> None:
    async with serve() as (client, _):
        r = await client.post("/label-studio/predict", json=predict_body([data_uri(400, 300)], OCR_CONFIG, key="ocr"))
        assert r.status_code == 200, r.text
        polygon, text = r.json()["results"][0]["result"]
        assert polygon["value"]["polygonlabels"] == ["Text"] and len(polygon["value"]["points"]) == 4
        assert (text["type"], text["id"], text["value"]["text"]) == ("textarea", polygon["id"], ["EXIT"])


async def test_tasks_of_a_call_run_concurrently_and_answer_in_order() -> None:
    engine = PromptedEngine(token_delay_s=0.01)
    sizes = [(100 + 20 * i, 80 + 10 * i) for i in range(6)]
    async with serve(engine) as (client, runtime):
        r = await client.post("/label-studio/predict", json=predict_body([data_uri(w, h) for w, h in sizes]))
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        assert len(results) == len(sizes)
        answered = [(p["result"][0]["original_width"], p["result"][0]["original_height"]) for p in results]
        assert answered == sizes
        assert engine.peak > 1  # not one after another
        assert requests_counted(runtime, "detection", "ok") == len(sizes)


async def test_a_task_whose_image_cannot_be_had_gets_an_empty_prediction(label_studio: FakeLabelStudio) -> None:
    label_studio.private["/data/upload/3/a.png"] = image_bytes(120, 90)
    label_studio.private["/data/upload/3/huge.png"] = noise_png(400, 400)  # over max_image_bytes
    images = ["/data/upload/3/a.png", "/data/upload/3/missing.png", "/data/upload/3/huge.png"]
    async with serve(label_studio_url=label_studio.url, label_studio_api_key=LEGACY_TOKEN) as (client, runtime):
        r = await client.post("/label-studio/predict", json=predict_body(images))
        assert r.status_code == 200, r.text
        good, missing, huge = r.json()["results"]
        assert good["result"][0]["original_width"] == 120
        assert missing["result"] == [] and "score" not in missing
        assert missing["error"]["code"] == "invalid_image" and "HTTP 404" in missing["error"]["message"]
        assert "/data/upload/3/missing.png" in missing["error"]["message"]
        assert huge["result"] == [] and huge["error"]["code"] == "image_too_large"
        assert requests_counted(runtime, "detection", "ok") == 1
        assert requests_counted(runtime, "detection", "invalid_image") == 1
        assert requests_counted(runtime, "detection", "image_too_large") == 1


async def test_label_studio_uploads_are_fetched_with_its_token(label_studio: FakeLabelStudio) -> None:
    label_studio.private["/data/upload/3/photo.png"] = image_bytes(200, 100)
    label_studio.private["/data/local-files/?d=images/cat.png"] = image_bytes(50, 40)
    label_studio.private["/storage-data/uploaded/?filepath=upload/3/cloud.png"] = image_bytes(60, 30)
    label_studio.redirects["/tasks/103/presign/?fileuri=s3%3A%2F%2Fbucket%2Fdog.png"] = (
        "/bucket/dog.png?X-Amz-Signature=a"
    )
    label_studio.public["/bucket/dog.png?X-Amz-Signature=a"] = image_bytes(70, 35)
    images = ["/data/upload/3/photo.png", "/data/local-files/?d=images/cat.png", "/data/upload/3/cloud.png"]
    images.append("s3://bucket/dog.png")
    async with serve(label_studio_url=label_studio.url + "/", label_studio_api_key=LEGACY_TOKEN) as (client, _):
        r = await client.post("/label-studio/predict", json=predict_body(images))
        assert r.status_code == 200, r.text
        widths = [p["result"][0]["original_width"] for p in r.json()["results"]]
        assert widths == [200, 50, 60, 70]
    token = f"Token {LEGACY_TOKEN}"
    assert label_studio.authorizations("/data/upload/3/photo.png") == [token]
    assert label_studio.authorizations("/data/local-files/?d=images/cat.png") == [token]
    # Uploads kept in a cloud bucket are served by the storage proxy: tried when /data/upload is 404.
    assert label_studio.authorizations("/data/upload/3/cloud.png") == [token]
    assert label_studio.authorizations("/storage-data/uploaded/?filepath=upload/3/cloud.png") == [token]


async def test_setup_tells_where_label_studio_is_and_its_token(label_studio: FakeLabelStudio) -> None:
    label_studio.private["/data/upload/3/photo.png"] = image_bytes(200, 100)
    async with serve() as (client, _):
        setup = {"project": "3.1714644000", "schema": DETECTION_CONFIG, "hostname": label_studio.url}
        r = await client.post("/label-studio/setup", json={**setup, "access_token": LEGACY_TOKEN})
        assert r.status_code == 200
        body = predict_body(["/data/upload/3/photo.png"])
        del body["label_config"]  # the project's, from its setup
        r = await client.post("/label-studio/predict", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["results"][0]["result"][0]["original_width"] == 200
    assert label_studio.authorizations("/data/upload/3/photo.png") == [f"Token {LEGACY_TOKEN}"]


async def test_a_personal_access_token_is_exchanged_once_for_an_access_token(label_studio: FakeLabelStudio) -> None:
    label_studio.private["/data/upload/3/a.png"] = image_bytes(64, 48)
    label_studio.private["/data/upload/3/b.png"] = image_bytes(48, 64)
    async with serve(label_studio_url=label_studio.url, label_studio_api_key=PERSONAL_TOKEN) as (client, _):
        for _ in range(2):
            r = await client.post(
                "/label-studio/predict", json=predict_body(["/data/upload/3/a.png", "/data/upload/3/b.png"])
            )
            assert r.status_code == 200, r.text
            assert all(p["result"] for p in r.json()["results"])
    assert label_studio.refreshes == 1
    assert set(label_studio.authorizations("/data/upload/3/a.png")) == {f"Bearer {ACCESS_TOKEN}"}


async def test_images_elsewhere_are_fetched_without_the_token(
    label_studio: FakeLabelStudio, image_host: FakeLabelStudio
) -> None:
    image_host.public["/photos/street.png"] = image_bytes(90, 60)
    async with serve(label_studio_url=label_studio.url, label_studio_api_key=LEGACY_TOKEN) as (client, _):
        r = await client.post("/label-studio/predict", json=predict_body([image_host.url + "/photos/street.png"]))
        assert r.status_code == 200, r.text
        assert r.json()["results"][0]["result"][0]["original_width"] == 90
    assert image_host.authorizations("/photos/street.png") == [None]


async def test_a_call_whose_every_image_fails_fails_with_the_reason(label_studio: FakeLabelStudio) -> None:
    label_studio.private["/data/upload/3/a.png"] = image_bytes(64, 48)
    async with serve(label_studio_url=label_studio.url, label_studio_api_key="not-the-token") as (client, runtime):
        r = await client.post("/label-studio/predict", json=predict_body(["/data/upload/3/a.png"]))
        assert r.status_code == 400
        error = r.json()["error"]
        assert error["code"] == "invalid_image"
        assert "HTTP 401" in error["message"] and "REXOMNI_LABEL_STUDIO_API_KEY" in error["message"]
        assert requests_counted(runtime, "detection", "invalid_image") == 1
    async with serve() as (client, _):  # no Label Studio URL known at all
        r = await client.post("/label-studio/predict", json=predict_body(["/data/upload/3/a.png"]))
        assert r.status_code == 400 and "REXOMNI_LABEL_STUDIO_URL" in r.json()["error"]["message"]


async def test_a_full_queue_refuses_the_call() -> None:
    engine = PromptedEngine(token_delay_s=0.05)
    async with serve(engine, max_queue=1) as (client, runtime):
        image = base64.b64encode(image_bytes(64, 48)).decode()
        busy = asyncio.create_task(client.post("/v1/detect", json={"image": image, "categories": ["car"]}))
        await wait_until(lambda: runtime.service.engine_requests == 1, what="the queue to fill")
        r = await client.post("/label-studio/predict", json=predict_body([data_uri(64, 48)]))
        assert r.status_code == 429 and r.json()["error"]["code"] == "overloaded"
        assert "retry-after" in r.headers
        assert (await busy).status_code == 200


async def test_bad_bodies_and_configs_are_refused() -> None:
    async with serve() as (client, _):
        r = await client.post("/label-studio/predict", json={"tasks": "all of them"})
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request"
        body = predict_body([data_uri(64, 48)], config="<View/>")
        r = await client.post("/label-studio/predict", json=body)
        assert r.status_code == 422 and "nothing Rex-Omni can predict" in r.json()["error"]["message"]
        del body["label_config"]
        r = await client.post("/label-studio/predict", json={**body, "project": "99.1"})
        assert r.status_code == 422 and "was not set up" in r.json()["error"]["message"]
        r = await client.post("/label-studio/predict", json={**predict_body([]), "tasks": []})
        assert (r.status_code, r.json()) == (200, {"results": [], "model_version": "scripted"})
        # JSON can carry lone surrogates (UTF-8 cannot): quoted back escaped, not a server error.
        lone = predict_body(["s3://bucket/\ud800.png"])
        lone["tasks"][0]["data"]["\udfff"] = "x"
        lone["tasks"][0]["id"] = "task-\ud800"
        r = await client.post(
            "/label-studio/predict", content=json.dumps(lone), headers={"content-type": "application/json"}
        )
        assert r.status_code == 400 and "REXOMNI_LABEL_STUDIO_URL" in r.json()["error"]["message"]
        del lone["tasks"][0]["data"]["image"]
        r = await client.post(
            "/label-studio/predict", content=json.dumps(lone), headers={"content-type": "application/json"}
        )
        assert r.status_code == 400 and "\\udfff" in r.json()["error"]["message"]
        r = await client.post(
            "/label-studio/setup",
            content=json.dumps({"schema": "<View>\ud800</View>"}),
            headers={"content-type": "application/json"},
        )
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request"


# ---- API keys -----------------------------------------------------------------------------------
async def test_api_keys_are_required() -> None:
    async with serve() as (client, _):
        for method, path in (
            ("GET", "/label-studio/health"),
            ("POST", "/label-studio/setup"),
            ("POST", "/label-studio/predict"),
        ):
            r = await client.request(method, path, headers={"authorization": ""}, json={})
            assert r.status_code == 401 and r.json()["error"]["code"] == "unauthenticated"
        r = await client.get("/label-studio/health", headers={"authorization": "", "x-api-key": "secret"})
        assert r.status_code == 200


def _basic_accepted() -> bool:
    try:
        ApiKeys((b"k",)).check("Basic " + base64.b64encode(b"label-studio:k").decode(), None)
    except Unauthenticated:
        return False
    return True


@pytest.mark.skipif(not _basic_accepted(), reason="API keys over HTTP Basic (Label Studio's auth) not accepted yet")
async def test_label_studio_basic_auth_carries_the_api_key() -> None:
    """Label Studio authenticates to ML backends with HTTP Basic only: the key is the password."""
    basic = "Basic " + base64.b64encode(b"label-studio:secret").decode()
    wrong = "Basic " + base64.b64encode(b"label-studio:guess").decode()
    async with serve() as (client, _):
        assert (await client.get("/label-studio/health", headers={"authorization": basic})).status_code == 200
        r = await client.post(
            "/label-studio/predict", json=predict_body([data_uri(64, 48)]), headers={"authorization": basic}
        )
        assert r.status_code == 200 and r.json()["results"][0]["result"]
        assert (await client.get("/label-studio/health", headers={"authorization": wrong})).status_code == 401
