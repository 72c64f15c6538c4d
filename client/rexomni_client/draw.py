"""Draw detections on the image (for ``rexomni detect --annotate``)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageOps

from rexomni_server.schemas import (
    BoxDetection,
    DetectResult,
    KeypointsDetection,
    PointDetection,
    PolygonDetection,
)

PALETTE = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45")


def annotate(image_path: str | Path, result: DetectResult, out_path: str | Path) -> None:
    image = ImageOps.exif_transpose(Image.open(image_path)).convert("RGB")
    draw = ImageDraw.Draw(image)
    colours: dict[str, str] = {}
    radius = max(2, min(image.size) // 150)
    for det in result.detections:
        colour = colours.setdefault(det.label, PALETTE[len(colours) % len(PALETTE)])
        if isinstance(det, (BoxDetection, KeypointsDetection)):
            draw.rectangle(det.box, outline=colour, width=radius)
            draw.text((det.box[0] + 2, det.box[1] + 2), det.label, fill=colour)
        if isinstance(det, KeypointsDetection):
            for xy in det.keypoints.values():
                if xy is not None:
                    draw.ellipse([xy[0] - radius, xy[1] - radius, xy[0] + radius, xy[1] + radius], fill=colour)
        elif isinstance(det, PointDetection):
            x, y = det.point
            draw.ellipse([x - radius * 2, y - radius * 2, x + radius * 2, y + radius * 2], fill=colour)
        elif isinstance(det, PolygonDetection):
            draw.polygon([tuple(p) for p in det.polygon], outline=colour, width=radius)
    image.save(out_path)


def annotation_problem(out_path: str | Path) -> str | None:
    """Why the annotated image could not be written there, or None: checked before the request."""
    path = Path(out_path)
    Image.init()  # registers every format's extensions
    if path.suffix.lower() not in Image.registered_extensions():
        return "the file name needs an image extension such as .jpg or .png"
    if not path.parent.is_dir():
        return f"no such folder: {path.parent}"
    return None
