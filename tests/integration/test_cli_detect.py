"""``rexomni detect``'s outputs (COCO, Label Studio, --output, --annotate) and the progress of
``detect`` and ``evaluate``, against real servers on the tiny engine whose output is forced."""

from __future__ import annotations

import asyncio
import io
import json
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from rexomni_client.cli import main
from rexomni_client.draw import label_colours
from rexomni_client.http import RexOmniClient
from rexomni_server.tasks import KEYPOINT_SETS
from tests.support import detect_result, image_bytes

FORCED = "<|object_ref_start|>cat<|object_ref_end|><|box_start|><0><0><999><999><|box_end|>"
OPTIONS = ["--options", json.dumps({"forced_output": FORCED})]
# One person, nose and left eye level (bins, which are pixels on a 999 px image), right eye hidden.
FORCED_PERSON = (
    '```json\n{"person1": {"bbox": " <100> <100> <900> <900> ", "keypoints": '
    '{"nose": " <300> <500> ", "left eye": " <600> <500> ", "right eye": "unvisible"}}}\n```'
)


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def images(tmp_path: Path, count: int) -> list[str]:
    paths = []
    for i in range(count):
        path = tmp_path / f"img{i}.png"
        path.write_bytes(image_bytes(50 + i, 20))
        paths.append(str(path))
    return paths


async def test_many_images_as_one_coco_document(
    live_servers: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url, _ = live_servers
    paths = [*images(tmp_path, 3), str(tmp_path / "missing.png")]
    out = tmp_path / "coco.json"
    args = ["--url", url, "detect", *paths, "--categories", "cat", "--format", "coco", "--output", str(out)]
    assert await asyncio.to_thread(main, [*args, *OPTIONS]) == 1  # one image failed
    stdout, stderr = capsys.readouterr()
    assert stdout == ""
    assert f"error: {paths[3]}: image not found: {paths[3]}" in stderr
    # stderr is no terminal here: plain progress lines, the last one the whole run.
    assert stderr.splitlines()[-1].startswith("detect: 4/4 images, ") and stderr.endswith(", 1 failed\n")
    doc = json.loads(out.read_text())
    assert [(i["id"], i["file_name"], i["width"]) for i in doc["images"]] == [
        (1, paths[0], 50),
        (2, paths[1], 51),
        (3, paths[2], 52),
    ]  # in the order given, whatever order they finished in
    assert doc["categories"] == [{"id": 1, "name": "cat"}]
    assert [(a["image_id"], a["bbox"]) for a in doc["annotations"]] == [
        (1, [0, 0, 50, 20]),
        (2, [0, 0, 51, 20]),
        (3, [0, 0, 52, 20]),
    ]
    assert all(a["iscrowd"] == 0 and a["category_id"] == 1 for a in doc["annotations"])


@pytest.mark.parametrize("transport", ["http", "grpc"])
async def test_one_image_as_a_labelstudio_file(
    live_servers: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str], transport: str
) -> None:
    url, target = live_servers
    (path,) = images(tmp_path, 1)
    where = ["--grpc", target] if transport == "grpc" else ["--url", url]
    args = [*where, "detect", path, "--categories", "cat", "--format", "labelstudio", "--from-name", "tag"]
    assert await asyncio.to_thread(main, [*args, *OPTIONS]) == 0
    (task,) = json.loads(capsys.readouterr().out)
    assert task["data"] == {"image": path}
    (prediction,) = task["predictions"]
    (region,) = prediction["result"]
    assert (region["type"], region["from_name"], region["to_name"]) == ("rectanglelabels", "tag", "image")
    assert region["value"] == {"x": 0, "y": 0, "width": 100, "height": 100, "rotation": 0, "rectanglelabels": ["cat"]}
    assert (region["original_width"], region["original_height"]) == (50, 20)


async def test_keypoints_as_coco_with_the_asked_set(
    live_servers: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url, _ = live_servers
    path = tmp_path / "p.png"
    path.write_bytes(image_bytes(999, 999))
    args = ["--url", url, "detect", str(path), "--task", "keypoint", "--categories", "person", "--format", "coco"]
    assert await asyncio.to_thread(main, [*args, "--options", json.dumps({"forced_output": FORCED_PERSON})]) == 0
    doc = json.loads(capsys.readouterr().out)
    (category,) = doc["categories"]
    assert category["keypoints"] == list(KEYPOINT_SETS["person"]) and [1, 2] in category["skeleton"]
    (annotation,) = doc["annotations"]
    assert annotation["keypoints"][:9] == [300, 500, 2, 600, 500, 2, 0, 0, 0] and annotation["num_keypoints"] == 2


async def test_annotated_keypoints_are_joined(
    live_servers: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url, _ = live_servers
    path, out = tmp_path / "p.png", tmp_path / "out.png"
    path.write_bytes(image_bytes(999, 999))
    args = ["--url", url, "detect", str(path), "--task", "keypoint", "--categories", "person", "--annotate", str(out)]
    assert await asyncio.to_thread(main, [*args, "--options", json.dumps({"forced_output": FORCED_PERSON})]) == 0
    (person,) = json.loads(capsys.readouterr().out)["detections"]
    colour = label_colours([person["label"]])[person["label"]]
    picture = Image.open(out).convert("RGB")
    assert picture.getpixel((450, 500)) == colour  # the nose-left eye line
    assert picture.getpixel((100, 500)) == colour  # the box
    assert picture.getpixel((450, 700)) == (30, 120, 200)  # the image itself


async def test_json_output_goes_to_the_file(
    live_servers: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url, _ = live_servers
    paths, out = images(tmp_path, 2), tmp_path / "out.jsonl"
    args = ["--url", url, "detect", *paths, "--categories", "cat", "--output", str(out), "--progress", "off"]
    assert await asyncio.to_thread(main, [*args, *OPTIONS]) == 0
    assert capsys.readouterr() == ("", "")  # nothing on stdout, no progress asked for
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(line["image"] for line in lines) == paths and all("result" in line for line in lines)
    single = tmp_path / "one.json"
    assert await asyncio.to_thread(main, [*args[:3], paths[0], "--categories", "cat", "-o", str(single), *OPTIONS]) == 0
    assert json.loads(single.read_text())["detections"][0]["label"] == "cat"  # the one result, as on stdout


async def test_a_terminal_gets_a_progress_bar(
    live_servers: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, _ = live_servers
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    paths = [*images(tmp_path, 3), str(tmp_path / "missing.png")]
    args = ["--url", url, "detect", *paths, "--categories", "cat", "--concurrency", "2", *OPTIONS]
    assert await asyncio.to_thread(main, args) == 1
    final = terminal.getvalue().rstrip("\n").rsplit("\r", 1)[-1]
    assert final.startswith("detect: 100%") and "4/4" in final and "image/s" in final and "1 failed" in final
    assert len(capsys.readouterr().out.splitlines()) == 4  # the JSON lines, untouched by the bar


async def test_output_options_are_checked_before_any_request(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (path,) = images(tmp_path, 1)
    unreachable = ["--url", "http://127.0.0.1:9", "detect", path, "--categories", "cat"]
    assert await asyncio.to_thread(main, [*unreachable, "--stream", "--format", "coco"]) == 2
    assert "--format coco writes one document" in capsys.readouterr().err
    assert await asyncio.to_thread(main, [*unreachable, "--output", str(tmp_path / "no" / "x.json")]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert await asyncio.to_thread(main, [*unreachable, "--output", str(tmp_path)]) == 2  # a folder
    assert "error: --output" in capsys.readouterr().err


def test_tiling_reaches_the_request_body(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sent: list[dict[str, Any]] = []

    def send(self: RexOmniClient, body: dict[str, Any]) -> httpx.Response:  # the body as posted
        sent.append(body)
        return httpx.Response(200, json=detect_result([], 50, 20).model_dump(mode="json"))

    monkeypatch.setattr(RexOmniClient, "_send", send)
    (path,) = images(tmp_path, 1)
    args = ["--url", "http://127.0.0.1:9", "detect", path, "--categories", "cat"]
    assert main([*args, "--tiling", "1024:0.25"]) == 0
    (body,) = sent
    assert body["options"]["tiling"] == {"tile_size": 1024, "overlap": 0.25, "whole_image": True, "iou_threshold": 0.5}
    capsys.readouterr()
    assert main([*args, "--tiling", "auto", "--options", json.dumps({"tiling": {"tile_size": 512}})]) == 2
    assert capsys.readouterr().err == "error: --tiling and --options tiling: give one\n"
    assert len(sent) == 1  # refused before any request


async def test_evaluate_shows_its_progress(
    live_servers: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url, _ = live_servers
    (tmp_path / "a.png").write_bytes(image_bytes(40, 30))
    lines = [
        {"image_path": "a.png", "categories": ["cat"], "gt": {"cat": [[0, 0, 40, 30]]}},
        {"image_path": "a.png", "categories": ["cat"], "gt": {"cat": [[0, 0, 4, 3]]}},
        {"image_path": "missing.png", "categories": ["cat"], "gt": {"cat": [[0, 0, 1, 1]]}},
    ]
    (tmp_path / "eval.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    args = ["--url", url, "evaluate", str(tmp_path / "eval.jsonl"), *OPTIONS]
    assert await asyncio.to_thread(main, args) == 1
    progress = capsys.readouterr().err.splitlines()
    assert progress[-1].startswith("evaluate: 3/3 images, ") and progress[-1].endswith(", 1 failed")
    assert not any(line.startswith("evaluated ") for line in progress)  # the old ticks are gone
    assert await asyncio.to_thread(main, [*args, "--progress", "off"]) == 1
    assert capsys.readouterr().err == ""
