"""Tiled detection for large images (SAHI-style): which rectangles to run, and how their
detections map back onto the original image.

A large image squeezed into ``max_pixels`` loses its small objects. Tiling runs the model on
overlapping crops instead, each small enough to be seen at (close to) native resolution, plus,
optionally, one whole-image pass that still sees the objects larger than a tile. Merging the
results is :mod:`rexomni_server.merging`'s job; everything here is pure geometry.

Conventions: a tile is a pixel rectangle ``[x0, x1) x [y0, y1)`` of the original image; as a
continuous region (where detection coordinates live) it spans ``[x0, x1] x [y0, y1]``. Grid tiles
come first, row by row from the top left; the whole-image pass, when planned, is the last tile.
Tile sides are multiples of ``PATCH_SIDE`` wherever that still fits ``max_pixels``: such a tile
passes smart_resize unchanged, so the model sees it pixel for pixel.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

from rexomni_server.schemas import (
    DEFAULT_TILE_OVERLAP,
    BoxDetection,
    DetectionModel,
    KeypointsDetection,
    PointDetection,
    PolygonDetection,
)
from rexomni_server.vocabulary import PATCH_SIDE, PIXEL_UNIT

DEFAULT_MAX_TILES = 64  # grid tiles; the whole-image pass is not counted
ASPECT_LIMIT = 4.0  # plan_auto's tiles follow the image's aspect up to this ratio
ASPECT_WEIGHT = 0.5  # plan_auto: cost of a tile aspect away from the image's (or square), per log unit

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Tile:
    index: int
    x0: int
    y0: int
    x1: int  # exclusive
    y1: int  # exclusive
    whole: bool = False  # the whole-image pass (covers the full image)

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    @property
    def height(self) -> int:
        return self.y1 - self.y0


@dataclass(frozen=True)
class TilingPlan:
    width: int
    height: int
    tiles: tuple[Tile, ...]
    overlap: int  # the least overlap, in pixels, between two adjacent grid tiles (0 for a 1x1 grid)

    @property
    def grid(self) -> tuple[Tile, ...]:
        return tuple(t for t in self.tiles if not t.whole)

    @property
    def whole_index(self) -> int | None:
        """Index of the whole-image pass, None when the plan has none."""
        return next((t.index for t in self.tiles if t.whole), None)

    @cached_property
    def _neighbours(self) -> dict[int, tuple[int, ...]]:
        grid = self.grid
        result: dict[int, tuple[int, ...]] = {}
        for tile in self.tiles:
            result[tile.index] = tuple(
                other.index for other in grid if other.index != tile.index and _band(tile, other) is not None
            )
        return result

    def neighbours(self, index: int) -> tuple[int, ...]:
        """Grid tiles whose rectangles meet this one's (touching counts: with no overlap, the shared
        edge is where objects are cut). For the whole-image pass: every grid tile."""
        return self._neighbours[index]

    def band(self, index: int, other: int) -> Box | None:
        """The region two tiles share (closed; a line or a point where they only touch)."""
        return _band(self.tiles[index], self.tiles[other])

    def bands_reached(self, index: int, box: Sequence[float]) -> tuple[int, ...]:
        """The neighbouring grid tiles whose shared band with this tile the box reaches."""
        tile = self.tiles[index]
        return tuple(other for other in self.neighbours(index) if _meets(box, _band(tile, self.tiles[other])))

    def in_overlap(self, index: int, box: Sequence[float]) -> bool:
        """Does a box (x0, y0, x1, y1 in image pixels) reach into a band this tile shares with
        another grid tile (touching the band's edge counts)?"""
        return bool(self.bands_reached(index, box))


def _band(a: Tile, b: Tile) -> Box | None:
    x0, y0 = max(a.x0, b.x0), max(a.y0, b.y0)
    x1, y1 = min(a.x1, b.x1), min(a.y1, b.y1)
    if x0 > x1 or y0 > y1:
        return None
    return (float(x0), float(y0), float(x1), float(y1))


def _meets(box: Sequence[float], region: Box | None) -> bool:
    if region is None:
        return False
    bx0, by0, bx1, by1 = min(box[0], box[2]), min(box[1], box[3]), max(box[0], box[2]), max(box[1], box[3])
    return bx0 <= region[2] and bx1 >= region[0] and by0 <= region[3] and by1 >= region[1]


# ---- planning --------------------------------------------------------------------------------
def _starts(length: int, count: int, side: int) -> list[int]:
    """``count`` starts spread evenly (integer rounding, half up) from 0 to ``length - side``."""
    if count == 1:
        return [0]
    span = length - side
    return [(2 * i * span + count - 1) // (2 * (count - 1)) for i in range(count)]


def _required_overlap(side: int, fraction: float) -> int:
    return math.ceil(fraction * side - 1e-9)


def _axis_ok(length: int, count: int, side: int, fraction: float) -> bool:
    if count == 1 or side >= length:
        return True
    step = -(-(length - side) // (count - 1))  # the largest gap between two evenly spread starts
    return side - step >= _required_overlap(side, fraction)


def _axis_side(length: int, count: int, fraction: float) -> int:
    """The least side for which ``count`` evenly spread tiles cover ``length`` with adjacent tiles
    overlapping by at least ``fraction`` of the side (the condition only gets easier as the side
    grows)."""
    if count == 1:
        return length
    side = max(1, math.floor(length / (count - (count - 1) * fraction)) - 2)
    while not _axis_ok(length, count, side, fraction):
        side += 1
    return min(side, length)


def _round_up(side: int, length: int) -> int:
    """The side as a multiple of PATCH_SIDE when that stays below the image's length."""
    rounded = -(-side // PATCH_SIDE) * PATCH_SIDE
    return rounded if rounded < length else side


def _axis_overlap(starts: list[int], side: int) -> int | None:
    if len(starts) < 2:
        return None
    return min(side - (b - a) for a, b in itertools.pairwise(starts))


def _build(width: int, height: int, cols: int, rows: int, tile_w: int, tile_h: int, whole_pass: bool) -> TilingPlan:
    xs, ys = _starts(width, cols, tile_w), _starts(height, rows, tile_h)
    tiles = [
        Tile(index=r * cols + c, x0=x, y0=y, x1=x + tile_w, y1=y + tile_h)
        for r, y in enumerate(ys)
        for c, x in enumerate(xs)
    ]
    if whole_pass and len(tiles) > 1:
        tiles.append(Tile(index=len(tiles), x0=0, y0=0, x1=width, y1=height, whole=True))
    overlaps = [o for o in (_axis_overlap(xs, tile_w), _axis_overlap(ys, tile_h)) if o is not None]
    return TilingPlan(width=width, height=height, tiles=tuple(tiles), overlap=min(overlaps, default=0))


def _check_image(width: int, height: int) -> None:
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")


def _refuse(width: int, height: int, cols: int, rows: int, max_tiles: int, advice: str) -> None:
    if cols * rows > max_tiles:
        raise ValueError(
            f"tiling a {width}x{height} image needs a {cols}x{rows} grid ({cols * rows} tiles); "
            f"at most {max_tiles} are allowed: {advice}"
        )


def plan_auto(
    width: int,
    height: int,
    max_pixels: int,
    overlap_fraction: float = DEFAULT_TILE_OVERLAP,
    whole_pass: bool = True,
    max_tiles: int = DEFAULT_MAX_TILES,
) -> TilingPlan:
    """The fewest tiles, each at most ``max_pixels`` (so the model sees it at native resolution),
    adjacent tiles overlapping by at least ``overlap_fraction`` of the tile side, the tile's aspect
    close to the image's or square. An image that fits ``max_pixels`` is one tile (no tiling, no
    whole-image pass). Raises ValueError when the grid would exceed ``max_tiles`` tiles."""
    _check_image(width, height)
    if max_pixels < PIXEL_UNIT:
        raise ValueError(f"max_pixels must be at least {PIXEL_UNIT}, got {max_pixels}")
    if not 0 <= overlap_fraction < 1:
        raise ValueError(f"overlap_fraction must be in [0, 1), got {overlap_fraction}")
    if max_tiles < 1:
        raise ValueError(f"max_tiles must be at least 1, got {max_tiles}")
    if width * height <= max_pixels:
        return _build(width, height, 1, 1, width, height, whole_pass=False)

    # The tile's aspect may follow the image's, within reason (a 40:1 strip still wants tiles
    # of its full height), or be square; a mismatch costs up to half a tile per tile.
    image_aspect = min(max(width / height, 1 / ASPECT_LIMIT), ASPECT_LIMIT)
    # Well beyond these counts a tile side would drop below one patch: never worth it.
    max_cols = 2 * math.ceil(width / (PATCH_SIDE * (1 - overlap_fraction))) + 2
    max_rows = 2 * math.ceil(height / (PATCH_SIDE * (1 - overlap_fraction))) + 2

    def sized(cols: int, rows: int) -> tuple[int, int] | None:
        exact_w, exact_h = _axis_side(width, cols, overlap_fraction), _axis_side(height, rows, overlap_fraction)
        if exact_w * exact_h > max_pixels:
            return None
        round_w, round_h = _round_up(exact_w, width), _round_up(exact_h, height)
        for w, h in ((round_w, round_h), (round_w, exact_h), (exact_w, round_h)):
            if w * h <= max_pixels:
                return w, h
        return exact_w, exact_h

    best: tuple[float, int, int, int, int, int] | None = None  # cost, count, rows, cols, w, h
    for rows in range(1, max_rows + 1):
        if best is not None and rows > best[0]:
            break  # the cost is at least the tile count, at least the row count
        if sized(max_cols, rows) is None:
            continue
        lo, hi = 1, max_cols  # the fewest columns that fit: sizes only shrink as columns are added
        while lo < hi:
            mid = (lo + hi) // 2
            if sized(mid, rows) is None:
                lo = mid + 1
            else:
                hi = mid
        for cols in range(lo, min(lo + 3, max_cols + 1)):
            size = sized(cols, rows)
            if size is None:
                continue
            aspect = size[0] / size[1]
            penalty = min(abs(math.log(aspect / image_aspect)), abs(math.log(aspect)))
            count = cols * rows
            candidate = (count * (1 + ASPECT_WEIGHT * penalty), count, rows, cols, size[0], size[1])
            if best is None or candidate < best:
                best = candidate
    if best is None:
        raise ValueError(f"no tiling of a {width}x{height} image fits max_pixels={max_pixels}")
    _, _, rows, cols, tile_w, tile_h = best
    _refuse(
        width,
        height,
        cols,
        rows,
        max_tiles,
        f"raise max_pixels (now {max_pixels}) or max_tiles, lower the overlap, or send a smaller image",
    )
    return _build(width, height, cols, rows, tile_w, tile_h, whole_pass)


def plan_explicit(
    width: int,
    height: int,
    tile_size: int,
    overlap: int,
    whole_pass: bool = True,
    max_tiles: int = DEFAULT_MAX_TILES,
) -> TilingPlan:
    """Square tiles of ``tile_size`` pixels (clamped to the image where it is smaller), adjacent
    tiles overlapping by at least ``overlap`` pixels, spread evenly so the last one ends at the edge."""
    _check_image(width, height)
    if tile_size < PATCH_SIDE:
        raise ValueError(f"tile_size must be at least {PATCH_SIDE}, got {tile_size}")
    if not 0 <= overlap < tile_size:
        raise ValueError(f"overlap must be at least 0 and less than tile_size ({tile_size}), got {overlap}")
    if max_tiles < 1:
        raise ValueError(f"max_tiles must be at least 1, got {max_tiles}")

    def count(length: int) -> int:
        return 1 if tile_size >= length else -(-(length - overlap) // (tile_size - overlap))

    cols, rows = count(width), count(height)
    _refuse(width, height, cols, rows, max_tiles, "raise tile_size or max_tiles, or lower the overlap")
    return _build(width, height, cols, rows, min(tile_size, width), min(tile_size, height), whole_pass)


# ---- coordinates -----------------------------------------------------------------------------
def crop_box(tile: Tile) -> tuple[int, int, int, int]:
    """The tile's rectangle as PIL's ``Image.crop`` takes it."""
    return (tile.x0, tile.y0, tile.x1, tile.y1)


def _xy(point: Sequence[float], dx: float, dy: float) -> list[float]:
    return [point[0] + dx, point[1] + dy]


def _xyxy(box: Sequence[float], dx: float, dy: float) -> list[float]:
    return [box[0] + dx, box[1] + dy, box[2] + dx, box[3] + dy]


def shift_detection(detection: DetectionModel, tile: Tile) -> DetectionModel:
    """A detection in the tile's pixels (the tile run as an image of its own size) -> the same
    detection in the original image's pixels: a new model, every coordinate moved by (x0, y0)."""
    dx, dy = float(tile.x0), float(tile.y0)
    if isinstance(detection, BoxDetection):
        return detection.model_copy(update={"box": _xyxy(detection.box, dx, dy)})
    if isinstance(detection, PointDetection):
        return detection.model_copy(update={"point": _xy(detection.point, dx, dy)})
    if isinstance(detection, PolygonDetection):
        return detection.model_copy(update={"polygon": [_xy(p, dx, dy) for p in detection.polygon]})
    if isinstance(detection, KeypointsDetection):
        keypoints = {name: None if p is None else _xy(p, dx, dy) for name, p in detection.keypoints.items()}
        return detection.model_copy(update={"box": _xyxy(detection.box, dx, dy), "keypoints": keypoints})
    raise TypeError(f"not a detection: {type(detection).__name__}")
