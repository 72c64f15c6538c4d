"""The public JSON API: the single source of truth for HTTP, the Python client and gRPC."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from rexomni_server.tasks import KEYPOINT_SETS, Task
from rexomni_server.vocabulary import PATCH_SIDE, FinishReason

# Every limit below is declared where pydantic enforces it while parsing, so hostile input is
# refused after at most limit + 1 items instead of after validating (and cleaning) all of them.
MAX_CATEGORIES = 64  # distinct categories, after blanks and repeats are dropped
# Entries of the list as sent, blanks and repeats included: room for a client's duplicates
# (dropped before MAX_CATEGORIES counts) without validating an unbounded list.
MAX_CATEGORY_ENTRIES = 4 * MAX_CATEGORIES
MAX_CATEGORY_CHARS = 256  # per category, surrounding whitespace not counted
# A comma-separated string is refused by its length before it is split: MAX_CATEGORY_ENTRIES
# entries of MAX_CATEGORY_CHARS characters and their commas fit, so only whitespace padding
# beyond that could be refused where a list would pass.
MAX_CATEGORIES_STRING_CHARS = MAX_CATEGORY_ENTRIES * (MAX_CATEGORY_CHARS + 1)
MAX_VISUAL_PROMPT_BOXES = 64
# A 400-box answer is about 25k characters; no generation budget needs ten times that.
MAX_FORCED_OUTPUT_CHARS = 262_144
# Per-tile forced outputs: one per tile of a tiled request (the server's max_tiles grid tiles and
# the whole-image pass); the server refuses a list whose length is not its plan's tile count.
MAX_FORCED_TILE_OUTPUTS = 1025
DEFAULT_TILE_OVERLAP = 0.2
MAX_TILE_OVERLAP = 0.5
DEFAULT_MERGE_IOU = 0.5
# Every HTTP response carries the request's id in this header (the client's own, if it sent one).
REQUEST_ID_HEADER = "X-Request-ID"

XY = Annotated[list[float], Field(min_length=2, max_length=2)]
XYXY = Annotated[list[float], Field(min_length=4, max_length=4)]


def _stripped(value: object) -> object:
    """Surrounding whitespace is no part of a category, nor of its length. Python's strip, not
    pydantic's strip_whitespace: that one leaves U+001C..U+001F, which str.strip removes."""
    return value.strip() if isinstance(value, str) else value


# The last annotation runs first: stripped, then held to its length.
Category = Annotated[str, StringConstraints(max_length=MAX_CATEGORY_CHARS), BeforeValidator(_stripped)]


class _Strict(BaseModel):
    """Requests: an unknown field is a mistake (a misspelt option), refused."""

    model_config = ConfigDict(extra="forbid")


class _Answer(BaseModel):
    """Responses: a client reading a newer server's answer ignores fields it does not know
    (fields may be added within v1), instead of failing on them."""

    model_config = ConfigDict(extra="ignore")


def validation_summary(errors: Iterable[Mapping[str, Any]]) -> str:
    """``field.path: message; ...`` for pydantic (and FastAPI) validation errors, the JSON
    body's own ``body`` prefix left out: the one wording every transport and client uses."""
    return "; ".join(
        f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'request'}: {e.get('msg')}" for e in errors
    )


# ---- detections -----------------------------------------------------------------------------
class _DetectionBase(_Answer):
    label: str = Field(description="Category, GUI element, or the recognised text (OCR tasks).")
    score: float | None = Field(default=None, description="Confidence in [0, 1] where the engine can compute one.")


class BoxDetection(_DetectionBase):
    type: Literal["box"] = "box"
    box: XYXY = Field(description="[x0, y0, x1, y1] in pixels of the original image.")


class PointDetection(_DetectionBase):
    type: Literal["point"] = "point"
    point: XY = Field(description="[x, y] in pixels of the original image.")


class PolygonDetection(_DetectionBase):
    type: Literal["polygon"] = "polygon"
    polygon: list[XY] = Field(min_length=3, description="[[x, y], ...] vertices in pixels.")


class KeypointsDetection(_DetectionBase):
    type: Literal["keypoints"] = "keypoints"
    box: XYXY
    keypoints: dict[str, XY | None] = Field(description="Name -> [x, y], or null when hidden.")


DetectionModel = Annotated[
    BoxDetection | PointDetection | PolygonDetection | KeypointsDetection,
    Field(discriminator="type"),
]


# ---- requests -------------------------------------------------------------------------------
class TilingOptions(_Strict):
    """Tiled detection for large images: overlapping tiles, each run at (close to) native
    resolution as an engine request of its own, merged back into one answer (README: Tiling)."""

    tile_size: int | None = Field(
        default=None,
        ge=PATCH_SIDE,
        description="Square tile side in original-image pixels. Default (auto): the fewest tiles that "
        "each fit max_pixels, so the model sees them pixel for pixel.",
    )
    overlap: float = Field(
        default=DEFAULT_TILE_OVERLAP,
        ge=0.0,
        le=MAX_TILE_OVERLAP,
        description="Least share of a tile's side that adjacent tiles overlap (objects cut by one tile "
        "are whole in the next when smaller than the overlap).",
    )
    whole_image: bool = Field(
        default=True,
        description="Also run the whole image (resized as without tiling), for objects larger than a "
        "tile and objects cut by tile edges.",
    )
    iou_threshold: float = Field(
        default=DEFAULT_MERGE_IOU,
        gt=0.0,
        le=1.0,
        description="Two detections of one label from different tiles are one object at this IoU "
        "of their boxes or more.",
    )


def _auto_tiling(value: object) -> object:
    if value == "auto":
        return {}
    if value is None or isinstance(value, dict | TilingOptions):
        return value
    raise PydanticCustomError(
        "tiling", 'tiling is "auto", or an object with tile_size, overlap, whole_image and iou_threshold'
    )


class DetectOptions(_Strict):
    max_new_tokens: int | None = Field(
        default=None, ge=1, description="Generation budget; default and ceiling set by the server."
    )
    min_pixels: int | None = Field(default=None, ge=1, description="smart_resize lower bound.")
    max_pixels: int | None = Field(default=None, ge=1, description="smart_resize upper bound.")
    return_raw_output: bool = Field(default=False, description="Include the model's raw text.")
    max_detections: int | None = Field(
        default=None, ge=1, description="Stop generating once this many detections were found."
    )
    stop_on_repetition: bool = Field(
        default=True,
        description="Stop when the model repeats boxes it already gave (its known runaway failure).",
    )
    scores: bool = Field(
        default=True,
        description="Score every detection from its coordinate tokens' log-probabilities "
        "(costs the engine a log-probability per token; off leaves score null).",
    )
    fan_out: bool | None = Field(
        default=None,
        description="One engine request per category, run concurrently and merged in category "
        "order (detection/pointing). Default: on where the engine batches concurrent requests.",
    )
    priority: int = Field(
        default=0,
        ge=-1000,
        le=1000,
        description="Scheduling priority, lower first (e.g. 10 for batch jobs, -10 for interactive "
        "users); equal priorities run in arrival order. Honoured by the vLLM engine when the server "
        "schedules by priority (REXOMNI_VLLM_SCHEDULING_POLICY=priority); refused elsewhere unless 0.",
    )
    tiling: Annotated[TilingOptions | None, BeforeValidator(_auto_tiling)] = Field(
        default=None,
        description='Tiled detection for images larger than max_pixels: "auto", or tile_size, overlap, '
        "whole_image and iou_threshold. Off by default; refused for GUI tasks and visual prompting.",
    )
    forced_output: str | None = Field(
        default=None,
        max_length=MAX_FORCED_OUTPUT_CHARS,
        description="Testing/benchmarking only: the raw output the model is forced to write (every "
        "tile's, when tiled). Rejected unless the server enables forced outputs.",
    )
    forced_tile_outputs: (
        Annotated[
            list[Annotated[str, Field(max_length=MAX_FORCED_OUTPUT_CHARS)]],
            Field(min_length=1, max_length=MAX_FORCED_TILE_OUTPUTS),
        ]
        | None
    ) = Field(
        default=None,
        description="Testing/benchmarking only, tiled requests: one forced output per tile (grid tiles "
        "row by row, then the whole-image pass). Rejected unless the server enables forced outputs.",
    )

    @model_validator(mode="after")
    def _one_forced_output(self) -> DetectOptions:
        if self.forced_output is not None and self.forced_tile_outputs is not None:
            raise ValueError("set forced_output or forced_tile_outputs, not both")
        return self


class DetectParams(_Strict):
    """Everything about a request except the image (shared by JSON, multipart and gRPC)."""

    task: Task = Task.DETECTION
    categories: list[Category] = Field(
        default_factory=list,
        max_length=MAX_CATEGORY_ENTRIES,
        description=f"Phrases to find; a comma-separated string (at most {MAX_CATEGORIES_STRING_CHARS} "
        f"characters) is accepted. Blanks and repeats (ignoring case) are dropped: at most "
        f"{MAX_CATEGORY_ENTRIES} entries as sent, {MAX_CATEGORIES} distinct ones, each at most "
        f"{MAX_CATEGORY_CHARS} characters.",
    )
    keypoint_type: Literal["person", "animal"] | None = Field(
        default=None, description="Keypoint set for task=keypoint (default: the category name)."
    )
    visual_prompt_boxes: list[XYXY] | None = Field(
        default=None,
        max_length=MAX_VISUAL_PROMPT_BOXES,
        description="Reference boxes [x0, y0, x1, y1] in original-image pixels.",
    )
    options: DetectOptions = Field(default_factory=DetectOptions)

    @field_validator("categories", mode="before")
    @classmethod
    def _split_categories(cls, value: object) -> object:
        if isinstance(value, str):
            if len(value) > MAX_CATEGORIES_STRING_CHARS:
                # Refused whole: splitting a huge string would build the huge list pydantic's
                # own limit is there to avoid.
                raise PydanticCustomError(
                    "string_too_long",
                    "a comma-separated string of categories may have at most {max_length} characters",
                    {"max_length": MAX_CATEGORIES_STRING_CHARS},
                )
            return value.split(",")
        return value

    @field_validator("categories")
    @classmethod
    def _clean_categories(cls, value: list[str]) -> list[str]:
        # Empty ones (already stripped) dropped, repeats (ignoring case) dropped: with fan-out a
        # repeated category would be asked twice and every detection returned twice.
        seen: set[str] = set()
        cleaned = []
        for category in value:
            if category and category.casefold() not in seen:
                seen.add(category.casefold())
                cleaned.append(category)
        if len(cleaned) > MAX_CATEGORIES:
            raise ValueError(f"at most {MAX_CATEGORIES} distinct categories per request")
        for category in cleaned:
            if "<|" in category or "|>" in category:
                raise ValueError("categories may not contain special-token markers '<|' or '|>'")
        return cleaned

    @field_validator("visual_prompt_boxes")
    @classmethod
    def _check_boxes(cls, value: list[list[float]] | None) -> list[list[float]] | None:
        if value is None:
            return None
        for x0, y0, x1, y1 in value:
            if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
                raise ValueError("visual prompt box coordinates must be finite numbers")
            if x1 <= x0 or y1 <= y0:
                raise ValueError("each visual prompt box needs x1 > x0 and y1 > y0")
        return value

    @model_validator(mode="after")
    def _check_task_inputs(self) -> DetectParams:
        if self.task is Task.VISUAL_PROMPTING:
            if not self.visual_prompt_boxes:
                raise ValueError("task 'visual_prompting' needs visual_prompt_boxes")
        elif not self.categories:
            raise ValueError(f"task {self.task.value!r} needs at least one category")
        if self.task is Task.KEYPOINT and self.keypoint_type is None:
            # Sensible default: a category that names a keypoint set picks it.
            if len(self.categories) == 1 and self.categories[0] in KEYPOINT_SETS:
                self.keypoint_type = self.categories[0]  # type: ignore[assignment]
            else:
                raise ValueError(f"task 'keypoint' needs keypoint_type, one of {sorted(KEYPOINT_SETS)}")
        return self


class DetectRequest(DetectParams):
    """``POST /v1/detect`` body."""

    image: str = Field(description="The image as base64 or a data URI (data:image/png;base64,...).")


# ---- results --------------------------------------------------------------------------------
class ImageInfo(_Answer):
    width: int
    height: int
    resized_width: int = Field(description="Width of the image the model saw (smart_resize).")
    resized_height: int


class TileInfo(_Answer):
    """One tile of a tiled request: the pixels [x0, x1) x [y0, y1) of the original image."""

    x0: int
    y0: int
    x1: int
    y1: int
    whole: bool = Field(default=False, description="The whole-image pass.")
    resized_width: int = Field(description="Width of the tile as the model saw it.")
    resized_height: int


class Usage(_Answer):
    prompt_tokens: int
    completion_tokens: int


class Timings(_Answer):
    queue_ms: float = Field(
        description="Until the engine started the request: waiting for a generation slot (on vLLM, "
        "which reports nothing earlier, until its first token, so prefill included)."
    )
    first_detection_ms: float | None = Field(description="From arrival to the first detection.")
    total_ms: float


class DetectResult(_Answer):
    request_id: str
    model: str
    task: Task
    detections: list[DetectionModel]
    image: ImageInfo
    truncated: bool = Field(description="The output was cut off (max_new_tokens) mid-answer.")
    finish_reason: FinishReason = Field(
        description="stop (the model ended), length (max_new_tokens), abort, max_detections, "
        "or repetition (the runaway guard stopped repeated boxes)."
    )
    skipped: int = Field(description="Unparseable pieces of the output that were ignored.")
    duplicates: int = Field(default=0, description="Exact repeats of earlier detections, dropped.")
    usage: Usage = Field(description="Tokens of every engine request (every tile, every category) summed.")
    timings: Timings
    raw_output: str | None = Field(
        default=None,
        description="The model's text; with fan-out or tiling each engine request's, joined by ', ' "
        "(tiles in their own coordinates).",
    )
    tiles: list[TileInfo] | None = Field(default=None, description="The tiles of a tiled request, else null.")


class ErrorBody(_Answer):
    code: str
    message: str
    request_id: str | None = None


class ErrorResponse(_Answer):
    error: ErrorBody


class TaskInfo(_Answer):
    name: Task
    template: str
    description: str
    output: str
    requires_categories: bool
    requires_visual_prompt: bool
    requires_keypoint_type: bool
    tileable: bool = Field(default=True, description="options.tiling applies to the task.")


class TasksResponse(_Answer):
    tasks: list[TaskInfo]
    keypoint_sets: dict[str, list[str]]
