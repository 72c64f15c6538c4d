"""The tasks Rex-Omni was trained on: prompt templates and keypoint sets, byte for byte.

A template that differs by one character from the trained text gives worse detections, so
these strings are copied exactly from the reference implementation (including the doubled
quote of ``gui_grounding``). Unit tests compare them against the literal text.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Task(StrEnum):
    DETECTION = "detection"
    POINTING = "pointing"
    VISUAL_PROMPTING = "visual_prompting"
    KEYPOINT = "keypoint"
    OCR_BOX = "ocr_box"
    OCR_POLYGON = "ocr_polygon"
    GUI_GROUNDING = "gui_grounding"
    GUI_POINTING = "gui_pointing"


class Geometry(StrEnum):
    """What one detection of a task is expected to be (decides when it is complete)."""

    BOX = "box"
    POINT = "point"
    POLYGON = "polygon"
    KEYPOINTS = "keypoints"


@dataclass(frozen=True)
class TaskSpec:
    task: Task
    template: str
    geometry: Geometry
    description: str
    requires_categories: bool = True
    requires_visual_prompt: bool = False
    requires_keypoint_type: bool = False
    # OCR tasks: the phrase of each group is the recognised text, not a category.
    phrase_is_text: bool = False


TASKS: dict[Task, TaskSpec] = {
    spec.task: spec
    for spec in (
        TaskSpec(
            Task.DETECTION,
            "Detect {categories}. Output the bounding box coordinates in [x0, y0, x1, y1] format.",
            Geometry.BOX,
            "Boxes around every instance of the named categories.",
        ),
        TaskSpec(
            Task.POINTING,
            "Point to {categories}.",
            Geometry.POINT,
            "One point on every instance of the named categories.",
        ),
        TaskSpec(
            Task.VISUAL_PROMPTING,
            "Given reference boxes {visual_prompt} indicating one or more objects, "
            "find all similar objects in the image and output their bounding boxes.",
            Geometry.BOX,
            "Boxes around objects similar to the reference boxes.",
            requires_categories=False,
            requires_visual_prompt=True,
        ),
        TaskSpec(
            Task.KEYPOINT,
            "Can you detect each {categories} in the image using a [x0, y0, x1, y1] box format, "
            "and then provide the coordinates of its {keypoints} as [x0, y0]? "
            "Output the answer in JSON format.",
            Geometry.KEYPOINTS,
            "A box and named keypoints for every instance (person or animal keypoint set).",
            requires_keypoint_type=True,
        ),
        TaskSpec(
            Task.OCR_BOX,
            "Detect all {categories} and recognize them.",
            Geometry.BOX,
            "Boxes around text (categories e.g. 'word', 'text line'); the label is the text.",
            phrase_is_text=True,
        ),
        TaskSpec(
            Task.OCR_POLYGON,
            "Can you detect all {categories} in this image in polygon format like "
            "[x0, y0, x1, y1, x2, y2 ...] and then recognize them?",
            Geometry.POLYGON,
            "Polygons around text; the label is the text.",
            phrase_is_text=True,
        ),
        TaskSpec(
            Task.GUI_GROUNDING,
            'Detect element "{categories}"" in the image.',
            Geometry.BOX,
            "A box around the described GUI element.",
        ),
        TaskSpec(
            Task.GUI_POINTING,
            'Point to element "{categories}".',
            Geometry.POINT,
            "A point on the described GUI element.",
        ),
    )
}

KEYPOINT_SETS: dict[str, tuple[str, ...]] = {
    "person": (
        "nose",
        "left eye",
        "right eye",
        "left ear",
        "right ear",
        "left shoulder",
        "right shoulder",
        "left elbow",
        "right elbow",
        "left wrist",
        "right wrist",
        "left hip",
        "right hip",
        "left knee",
        "right knee",
        "left ankle",
        "right ankle",
    ),
    "animal": (
        "left eye",
        "right eye",
        "nose",
        "neck",
        "root of tail",
        "left shoulder",
        "left elbow",
        "left front paw",
        "right shoulder",
        "right elbow",
        "right front paw",
        "left hip",
        "left knee",
        "left back paw",
        "right hip",
        "right knee",
        "right back paw",
    ),
}
