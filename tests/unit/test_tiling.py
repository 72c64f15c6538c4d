"""Tiling plans: coverage, overlap, limits, and mapping tile coordinates back to the image."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rexomni_server.schemas import BoxDetection, KeypointsDetection, PointDetection, PolygonDetection
from rexomni_server.tiling import Tile, TilingPlan, crop_box, plan_auto, plan_explicit, shift_detection
from rexomni_server.vocabulary import PATCH_SIDE, PIXEL_UNIT

MAX_PIXELS = 2560 * PIXEL_UNIT


def _check_grid(plan: TilingPlan) -> None:
    grid = plan.grid
    assert [t.index for t in plan.tiles] == list(range(len(plan.tiles)))
    for tile in grid:
        assert 0 <= tile.x0 < tile.x1 <= plan.width
        assert 0 <= tile.y0 < tile.y1 <= plan.height
    # Every pixel is in some grid tile: the distinct column and row spans each cover their axis.
    for spans, length in (
        (sorted({(t.x0, t.x1) for t in grid}), plan.width),
        (sorted({(t.y0, t.y1) for t in grid}), plan.height),
    ):
        assert spans[0][0] == 0 and spans[-1][1] == length
        for (_, end), (start, _) in itertools.pairwise(spans):
            assert start <= end  # no gap
            assert end - start >= plan.overlap
    assert len(grid) == len({(s[0], s[1]) for s in ((t.x0, t.y0) for t in grid)})
    whole = [t for t in plan.tiles if t.whole]
    assert len(whole) <= 1
    if whole:
        assert len(grid) > 1 and whole[0] == plan.tiles[-1]
        assert crop_box(whole[0]) == (0, 0, plan.width, plan.height)


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 9000),
    st.integers(1, 9000),
    st.integers(PIXEL_UNIT, 4 * MAX_PIXELS),
    st.sampled_from([0.0, 0.1, 0.2, 0.3]),
    st.booleans(),
)
def test_auto_grids_cover_the_image(width: int, height: int, max_pixels: int, fraction: float, whole: bool) -> None:
    try:
        plan = plan_auto(width, height, max_pixels, fraction, whole, max_tiles=400)
    except ValueError as exc:
        assert "at most 400 are allowed" in str(exc)
        return
    _check_grid(plan)
    for tile in plan.grid:
        assert tile.width * tile.height <= max_pixels
    grid = plan.grid
    if len(grid) == 1:
        assert width * height <= max_pixels and plan.whole_index is None and plan.overlap == 0
    else:
        assert width * height > max_pixels
        assert (plan.whole_index is not None) == whole
        side = grid[0]
        cols, rows = len({t.x0 for t in grid}), len({t.y0 for t in grid})
        if cols > 1:
            assert min_overlap(sorted({t.x0 for t in grid}), side.width) >= fraction * side.width - 1e-6
        if rows > 1:
            assert min_overlap(sorted({t.y0 for t in grid}), side.height) >= fraction * side.height - 1e-6


def min_overlap(starts: list[int], side: int) -> int:
    return min(side - (b - a) for a, b in itertools.pairwise(starts))


def test_an_image_that_fits_is_one_tile() -> None:
    plan = plan_auto(1000, 1000, MAX_PIXELS)
    assert plan.tiles == (Tile(0, 0, 0, 1000, 1000),)
    assert plan.neighbours(0) == () and not plan.in_overlap(0, (0, 0, 1000, 1000))


def test_a_12_megapixel_photo() -> None:
    plan = plan_auto(4000, 3000, MAX_PIXELS)
    grid = plan.grid
    assert 6 <= len(grid) <= 9
    assert plan.whole_index == len(grid) and len(plan.tiles) == len(grid) + 1
    tile = grid[0]
    # Close to native: each tile fills most of max_pixels without exceeding it, in whole patches.
    assert 0.7 * MAX_PIXELS <= tile.width * tile.height <= MAX_PIXELS
    assert tile.width % PATCH_SIDE == 0 and tile.height % PATCH_SIDE == 0
    assert 0.5 <= tile.width / tile.height <= 2
    assert plan.overlap >= 0.2 * min(tile.width, tile.height)
    _check_grid(plan)


def test_no_whole_pass_when_not_asked() -> None:
    plan = plan_auto(4000, 3000, MAX_PIXELS, whole_pass=False)
    assert plan.whole_index is None and all(not t.whole for t in plan.tiles)


def test_too_many_tiles_is_refused_with_advice() -> None:
    with pytest.raises(ValueError, match=r"needs a \d+x\d+ grid \(\d+ tiles\); at most 4 are allowed: raise"):
        plan_auto(8000, 6000, MAX_PIXELS, max_tiles=4)
    with pytest.raises(ValueError, match=r"needs a 10x10 grid \(100 tiles\); at most 64"):
        plan_explicit(1000, 1000, tile_size=100, overlap=0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tile_size": 27, "overlap": 0}, "tile_size must be at least 28"),
        ({"tile_size": 100, "overlap": 100}, "overlap must be"),
        ({"tile_size": 100, "overlap": -1}, "overlap must be"),
    ],
)
def test_explicit_validation(kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        plan_explicit(500, 500, **kwargs)


def test_auto_validation() -> None:
    with pytest.raises(ValueError, match="overlap_fraction"):
        plan_auto(5000, 5000, MAX_PIXELS, overlap_fraction=1.0)
    with pytest.raises(ValueError, match="max_pixels"):
        plan_auto(5000, 5000, 100)
    with pytest.raises(ValueError, match="image size"):
        plan_auto(0, 5000, MAX_PIXELS)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 3000), st.integers(1, 3000), st.integers(28, 1200), st.data())
def test_explicit_grids_cover_the_image(width: int, height: int, tile_size: int, data: st.DataObject) -> None:
    overlap = data.draw(st.integers(0, tile_size - 1))
    whole = data.draw(st.booleans())
    try:
        plan = plan_explicit(width, height, tile_size, overlap, whole, max_tiles=2_000)
    except ValueError as exc:
        assert "at most 2000 are allowed" in str(exc)
        return
    _check_grid(plan)
    for tile in plan.grid:
        assert (tile.width, tile.height) == (min(tile_size, width), min(tile_size, height))
    if len(plan.grid) > 1:
        assert plan.overlap >= overlap
    else:
        assert plan.whole_index is None


def test_explicit_tile_larger_than_the_image_is_clamped() -> None:
    plan = plan_explicit(300, 200, tile_size=1000, overlap=100)
    assert plan.tiles == (Tile(0, 0, 0, 300, 200),)


def test_explicit_layout_and_neighbours() -> None:
    plan = plan_explicit(250, 150, tile_size=100, overlap=25, whole_pass=True)
    assert [crop_box(t) for t in plan.grid] == [
        (0, 0, 100, 100),
        (75, 0, 175, 100),
        (150, 0, 250, 100),
        (0, 50, 100, 150),
        (75, 50, 175, 150),
        (150, 50, 250, 150),
    ]
    assert plan.overlap == 25
    assert plan.neighbours(0) == (1, 3, 4)
    assert plan.neighbours(4) == (0, 1, 2, 3, 5)
    assert plan.neighbours(6) == (0, 1, 2, 3, 4, 5)  # the whole pass
    assert not plan.in_overlap(0, (10, 10, 60, 40))
    assert plan.in_overlap(0, (10, 10, 80, 40))  # reaches tile 1's band
    assert plan.in_overlap(0, (10, 10, 75, 40))  # touching the band counts
    assert plan.bands_reached(0, (80, 60, 90, 70)) == (1, 3, 4)


def test_touching_tiles_share_their_edge() -> None:
    plan = plan_explicit(200, 100, tile_size=100, overlap=0, whole_pass=False)
    assert plan.neighbours(0) == (1,)
    assert plan.in_overlap(0, (50, 10, 100, 20)) and not plan.in_overlap(0, (50, 10, 99, 20))


TILE = Tile(3, 1204, 912, 2744, 2088)


def _unshift(detection, tile: Tile):  # type: ignore[no-untyped-def]
    return shift_detection(detection, Tile(tile.index, -tile.x0, -tile.y0, 0, 0))


def test_shift_every_geometry() -> None:
    assert shift_detection(BoxDetection(label="a", score=0.5, box=[1, 2, 3.5, 4]), TILE) == BoxDetection(
        label="a", score=0.5, box=[1205, 914, 1207.5, 916]
    )
    assert shift_detection(PointDetection(label="p", point=[0.25, 0]), TILE).point == [1204.25, 912]
    assert shift_detection(PolygonDetection(label="g", polygon=[[0, 0], [1, 0], [0, 1]]), TILE).polygon == [
        [1204, 912],
        [1205, 912],
        [1204, 913],
    ]
    shifted = shift_detection(
        KeypointsDetection(label="person", box=[0, 0, 10, 10], keypoints={"nose": [5, 5], "ear": None}), TILE
    )
    assert isinstance(shifted, KeypointsDetection)
    assert shifted.box == [1204, 912, 1214, 922] and shifted.keypoints == {"nose": [1209, 917], "ear": None}


coordinate = st.integers(0, 1_000_000).map(lambda n: n / 1024)  # exact in binary floating point


@given(st.lists(coordinate, min_size=4, max_size=4), st.lists(st.tuples(coordinate, coordinate), min_size=3))
def test_shift_round_trip_is_exact(box: list[float], polygon: list[tuple[float, float]]) -> None:
    for detection in (
        BoxDetection(label="a", box=box),
        PointDetection(label="a", point=box[:2]),
        PolygonDetection(label="a", polygon=[list(p) for p in polygon]),
        KeypointsDetection(label="a", box=box, keypoints={"k": box[2:], "h": None}),
    ):
        shifted = shift_detection(detection, TILE)
        assert shifted is not detection and shifted != detection
        assert _unshift(shifted, TILE) == detection
