"""Draw detections on the image (for ``rexomni detect --annotate``).

Sizes follow the image (the label's font is 1/40 of its shorter side, at least 12 px); each
label has its own colour, the same in every picture; labels ("person 0.93") are written on a
filled box above the detection (inside it at the image's top edge) and drawn last, over
everything else. Polygons are outlined over a translucent fill, keypoints joined by their
skeleton, points circled.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageColor, ImageDraw, ImageFont, ImageOps

from rexomni_client.export import SKELETONS, keypoint_set_for
from rexomni_server.schemas import (
    BoxDetection,
    DetectResult,
    KeypointsDetection,
    PointDetection,
    PolygonDetection,
)

RGB = tuple[int, int, int]
# Sasha Trubetskoy's distinct colours, the palest left out (they vanish on bright photos).
PALETTE: tuple[RGB, ...] = tuple(
    ImageColor.getrgb(c)  # type: ignore[misc]
    for c in (
        "#e6194b",
        "#3cb44b",
        "#ffe119",
        "#4363d8",
        "#f58231",
        "#911eb4",
        "#42d4f4",
        "#f032e6",
        "#bfef45",
        "#fabed4",
        "#469990",
        "#dcbeff",
        "#9a6324",
        "#800000",
        "#aaffc3",
        "#808000",
        "#000075",
        "#a9a9a9",
    )
)
MAX_LABEL_CHARS = 48  # longer labels (OCR text) are cut, with an ellipsis
FILL_OPACITY = 0.25  # of a polygon's fill


def label_colours(labels: Iterable[str]) -> dict[str, RGB]:
    """A colour per label: picked from the palette by a hash of the label, so a label keeps its
    colour from picture to picture; a label whose colour another label of the picture already
    has (labels taken in sorted order) takes the next free one, so the labels of a picture
    differ while the palette lasts."""
    colours: dict[str, RGB] = {}
    used: set[int] = set()
    for label in sorted(set(labels)):
        first = zlib.crc32(label.encode("utf-8")) % len(PALETTE)
        slot = next(
            (s for s in ((first + step) % len(PALETTE) for step in range(len(PALETTE))) if s not in used), first
        )
        used.add(slot)
        colours[label] = PALETTE[slot]
    return colours


@dataclass(frozen=True)
class Style:
    font_size: int
    line: int  # width of outlines and skeleton lines
    radius: int  # of keypoint dots; points are circled at twice this


def style_for(size: tuple[int, int]) -> Style:
    font_size = max(12, round(min(size) / 40))
    return Style(font_size=font_size, line=max(2, round(font_size / 8)), radius=max(3, round(font_size / 4)))


@functools.lru_cache(maxsize=16)
def font_of(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's own scalable font (Pillow >= 10.1 built with FreeType); without FreeType,
    Pillow gives its small bitmap font instead."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # an older or stripped-down Pillow
        return ImageFont.load_default()


def label_text(label: str, score: float | None) -> str:
    if len(label) > MAX_LABEL_CHARS:
        label = label[: MAX_LABEL_CHARS - 1] + "…"
    return label if score is None else f"{label} {score:.2f}"


def render(image: Image.Image, result: DetectResult, *, keypoint_type: str | None = None) -> Image.Image:
    """A copy of ``image`` (RGB) with the detections drawn; ``keypoint_type`` (the set asked
    for) picks the skeleton where the keypoints' names leave it open."""
    style = style_for(image.size)
    colours = label_colours(d.label for d in result.detections)
    canvas = image.convert("RGBA")
    fills = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    alpha = round(255 * FILL_OPACITY)
    for det in result.detections:
        if isinstance(det, PolygonDetection):
            ImageDraw.Draw(fills).polygon(_xy(det.polygon), fill=(*colours[det.label], alpha))
    canvas = Image.alpha_composite(canvas, fills)
    draw = ImageDraw.Draw(canvas)
    labels: list[tuple[tuple[float, float], str, RGB]] = []
    r = style.radius
    for det in result.detections:
        colour = colours[det.label]
        anchor: tuple[float, float]
        if isinstance(det, (BoxDetection, KeypointsDetection)):
            x0, y0, x1, y1 = det.box
            draw.rectangle((x0, y0, x1, y1), outline=colour, width=style.line)
            anchor = (x0, y0)
        if isinstance(det, KeypointsDetection):
            given = {name: (xy[0], xy[1]) for name, xy in det.keypoints.items() if xy is not None}
            kind = keypoint_set_for(det.label, det.keypoints, keypoint_type)
            for a, b in SKELETONS[kind] if kind else ():
                if a in given and b in given:
                    draw.line([given[a], given[b]], fill=colour, width=style.line)
            for x, y in given.values():
                draw.ellipse((x - r, y - r, x + r, y + r), fill=colour, outline=(255, 255, 255))
        elif isinstance(det, PointDetection):
            x, y = det.point
            draw.ellipse((x - 2 * r, y - 2 * r, x + 2 * r, y + 2 * r), outline=colour, width=style.line)
            draw.ellipse((x - r / 2, y - r / 2, x + r / 2, y + r / 2), fill=colour)
            anchor = (x + 2 * r, y - 2 * r)
        elif isinstance(det, PolygonDetection):
            points = _xy(det.polygon)
            draw.polygon(points, outline=colour, width=style.line)
            anchor = (min(p[0] for p in points), min(p[1] for p in points))
        labels.append((anchor, label_text(det.label, det.score), colour))
    font = font_of(style.font_size)
    for anchor, text, colour in labels:
        _label(draw, anchor, text, colour, font, canvas.size)
    return canvas.convert("RGB")


def _xy(points: Sequence[Sequence[float]]) -> list[tuple[float, float]]:
    return [(p[0], p[1]) for p in points]


def _label(
    draw: ImageDraw.ImageDraw,
    anchor: tuple[float, float],
    text: str,
    colour: RGB,
    font: ImageFont.FreeTypeFont | ImageFont.ImageFont,
    size: tuple[int, int],
) -> None:
    """``text`` on a box of ``colour`` whose bottom-left is at ``anchor`` (its top-left when
    there is no room above), kept inside the image."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    pad = max(2, round((bottom - top) / 5))
    width, height = right - left + 2 * pad, bottom - top + 2 * pad
    x = min(max(0.0, anchor[0]), max(0.0, size[0] - width))
    y = anchor[1] - height if anchor[1] - height >= 0 else anchor[1]
    y = min(max(0.0, y), max(0.0, size[1] - height))
    draw.rectangle((x, y, x + width - 1, y + height - 1), fill=colour)
    luminance = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
    draw.text((x + pad - left, y + pad - top), text, fill=(0, 0, 0) if luminance > 140 else (255, 255, 255), font=font)


def annotate(
    image_path: str | Path, result: DetectResult, out_path: str | Path, *, keypoint_type: str | None = None
) -> None:
    image = ImageOps.exif_transpose(Image.open(image_path))
    render(image, result, keypoint_type=keypoint_type).save(out_path)


def annotation_problem(out_path: str | Path) -> str | None:
    """Why the annotated image could not be written there, or None: checked before the request."""
    path = Path(out_path)
    Image.init()  # registers every format's extensions
    if path.suffix.lower() not in Image.registered_extensions():
        return "the file name needs an image extension such as .jpg or .png"
    if not path.parent.is_dir():
        return f"no such folder: {path.parent}"
    return None
