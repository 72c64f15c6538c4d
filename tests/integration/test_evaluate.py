"""`rexomni evaluate` end to end: a real uvicorn server on the tiny transformers engine whose
output is forced, so every metric the evaluator prints is known in advance."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from rexomni_client.cli import main
from rexomni_client.evaluation import DatasetError, EvalSample, Truth, evaluate
from rexomni_client.evaluation.report import table
from rexomni_client.evaluation.runner import Query
from rexomni_client.evaluation.scoring import Metric
from rexomni_client.http import AsyncRexOmniClient, RexOmniHTTPError
from rexomni_server.schemas import DetectResult, TilingOptions
from rexomni_server.tasks import Task
from tests.support import image_bytes

W, H = 200, 100
# Every request answers "one cat covering the whole image".
FORCED = "<|object_ref_start|>cat<|object_ref_end|><|box_start|><0><0><999><999><|box_end|><|im_end|>"


def dataset(tmp_path: Path) -> Path:
    for name in ("exact.png", "half.png"):
        (tmp_path / name).write_bytes(image_bytes(W, H, "PNG"))
    lines = [
        {"image_path": "exact.png", "categories": ["cat"], "gt": {"cat": [[0, 0, W, H]]}},
        # IoU 0.5 with the forced cat, and a dog nobody finds: P 1, R 0.5 at IoU 0.50 only.
        {
            "image_path": "half.png",
            "categories": ["cat", "dog"],
            "gt": {"cat": [[0, 0, 100, 100]], "dog": [[0, 0, 9, 9]]},
        },
        {"image_path": "missing.png", "categories": ["cat"], "gt": {"cat": [[0, 0, 1, 1]]}},
    ]
    path = tmp_path / "eval.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines))
    return path


async def test_cli_scores_a_live_server(
    live_servers: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url, _ = live_servers
    data, report, predictions = dataset(tmp_path), tmp_path / "report.json", tmp_path / "pred.jsonl"
    args = ["--url", url, "evaluate", str(data), "--concurrency", "2", "--report", str(report)]
    args += ["--predictions", str(predictions), "--options", json.dumps({"forced_output": FORCED}), "--per-category"]
    assert await asyncio.to_thread(main, args) == 1  # an image failed: the run is not whole

    metrics = json.loads(report.read_text())
    assert metrics["scored"] == 2 and metrics["samples"] == 3
    assert metrics["failed"] == {"3": f"image not found: {tmp_path / 'missing.png'}"}
    assert metrics["metrics"]["0.50"] == {"precision": 1.0, "recall": 0.75, "f1": round(2 * 0.75 / 1.75, 4)}
    assert metrics["metrics"]["0.95"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5}
    assert metrics["detections"] == 2 and metrics["length_limited"] == 0
    out = capsys.readouterr().out
    assert "IoU 0.50" in out and "2/3 images scored, 1 failed" in out
    # Per category, at IoU 0.50: the cat is found in both images, the dog in neither.
    assert metrics["per_category"] == {
        "cat": {"images": 2, "criterion": "0.50", "precision": 1.0, "recall": 1.0, "f1": 1.0},
        "dog": {"images": 1, "criterion": "0.50", "precision": 0.0, "recall": 0.0, "f1": 0.0},
    }
    worst_first = out[out.index("category (worst first") :].splitlines()
    assert worst_first[1].startswith("dog") and worst_first[2].startswith("cat")

    records = {r["id"]: r for r in map(json.loads, predictions.read_text().splitlines())}
    assert records["1"]["detections"][0]["box"] == [0.0, 0.0, W, H]
    assert records["2"]["matches"]["0.50"] == 1 and records["2"]["truths"] == 2
    assert "error" in records["3"]


async def test_cli_limit_evaluates_the_first_images_only(live_servers: tuple[str, str], tmp_path: Path) -> None:
    url, _ = live_servers
    data, report = dataset(tmp_path), tmp_path / "limited.json"
    args = ["--url", url, "evaluate", str(data), "--limit", "2", "--report", str(report)]
    assert await asyncio.to_thread(main, [*args, "--options", json.dumps({"forced_output": FORCED})]) == 0
    metrics = json.loads(report.read_text())
    assert metrics["samples"] == metrics["scored"] == 2 and metrics["failed"] == {}  # not the missing third


async def test_cli_visual_prompting_on_a_live_server(
    live_servers: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url, _ = live_servers
    (tmp_path / "exact.png").write_bytes(image_bytes(W, H, "PNG"))
    line = {
        "image_path": "exact.png",
        "categories": ["cat"],
        "gt": {"cat": [[0, 0, W, H]]},
        "visual_prompt": {"cat": [[10, 10, 50, 50]]},
    }
    (tmp_path / "vp.jsonl").write_text(json.dumps(line))
    report = tmp_path / "vp.json"
    args = ["--url", url, "evaluate", str(tmp_path / "vp.jsonl"), "--task", "visual_prompting", "--report", str(report)]
    assert await asyncio.to_thread(main, [*args, "--options", json.dumps({"forced_output": FORCED})]) == 0
    assert json.loads(report.read_text())["mean_0.50_0.95"]["f1"] == 1.0
    capsys.readouterr()
    # A dataset without reference boxes cannot be scored this way: refused before any request.
    args[3] = str(dataset(tmp_path))
    assert await asyncio.to_thread(main, args) == 2
    assert "no visual_prompt boxes" in capsys.readouterr().err


async def test_cli_keypoints_on_a_live_server(
    live_servers: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url, _ = live_servers
    (tmp_path / "p.png").write_bytes(image_bytes(W, H, "PNG"))

    def px(b: int, size: int) -> float:
        return b / 999 * size

    # The forced answer: one person, nose at bins (300, 200), left eye hidden.
    forced = (
        '```json\n{"person1": {"bbox": " <100> <100> <500> <900> ", "keypoints": '
        '{"nose": " <300> <200> ", "left eye": "unvisible"}}}\n```'
    )
    box = [px(100, W), px(100, H), px(500, W), px(900, H)]
    exact = {"bbox": box, "keypoints": {"nose": [px(300, W), px(200, H)], "left eye": None}}
    elsewhere = {"bbox": box, "keypoints": {"nose": [px(500, W), px(900, H)], "left eye": None}}
    lines = [
        {"image_path": "p.png", "categories": ["person"], "gt": {"person": [exact]}},
        {"image_path": "p.png", "categories": ["person"], "gt": {"person": [elsewhere]}},
    ]
    (tmp_path / "kp.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    report = tmp_path / "kp.json"
    args = ["--url", url, "evaluate", str(tmp_path / "kp.jsonl"), "--task", "keypoint", "--report", str(report)]
    assert await asyncio.to_thread(main, [*args, "--options", json.dumps({"forced_output": forced})]) == 0
    written = json.loads(report.read_text())
    assert written["measure"] == "OKS"
    metrics = written["metrics"]
    # Image 1 matches at every OKS threshold, image 2 (the nose far away) at none.
    assert metrics["0.95"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5}
    assert "OKS 0.50" in capsys.readouterr().out


async def test_cli_resume_asks_only_what_is_missing(
    live_servers: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url, _ = live_servers
    data, predictions, report = dataset(tmp_path), tmp_path / "pred.jsonl", tmp_path / "report.json"
    args = ["--url", url, "evaluate", str(data), "--predictions", str(predictions), "--report", str(report)]
    args += ["--options", json.dumps({"forced_output": FORCED})]
    assert await asyncio.to_thread(main, args) == 1  # the third image is missing: it fails
    first = json.loads(report.read_text())
    (tmp_path / "missing.png").write_bytes(image_bytes(W, H, "PNG"))  # now it is there
    with predictions.open("a") as f:  # a run killed while writing a line
        f.write('{"id": "3", "detections": [{"ty')
    assert await asyncio.to_thread(main, [*args, "--resume"]) == 0
    resumed = json.loads(report.read_text())
    assert resumed["resumed"] == 2 and resumed["scored"] == 3 and resumed["failed"] == {}
    lines = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert [line["id"] for line in lines].count("3") == 2 and len(lines) == 4  # only image 3 asked again
    # The two earlier images score as before; image 3 (GT 1x1 px at the corner) adds a miss.
    assert first["metrics"]["0.50"]["precision"] == 1.0 and resumed["metrics"]["0.50"]["precision"] == pytest.approx(
        2 / 3, abs=1e-4
    )
    assert "2 images scored from the earlier predictions" in capsys.readouterr().out
    assert await asyncio.to_thread(main, [*args[:3], str(data), "--resume"]) == 2  # nothing to resume from
    assert "--resume needs --predictions" in capsys.readouterr().err


async def test_an_image_the_schema_refuses_fails_alone(live_servers: tuple[str, str], tmp_path: Path) -> None:
    url, _ = live_servers
    (tmp_path / "a.png").write_bytes(image_bytes(W, H, "PNG"))
    lines = [
        {"image_path": "a.png", "categories": ["cat"], "gt": {"cat": [[0, 0, W, H]]}},
        {"image_path": "a.png", "categories": [], "gt": {}},  # a detection request needs a category
    ]
    (tmp_path / "x.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    report = tmp_path / "r.json"
    args = ["--url", url, "evaluate", str(tmp_path / "x.jsonl"), "--report", str(report)]
    assert await asyncio.to_thread(main, [*args, "--options", json.dumps({"forced_output": FORCED})]) == 1
    written = json.loads(report.read_text())
    assert written["scored"] == 1 and "needs at least one category" in written["failed"]["2"]


async def test_cli_rejects_bad_options_and_files_before_any_request(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = dataset(tmp_path)
    unreachable = ["--url", "http://127.0.0.1:9", "evaluate"]
    assert await asyncio.to_thread(main, [*unreachable, str(data), "--options", '{"max_new_tokens": 0}']) == 2
    assert "bad --options" in capsys.readouterr().err
    assert await asyncio.to_thread(main, [*unreachable, str(tmp_path / "none.jsonl")]) == 2
    assert "No such file" in capsys.readouterr().err
    assert await asyncio.to_thread(main, [*unreachable, str(data)]) == 1
    assert "server unreachable" in capsys.readouterr().err
    # A task the dataset cannot be scored for is refused before --predictions is opened.
    predictions = tmp_path / "kept.jsonl"
    predictions.write_text('{"id": "1", "detections": []}\n')
    keypoint = [*unreachable, str(data), "--task", "keypoint", "--predictions", str(predictions)]
    assert await asyncio.to_thread(main, keypoint) == 2
    assert "without keypoints" in capsys.readouterr().err
    assert predictions.read_text() == '{"id": "1", "detections": []}\n'  # not emptied


def test_cli_tiling_reaches_every_request(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sent: list[dict[str, Any]] = []

    async def send(self: AsyncRexOmniClient, body: dict[str, Any]) -> httpx.Response:  # the body as posted
        sent.append(body)
        return httpx.Response(200, json=result([box("cat", 0, 0, W, H)]).model_dump(mode="json"))

    monkeypatch.setattr(AsyncRexOmniClient, "_send", send)
    args = ["--url", "http://127.0.0.1:9", "evaluate", str(dataset(tmp_path)), "--limit", "2", "--tiling", "auto"]
    assert main(args) == 0
    assert len(sent) == 2 and all(body["options"]["tiling"] == TilingOptions().model_dump() for body in sent)
    capsys.readouterr()
    assert main([*args, "--options", json.dumps({"tiling": "auto"})]) == 2
    assert "error: --tiling and --options tiling: give one" in capsys.readouterr().err
    assert len(sent) == 2  # refused before any request


def result(detections: list[dict[str, object]], finish_reason: str = "stop") -> DetectResult:
    return DetectResult.model_validate(
        {
            "request_id": "r",
            "model": "scripted",
            "task": "detection",
            "detections": detections,
            "image": {"width": 10, "height": 10, "resized_width": 28, "resized_height": 28},
            "finish_reason": finish_reason,
            "truncated": finish_reason == "length",
            "skipped": 0,
            "usage": {"prompt_tokens": 1, "completion_tokens": 1},
            "timings": {"queue_ms": 0.0, "first_detection_ms": 1.0, "total_ms": 1.0},
        }
    )


def box(label: str, *coords: float) -> dict[str, object]:
    return {"type": "box", "label": label, "box": list(coords)}


async def test_refused_and_cut_off_answers_are_counted_not_fatal(tmp_path: Path) -> None:
    cat = (Truth("cat", box=(0, 0, 10, 10)),)
    samples = []
    for name in ("ok", "refused", "cut"):
        (tmp_path / name).write_bytes(name.encode())  # the fake server answers by the image's bytes
        samples.append(EvalSample(name, tmp_path / name, ("cat",), cat))

    async def detect(task: Task, query: Query, image: bytes) -> DetectResult:
        if image == b"refused":
            raise RexOmniHTTPError(422, "image_too_large", "too many pixels")
        return result([], "length") if image == b"cut" else result([box("cat", 0, 0, 10, 10)])

    run = await evaluate(samples, detect, "detection", concurrency=4)
    assert run.failed == {"refused": "422 image_too_large: too many pixels"}
    assert run.summary.samples == 2 and run.length_limited == 1
    assert run.summary.by_key["0.95"] == Metric(precision=0.5, recall=0.5, f1=0.5)
    assert "1 answers hit max_new_tokens" in table(run)


async def test_visual_prompting_asks_once_per_category_and_credits_its_answers(tmp_path: Path) -> None:
    (tmp_path / "shelf.png").write_bytes(b"")
    sample = EvalSample(
        "shelf",
        tmp_path / "shelf.png",
        ("apple", "pear"),
        (Truth("apple", box=(0, 0, 10, 10)), Truth("apple", box=(20, 0, 30, 10)), Truth("pear", box=(50, 50, 60, 60))),
        visual_prompts=(("apple", ((0, 0, 10, 10),)), ("pear", ((50, 50, 60, 60),))),
    )
    asked: list[Query] = []

    async def detect(task: Task, query: Query, image: bytes) -> DetectResult:
        asked.append(query)
        # The model labels visual-prompt answers itself ("object"); the evaluator credits the
        # category whose reference boxes were sent.
        if query.label == "apple":
            return result([box("object", 0, 0, 10, 10), box("object", 20, 0, 30, 10)])
        return result([box("object", 0, 0, 10, 10)])  # a pear answer on an apple: wrong

    records: list[dict[str, object]] = []
    run = await evaluate([sample], detect, "visual_prompting", on_record=records.append)
    assert [(q.label, q.visual_prompt_boxes, q.categories) for q in asked] == [
        ("apple", ((0, 0, 10, 10),), ()),
        ("pear", ((50, 50, 60, 60),), ()),
    ]
    metric = run.summary.by_key["0.50"]
    assert (metric.precision, metric.recall) == (pytest.approx(2 / 3), pytest.approx(2 / 3))
    assert [d["label"] for d in records[0]["detections"]] == ["apple", "apple", "pear"]  # type: ignore[index, union-attr]
    assert run.by_category["pear"].by_key["0.50"].f1 == 0.0


async def test_visual_prompting_needs_reference_boxes(tmp_path: Path) -> None:
    sample = EvalSample("x", tmp_path / "x.png", ("cat",), (Truth("cat", box=(0, 0, 1, 1)),))

    async def never(task: Task, query: Query, image: bytes) -> DetectResult:
        raise AssertionError("no request may be sent")

    with pytest.raises(DatasetError, match="no visual_prompt boxes"):
        await evaluate([sample], never, "visual_prompting")


def test_saved_answers_survive_a_run_killed_mid_line() -> None:
    from rexomni_client.evaluation.runner import saved_answers

    good = json.dumps({"id": "1", "detections": [{"type": "box", "label": "cat", "box": [0, 0, 1, 1]}]})
    failed = json.dumps({"id": "2", "error": "image not found"})
    cut = '{"id": "3", "detections": [{"type": "bo'
    saved = saved_answers(f"{good}\n{failed}\n{cut}")
    assert list(saved) == ["1"]  # the failed and the cut-short images will be asked again
    assert saved["1"].detections[0].label == "cat"
    # A whole record without its newline was cut too (every record is written with one).
    assert saved_answers(f"{failed}\n{good}") == {}
    with pytest.raises(DatasetError, match="predictions line 2 cannot be read"):
        saved_answers(f"{good}\n{cut}\n{failed}\n")  # damage before the end is not a kill: refuse
