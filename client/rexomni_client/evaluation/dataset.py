"""Evaluation datasets: COCO instances JSON, and the JSONL annotations Rex-Omni's own
evaluation data uses (one image per line: ``image_path``, ``categories``, ``gt``).

COCO: each image is asked for the categories it contains (the reference evaluation's
"positive only" protocol; asking LVIS's 1203 names per image would not fit a prompt); images
without annotations are left out. Boxes are converted from COCO's [x, y, w, h] to
[x0, y0, x1, y1]; polygon and RLE segmentations become the shapes point tasks are judged by.

Rex-Omni JSONL: ``gt`` maps each phrase to boxes [x0, y0, x1, y1] (or polygons of more than
four values), or holds ``gt_mask`` mapping each phrase to COCO RLE masks (pointing); for GUI
data it is a single box. Images asked for one phrase are matched without regard to labels.
Visual-prompt data adds ``visual_prompt``: each category's reference boxes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rexomni_client.evaluation.scoring import XY, XYXY, MaskShape, MultiShape, PolygonShape, Shape, Truth


class DatasetError(ValueError):
    """The annotation file cannot be read as an evaluation dataset (message says where)."""


@dataclass(frozen=True)
class EvalSample:
    sample_id: str
    image: Path
    categories: tuple[str, ...]
    truths: tuple[Truth, ...]
    # Visual prompting: reference boxes per category, each category asked on its own.
    visual_prompts: tuple[tuple[str, tuple[XYXY, ...]], ...] = ()

    @property
    def single_phrase(self) -> bool:
        return len(self.categories) == 1

    @property
    def boxed(self) -> bool:
        """Every object has a box, so box predictions can be scored against it."""
        return all(t.box is not None for t in self.truths)


def load_dataset(path: Path, images: Path | None = None, fmt: str = "auto") -> list[EvalSample]:
    """Samples of a COCO JSON or Rex-Omni JSONL file; image paths are resolved against
    ``images`` (default: the annotation file's folder)."""
    root = images if images is not None else path.parent
    if fmt == "auto":
        fmt = "jsonl" if path.suffix == ".jsonl" else "coco"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise DatasetError(f"{path}: {exc.strerror or exc}") from None
    if fmt == "coco":
        samples = list(_coco_samples(_json(text, str(path)), root))
    elif fmt == "jsonl":
        samples = list(_jsonl_samples(text, root, path))
    else:
        raise DatasetError(f"unknown dataset format {fmt!r} (coco, jsonl or auto)")
    # Scores, answers and --resume are keyed by sample id: two images with one id would mix.
    seen: set[str] = set()
    for sample in samples:
        if sample.sample_id in seen:
            raise DatasetError(f"{path.name}: id {sample.sample_id!r} is used by more than one image")
        seen.add(sample.sample_id)
    return samples


def _json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{where}: not JSON ({exc.msg} at line {exc.lineno})") from None


def _xyxy(values: Any, where: str) -> XYXY:
    if not isinstance(values, list | tuple) or len(values) != 4:
        raise DatasetError(f"{where}: expected 4 numbers, got {values!r}")
    try:
        x0, y0, x1, y1 = (float(v) for v in values)
    except (TypeError, ValueError):
        raise DatasetError(f"{where}: expected 4 numbers, got {values!r}") from None
    return x0, y0, x1, y1


def _polygon(flat: Sequence[Any], where: str) -> PolygonShape:
    if len(flat) < 6 or len(flat) % 2:
        raise DatasetError(f"{where}: a polygon needs an even number (>= 6) of values")
    try:
        values = [float(v) for v in flat]
    except (TypeError, ValueError):
        raise DatasetError(f"{where}: polygon values must be numbers") from None
    points: tuple[XY, ...] = tuple(zip(values[::2], values[1::2], strict=True))
    return PolygonShape(points)


# ---- COCO -----------------------------------------------------------------------------------
def _coco_shape(segmentation: Any, where: str) -> Shape | None:
    if isinstance(segmentation, dict):
        return MaskShape(segmentation)
    if isinstance(segmentation, list) and segmentation:
        # COCO has a few degenerate parts (fewer than three points); like other COCO tools, skip
        # them rather than refuse the file (box tasks never look at segmentations anyway).
        parts = tuple(_polygon(p, where) for p in segmentation if isinstance(p, list) and len(p) >= 6)
        if parts:
            return parts[0] if len(parts) == 1 else MultiShape(parts)
    return None


def _coco_keypoints(flat: Any, names: Sequence[str], where: str) -> dict[str, XY | None] | None:
    if not flat or not names:
        return None
    if not isinstance(flat, list) or len(flat) != 3 * len(names):
        raise DatasetError(f"{where}: keypoints must be {len(names)} (x, y, v) triples")
    return {name: _keypoint(flat[3 * i : 3 * i + 3], f"{where} keypoint {name!r}") for i, name in enumerate(names)}


def _coco_samples(data: Any, root: Path) -> Iterator[EvalSample]:
    if not isinstance(data, dict) or not all(k in data for k in ("images", "annotations", "categories")):
        raise DatasetError("a COCO file needs 'images', 'annotations' and 'categories'")
    try:
        names = {c["id"]: c["name"] for c in data["categories"]}
        # person_keypoints files name each category's keypoints; annotations give x, y, v triples.
        keypoint_names = {c["id"]: [k.replace("_", " ") for k in c.get("keypoints", [])] for c in data["categories"]}
        files = {im["id"]: im["file_name"] for im in data["images"]}
    except (KeyError, TypeError) as exc:
        raise DatasetError(f"COCO categories/images entry without {exc}") from None
    per_image: dict[Any, list[tuple[int, Truth]]] = {}
    for n, ann in enumerate(data["annotations"]):
        where = f"annotation {ann.get('id', n) if isinstance(ann, dict) else n}"
        try:
            image_id, category_id, bbox = ann["image_id"], ann["category_id"], ann["bbox"]
        except (KeyError, TypeError) as exc:
            raise DatasetError(f"{where}: missing {exc}") from None
        if category_id not in names:
            raise DatasetError(f"{where}: unknown category_id {category_id}")
        x, y, w, h = _xyxy(bbox, where)
        truth = Truth(
            category=names[category_id],
            box=(x, y, x + w, y + h),
            shape=_coco_shape(ann.get("segmentation"), where),
            crowd=bool(ann.get("iscrowd", 0)),
            keypoints=_coco_keypoints(ann.get("keypoints"), keypoint_names[category_id], where),
        )
        per_image.setdefault(image_id, []).append((category_id, truth))
    for image_id, file_name in files.items():
        found = per_image.get(image_id)
        if not found:
            continue
        category_ids = sorted({cid for cid, _ in found})
        yield EvalSample(
            sample_id=str(image_id),
            image=root / file_name,
            categories=tuple(names[c] for c in category_ids),
            truths=tuple(t for _, t in found),
        )


# ---- Rex-Omni JSONL -------------------------------------------------------------------------
def _jsonl_truths(gt: Any, categories: Sequence[str], where: str) -> list[Truth]:
    if isinstance(gt, list):  # GUI data: one box for the one phrase
        if len(categories) != 1:
            raise DatasetError(f"{where}: a bare box as gt needs exactly one category")
        return [Truth(categories[0], box=_xyxy(gt, where))]
    if not isinstance(gt, dict):
        raise DatasetError(f"{where}: gt must be an object or a box")
    if "gt_mask" in gt:
        masks = gt["gt_mask"]
        if not isinstance(masks, dict):
            raise DatasetError(f"{where}: gt_mask must map phrases to RLE masks")
        return [Truth(phrase, shape=MaskShape(rle)) for phrase, rles in masks.items() for rle in rles]
    truths = []
    for phrase, objects in gt.items():
        if not isinstance(objects, list):
            raise DatasetError(f"{where}: gt[{phrase!r}] must be a list of boxes")
        for obj in objects:
            here = f"{where} gt[{phrase!r}]"
            if isinstance(obj, dict):  # keypoint data: {"bbox": [...], "keypoints": {name: [x, y] | null}}
                truths.append(Truth(phrase, box=_xyxy(obj.get("bbox"), here), keypoints=_keypoints(obj, here)))
            elif isinstance(obj, list) and len(obj) > 4:
                truths.append(Truth(phrase, shape=_polygon(obj, here)))
            else:
                truths.append(Truth(phrase, box=_xyxy(obj, here)))
    return truths


def _keypoint(value: Any, where: str) -> XY | None:
    """[x, y], [x, y, v] (COCO: v = 0 not labelled), or null / "unvisible" for hidden."""
    if value is None or value == "unvisible":
        return None
    if isinstance(value, list | tuple) and len(value) in (2, 3):
        try:
            x, y, *visibility = (float(v) for v in value)
        except (TypeError, ValueError):
            pass
        else:
            return None if visibility and visibility[0] == 0 else (x, y)
    raise DatasetError(f"{where}: a keypoint is [x, y], [x, y, v] or null, not {value!r}")


def _keypoints(obj: dict[str, Any], where: str) -> dict[str, XY | None]:
    raw = obj.get("keypoints")
    if not isinstance(raw, dict):
        raise DatasetError(f"{where}: keypoints must map names to positions")
    return {name.replace("_", " "): _keypoint(value, f"{where} keypoint {name!r}") for name, value in raw.items()}


def _jsonl_samples(text: str, root: Path, path: Path) -> Iterator[EvalSample]:
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path.name} line {lineno}"
        entry = _json(line, where)
        try:
            image_path, categories, gt = entry["image_path"], entry["categories"], entry["gt"]
        except (KeyError, TypeError) as exc:
            raise DatasetError(f"{where}: missing {exc}") from None
        if isinstance(categories, str):
            categories = [categories]
        if not isinstance(categories, list) or not all(isinstance(c, str) for c in categories):
            raise DatasetError(f"{where}: categories must be a list of strings")
        yield EvalSample(
            sample_id=str(entry.get("id", lineno)),
            image=root / image_path,
            categories=tuple(categories),
            truths=tuple(_jsonl_truths(gt, categories, where)),
            visual_prompts=_visual_prompts(entry.get("visual_prompt"), where),
        )


def _visual_prompts(raw: Any, where: str) -> tuple[tuple[str, tuple[XYXY, ...]], ...]:
    if raw is None:
        return ()
    if not isinstance(raw, dict) or not all(isinstance(boxes, list) and boxes for boxes in raw.values()):
        raise DatasetError(f"{where}: visual_prompt must map each category to a non-empty list of boxes")
    return tuple(
        (category, tuple(_xyxy(box, f"{where} visual_prompt[{category!r}]") for box in boxes))
        for category, boxes in raw.items()
    )
