"""A tiled request's own steps: which tasks may be tiled, its tiles' images, and its engine
requests' detections mapped back onto the image and merged as tiles end.

:mod:`rexomni_server.tiling` plans the tiles and :mod:`rexomni_server.merging` merges; this
module ties them to a request. Each tile runs as engine requests of its own (one, or one per
category when the request fans out), so tiles run concurrently wherever the engine batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from PIL import Image

from rexomni_server.errors import InvalidRequest
from rexomni_server.images import prepare_image
from rexomni_server.merging import StreamingMerger
from rexomni_server.schemas import DetectionModel, DetectOptions, DetectParams, TileInfo, TilingOptions
from rexomni_server.tasks import Task
from rexomni_server.tiling import TilingPlan, crop_box, plan_auto, plan_explicit, shift_detection

# Tasks whose answer is about the whole image, which tiles would each answer on their own.
UNTILEABLE_TASKS = {
    Task.GUI_GROUNDING: "GUI grounding finds one element on the whole screen, which each tile would answer on its own",
    Task.GUI_POINTING: "GUI pointing finds one element on the whole screen, which each tile would answer on its own",
    Task.VISUAL_PROMPTING: "visual prompting's reference boxes describe objects of the whole image, and most "
    "tiles would not contain them",
}


def check_tiling(params: DetectParams) -> None:
    """Refuse, before any work, what tiling cannot do."""
    options = params.options
    if options.tiling is None:
        if options.forced_tile_outputs is not None:
            raise InvalidRequest("options.forced_tile_outputs (one per tile) needs options.tiling")
        return
    reason = UNTILEABLE_TASKS.get(params.task)
    if reason is not None:
        raise InvalidRequest(f"options.tiling cannot apply to task {params.task.value!r}: {reason}; send it untiled")


def plan_tiles(width: int, height: int, options: TilingOptions, max_pixels: int, max_tiles: int) -> TilingPlan:
    """The tiling plan of an image; InvalidRequest (with advice) when it needs too many tiles."""
    try:
        if options.tile_size is None:
            return plan_auto(width, height, max_pixels, options.overlap, options.whole_image, max_tiles)
        overlap = round(options.overlap * options.tile_size)
        return plan_explicit(width, height, options.tile_size, overlap, options.whole_image, max_tiles)
    except ValueError as exc:
        raise InvalidRequest(f"options.tiling: {exc}") from exc


@dataclass(frozen=True)
class TiledImage:
    """A decoded image cut into its plan's tiles, each resized as the model will see it."""

    plan: TilingPlan
    images: tuple[Image.Image, ...]  # per tile, in plan order

    def infos(self) -> list[TileInfo]:
        return [
            TileInfo(x0=t.x0, y0=t.y0, x1=t.x1, y1=t.y1, whole=t.whole, resized_width=i.width, resized_height=i.height)
            for t, i in zip(self.plan.tiles, self.images, strict=True)
        ]


def cut_tiles(image: Image.Image, plan: TilingPlan, min_pixels: int, max_pixels: int) -> TiledImage:
    """Crop and resize every tile (CPU work: the decode pool's)."""
    images = []
    for tile in plan.tiles:
        box = crop_box(tile)
        crop = image if box == (0, 0, image.width, image.height) else image.crop(box)
        images.append(prepare_image(crop, min_pixels, max_pixels).resized)
    return TiledImage(plan, tuple(images))


def forced_per_region(options: DetectOptions, regions: int) -> list[str | None]:
    """The forced output of each region (the image, or each tile): forced_output for every
    region, or forced_tile_outputs, one per tile (check_tiling allows those when tiled only)."""
    per_tile = options.forced_tile_outputs
    if per_tile is None:
        return [options.forced_output] * regions
    if len(per_tile) != regions:
        raise InvalidRequest(
            f"options.forced_tile_outputs has {len(per_tile)} answers; this image is tiled into {regions} tiles "
            "(grid tiles row by row, then the whole-image pass)"
        )
    return list(per_tile)


@dataclass
class TileMerge:
    """A tiled run's merge: engine request ``i`` belongs to tile ``tile_of[i]``; a tile is done
    once all of its engine requests have ended."""

    tiled: TiledImage
    tile_of: list[int]
    iou_threshold: float
    merger: StreamingMerger = field(init=False)
    _running: dict[int, int] = field(init=False)  # tile -> its engine requests not yet ended

    @property
    def plan(self) -> TilingPlan:
        return self.tiled.plan

    def __post_init__(self) -> None:
        self.merger = StreamingMerger(self.plan, self.iou_threshold)
        self._running = {}
        for tile in self.tile_of:
            self._running[tile] = self._running.get(tile, 0) + 1

    def found(self, index: int, detections: Sequence[DetectionModel]) -> list[DetectionModel]:
        """Engine request ``index`` found these (in its tile's pixels): what is final now."""
        tile = self.plan.tiles[self.tile_of[index]]
        final: list[DetectionModel] = []
        for detection in detections:
            final += self.merger.add(tile.index, shift_detection(detection, tile))
        return final

    def ended(self, index: int) -> list[DetectionModel]:
        """Engine request ``index`` ended: what is final now."""
        tile = self.tile_of[index]
        self._running[tile] -= 1
        return self.merger.tile_done(tile) if self._running[tile] == 0 else []

    def finish(self) -> list[DetectionModel]:
        return self.merger.finish()
