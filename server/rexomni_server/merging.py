"""Merging the detections of a tiled run (see :mod:`rexomni_server.tiling`) into one answer,
streaming each one as soon as no tile still running can change it.

Detections arrive one by one as ``(tile index, detection in original-image pixels)``, tiles
running concurrently. Only detections of the same label and the same geometry type ever
interact, and never two of the same tile: a tile's own answer is kept as the model gave it, as
in a request without tiling. The rules, in order:

1. **Locality.** Two detections of different *grid* tiles interact only if the tiles are
   neighbours and both detections reach the band those two tiles share (``TilingPlan.band``).
   A detection of a tile's interior therefore never meets another tile's, whatever coordinates a
   model returns.
2. **Edge cuts (boxes only).** A box that ends within ``max(2 px, 1 %)`` of its tile's side, where
   that side lies inside the image (another tile continues there), is *cut*. Two boxes of
   side-by-side tiles (same row, or same column) are fused into their union box, their best score
   kept, when at least one of them is cut on the side the tiles share, both reach the shared band,
   they overlap or are at most that tolerance apart along the cut axis, and they overlap across
   it by at least ``ALIGNMENT`` (0.6) of the smaller extent. Fusion is transitive (an object over
   four tiles becomes one box).
3. **Suppression.** Greedy non-maximum suppression by score over the (fused) candidates of each
   group of interacting detections, between candidates of different tiles: boxes, polygons and
   keypoint instances by the IoU of their boxes (>= ``iou_threshold``), points within
   ``point_distance_px`` (default: ``POINT_DISTANCE_FRACTION`` of the plan's overlap, at least
   ``MIN_POINT_DISTANCE_PX``). A null score ranks below every score; ties go to the detection
   that arrived first.
4. **The whole-image pass** is kept as the model gave it, then meets the grid's results: a cut
   grid result (a fused box, or a single box, polygon or keypoint instance touching a cut edge)
   that a whole-image detection matches (IoU >= ``iou_threshold``) gives way to it - the whole
   image saw the object uncut, and that whole-image detection is kept. Any other grid result
   wins: a whole-image detection matching only such results is dropped (the tile saw the object
   at a higher resolution). A whole-image detection matching nothing is kept.

Finality (what makes streaming safe): a grid detection that reaches no band and is not cut is
final at once - nothing can merge it away. One that reaches a band is final once every tile
whose band it reaches is done (its own tile may still be running); one that is cut waits for
the whole-image pass as well (:func:`is_final`). Detections linked by rules 1-3 form groups, and a
group is resolved, and its results streamed, once every member is final: no later detection
can link to it, so its outcome can no longer change. Whole-image detections are final once
every tile is done, since any grid result may still suppress them. :class:`StreamingMerger`
applies this; :func:`merge` is the same rules over everything at once, every group resolved
with all detections known, so what a StreamingMerger streams, plus its ``finish()``, is exactly
``merge`` of the same detections in the same arrival order (property-tested).
"""

from __future__ import annotations

import math
from collections.abc import Sequence, Set
from dataclasses import dataclass

from rexomni_server.schemas import DEFAULT_MERGE_IOU, BoxDetection, DetectionModel, PointDetection, PolygonDetection
from rexomni_server.tiling import Tile, TilingPlan

Box = tuple[float, float, float, float]

ALIGNMENT = 0.6  # edge-cut fusion: overlap across the cut, as a fraction of the smaller extent
CUT_EDGE_FRACTION = 0.01  # a box this close to a tile's inner side (fraction of the side) is cut
CUT_EDGE_MIN_PX = 2.0  # ... or this close, in pixels, whichever is more
POINT_DISTANCE_FRACTION = 0.05  # default point_distance_px, as a fraction of the plan's overlap
MIN_POINT_DISTANCE_PX = 2.0


def box_of(detection: DetectionModel) -> Box:
    """The detection's box, normalised (x0 <= x1, y0 <= y1): a point is a zero-size box, a polygon
    its bounding box, a keypoint instance its box."""
    if isinstance(detection, PointDetection):
        x, y = detection.point
        return (x, y, x, y)
    if isinstance(detection, PolygonDetection):
        xs, ys = [p[0] for p in detection.polygon], [p[1] for p in detection.polygon]
        return (min(xs), min(ys), max(xs), max(ys))
    x0, y0, x1, y1 = detection.box
    return (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two boxes (x0, y0, x1, y1). Two identical empty boxes: 1."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(0.0, iw) * max(0.0, ih)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    if union <= 0:
        return 1.0 if tuple(a) == tuple(b) else 0.0
    return inter / union


def _tolerance(side: int) -> float:
    return max(CUT_EDGE_MIN_PX, CUT_EDGE_FRACTION * side)


def _is_cut(plan: TilingPlan, tile: Tile, detection: DetectionModel) -> bool:
    """Does a (non-point) grid detection end at one of its tile's sides that lie inside the image?"""
    if tile.whole or isinstance(detection, PointDetection):
        return False
    x0, y0, x1, y1 = box_of(detection)
    tx, ty = _tolerance(tile.width), _tolerance(tile.height)
    return (
        (tile.x0 > 0 and x0 <= tile.x0 + tx)
        or (tile.x1 < plan.width and x1 >= tile.x1 - tx)
        or (tile.y0 > 0 and y0 <= tile.y0 + ty)
        or (tile.y1 < plan.height and y1 >= tile.y1 - ty)
    )


def _needs(plan: TilingPlan, tile_index: int, detection: DetectionModel) -> frozenset[int]:
    """The tiles that must be done before this detection is final: the tiles whose band it
    reaches and, for a cut one, the whole-image pass (none for a detection of a tile's interior).
    Its own tile need not be done: a tile's detections never link to each other, and every
    detection that could link to this one comes from a tile in that set."""
    tile = plan.tiles[tile_index]
    if tile.whole:
        return frozenset(t.index for t in plan.tiles)
    needs = set(plan.bands_reached(tile_index, box_of(detection)))
    whole = plan.whole_index
    if whole is not None and _is_cut(plan, tile, detection):
        needs.add(whole)
    return frozenset(needs)


def is_final(tile_index: int, detection: DetectionModel, plan: TilingPlan, done: Set[int]) -> bool:
    """May this detection (in image pixels) of this tile stream now, given the tiles that are
    done? See the module's finality rule; a StreamingMerger also waits for every detection
    linked to this one."""
    return _needs(plan, tile_index, detection) <= done


@dataclass
class _Item:
    seq: int  # arrival position: ranks ties, orders results
    tile: int
    detection: DetectionModel
    group: tuple[str, str]  # label, geometry type
    box: Box
    cut: bool
    needs: frozenset[int]


@dataclass
class _Result:
    seq: int
    detection: DetectionModel
    box: Box
    cut: bool
    tiles: frozenset[int]  # the tiles it came from (several for a fused box)


def _rank(score: float | None, seq: int) -> tuple[bool, float, int]:
    return (score is None, -(score or 0.0), seq)


class StreamingMerger:
    """Merges a tiled run's detections as they arrive, returning each as soon as it is final.

    ``add(tile_index, detection)`` takes one detection (in original-image pixels) and
    ``tile_done(tile_index)`` says a tile's answer is complete; each returns the detections that
    became final, merged. ``finish()`` returns the rest (tiles never done count as done).
    Everything returned, taken together, equals ``merge`` over the same detections in arrival
    order; nothing is returned twice.
    """

    def __init__(
        self,
        plan: TilingPlan,
        iou_threshold: float = DEFAULT_MERGE_IOU,
        point_distance_px: float | None = None,
    ) -> None:
        if not 0 < iou_threshold <= 1:
            raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}")
        if point_distance_px is None:
            point_distance_px = max(MIN_POINT_DISTANCE_PX, POINT_DISTANCE_FRACTION * plan.overlap)
        if point_distance_px < 0:
            raise ValueError(f"point_distance_px must be at least 0, got {point_distance_px}")
        self.plan = plan
        self.iou_threshold = iou_threshold
        self.point_distance_px = point_distance_px
        self._done: set[int] = set()
        self._finished = False
        self._seq = 0
        self._items: list[_Item] = []  # grid detections, by position in this list
        self._parent: list[int] = []  # union-find over _items: groups of linked detections
        self._by_tile_group: dict[tuple[int, tuple[str, str]], list[int]] = {}
        self._open: set[int] = set()  # _items not yet resolved
        self._grid_results: list[_Result] = []  # every grid result kept so far (for the whole pass)
        self._whole_pending: list[_Result] = []  # whole-pass detections while that pass runs
        self._whole: list[_Result] | None = None  # ... once it is done
        self._whole_resolved = False

    # ---- public ------------------------------------------------------------------------------
    def add(self, tile_index: int, detection: DetectionModel) -> list[DetectionModel]:
        self._check_running(tile_index)
        self._insert(tile_index, detection)
        return [r.detection for r in self._collect()]

    def tile_done(self, tile_index: int) -> list[DetectionModel]:
        self._check_running(tile_index)
        self._mark_done(tile_index)
        return [r.detection for r in self._collect()]

    def finish(self) -> list[DetectionModel]:
        return [r.detection for r in self._finish()]

    # ---- internals ---------------------------------------------------------------------------
    def _check_running(self, tile_index: int) -> None:
        if self._finished:
            raise ValueError("the merge is finished")
        if not 0 <= tile_index < len(self.plan.tiles):
            raise ValueError(f"tile {tile_index} is not in the plan ({len(self.plan.tiles)} tiles)")
        if tile_index in self._done:
            raise ValueError(f"tile {tile_index} is done already")

    def _mark_done(self, tile_index: int) -> None:
        self._done.add(tile_index)
        if self.plan.tiles[tile_index].whole:
            self._whole = self._whole_pending

    def _finish(self) -> list[_Result]:
        if self._finished:
            raise ValueError("the merge is finished")
        self._finished = True
        for tile in self.plan.tiles:
            if tile.index not in self._done:
                self._mark_done(tile.index)
        return self._collect()

    def _find(self, i: int) -> int:
        while self._parent[i] != i:
            self._parent[i] = self._parent[self._parent[i]]
            i = self._parent[i]
        return i

    def _insert(self, tile_index: int, detection: DetectionModel) -> None:
        seq, self._seq = self._seq, self._seq + 1
        tile = self.plan.tiles[tile_index]
        if tile.whole:
            self._whole_pending.append(_Result(seq, detection, box_of(detection), False, frozenset({tile_index})))
            return
        item = _Item(
            seq=seq,
            tile=tile_index,
            detection=detection,
            group=(detection.label, detection.type),
            box=box_of(detection),
            cut=_is_cut(self.plan, tile, detection),
            needs=_needs(self.plan, tile_index, detection),
        )
        index = len(self._items)
        self._items.append(item)
        self._parent.append(index)
        self._open.add(index)
        for other_tile in self.plan.neighbours(tile_index):
            for j in self._by_tile_group.get((other_tile, item.group), ()):
                if self._linked(item, self._items[j]):
                    self._parent[self._find(index)] = self._find(j)
        self._by_tile_group.setdefault((tile_index, item.group), []).append(index)

    def _close(self, a: Box, b: Box, points: bool) -> bool:
        if points:
            return math.dist(a[:2], b[:2]) <= self.point_distance_px
        return iou(a, b) >= self.iou_threshold

    def _local(self, a: _Item, b: _Item) -> bool:
        if a.tile == b.tile:
            return False  # a tile's own detections stand as the model gave them
        band = self.plan.band(a.tile, b.tile)
        return band is not None and _reaches(a.box, band) and _reaches(b.box, band)

    def _linked(self, a: _Item, b: _Item) -> bool:
        if a.group != b.group or not self._local(a, b):
            return False
        return self._close(a.box, b.box, a.group[1] == "point") or self._fusible(a, b)

    def _fusible(self, a: _Item, b: _Item) -> bool:
        """Rule 2: two pieces of one box cut by the side two tiles share."""
        if a.group[1] != "box" or not self._local(a, b):
            return False
        ta, tb = self.plan.tiles[a.tile], self.plan.tiles[b.tile]
        if (ta.y0, ta.y1) == (tb.y0, tb.y1):
            axis = 0  # side by side: the cut is vertical
        elif (ta.x0, ta.x1) == (tb.x0, tb.x1):
            axis = 1
        else:
            return False
        if (ta.x0, ta.y0)[axis] > (tb.x0, tb.y0)[axis]:
            a, b, ta, tb = b, a, tb, ta  # a: the tile before the cut
        lo_a, hi_a = a.box[axis], a.box[axis + 2]
        lo_b, hi_b = b.box[axis], b.box[axis + 2]
        end_a = (ta.x1, ta.y1)[axis]
        start_b = (tb.x0, tb.y0)[axis]
        tol_a, tol_b = _tolerance((ta.width, ta.height)[axis]), _tolerance((tb.width, tb.height)[axis])
        if not (hi_a >= end_a - tol_a or lo_b <= start_b + tol_b):
            return False
        if max(lo_a, lo_b) - min(hi_a, hi_b) > max(tol_a, tol_b):
            return False  # apart along the cut axis
        across = 1 - axis
        pa0, pa1 = a.box[across], a.box[across + 2]
        pb0, pb1 = b.box[across], b.box[across + 2]
        shared = min(pa1, pb1) - max(pa0, pb0)
        return shared >= 0 and shared >= ALIGNMENT * min(pa1 - pa0, pb1 - pb0)

    def _suppress(self, results: list[_Result]) -> list[_Result]:
        """Greedy non-maximum suppression within each label and type, between results of
        different tiles; kept results in arrival order."""
        kept: list[_Result] = []
        for result in sorted(results, key=lambda r: _rank(r.detection.score, r.seq)):
            if not any(k.tiles.isdisjoint(result.tiles) and self._matches(k, result) for k in kept):
                kept.append(result)
        return sorted(kept, key=lambda r: r.seq)

    def _resolve(self, members: list[int]) -> list[_Result]:
        """Rules 2 and 3 over one group of linked grid detections."""
        parent = {i: i for i in members}

        def find(i: int) -> int:
            while parent[i] != i:
                i = parent[i]
            return i

        for n, i in enumerate(members):
            for j in members[n + 1 :]:
                if self._fusible(self._items[i], self._items[j]):
                    ri, rj = find(i), find(j)
                    if ri != rj:
                        parent[max(ri, rj)] = min(ri, rj)
        clusters: dict[int, list[_Item]] = {}
        for i in members:
            clusters.setdefault(find(i), []).append(self._items[i])
        candidates = []
        for pieces in clusters.values():
            if len(pieces) == 1:
                only = pieces[0]
                candidates.append(_Result(only.seq, only.detection, only.box, only.cut, frozenset({only.tile})))
                continue
            box = (
                min(p.box[0] for p in pieces),
                min(p.box[1] for p in pieces),
                max(p.box[2] for p in pieces),
                max(p.box[3] for p in pieces),
            )
            scores = [p.detection.score for p in pieces if p.detection.score is not None]
            fused = BoxDetection(label=pieces[0].detection.label, score=max(scores, default=None), box=list(box))
            tiles = frozenset(p.tile for p in pieces)
            candidates.append(_Result(min(p.seq for p in pieces), fused, box, True, tiles))
        return self._suppress(candidates)

    def _collect(self) -> list[_Result]:
        """Resolve every group whose members are all final; return what is kept, in arrival order."""
        roots: dict[int, list[int]] = {}
        for i in self._open:
            roots.setdefault(self._find(i), []).append(i)
        out: list[_Result] = []
        for members in roots.values():
            if not all(self._items[i].needs <= self._done for i in members):
                continue
            self._open.difference_update(members)
            for result in self._resolve(sorted(members)):
                self._grid_results.append(result)
                if not (result.cut and self._whole_matches(result)):
                    out.append(result)
        grid_done = all(t.index in self._done for t in self.plan.grid)
        if grid_done and not self._open and self._whole is not None and not self._whole_resolved:
            self._whole_resolved = True
            for whole in self._whole:
                matched = [r for r in self._grid_results if self._matches(whole, r)]
                if not matched or any(r.cut for r in matched):
                    out.append(whole)
        return sorted(out, key=lambda r: r.seq)

    def _matches(self, a: _Result, b: _Result) -> bool:
        if (a.detection.label, a.detection.type) != (b.detection.label, b.detection.type):
            return False
        return self._close(a.box, b.box, a.detection.type == "point")

    def _whole_matches(self, result: _Result) -> bool:
        return any(self._matches(whole, result) for whole in self._whole or ())


def _reaches(box: Box, band: Box) -> bool:
    return box[0] <= band[2] and box[2] >= band[0] and box[1] <= band[3] and box[3] >= band[1]


def merge(
    detections: Sequence[tuple[int, DetectionModel]],
    plan: TilingPlan,
    iou_threshold: float = DEFAULT_MERGE_IOU,
    point_distance_px: float | None = None,
) -> list[DetectionModel]:
    """Merge ``(tile index, detection in image pixels)`` pairs by the module's rules, every group
    resolved with all detections known; the kept detections in the order they first appear in
    the input (a fused box: its first piece's)."""
    merger = StreamingMerger(plan, iou_threshold, point_distance_px)
    for tile_index, detection in detections:
        merger._check_running(tile_index)
        merger._insert(tile_index, detection)
    return [r.detection for r in sorted(merger._finish(), key=lambda r: r.seq)]
