"""Many images at once: ``detect_many`` and ``rexomni detect a b c`` over HTTP and gRPC against
real servers on the tiny engine; a bad image is reported on its own line and the rest go on."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from rexomni_client import AsyncRexOmniClient, detect_many
from rexomni_client.cli import main
from rexomni_client.http import RexOmniHTTPError
from rexomni_server.schemas import DetectResult
from tests.support import image_bytes

FORCED = "<|object_ref_start|>cat<|object_ref_end|><|box_start|><0><0><999><999><|box_end|>"


async def test_detect_many_answers_every_image_once(live_servers: tuple[str, str]) -> None:
    url, _ = live_servers
    images = [image_bytes(40 + i, 30) for i in range(5)] + [b"not an image"]
    async with AsyncRexOmniClient(url) as client:
        answers = {
            index: answer
            async for index, answer in detect_many(
                client, images, "detection", ["cat"], concurrency=3, forced_output=FORCED
            )
        }
    assert sorted(answers) == list(range(6))
    for index in range(5):
        result = answers[index]
        assert isinstance(result, DetectResult) and result.image.width == 40 + index  # each image its own answer
    assert isinstance(answers[5], RexOmniHTTPError) and answers[5].status == 400


@pytest.mark.parametrize("transport", ["http", "grpc"])
async def test_cli_detects_several_images_as_json_lines(
    live_servers: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str], transport: str
) -> None:
    url, target = live_servers
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"img{i}.png")
        paths[-1].write_bytes(image_bytes(50, 20 + i))
    paths.append(tmp_path / "missing.png")
    where = ["--grpc", target] if transport == "grpc" else ["--url", url]
    args = [*where, "detect", *map(str, paths), "--categories", "cat", "--concurrency", "2"]
    code = await asyncio.to_thread(main, [*args, "--options", json.dumps({"forced_output": FORCED})])
    assert code == 1  # one image failed
    lines = {line["image"]: line for line in map(json.loads, capsys.readouterr().out.splitlines())}
    assert set(lines) == set(map(str, paths))
    for i in range(3):
        result = lines[str(paths[i])]["result"]
        assert result["image"]["height"] == 20 + i and result["detections"][0]["label"] == "cat"
    assert lines[str(paths[3])]["error"] == f"image not found: {paths[3]}"


async def test_cli_checks_options_before_any_request(capsys: pytest.CaptureFixture[str]) -> None:
    unreachable = ["--url", "http://127.0.0.1:9", "detect", "a.png", "b.png"]
    assert await asyncio.to_thread(main, [*unreachable, "--categories", "cat", "--options", '{"priority": 5000}']) == 2
    assert "error: bad request: priority: Input should be less than or equal to 1000" in capsys.readouterr().err
    assert await asyncio.to_thread(main, [*unreachable]) == 2
    assert "needs at least one category" in capsys.readouterr().err
    assert await asyncio.to_thread(main, [*unreachable, "--categories", "cat", "--stream"]) == 2
    assert "take one image" in capsys.readouterr().err


async def test_cli_without_a_server_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = tmp_path / "a.png"
    image.write_bytes(image_bytes(40, 30))
    for images in ([image], [image, image]):
        args = ["--url", "http://127.0.0.1:9", "detect", *map(str, images), "--categories", "cat"]
        assert await asyncio.to_thread(main, args) == 1
        assert "error: cannot reach http://127.0.0.1:9" in capsys.readouterr().err
    assert await asyncio.to_thread(main, ["--grpc", "127.0.0.1:9", "evaluate", str(image)]) == 2
    assert "evaluate talks HTTP" in capsys.readouterr().err
