"""Prompts must be the trained text byte for byte: literals copied from REXOMNI.md."""

from __future__ import annotations

import json

import pytest

from rexomni_server.errors import InvalidRequest
from rexomni_server.prompts import build_chat_prompt, build_task_text, encode_visual_prompt
from rexomni_server.tasks import KEYPOINT_SETS, TASKS, Task

PERSON_KEYPOINTS = (
    "nose, left eye, right eye, left ear, right ear, left shoulder, right shoulder, "
    "left elbow, right elbow, left wrist, right wrist, left hip, right hip, left knee, "
    "right knee, left ankle, right ankle"
)
ANIMAL_KEYPOINTS = (
    "left eye, right eye, nose, neck, root of tail, left shoulder, left elbow, "
    "left front paw, right shoulder, right elbow, right front paw, left hip, left knee, "
    "left back paw, right hip, right knee, right back paw"
)


@pytest.mark.parametrize(
    ("task", "categories", "expected"),
    [
        (
            Task.DETECTION,
            ["person", "car"],
            "Detect person, car. Output the bounding box coordinates in [x0, y0, x1, y1] format.",
        ),
        (Task.POINTING, ["cup"], "Point to cup."),
        (Task.OCR_BOX, ["word"], "Detect all word and recognize them."),
        (
            Task.OCR_POLYGON,
            ["text line"],
            "Can you detect all text line in this image in polygon format like "
            "[x0, y0, x1, y1, x2, y2 ...] and then recognize them?",
        ),
        (Task.GUI_GROUNDING, ["search bar"], 'Detect element "search bar"" in the image.'),
        (Task.GUI_POINTING, ["close button"], 'Point to element "close button".'),
    ],
)
def test_category_templates_are_byte_exact(task: Task, categories: list[str], expected: str) -> None:
    assert build_task_text(task, categories) == expected


@pytest.mark.parametrize(("kind", "names"), [("person", PERSON_KEYPOINTS), ("animal", ANIMAL_KEYPOINTS)])
def test_keypoint_template_lists_the_set(kind: str, names: str) -> None:
    text = build_task_text(Task.KEYPOINT, [kind], keypoint_type=kind)
    assert text == (
        f"Can you detect each {kind} in the image using a [x0, y0, x1, y1] box format, "
        f"and then provide the coordinates of its {names} as [x0, y0]? Output the answer in JSON format."
    )
    assert len(KEYPOINT_SETS[kind]) == 17


def test_visual_prompt_encodes_pixel_boxes_to_bins_with_json_dumps_spacing() -> None:
    text = build_task_text(
        Task.VISUAL_PROMPTING,
        visual_prompt_boxes=[[100, 50, 300, 200], [0, 0, 1000, 500]],
        image_size=(1000, 500),
    )
    # 100/1000*999 = 99.9 -> 99; 50/500*999 = 99.9 -> 99; 300/1000*999 = 299.7 -> 299; ...
    assert text == (
        'Given reference boxes {"object_1": ["<99><99><299><399>", "<0><0><999><999>"]} '
        "indicating one or more objects, find all similar objects in the image and output "
        "their bounding boxes."
    )


def test_visual_prompt_clamps_boxes_outside_the_image() -> None:
    encoded = json.loads(encode_visual_prompt([[-10, -10, 5000, 5000]], 100, 100))
    assert encoded == {"object_1": ["<0><0><999><999>"]}


def test_chat_prompt_wraps_system_image_and_task() -> None:
    assert build_chat_prompt("Point to cup.") == (
        "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Point to cup.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_chat_prompt_expands_image_pads() -> None:
    assert build_chat_prompt("x", image_tokens=3).count("<|image_pad|>") == 3


def test_missing_inputs_are_clear_errors() -> None:
    with pytest.raises(InvalidRequest, match="category"):
        build_task_text(Task.DETECTION, [])
    with pytest.raises(InvalidRequest, match="keypoint_type"):
        build_task_text(Task.KEYPOINT, ["person"], keypoint_type="hand")
    with pytest.raises(InvalidRequest, match="visual_prompt_boxes"):
        build_task_text(Task.VISUAL_PROMPTING, image_size=(10, 10))


def test_every_task_has_a_spec() -> None:
    assert set(TASKS) == set(Task)
