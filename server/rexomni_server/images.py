"""Image decoding, validation and Qwen2.5-VL's smart_resize. CPU-bound: call off the event loop."""

from __future__ import annotations

import base64
import binascii
import io
import math
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

from rexomni_server.errors import ImageTooLarge, InvalidImage, RexOmniError, UnsupportedImageFormat
from rexomni_server.vocabulary import PATCH_SIDE

MAX_ASPECT_RATIO = 200
# MPO is what many phones write for JPEG; it decodes like one.
ACCEPTED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "BMP", "GIF", "TIFF"})


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int
    max_side: int
    max_pixels: int


@dataclass(frozen=True)
class PreparedImage:
    """The original size (coordinates refer to it) and the resized image the model sees."""

    width: int
    height: int
    resized: Image.Image

    @property
    def resized_size(self) -> tuple[int, int]:
        return self.resized.size


def decode_base64_image(text: str) -> bytes:
    """Base64 or ``data:image/...;base64,`` URI -> bytes."""
    payload = text.strip()
    if payload.startswith("data:"):
        header, sep, payload = payload.partition(",")
        if not sep or ";base64" not in header:
            raise InvalidImage("data URI must be base64-encoded (data:image/...;base64,...)")
    # Line-wrapped base64 (GNU `base64` without -w0, base64.encodebytes) is still base64.
    payload = "".join(payload.split())
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidImage("image is not valid base64") from exc


def decode_image(data: bytes, limits: ImageLimits) -> Image.Image:
    """Bytes -> RGB image with EXIF orientation applied; clear errors for everything else."""
    if not data:
        raise InvalidImage("image is empty")
    if len(data) > limits.max_bytes:
        raise ImageTooLarge(f"image is {len(data)} bytes; the limit is {limits.max_bytes}")
    try:
        with warnings.catch_warnings():
            # Our own limit (max_decoded_pixels, checked on the header below) governs, not
            # Pillow's fixed 89 MP warning; its hard error at twice that still applies.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image: Image.Image = Image.open(io.BytesIO(data))
            fmt = image.format or ""
            if fmt not in ACCEPTED_FORMATS:
                raise UnsupportedImageFormat(
                    f"image format {fmt or 'unknown'!r} is not accepted; "
                    f"use one of {sorted(ACCEPTED_FORMATS - {'MPO'})}"
                )
            width, height = image.size
            # Checked on the header, before any pixel is decoded: this is the bomb guard.
            _check_size(width, height, limits)
            # An animated GIF/WebP/TIFF opens at its first frame, the one used. Asking for
            # n_frames or seeking would walk every frame (a GIF reads them all to count them).
            image.load()
            image = _upright(image)
            return _to_rgb(image)
    except RexOmniError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        if isinstance(exc, UnidentifiedImageError):
            raise InvalidImage("the data is not an image PIL can read") from exc
        raise ImageTooLarge("image has too many pixels (decompression bomb guard)") from exc
    except Exception as exc:
        # Damaged files make Pillow's decoders fail in many ways (struct.error, TypeError, ...):
        # every one of them is the client's bad image, never a server error.
        raise InvalidImage(f"image could not be decoded: {type(exc).__name__}: {exc}") from exc


def _upright(image: Image.Image) -> Image.Image:
    """EXIF orientation applied; a damaged EXIF block leaves the pixels as stored."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception:
        return image


def _check_size(width: int, height: int, limits: ImageLimits) -> None:
    if width <= 0 or height <= 0:
        raise InvalidImage("image has zero width or height")
    if max(width, height) > limits.max_side:
        raise ImageTooLarge(f"image is {width}x{height}; the longest side may be {limits.max_side}")
    if width * height > limits.max_pixels:
        raise ImageTooLarge(f"image has {width * height} pixels; the limit is {limits.max_pixels}")
    if max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
        raise InvalidImage(f"image aspect ratio exceeds {MAX_ASPECT_RATIO}:1")


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any mode -> RGB; transparent pixels become white rather than whatever colour they hid."""
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if image.mode.startswith("I") or image.mode == "F":
        image = _grey_to_l(image)
    return image.convert("RGB")


def _grey_to_l(image: Image.Image) -> Image.Image:
    """16/32-bit integer or float greyscale -> 8 bits, scaled rather than clipped: integers by
    the 16-bit range, floats by 0-1 when that is their range (plain conversion makes them black).
    Going through mode F first works for every integer layout (I;16B has no point operation)."""
    floats = image.convert("F")
    if image.mode == "F":
        high = float(floats.getextrema()[1])  # type: ignore[arg-type]  # one band: (low, high)
        scale = 255.0 if high <= 1.0 else 1.0
    else:
        scale = 255.0 / 65535.0
    return floats.point(lambda v: v * scale).convert("L")


def smart_resize(
    height: int, width: int, factor: int = PATCH_SIDE, min_pixels: int = 0, max_pixels: int = 0
) -> tuple[int, int]:
    """Qwen2.5-VL's resize rule (qwen_vl_utils): sides multiple of ``factor``, area in bounds."""
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise InvalidImage(f"image aspect ratio exceeds {MAX_ASPECT_RATIO}:1")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def prepare_image(image: Image.Image, min_pixels: int, max_pixels: int) -> PreparedImage:
    """Resize to the smart_resize size (bicubic, as the reference's qwen_vl_utils does)."""
    width, height = image.size
    new_h, new_w = smart_resize(height, width, PATCH_SIDE, min_pixels, max_pixels)
    resized = image if (new_w, new_h) == (width, height) else image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    return PreparedImage(width=width, height=height, resized=resized)


def load_and_prepare(data: bytes, limits: ImageLimits, min_pixels: int, max_pixels: int) -> PreparedImage:
    """The whole CPU-side image step of a request (one call for ``asyncio.to_thread``)."""
    return prepare_image(decode_image(data, limits), min_pixels, max_pixels)
