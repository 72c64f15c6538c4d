"""Label Studio ML backend logic: a project's label config read into Rex-Omni requests, and
Rex-Omni's results written as Label Studio predictions. Pure: no I/O (the routes and the image
downloads are in ``transport/label_studio.py``).

A label config names what to draw. Each control tag linked to an ``<Image>`` becomes one or
more Rex-Omni requests per task (a *job*):

- ``RectangleLabels``: ``detection`` over its labels; text labels ("Text", "Word", "Text line",
  ...) instead ``ocr_box``, the recognised text going to a per-region ``TextArea`` when the
  config has one (else to the region's ``meta``).
- ``KeyPointLabels``: ``keypoint`` when every label names a keypoint of one of Rex-Omni's
  keypoint sets ("nose", "left_eye", ...), one point region per visible keypoint of each
  instance, plus the instance's box when a ``RectangleLabels`` on the same image has a label
  for it; otherwise ``pointing`` over its labels.
- ``PolygonLabels``: Rex-Omni draws polygons only around text, so text labels become
  ``ocr_polygon``; object labels are left out (boxes turned into four-point polygons would
  pass for outlines they are not).

A ``<Label>`` is asked for by its ``value``, or by the comma-separated phrases of its
``predicted_values`` attribute (e.g. ``<Label value="Vehicle" predicted_values="car,truck"/>``);
underscores become spaces. A control tag with ``model_skip="true"`` is left out, and one with
``model_score_threshold="0.4"`` drops detections scored below it.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal, TypedDict
from urllib.parse import quote, urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rexomni_server.errors import InvalidImage, InvalidRequest
from rexomni_server.schemas import (
    MAX_CATEGORIES,
    BoxDetection,
    DetectionModel,
    DetectParams,
    DetectResult,
    KeypointsDetection,
    PointDetection,
    PolygonDetection,
    validation_summary,
)
from rexomni_server.tasks import KEYPOINT_SETS, Task

MODEL_CLASS = "RexOmni"  # what /health names, as the SDK's backends name their model class
MAX_CONFIG_CHARS = 1_000_000  # a label config is a few kilobytes; far more is not one
MAX_TASKS = 1000  # per /predict call (Label Studio asks for one task, or a Data Manager batch)
# Drawn size of a predicted point, in percent of the image width (Label Studio's keypoint width).
KEYPOINT_WIDTH_PERCENT = 0.5
# Data key Label Studio uses when an imported task's key does not match the config.
UNDEFINED_DATA_KEY = "$undefined$"
CLOUD_SCHEMES = frozenset({"s3", "gs", "azure-blob"})
# Labels read as text: such a label asks for OCR (its regions carry the recognised text).
TEXT_LABELS = frozenset(
    {
        "text",
        "texts",
        "word",
        "words",
        "text line",
        "text lines",
        "textline",
        "textlines",
        "line of text",
        "handwriting",
        "handwritten text",
        "printed text",
        "text block",
        "text region",
        "ocr",
    }
)
WORD_LABELS = frozenset({"word", "words"})  # asked as "word"; other text labels as "text line"


def normalize(name: str) -> str:
    """Case-, underscore- and spacing-blind form of a label or keypoint name."""
    return " ".join(name.replace("_", " ").replace("-", " ").split()).casefold()


def prompt_phrase(name: str) -> str:
    """A label as the model is asked for it: underscores as spaces, spacing collapsed."""
    return " ".join(name.replace("_", " ").split())


# ---- the wire: what Label Studio sends ---------------------------------------------------------
class _FromLabelStudio(BaseModel):
    """Label Studio's bodies: fields it adds in a newer version are ignored, not refused."""

    model_config = ConfigDict(extra="ignore", protected_namespaces=())


class LabelStudioTask(_FromLabelStudio):
    id: int | str | None = None
    data: dict[str, Any] = Field(default_factory=dict)


class PredictParams(_FromLabelStudio):
    login: str | None = None
    password: str | None = None
    context: Any = None


class PredictRequest(_FromLabelStudio):
    """``POST /label-studio/predict``, as Label Studio's ``MLApi.make_predictions`` sends it."""

    tasks: list[LabelStudioTask] = Field(max_length=MAX_TASKS)
    label_config: str | None = Field(default=None, max_length=MAX_CONFIG_CHARS)
    project: str | int | None = Field(default=None, description="'<project id>.<created timestamp>'")
    model_version: str | None = None
    params: PredictParams | None = None


class SetupRequest(_FromLabelStudio):
    """``POST /label-studio/setup``: sent when the model is connected and before predictions."""

    project: str | int | None = None
    label_config: str = Field(alias="schema", max_length=MAX_CONFIG_CHARS)
    hostname: str | None = Field(default=None, description="Label Studio's own idea of its URL.")
    access_token: str | None = Field(default=None, description="The project owner's legacy token.")
    model_version: str | None = None
    extra_params: Any = None


class ValidateRequest(_FromLabelStudio):
    """``POST /label-studio/validate``: older Label Studio versions check a config with it."""

    config: str = Field(max_length=MAX_CONFIG_CHARS)


def project_id(project: str | int | None) -> str | None:
    """``"12.1712345678"`` -> ``"12"``."""
    if project is None:
        return None
    text = str(project).split(".", 1)[0].strip()
    return text or None


# ---- the wire: what we answer --------------------------------------------------------------------
class _ToLabelStudio(BaseModel):
    model_config = ConfigDict(protected_namespaces=(), populate_by_name=True)


class RectangleValue(_ToLabelStudio):
    x: float
    y: float
    width: float
    height: float
    rotation: float = 0.0
    rectanglelabels: list[str]


class KeyPointValue(_ToLabelStudio):
    x: float
    y: float
    width: float
    keypointlabels: list[str]


class PolygonValue(_ToLabelStudio):
    points: list[list[float]]
    polygonlabels: list[str]


class TextAreaValue(_ToLabelStudio):
    """A per-region transcription: the region's geometry and its text."""

    x: float | None = None
    y: float | None = None
    width: float | None = None
    height: float | None = None
    rotation: float | None = None
    points: list[list[float]] | None = None
    text: list[str]


RegionKind = Literal["rectanglelabels", "keypointlabels", "polygonlabels", "textarea"]


class Region(_ToLabelStudio):
    """One item of a prediction's ``result``; coordinates in percent of the original image."""

    id: str
    from_name: str
    to_name: str
    type: RegionKind
    original_width: int
    original_height: int
    image_rotation: int = 0
    value: RectangleValue | KeyPointValue | PolygonValue | TextAreaValue
    score: float | None = None
    # Keypoints of one instance point at the instance's box (Label Studio groups them).
    parent_id: str | None = Field(default=None, serialization_alias="parentID")
    meta: dict[str, list[str]] | None = None


class PredictionError(_ToLabelStudio):
    code: str
    message: str


class Prediction(_ToLabelStudio):
    """One task's prediction. ``error``: why it is empty (Label Studio ignores the field)."""

    model_version: str
    score: float | None = None
    result: list[Region]
    error: PredictionError | None = None


class PredictResponse(_ToLabelStudio):
    results: list[Prediction]
    model_version: str


class SetupResponse(_ToLabelStudio):
    model_version: str
    warnings: list[str] = Field(default_factory=list, description="Control tags left out, and why.")


class ValidateResponse(_ToLabelStudio):
    status: Literal["ok"] = "ok"
    warnings: list[str] = Field(default_factory=list, description="Control tags left out, and why.")


class HealthResponse(_ToLabelStudio):
    status: Literal["UP", "DOWN"]
    model_class: str = MODEL_CLASS
    error: str | None = None


class WebhookResponse(_ToLabelStudio):
    status: Literal["ignored"] = "ignored"
    message: str


# ---- the label config --------------------------------------------------------------------------
class ControlKind(StrEnum):
    RECTANGLE = "rectanglelabels"
    KEYPOINT = "keypointlabels"
    POLYGON = "polygonlabels"


CONTROL_TAGS = {kind.value: kind for kind in ControlKind}
CONTROL_NAMES = {
    ControlKind.RECTANGLE: "RectangleLabels",
    ControlKind.KEYPOINT: "KeyPointLabels",
    ControlKind.POLYGON: "PolygonLabels",
}


@dataclass(frozen=True)
class ImageSource:
    """An ``<Image>``: its name (regions' ``to_name``) and where a task keeps its URL."""

    name: str
    data_key: str | None  # value="$image" -> "image"
    literal: str | None = None  # a value without "$" is the URL itself

    def reference(self, task: LabelStudioTask) -> str:
        """The task's image reference (URL, Label Studio path or data URI)."""
        if self.literal is not None:
            return self.literal
        assert self.data_key is not None
        value = task.data.get(self.data_key)
        if value is None:
            value = task.data.get(UNDEFINED_DATA_KEY)
        if not isinstance(value, str) or not value.strip():
            keys = ", ".join(sorted(map(printable, task.data))) or "none"
            raise InvalidImage(
                f"task {printable(task.id)}: data.{self.data_key} (the <Image name={self.name!r}> value) holds no "
                f"image URL; the task's data keys: {keys}"
            )
        return value.strip()


@dataclass(frozen=True)
class LabelDef:
    value: str  # what Label Studio shows and stores
    phrases: tuple[str, ...]  # what Rex-Omni is asked for
    predicted: bool  # the phrases came from predicted_values

    @property
    def is_text(self) -> bool:
        if normalize(self.value) in TEXT_LABELS:
            return True
        return self.predicted and all(normalize(p) in TEXT_LABELS for p in self.phrases)

    def ocr_phrases(self) -> tuple[str, ...]:
        if self.predicted:
            return self.phrases
        return ("word",) if normalize(self.value) in WORD_LABELS else ("text line",)


@dataclass(frozen=True)
class Control:
    kind: ControlKind
    name: str  # regions' from_name
    image: ImageSource
    labels: tuple[LabelDef, ...]
    score_threshold: float | None = None

    def describe(self) -> str:
        return f"<{CONTROL_NAMES[self.kind]} name={self.name!r}>"


@dataclass(frozen=True)
class Job:
    """One Rex-Omni request per task, and how its answer becomes regions."""

    params: DetectParams
    control: Control  # the control tag its regions belong to
    # Normalised phrase (detection, pointing) or keypoint name (keypoint) -> the Label's value.
    labels: dict[str, str] = field(default_factory=dict)
    # keypoint: the RectangleLabels the instance boxes go to, normalised instance phrase -> value.
    box_control: Control | None = None
    box_labels: dict[str, str] = field(default_factory=dict)
    # OCR: every region's label, and the per-region TextArea that takes the recognised text.
    text_label: str | None = None
    transcription: str | None = None

    @property
    def image(self) -> ImageSource:
        return self.control.image


@dataclass(frozen=True)
class LabelConfig:
    jobs: tuple[Job, ...]
    warnings: tuple[str, ...] = ()  # control tags left out, and why

    @property
    def images(self) -> tuple[ImageSource, ...]:
        return tuple(dict.fromkeys(job.image for job in self.jobs))


def _attr(element: ET.Element, name: str) -> str | None:
    """An attribute by name, ignoring case (``toName`` / ``toname``)."""
    wanted = name.casefold()
    for key, value in element.attrib.items():
        if key.casefold() == wanted:
            return value
    return None


def _is_true(value: str | None) -> bool:
    return (value or "").strip().casefold() in {"1", "true", "yes"}


def _tag(element: ET.Element) -> str:
    return element.tag.casefold() if isinstance(element.tag, str) else ""


def _read_xml(xml: str) -> ET.Element:
    if len(xml) > MAX_CONFIG_CHARS:
        raise InvalidRequest(f"the label config has more than {MAX_CONFIG_CHARS} characters")
    if re.search(r"<!(DOCTYPE|ENTITY)", xml, re.IGNORECASE):
        raise InvalidRequest("the label config may not declare a DOCTYPE or entities")
    try:
        return ET.fromstring(xml)
    except ET.ParseError as exc:
        raise InvalidRequest(f"the label config is not valid XML: {exc}") from None
    except UnicodeError:  # a lone surrogate (JSON can carry one): no XML text
        raise InvalidRequest("the label config is not valid XML: it is not Unicode text") from None


def _image_source(element: ET.Element) -> ImageSource | None:
    name = (_attr(element, "name") or "").strip()
    value = (_attr(element, "value") or "").strip()
    if not name or not value:
        return None
    if value.startswith("$"):
        return ImageSource(name, value[1:]) if value[1:] else None
    return ImageSource(name, None, value)


def _labels(element: ET.Element) -> tuple[LabelDef, ...]:
    labels: list[LabelDef] = []
    for child in element.iter():
        if child is element or _tag(child) != "label":
            continue
        value = (_attr(child, "value") or "").strip()
        if not value:
            continue
        predicted = [prompt_phrase(p) for p in (_attr(child, "predicted_values") or "").split(",")]
        phrases = tuple(p for p in predicted if p)
        labels.append(LabelDef(value, phrases or (prompt_phrase(value),), bool(phrases)))
    return tuple(labels)


def _threshold(element: ET.Element, name: str) -> float | None:
    raw = _attr(element, "model_score_threshold")
    if raw is None or not raw.strip():
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= 1.0:
        raise InvalidRequest(f"control {name!r}: model_score_threshold must be a number in [0, 1], not {raw!r}")
    return value


def _params(control: Control, fields: dict[str, Any]) -> DetectParams:
    try:
        return DetectParams.model_validate(fields)
    except ValidationError as exc:
        raise InvalidRequest(f"label config, {control.describe()}: {validation_summary(exc.errors())}") from None


def _phrase_map(labels: Iterable[LabelDef]) -> dict[str, str]:
    """Normalised phrase -> Label value; the first label asking for a phrase keeps it."""
    mapping: dict[str, str] = {}
    for label in labels:
        for phrase in label.phrases:
            mapping.setdefault(normalize(phrase), label.value)
    return mapping


def _chunks(phrases: Sequence[str]) -> Iterator[list[str]]:
    """At most MAX_CATEGORIES distinct phrases (ignoring case) per request."""
    unique = list({normalize(p): p for p in reversed(phrases)}.values())[::-1]
    for start in range(0, len(unique), MAX_CATEGORIES):
        yield unique[start : start + MAX_CATEGORIES]


def keypoint_set(labels: Sequence[LabelDef], boxes: Control | None) -> str | None:
    """The keypoint set whose points every label names (two labels at least), else None.

    Names shared by both sets (eyes, nose, shoulders, ...) read as the person set, unless the
    image's RectangleLabels has labels and none of them is "person"."""
    if len(labels) < 2:
        return None
    names = {normalize(phrase) for label in labels for phrase in label.phrases}
    sets = [name for name, points in KEYPOINT_SETS.items() if names <= {normalize(p) for p in points}]
    if len(sets) <= 1:
        return sets[0] if sets else None
    box_labels = {normalize(p) for label in (boxes.labels if boxes else ()) for p in label.phrases}
    return "animal" if box_labels and "person" not in box_labels else "person"


def parse_label_config(xml: str) -> LabelConfig:
    """The jobs a label config asks for. Raises InvalidRequest when it is not XML, or when it
    has no control tag Rex-Omni can fill (the message says why each was left out)."""
    root = _read_xml(xml)
    images: dict[str, ImageSource] = {}
    textareas: dict[str, str] = {}  # image name -> per-region TextArea name
    elements: list[ET.Element] = []
    for element in root.iter():
        tag = _tag(element)
        if tag == "image":
            source = _image_source(element)
            if source is not None:
                images.setdefault(source.name, source)
        elif tag == "textarea" and _is_true(_attr(element, "perRegion")):
            name = (_attr(element, "name") or "").strip()
            for target in (_attr(element, "toName") or "").split(","):
                if name and target.strip():
                    textareas.setdefault(target.strip(), name)
        elif tag in CONTROL_TAGS:
            elements.append(element)
    warnings: list[str] = []
    controls: list[Control] = []
    for element in elements:
        kind = CONTROL_TAGS[_tag(element)]
        name = (_attr(element, "name") or "").strip()
        described = f"<{CONTROL_NAMES[kind]} name={name!r}>"
        if not name:
            warnings.append(f"<{CONTROL_NAMES[kind]}> without a name is left out")
            continue
        if _is_true(_attr(element, "model_skip")):
            warnings.append(f"{described} is left out (model_skip)")
            continue
        targets = [t.strip() for t in (_attr(element, "toName") or "").split(",")]
        linked = [images[t] for t in targets if t in images]
        if not linked:
            warnings.append(f"{described} is left out: its toName names no <Image> with a $value")
            continue
        labels = _labels(element)
        if not labels:
            warnings.append(f"{described} is left out: it has no <Label value=...> (dynamic labels are not supported)")
            continue
        controls.append(Control(kind, name, linked[0], labels, _threshold(element, name)))

    jobs: list[Job] = []
    for image in dict.fromkeys(c.image for c in controls):
        on_image = [c for c in controls if c.image == image]
        rectangles = [c for c in on_image if c.kind is ControlKind.RECTANGLE]
        transcription = textareas.get(image.name)
        boxed: set[tuple[str, str]] = set()  # (RectangleLabels, label value) a keypoint job draws
        for control in (c for c in on_image if c.kind is ControlKind.KEYPOINT):
            keypoint_job = _keypoint_job(control, rectangles[0] if rectangles else None)
            if keypoint_job is None:
                jobs += _phrase_jobs(control, Task.POINTING, control.labels)
                continue
            if keypoint_job.box_control is not None:
                boxed |= {(keypoint_job.box_control.name, value) for value in keypoint_job.box_labels.values()}
            jobs.append(keypoint_job)
        for control in rectangles:
            remaining = [label for label in control.labels if (control.name, label.value) not in boxed]
            jobs += _phrase_jobs(control, Task.DETECTION, [label for label in remaining if not label.is_text])
            texts = [label for label in remaining if label.is_text]
            if texts:
                jobs.append(_ocr_job(control, Task.OCR_BOX, texts, transcription))
        for control in (c for c in on_image if c.kind is ControlKind.POLYGON):
            texts = [label for label in control.labels if label.is_text]
            objects = [label.value for label in control.labels if not label.is_text]
            if objects:
                warnings.append(
                    f"{control.describe()}: labels {', '.join(map(repr, objects))} are left out: Rex-Omni draws "
                    "polygons only around text (use RectangleLabels for objects)"
                )
            if texts:
                jobs.append(_ocr_job(control, Task.OCR_POLYGON, texts, transcription))
    if not jobs:
        why = "; ".join(warnings) or "it has no RectangleLabels, KeyPointLabels or PolygonLabels linked to an <Image>"
        raise InvalidRequest(f"the label config has nothing Rex-Omni can predict: {why}")
    return LabelConfig(tuple(jobs), tuple(warnings))


def _phrase_jobs(control: Control, task: Task, labels: Sequence[LabelDef]) -> list[Job]:
    """detection / pointing over the labels' phrases (several requests past MAX_CATEGORIES)."""
    mapping = _phrase_map(labels)
    return [
        Job(_params(control, {"task": task, "categories": phrases}), control, labels=mapping)
        for phrases in _chunks([p for label in labels for p in label.phrases])
    ]


def _keypoint_job(control: Control, boxes: Control | None) -> Job | None:
    """keypoint, when the control's labels name the points of a keypoint set. The instances are
    asked for by the RectangleLabels' labels for them ("person" for the person set; every object
    label for the animal set), whose boxes the job then draws; without such labels by the set's
    name ("person", "animal"), without boxes."""
    kind = keypoint_set(control.labels, boxes)
    if kind is None:
        return None
    instances: list[LabelDef] = []
    if boxes is not None:
        objects = [label for label in boxes.labels if not label.is_text]
        if kind == "person":
            instances = [label for label in objects if "person" in {normalize(p) for p in label.phrases}]
        else:
            instances = objects
    if kind == "person":
        categories = ["person"]
        box_labels = {"person": instances[0].value} if instances else {}
    else:
        categories = [p for label in instances for p in label.phrases] or [kind]
        box_labels = _phrase_map(instances)
    params = _params(control, {"task": Task.KEYPOINT, "categories": categories, "keypoint_type": kind})
    return Job(
        params,
        control,
        labels=_phrase_map(control.labels),
        box_control=boxes if box_labels else None,
        box_labels=box_labels,
    )


def _ocr_job(control: Control, task: Task, texts: Sequence[LabelDef], transcription: str | None) -> Job:
    """ocr_box / ocr_polygon: every region labelled with the first text label (an OCR answer
    names the text it read, not which label asked for it)."""
    phrases = next(_chunks([p for label in texts for p in label.ocr_phrases()]))
    params = _params(control, {"task": task, "categories": phrases})
    return Job(params, control, text_label=texts[0].value, transcription=transcription)


# ---- results -> regions -------------------------------------------------------------------------
def _percent(value: float, size: int) -> float:
    return min(100.0, max(0.0, value / size * 100.0))


class BoxPercent(TypedDict):
    x: float
    y: float
    width: float
    height: float


def _box_value(box: Sequence[float], width: int, height: int) -> BoxPercent:
    """[x0, y0, x1, y1] in pixels -> top-left corner and size in percent of the image."""
    x0, y0 = _percent(box[0], width), _percent(box[1], height)
    x1, y1 = _percent(box[2], width), _percent(box[3], height)
    return {"x": x0, "y": y0, "width": max(0.0, x1 - x0), "height": max(0.0, y1 - y0)}


def _points(polygon: Sequence[Sequence[float]], width: int, height: int) -> list[list[float]]:
    return [[_percent(x, width), _percent(y, height)] for x, y in polygon]


@dataclass
class RegionWriter:
    """The regions of one task's prediction, with ids unique within it (shared by its jobs)."""

    ids: Iterator[int] = field(default_factory=lambda: iter(range(1, 1 << 62)))
    regions: list[Region] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)  # one per detection that made regions

    def next_id(self) -> str:
        return f"r{next(self.ids)}"

    def add(
        self,
        from_name: str,
        image: ImageSource,
        size: tuple[int, int],
        value: RectangleValue | KeyPointValue | PolygonValue | TextAreaValue,
        score: float | None,
        *,
        region_id: str | None = None,
        parent_id: str | None = None,
        meta: dict[str, list[str]] | None = None,
    ) -> str:
        kinds: dict[type[BaseModel], RegionKind] = {
            RectangleValue: "rectanglelabels",
            KeyPointValue: "keypointlabels",
            PolygonValue: "polygonlabels",
            TextAreaValue: "textarea",
        }
        region = Region(
            id=region_id or self.next_id(),
            from_name=from_name,
            to_name=image.name,
            type=kinds[type(value)],
            original_width=size[0],
            original_height=size[1],
            value=value,
            score=score,
            parent_id=parent_id,
            meta=meta,
        )
        self.regions.append(region)
        return region.id

    def write(self, job: Job, result: DetectResult) -> None:
        """The regions of one job's result (detections scored below the control's threshold
        and labels the config does not have are left out)."""
        size = (result.image.width, result.image.height)
        for detection in result.detections:
            if not _passes(job.control, detection.score):
                continue
            if isinstance(detection, KeypointsDetection):
                wrote = self._instance(job, detection, size)
            elif job.text_label is not None:
                wrote = self._text(job, detection, size)
            else:
                wrote = self._labelled(job, detection, size)
            if wrote and detection.score is not None:
                self.scores.append(detection.score)

    def _labelled(self, job: Job, detection: DetectionModel, size: tuple[int, int]) -> bool:
        label = job.labels.get(normalize(detection.label))
        if label is None:
            return False
        value: RectangleValue | KeyPointValue
        if isinstance(detection, BoxDetection):
            value = RectangleValue(**_box_value(detection.box, *size), rectanglelabels=[label])
        elif isinstance(detection, PointDetection):
            value = _keypoint(detection.point, size, label)
        else:
            return False
        self.add(job.control.name, job.image, size, value, detection.score)
        return True

    def _text(self, job: Job, detection: DetectionModel, size: tuple[int, int]) -> bool:
        """An OCR detection: the region labelled with the control's text label, and the text
        in the per-region TextArea (same region id) or, without one, in the region's meta."""
        assert job.text_label is not None
        text = detection.label.strip()
        shape: RectangleValue | PolygonValue
        if isinstance(detection, BoxDetection):
            geometry = _box_value(detection.box, *size)
            shape = RectangleValue(**geometry, rectanglelabels=[job.text_label])
            transcribed = TextAreaValue(**geometry, rotation=0.0, text=[text])
        elif isinstance(detection, PolygonDetection):
            points = _points(detection.polygon, *size)
            shape = PolygonValue(points=points, polygonlabels=[job.text_label])
            transcribed = TextAreaValue(points=points, text=[text])
        else:
            return False
        meta = {"text": [text]} if text and job.transcription is None else None
        region_id = self.add(job.control.name, job.image, size, shape, detection.score, meta=meta)
        if job.transcription is not None and text:
            self.add(job.transcription, job.image, size, transcribed, detection.score, region_id=region_id)
        return True

    def _instance(self, job: Job, detection: KeypointsDetection, size: tuple[int, int]) -> bool:
        """A keypoint instance: its box (when the config has a label for it, and the box's
        RectangleLabels' threshold lets it), then a point per visible keypoint a Label names,
        each pointing at the box."""
        parent: str | None = None
        box_label = job.box_labels.get(normalize(detection.label))
        if box_label is None and len(job.box_labels) == 1:
            box_label = next(iter(job.box_labels.values()))  # one instance label: it is this one's
        box_control = job.box_control
        if box_control is not None and box_label is not None and _passes(box_control, detection.score):
            box = RectangleValue(**_box_value(detection.box, *size), rectanglelabels=[box_label])
            parent = self.add(box_control.name, job.image, size, box, detection.score)
        wrote = parent is not None
        for name, point in detection.keypoints.items():
            label = job.labels.get(normalize(name))
            if point is not None and label is not None:
                value = _keypoint(point, size, label)
                self.add(job.control.name, job.image, size, value, detection.score, parent_id=parent)
                wrote = True
        return wrote

    def prediction(self, model_version: str) -> Prediction:
        """The task's prediction; its score is the mean of the scores of the detections that
        became regions, absent when none has one."""
        score = sum(self.scores) / len(self.scores) if self.scores else None
        return Prediction(model_version=model_version, score=score, result=list(self.regions))


def _passes(control: Control, score: float | None) -> bool:
    """Not below the control's model_score_threshold (an unscored detection always passes)."""
    threshold = control.score_threshold
    return threshold is None or score is None or score >= threshold


def _keypoint(point: Sequence[float], size: tuple[int, int], label: str) -> KeyPointValue:
    x, y = _percent(point[0], size[0]), _percent(point[1], size[1])
    return KeyPointValue(x=x, y=y, width=KEYPOINT_WIDTH_PERCENT, keypointlabels=[label])


def to_prediction(jobs: Sequence[Job], results: Sequence[DetectResult], model_version: str) -> Prediction:
    """One task's prediction from its jobs' results (in the same order)."""
    writer = RegionWriter()
    for job, result in zip(jobs, results, strict=True):
        writer.write(job, result)
    return writer.prediction(model_version)


def failed_prediction(model_version: str, code: str, message: str) -> Prediction:
    """A task that could not be predicted: Label Studio pairs results with tasks by position, so
    it still gets its place, empty, with the reason."""
    return Prediction(model_version=model_version, result=[], error=PredictionError(code=code, message=message))


# ---- where a task's image is --------------------------------------------------------------------
@dataclass(frozen=True)
class ImageLocation:
    """An image to download. ``label_studio``: it is on Label Studio (sent with its token).
    ``fallback``: a second URL for the same file, tried when the first answers 404 (Label Studio
    serves uploads from /storage-data/uploaded/ when its own storage is a cloud bucket)."""

    url: str
    label_studio: bool
    fallback: str | None = None

    def described(self) -> str:
        return describe_url(self.url)


def printable(text: object) -> str:
    """Text from a request, safe to put in an answer: lone surrogates (JSON can carry them, UTF-8
    cannot) escaped."""
    return str(text).encode("utf-8", "backslashreplace").decode("utf-8")


def describe_url(url: str) -> str:
    """A URL for messages and logs: without its query (presigned URLs carry signatures there)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return printable(url[:200])
    if not parts.scheme:
        return printable(url[:200])
    return printable(f"{parts.scheme}://{parts.netloc}{parts.path}" + ("?..." if parts.query else ""))


def same_origin(url: str, base_url: str) -> bool:
    try:
        a, b = urlsplit(url), urlsplit(base_url)
    except ValueError:
        return False
    default = {"http": 80, "https": 443}

    def port(parts: Any) -> int | None:
        try:
            return int(parts.port or default.get(parts.scheme, 0))
        except ValueError:
            return None

    return bool(b.hostname) and (a.scheme, a.hostname, port(a)) == (b.scheme, b.hostname, port(b))


def locate_image(reference: str, task_id: int | str | None, base_url: str) -> ImageLocation | str:
    """Where a task's image reference points: a data URI (returned as it is), an http(s) URL,
    a path on Label Studio (``/data/upload/...``, ``/data/local-files/?d=...``,
    ``/tasks/N/resolve/...``) or a cloud storage URI (``s3://``, ``gs://``, ``azure-blob://``,
    fetched through Label Studio's presign endpoint). ``base_url``: Label Studio's, or "".
    Raises InvalidImage for anything else."""
    ref = reference.strip()
    if ref.startswith("data:"):
        return ref
    base = base_url.rstrip("/")
    try:
        parts = urlsplit(ref)
        scheme = parts.scheme.casefold()
    except ValueError:  # e.g. an unclosed IPv6 bracket
        raise InvalidImage(f"the image reference {describe_url(ref)!r} is not a valid URL") from None
    if scheme in ("http", "https"):
        if not parts.hostname:
            raise InvalidImage(f"the image URL {describe_url(ref)!r} names no host")
        return ImageLocation(ref, bool(base) and same_origin(ref, base))
    if ref.startswith("upload/"):
        ref = "/data/" + ref
    elif ref.startswith("/upload/"):
        ref = "/data" + ref
    if ref.startswith("/") or scheme in CLOUD_SCHEMES:
        if not base:
            raise InvalidImage(
                f"the image {describe_url(ref)!r} is stored in Label Studio, whose URL this server does not know: "
                "set REXOMNI_LABEL_STUDIO_URL (or let Label Studio connect, which sends its hostname)"
            )
        if scheme in CLOUD_SCHEMES:
            if task_id is None:
                raise InvalidImage(f"the cloud storage image {describe_url(ref)!r} needs the task's id to be resolved")
            task, uri = quote(str(task_id), safe=""), quote(ref, safe="", errors="backslashreplace")
            return ImageLocation(f"{base}/tasks/{task}/presign/?fileuri={uri}", True)
        fallback = None
        if ref.startswith("/data/upload/"):
            fallback = f"{base}/storage-data/uploaded/?filepath={ref.removeprefix('/data/')}"
        return ImageLocation(base + ref, True, fallback)
    raise InvalidImage(
        f"the image reference {describe_url(ref)!r} is not a URL this server can fetch "
        "(http(s), a Label Studio path, s3/gs/azure-blob storage or a data URI)"
    )


# ---- Label Studio's tokens ----------------------------------------------------------------------
def _b64url_json(part: str) -> Any:
    try:
        return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        return None


def jwt_expiry(token: str) -> float | None:
    """The ``exp`` (Unix time) of a token that is a JWT, read without verifying it; None when it
    is not one (a legacy token) or has no expiry."""
    parts = token.split(".")
    if len(parts) != 3 or not all(parts[:2]):
        return None
    header, payload = _b64url_json(parts[0]), _b64url_json(parts[1])
    if not isinstance(header, dict) or not isinstance(payload, dict):
        return None
    exp = payload.get("exp")
    return float(exp) if isinstance(exp, (int, float)) and not isinstance(exp, bool) else None


def is_personal_access_token(token: str, now: float | None = None) -> bool:
    """A Label Studio personal access token: a JWT (refresh token) that has not expired. Other
    tokens are legacy tokens, sent as they are (Label Studio's SDK decides the same way)."""
    exp = jwt_expiry(token)
    return exp is not None and exp > (time.time() if now is None else now)
