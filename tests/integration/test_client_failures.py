"""The HTTP clients against a server that misbehaves on purpose (a raw TCP server answering
from a script): dropped connections, streams that break off, errors, answers that are not
results. Each answer is sent on its own connection, which is then closed."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from rexomni_client import AsyncRexOmniClient, RexOmniClient, RexOmniHTTPError
from rexomni_client.cli import main
from rexomni_server.schemas import BoxDetection, DetectResult
from tests.support import image_bytes

PNG = image_bytes(32, 32)
DETECTION = {"label": "cat", "type": "box", "box": [1.0, 2.0, 3.0, 4.0], "score": 0.9}
RESULT = {
    "request_id": "r1",
    "model": "fake",
    "task": "detection",
    "detections": [DETECTION],
    "image": {"width": 32, "height": 32, "resized_width": 56, "resized_height": 56},
    "truncated": False,
    "finish_reason": "stop",
    "skipped": 0,
    "usage": {"prompt_tokens": 1, "completion_tokens": 1},
    "timings": {"queue_ms": 0.0, "first_detection_ms": 1.0, "total_ms": 2.0},
}


def http(status: int, body: bytes, content_type: str = "application/json", **headers: str) -> bytes:
    head = [f"HTTP/1.1 {status} X", f"content-type: {content_type}", f"content-length: {len(body)}"]
    head += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    return ("\r\n".join([*head, "connection: close", "", ""])).encode() + body


def sse(*events: tuple[str, object]) -> bytes:
    """An event stream that simply ends (the connection closes) after these events."""
    body = "".join(f"event: {kind}\r\ndata: {json.dumps(data)}\r\n\r\n" for kind, data in events).encode()
    return http(200, body, "text/event-stream", x_request_id="stream-7")


DROP = b""  # close the connection without answering


class ScriptedHTTPServer:
    def __init__(self) -> None:
        self.answers: list[bytes] = []
        self.requests = 0
        self.url = ""

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            (int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")), 0
        )
        await reader.readexactly(length)
        answer = self.answers[min(self.requests, len(self.answers) - 1)]
        self.requests += 1
        writer.write(answer)
        await writer.drain()
        writer.close()


@pytest.fixture
async def fake() -> AsyncIterator[ScriptedHTTPServer]:
    server = ScriptedHTTPServer()
    tcp = await asyncio.start_server(server._serve, "127.0.0.1", 0)
    server.url = f"http://127.0.0.1:{tcp.sockets[0].getsockname()[1]}"
    async with tcp:
        yield server


def sync_and_async(fake: ScriptedHTTPServer) -> list[Callable[[], object]]:
    """The same call through both clients (the sync one on a thread: the server shares our loop)."""

    async def async_stream() -> list[object]:
        async with AsyncRexOmniClient(fake.url, retries=1) as client:
            return [item async for item in client.detect_stream(PNG, "detection", ["cat"])]

    def sync_stream() -> list[object]:
        with RexOmniClient(fake.url, retries=1) as client:
            return list(client.detect_stream(PNG, "detection", ["cat"]))

    return [async_stream, lambda: asyncio.to_thread(sync_stream)]


async def test_a_connection_dropped_before_any_answer_is_sent_again(fake: ScriptedHTTPServer) -> None:
    fake.answers = [DROP, http(200, json.dumps(RESULT).encode())]
    async with AsyncRexOmniClient(fake.url, retries=1) as client:
        result = await client.detect(PNG, "detection", ["cat"])
    assert result.detections[0].label == "cat" and fake.requests == 2
    fake.requests = 0
    fake.answers = [DROP, sse(("detection", {"detection": DETECTION}), ("done", RESULT))]
    with RexOmniClient(fake.url, retries=1) as sync_client:
        items = await asyncio.to_thread(lambda: list(sync_client.detect_stream(PNG, "detection", ["cat"])))
    assert isinstance(items[-1], DetectResult) and fake.requests == 2


async def test_a_stream_that_ends_without_its_result_raises(fake: ScriptedHTTPServer) -> None:
    fake.answers = [sse(("detection", {"detection": DETECTION}))]
    for call in sync_and_async(fake):
        fake.requests = 0
        with pytest.raises(RexOmniHTTPError) as broke:
            await call()  # type: ignore[misc]
        assert broke.value.code == "stream_incomplete" and broke.value.status == 502
        assert broke.value.request_id == "stream-7"
        assert fake.requests == 1  # a stream that yielded something is never sent again


async def test_loading_503_is_retried_after_retry_after(fake: ScriptedHTTPServer) -> None:
    loading = {"error": {"code": "engine_not_ready", "message": "the model is still loading", "request_id": "l"}}
    fake.answers = [http(503, json.dumps(loading).encode(), retry_after="0"), http(200, json.dumps(RESULT).encode())]
    async with AsyncRexOmniClient(fake.url, retries=1) as client:
        result = await client.detect(PNG, "detection", ["cat"])
    assert result.detections and fake.requests == 2
    fake.requests = 0
    async with AsyncRexOmniClient(fake.url, retries=0) as impatient:
        with pytest.raises(RexOmniHTTPError) as refused:
            await impatient.detect(PNG, "detection", ["cat"])
    assert refused.value.status == 503 and refused.value.code == "engine_not_ready" and fake.requests == 1


async def test_errors_carry_the_servers_code_request_id_and_equivalent_status(fake: ScriptedHTTPServer) -> None:
    error = {"error": {"code": "timeout", "message": "too slow", "request_id": "abc", "status": 504}}
    fake.answers = [sse(("detection", {"detection": DETECTION}), ("error", error))]
    for call in sync_and_async(fake):
        with pytest.raises(RexOmniHTTPError) as failed:
            await call()  # type: ignore[misc]
        assert (failed.value.status, failed.value.code, failed.value.request_id) == (504, "timeout", "abc")
    refusal = {"error": {"code": "invalid_request", "message": "no", "request_id": "rid-9"}}
    fake.answers = [http(422, json.dumps(refusal).encode())]
    async with AsyncRexOmniClient(fake.url) as client:
        with pytest.raises(RexOmniHTTPError) as refused:
            await client.detect(PNG, "detection", ["cat"])
    assert refused.value.request_id == "rid-9" and "rid-9" in str(refused.value)


async def test_an_answer_that_is_not_a_result_is_a_clear_error(fake: ScriptedHTTPServer) -> None:
    fake.answers = [http(200, b"<html>login</html>", "text/html", x_request_id="p1")]
    async with AsyncRexOmniClient(fake.url) as client:
        with pytest.raises(RexOmniHTTPError) as wrong:
            await client.detect(PNG, "detection", ["cat"])
    assert wrong.value.code == "bad_response" and "login" in wrong.value.message


async def test_bulk_detect_survives_a_dropped_connection(
    fake: ScriptedHTTPServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images = []
    for i in range(3):
        (path := tmp_path / f"{i}.png").write_bytes(PNG)
        images.append(str(path))
    fake.answers = [http(200, json.dumps(RESULT).encode()), DROP, http(200, json.dumps(RESULT).encode())]
    argv = ["--url", fake.url, "--retries", "0", "detect", *images, "--categories", "cat", "--concurrency", "1"]
    status = await asyncio.to_thread(main, argv)
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert status == 1 and len(lines) == 3  # every image answered or failed on its own
    assert [("result" in line) for line in lines].count(True) == 2
    assert "disconnected" in next(line["error"] for line in lines if "error" in line).lower()


async def test_cli_says_when_a_stream_broke_off(
    fake: ScriptedHTTPServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.answers = [sse(("detection", {"detection": DETECTION}))]
    (image := tmp_path / "a.png").write_bytes(PNG)
    status = await asyncio.to_thread(main, ["--url", fake.url, "detect", str(image), "--categories", "cat", "--stream"])
    out, err = capsys.readouterr()
    assert status == 1 and BoxDetection.model_validate(json.loads(out.splitlines()[0])["detection"])
    assert "stream_incomplete" in err and "cannot reach" not in err


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--max-new-tokens", "0"], "max_new_tokens"),  # 0 is refused, not taken for "unset"
        (["--annotate", "out"], "extension"),
        (["--annotate", "no/such/folder/out.jpg"], "no such folder"),
    ],
)
async def test_cli_refuses_bad_arguments_before_any_request(
    fake: ScriptedHTTPServer, tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], expected: str
) -> None:
    fake.answers = [http(200, json.dumps(RESULT).encode())]
    (image := tmp_path / "a.png").write_bytes(PNG)
    argv = ["--url", fake.url, "detect", str(image), "--categories", "cat", *extra]
    status = await asyncio.to_thread(main, argv)
    assert status == 2 and expected in capsys.readouterr().err and fake.requests == 0


async def test_a_stream_answer_that_is_not_an_event_stream_is_a_bad_response(fake: ScriptedHTTPServer) -> None:
    fake.answers = [http(200, b"<html>login</html>", "text/html")]
    for call in sync_and_async(fake):
        with pytest.raises(RexOmniHTTPError) as wrong:
            await call()  # type: ignore[misc]
        assert wrong.value.code == "bad_response" and wrong.value.status == 200


async def test_a_newer_servers_extra_fields_are_ignored(fake: ScriptedHTTPServer) -> None:
    newer = {**RESULT, "added_later": {"x": 1}, "detections": [{**DETECTION, "mask": "rle..."}]}
    fake.answers = [http(200, json.dumps(newer).encode())]
    async with AsyncRexOmniClient(fake.url) as client:
        result = await client.detect(PNG, "detection", ["cat"])
    assert result.detections[0].label == "cat" and not hasattr(result, "added_later")
