"""``--tiling``, shared by ``rexomni detect`` and ``rexomni evaluate``.

--tiling auto            tiles of the automatic size, the default overlap
--tiling 1024            1024 px square tiles
--tiling 1024:0.25       1024 px tiles overlapping by at least a quarter of their side
--tiling auto:0.25       the automatic size, that overlap
"""

from __future__ import annotations

import argparse
from typing import Any

from pydantic import ValidationError

from rexomni_server.schemas import TilingOptions, validation_summary

TILING_HELP = (
    "tiled detection for large images: auto, SIZE (tile side in pixels, e.g. 1024) or SIZE:OVERLAP "
    "(e.g. 1024:0.25; SIZE may be auto). Every tiling field, whole_image and iou_threshold included, "
    "can be set with --options '{\"tiling\": {...}}' instead"
)


class TilingConflict(ValueError):
    """--tiling given with an --options that sets tiling too."""


def parse_tiling(text: str) -> str | dict[str, Any]:
    """``--tiling``'s value as the request's ``tiling`` option: "auto", or an object with
    tile_size (and overlap). Checked with the server's own schema; argparse reports an
    ``ArgumentTypeError`` as a usage error."""
    size_text, sep, overlap_text = text.strip().partition(":")
    size_text, overlap_text = size_text.strip(), overlap_text.strip()
    tiling: dict[str, Any] = {}
    if size_text.lower() != "auto":
        try:
            tiling["tile_size"] = int(size_text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r}: expected auto, SIZE or SIZE:OVERLAP (e.g. 1024 or 1024:0.25)"
            ) from None
    if sep:
        try:
            tiling["overlap"] = float(overlap_text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: the overlap after ':' is a number, e.g. 0.25") from None
    try:
        TilingOptions(**tiling)
    except ValidationError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {validation_summary(exc.errors())}") from None
    return tiling if tiling else "auto"


def add_tiling_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tiling", type=parse_tiling, metavar="auto|SIZE[:OVERLAP]", help=TILING_HELP)


def with_tiling(options: dict[str, Any], tiling: str | dict[str, Any] | None) -> dict[str, Any]:
    """``options`` with ``--tiling``'s value as its ``tiling``; TilingConflict when --options
    has one already."""
    if tiling is None:
        return options
    if "tiling" in options:
        raise TilingConflict("--tiling and --options tiling: give one")
    return {**options, "tiling": tiling}
