"""Image decoding: formats, EXIF orientation, modes, and clear errors for bad input."""

from __future__ import annotations

import base64
import io
import struct
import zlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import GifImagePlugin, Image, TiffImagePlugin

from rexomni_server.errors import ImageTooLarge, InvalidImage, UnsupportedImageFormat
from rexomni_server.images import (
    ImageLimits,
    decode_base64_image,
    decode_image,
    load_and_prepare,
    smart_resize,
)
from tests.support import image_bytes

LIMITS = ImageLimits(max_bytes=5_000_000, max_side=8192, max_pixels=20_000_000)
MIN_PIXELS, MAX_PIXELS = 16 * 28 * 28, 2560 * 28 * 28


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF"])
def test_accepted_formats_decode_to_rgb(fmt: str) -> None:
    image = decode_image(image_bytes(320, 200, fmt), LIMITS)
    assert image.mode == "RGB" and image.size == (320, 200)


@pytest.mark.parametrize(
    ("fmt", "plugin"), [("GIF", GifImagePlugin.GifImageFile), ("TIFF", TiffImagePlugin.TiffImageFile)]
)
def test_animated_images_use_the_first_frame_without_walking_the_others(
    fmt: str, plugin: type[Image.Image], monkeypatch: pytest.MonkeyPatch
) -> None:
    frames = [Image.new("RGB", (40, 30), (255 - i, 0, i)) for i in range(0, 200, 4)]
    buf = io.BytesIO()
    frames[0].save(buf, fmt, save_all=True, append_images=frames[1:])
    requested: list[int] = []
    seek = plugin._seek  # type: ignore[attr-defined]

    def recording(image: Image.Image, frame: int, *args: object) -> None:
        requested.append(frame)
        seek(image, frame, *args)

    monkeypatch.setattr(plugin, "_seek", recording)
    pixel = decode_image(buf.getvalue(), LIMITS).getpixel((5, 5))
    assert isinstance(pixel, tuple) and pixel[0] > 200 and pixel[2] < 50
    # Counting the frames (n_frames) would have read every one of them.
    assert set(requested) <= {0}


def test_exif_orientation_is_applied() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    buf = io.BytesIO()
    Image.new("RGB", (300, 100)).save(buf, "JPEG", exif=exif)
    assert decode_image(buf.getvalue(), LIMITS).size == (100, 300)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "I;16", "1", "LA"])
def test_any_mode_becomes_rgb(mode: str) -> None:
    fmt = "TIFF" if mode in ("CMYK", "I;16") else "PNG"
    assert decode_image(image_bytes(64, 48, fmt, mode=mode), LIMITS).mode == "RGB"


def test_transparent_pixels_become_white() -> None:
    buf = io.BytesIO()
    Image.new("RGBA", (10, 10), (0, 0, 0, 0)).save(buf, "PNG")
    assert decode_image(buf.getvalue(), LIMITS).getpixel((0, 0)) == (255, 255, 255)


def _png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG that claims huge dimensions: a decompression bomb's header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"", InvalidImage),
        (b"not an image at all", InvalidImage),
        (image_bytes(64, 64)[:60], InvalidImage),
        (_png_header_only(8000, 8000), ImageTooLarge),
        (_png_header_only(20000, 10), ImageTooLarge),
        (_png_header_only(4000, 10), InvalidImage),  # aspect ratio > 200
        (b"%PDF-1.4 " + b"0" * 100, InvalidImage),
    ],
)
def test_bad_images_raise_clear_errors(data: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        decode_image(data, LIMITS)


def test_over_byte_limit() -> None:
    with pytest.raises(ImageTooLarge, match="bytes"):
        decode_image(image_bytes(64, 64), ImageLimits(max_bytes=10, max_side=100, max_pixels=10_000))


def test_unsupported_format_is_named() -> None:
    with pytest.raises(UnsupportedImageFormat, match="ICO"):
        decode_image(image_bytes(32, 32, "ICO"), LIMITS)


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((480, 640), (476, 644)),  # rounded to multiples of 28
        ((10, 10), (112, 112)),  # scaled up to min_pixels
        ((4000, 6000), (1148, 1708)),  # scaled down under max_pixels
        ((28, 28), (112, 112)),
        ((1, 98), (28, 1120)),  # qwen_vl_utils' clamp of tiny sides
    ],
)
def test_smart_resize_matches_qwen(size: tuple[int, int], expected: tuple[int, int]) -> None:
    h, w = smart_resize(*size, 28, MIN_PIXELS, MAX_PIXELS)
    assert (h, w) == expected
    assert h % 28 == 0 and w % 28 == 0 and MIN_PIXELS <= h * w <= MAX_PIXELS


@settings(max_examples=300, deadline=None)
@given(h=st.integers(28, 9000), w=st.integers(28, 9000), budget=st.integers(4, 16384))
def test_smart_resize_agrees_with_transformers(h: int, w: int, budget: int) -> None:
    # Sides under 28 px differ on purpose: we follow qwen_vl_utils (what the reference calls),
    # which clamps each rounded side to at least 28 before comparing with the pixel budget.
    reference = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")
    if max(h, w) / min(h, w) > 200:
        return
    max_pixels = budget * 28 * 28
    min_pixels = min(MIN_PIXELS, max_pixels)
    assert smart_resize(h, w, 28, min_pixels, max_pixels) == reference.smart_resize(
        h, w, factor=28, min_pixels=min_pixels, max_pixels=max_pixels
    )


def test_prepare_keeps_original_size_and_resizes_for_the_model() -> None:
    prepared = load_and_prepare(image_bytes(640, 480), LIMITS, MIN_PIXELS, MAX_PIXELS)
    assert (prepared.width, prepared.height) == (640, 480)
    assert prepared.resized_size == (644, 476)


def test_base64_and_data_uri() -> None:
    raw = image_bytes(8, 8)
    encoded = base64.b64encode(raw).decode()
    assert decode_base64_image(encoded) == raw
    assert decode_base64_image("data:image/png;base64," + encoded) == raw
    with pytest.raises(InvalidImage):
        decode_base64_image("data:image/png," + encoded)
    with pytest.raises(InvalidImage):
        decode_base64_image("!!!")


DATA = Path(__file__).resolve().parents[1] / "data"


@pytest.mark.parametrize("name", ["corrupt_exif.jpg", "corrupt_gif_frames.gif", "corrupt_frames.tif"])
def test_damaged_files_found_by_fuzzing_are_handled(name: str) -> None:
    """Byte-mutated files that once escaped as 500s: each decodes (a damaged EXIF block only
    loses its rotation) or is a clear InvalidImage."""
    data = (DATA / name).read_bytes()
    try:
        image = decode_image(data, LIMITS)
    except InvalidImage as exc:
        assert "could not be decoded" in str(exc)
    else:
        assert image.mode == "RGB" and image.size[0] > 0


def test_wide_greyscale_modes_keep_their_brightness() -> None:
    def decoded(image: Image.Image) -> int:
        buf = io.BytesIO()
        image.save(buf, "TIFF")
        pixel = decode_image(buf.getvalue(), LIMITS).getpixel((0, 0))
        assert isinstance(pixel, tuple)
        return int(pixel[0])

    big_endian = Image.new("I;16B", (4, 4))
    big_endian.putdata([65535] * 16)
    assert decoded(big_endian) == 255  # was refused: "point operation not supported"
    assert decoded(Image.new("F", (4, 4), 0.5)) == 127  # 0-1 floats: was all black
    assert decoded(Image.new("F", (4, 4), 200.0)) == 200  # 0-255 floats stay as they are


def test_the_pixel_limit_is_ours_not_pillows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow would warn from 1000 px on
    limits = ImageLimits(max_bytes=5_000_000, max_side=8192, max_pixels=2000)
    assert decode_image(image_bytes(40, 40), limits).size == (40, 40)  # 1600 px: within ours
    with pytest.raises(ImageTooLarge):
        decode_image(image_bytes(50, 50), limits)  # 2500 px: over ours
