"""Task text and chat wrapping: pure functions of the request, no I/O."""

from __future__ import annotations

import json
from collections.abc import Sequence

from rexomni_server.coords import bin_token, to_bin
from rexomni_server.errors import InvalidRequest
from rexomni_server.schemas import DetectParams
from rexomni_server.tasks import KEYPOINT_SETS, TASKS, Task
from rexomni_server.vocabulary import END_MARKER

SYSTEM_PROMPT = "You are a helpful assistant"
IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
IMAGE_PAD = "<|image_pad|>"

Box = Sequence[float]


def encode_visual_prompt(boxes: Sequence[Box], width: int, height: int) -> str:
    """Reference boxes in original-image pixels -> the JSON text the model was trained on."""
    encoded = [
        "".join(bin_token(to_bin(value, width if i % 2 == 0 else height)) for i, value in enumerate(box))
        for box in boxes
    ]
    # json.dumps default spacing is part of the trained text.
    return json.dumps({"object_1": encoded})


def build_task_text(
    task: Task,
    categories: Sequence[str] = (),
    *,
    keypoint_type: str | None = None,
    visual_prompt_boxes: Sequence[Box] | None = None,
    image_size: tuple[int, int] | None = None,
) -> str:
    """The user text for one task, byte for byte the trained template."""
    spec = TASKS[task]
    if spec.requires_visual_prompt:
        if not visual_prompt_boxes:
            raise InvalidRequest("visual_prompting needs at least one box in visual_prompt_boxes")
        if image_size is None:
            raise InvalidRequest("visual_prompting needs the image size to encode its boxes")
        width, height = image_size
        return spec.template.format(visual_prompt=encode_visual_prompt(visual_prompt_boxes, width, height))
    if spec.requires_categories and not categories:
        raise InvalidRequest(f"task {task.value!r} needs at least one category")
    joined = ", ".join(categories)
    if spec.requires_keypoint_type:
        if keypoint_type not in KEYPOINT_SETS:
            raise InvalidRequest(f"task 'keypoint' needs keypoint_type, one of {sorted(KEYPOINT_SETS)}")
        return spec.template.format(categories=joined, keypoints=", ".join(KEYPOINT_SETS[keypoint_type]))
    return spec.template.format(categories=joined)


def task_text_for(params: DetectParams, image_size: tuple[int, int] | None) -> str:
    """The task text of a validated request (the image size encodes visual prompts)."""
    return build_task_text(
        params.task,
        params.categories,
        keypoint_type=params.keypoint_type,
        visual_prompt_boxes=params.visual_prompt_boxes,
        image_size=image_size,
    )


def build_chat_prompt(task_text: str, image_tokens: int = 1) -> str:
    """Qwen2.5-VL chat text: system turn, user turn with the image then the task, open assistant.

    ``image_tokens`` repeats ``<|image_pad|>``: engines that feed token ids directly (transformers)
    expand it to the number of merged patches; vLLM expands a single placeholder itself.
    """
    image = IMAGE_PLACEHOLDER.replace(IMAGE_PAD, IMAGE_PAD * image_tokens)
    return (
        f"<|im_start|>system\n{SYSTEM_PROMPT}{END_MARKER}\n"
        f"<|im_start|>user\n{image}{task_text}{END_MARKER}\n"
        "<|im_start|>assistant\n"
    )
