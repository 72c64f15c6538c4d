"""End to end: real HTTP app + real transformers engine on the tiny model, forced outputs,
exact pixel coordinates for every output geometry."""

from __future__ import annotations

import base64
from typing import Any

import httpx
import pytest

from rexomni_server.runtime import Runtime
from tests.support import image_bytes

W, H = 800, 600
IMAGE = base64.b64encode(image_bytes(W, H, "JPEG")).decode()


def x(b: int) -> float:
    return b / 999 * W


def y(b: int) -> float:
    return b / 999 * H


async def detect(client: httpx.AsyncClient, forced: str, **fields: object) -> dict[str, Any]:
    body = {"image": IMAGE, **fields, "options": {"forced_output": forced, "return_raw_output": True}}
    r = await client.post("/v1/detect", json=body)
    assert r.status_code == 200, r.text
    result: dict[str, Any] = r.json()
    for detection in result["detections"]:
        # The transformers engine scores every detection from its coordinate log-probabilities.
        score = detection.pop("score")
        assert isinstance(score, float) and 0.0 < score <= 1.0
    assert result["raw_output"] == forced
    assert result["finish_reason"] == "stop" and result["truncated"] is False
    return result


async def test_detection(tiny_client: httpx.AsyncClient, tiny_runtime: Runtime) -> None:
    forced = (
        "<|object_ref_start|>person<|object_ref_end|><|box_start|>"
        "<0><35><980><987>, <646><0><999><940><|box_end|>, "
        "<|object_ref_start|>car<|object_ref_end|><|box_start|><100><200><300><400><|box_end|>"
    )
    result = await detect(tiny_client, forced, task="detection", categories=["person", "car"])
    assert result["detections"] == [
        {"label": "person", "type": "box", "box": [x(0), y(35), x(980), y(987)]},
        {"label": "person", "type": "box", "box": [x(646), y(0), x(999), y(940)]},
        {"label": "car", "type": "box", "box": [x(100), y(200), x(300), y(400)]},
    ]
    assert result["image"] == {"width": W, "height": H, "resized_width": 812, "resized_height": 588}
    usage = result["usage"]
    forced_tokens = len(tiny_runtime.engine._tokenizer.encode(forced))  # type: ignore[attr-defined]
    # every forced token plus the end-of-turn token; the prompt holds ~600 image tokens
    assert isinstance(usage, dict) and usage["completion_tokens"] == forced_tokens + 1
    assert usage["prompt_tokens"] > 600


async def test_scores_can_be_turned_off(tiny_client: httpx.AsyncClient) -> None:
    forced = "<|object_ref_start|>cup<|object_ref_end|><|box_start|><1><2><3><4><|box_end|>"
    body = {"image": IMAGE, "categories": ["cup"], "options": {"forced_output": forced, "scores": False}}
    result = (await tiny_client.post("/v1/detect", json=body)).json()
    assert [d["score"] for d in result["detections"]] == [None]


async def test_pointing(tiny_client: httpx.AsyncClient) -> None:
    forced = "<|object_ref_start|>cup<|object_ref_end|><|box_start|><500><250>, <10><990><|box_end|>"
    result = await detect(tiny_client, forced, task="pointing", categories="cup")
    assert [d["point"] for d in result["detections"]] == [[x(500), y(250)], [x(10), y(990)]]  # type: ignore[union-attr,index]


async def test_ocr_polygon(tiny_client: httpx.AsyncClient) -> None:
    forced = "<|object_ref_start|>Hello<|object_ref_end|><|box_start|><1><2><30><2><30><20><1><20><|box_end|>"
    result = await detect(tiny_client, forced, task="ocr_polygon", categories=["text line"])
    assert result["detections"] == [
        {
            "label": "Hello",
            "type": "polygon",
            "polygon": [[x(1), y(2)], [x(30), y(2)], [x(30), y(20)], [x(1), y(20)]],
        }
    ]


async def test_keypoint(tiny_client: httpx.AsyncClient) -> None:
    forced = (
        '```json\n{"person1": {"bbox": " <100> <100> <500> <900> ", "keypoints": '
        '{"nose": " <300> <200> ", "left eye": "unvisible"}}}\n```'
    )
    result = await detect(tiny_client, forced, task="keypoint", categories=["person"], keypoint_type="person")
    assert result["detections"] == [
        {
            "label": "person",
            "type": "keypoints",
            "box": [x(100), y(100), x(500), y(900)],
            "keypoints": {"nose": [x(300), y(200)], "left eye": None},
        }
    ]


async def test_visual_prompting(tiny_client: httpx.AsyncClient) -> None:
    forced = (
        "<|object_ref_start|>object_1<|object_ref_end|><|box_start|><10><10><20><20>, <700><700><800><800><|box_end|>"
    )
    result = await detect(tiny_client, forced, task="visual_prompting", visual_prompt_boxes=[[8, 6, 16, 12]])
    boxes = [d["box"] for d in result["detections"]]  # type: ignore[union-attr,index]
    assert boxes == [[x(10), y(10), x(20), y(20)], [x(700), y(700), x(800), y(800)]]


async def test_truncation_keeps_complete_detections(tiny_client: httpx.AsyncClient) -> None:
    forced = (
        "<|object_ref_start|>a<|object_ref_end|><|box_start|><1><2><3><4>, <5><6><7><8>, <9><10><11><12><|box_end|>"
    )
    body = {"image": IMAGE, "categories": ["a"], "options": {"forced_output": forced, "max_new_tokens": 14}}
    result = (await tiny_client.post("/v1/detect", json=body)).json()
    assert result["truncated"] is True and result["finish_reason"] == "length"
    assert len(result["detections"]) == 2


@pytest.mark.parametrize(
    ("task", "coordinates", "expected"),
    [
        ("ocr_box", "<1><2><3><4>", {"type": "box", "box": [x(1), y(2), x(3), y(4)]}),
        ("gui_grounding", "<1><2><3><4>", {"type": "box", "box": [x(1), y(2), x(3), y(4)]}),
        ("gui_pointing", "<500><250>", {"type": "point", "point": [x(500), y(250)]}),
    ],
)
async def test_other_tasks_give_their_own_geometry_and_label(
    tiny_client: httpx.AsyncClient, task: str, coordinates: str, expected: dict[str, object]
) -> None:
    # The label is what the model wrote: the recognised text for OCR, the element for GUI.
    forced = f"<|object_ref_start|>Total: 42,00 €<|object_ref_end|><|box_start|>{coordinates}<|box_end|>"
    result = await detect(tiny_client, forced, task=task, categories=["word" if task == "ocr_box" else "button"])
    (detection,) = result["detections"]  # type: ignore[misc]
    assert {k: v for k, v in detection.items() if k not in ("score",)} == {"label": "Total: 42,00 €", **expected}
    assert result["skipped"] == 0
