"""Tiled inference for survey images far larger than the model's input.

The image is cut into overlapping tiles (edge tiles shifted inside the image, never padded),
tiles run through the predictor in batches made lazily from views of the decoded image, and
detections are mapped back to image pixels and merged across tiles.

Merging only ever compares boxes from tiles that overlap: a box is clipped to its tile, so
boxes of two disjoint tiles cannot overlap. Greedy suppression over that sparse overlap
graph gives exactly class-aware NMS, in memory linear in the number of boxes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from .boxes import box_area
from .structures import Detections
from .views import checked_views

Pixels = np.ndarray | torch.Tensor  # (H, W, 3): decoded on the CPU, or on the device
MergeMode = Literal["nms", "greedy"]
Metric = Literal["iou", "ios"]


@dataclass(frozen=True)
class TilingOptions:
    tile_size: int = 800
    overlap: float = 0.2
    batch_size: int | None = None  # tiles per forward pass; None: the predictor's preference
    merge: MergeMode = "nms"  # nms: keep the best box; greedy: grow it over split pieces
    metric: Metric = "iou"  # ios (intersection over the smaller box) joins edge fragments
    threshold: float = 0.5
    full_image_pass: bool = False
    views: int = 1  # 2 or 4: each tile also run mirrored, boxes fused (views.py)

    def __post_init__(self) -> None:
        if self.tile_size < 32:
            raise ValueError(f"tile size {self.tile_size} is too small (at least 32 px)")
        if not 0.0 <= self.overlap < 1.0:
            raise ValueError(f"tile overlap {self.overlap} must be in [0, 1)")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch size {self.batch_size} must be at least 1")
        if self.merge not in ("nms", "greedy") or self.metric not in ("iou", "ios"):
            raise ValueError(f"unknown merge {self.merge!r} / metric {self.metric!r}")
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"merge threshold {self.threshold} must be in (0, 1]")
        checked_views(self.views)


@dataclass(frozen=True)
class Tile:
    y0: int
    x0: int
    y1: int
    x1: int

    def intersects(self, other: Tile) -> bool:
        return (
            self.x0 < other.x1 and other.x0 < self.x1 and self.y0 < other.y1 and other.y0 < self.y1
        )


def _starts(length: int, tile: int, overlap: float) -> list[int]:
    """Evenly spread starts, the last one flush with the far edge: every overlap is at least
    the requested one and no tile is a near-duplicate of its neighbour."""
    if length <= tile:
        return [0]
    stride = max(1, tile - round(tile * overlap))
    count = math.ceil((length - tile) / stride) + 1
    return [round(i * (length - tile) / (count - 1)) for i in range(count)]


def tile_grid(height: int, width: int, tile_size: int, overlap: float) -> list[Tile]:
    """Row-major tiles covering the image; tiles are clipped to images smaller than one."""
    return [
        Tile(y, x, min(y + tile_size, height), min(x + tile_size, width))
        for y in _starts(height, tile_size, overlap)
        for x in _starts(width, tile_size, overlap)
    ]


Predict = Callable[[Sequence[np.ndarray]], list[Detections]]


@dataclass(frozen=True)
class TilePlan:
    """The crops one image is run as, and how their detections come back together. Both the
    in-process tiled predictor and the streaming batch job follow the same plan, so they
    give the same detections."""

    height: int
    width: int
    crops: tuple[Tile, ...]  # tiles in row-major order, then the full-image pass if any
    options: TilingOptions | None  # None: the image runs whole, exactly as DefaultPredictor

    @classmethod
    def for_image(cls, height: int, width: int, options: TilingOptions | None) -> TilePlan:
        whole = Tile(0, 0, height, width)
        if options is None:
            return cls(height, width, (whole,), None)
        tiles = tile_grid(height, width, options.tile_size, options.overlap)
        if options.full_image_pass and tiles != [whole]:
            tiles.append(whole)
        return cls(height, width, tuple(tiles), options)

    @property
    def single_pass(self) -> bool:
        """One crop that is the whole image: its detections need no merging."""
        return len(self.crops) == 1

    def batches(self, size: int) -> Iterator[list[Tile]]:
        """Consecutive crops of one shape, at most `size` at a time: a batch never pads one
        crop to another's size, which would change its detections."""
        batch: list[Tile] = []
        for tile in self.crops:
            if batch and (len(batch) == size or _shape(batch[0]) != _shape(tile)):
                yield batch
                batch = []
            batch.append(tile)
        if batch:
            yield batch

    def merge(self, outputs: list[Detections]) -> Detections:
        """Detections of every crop (in crop pixels, in `crops` order) -> the image's."""
        if self.single_pass:
            return outputs[0]
        assert self.options is not None
        parts = [_shift(det, tile) for det, tile in zip(outputs, self.crops, strict=True)]
        merged = merge_tiles(parts, list(range(len(parts))), list(self.crops), self.options)
        merged.image_size = (self.height, self.width)
        return merged


def crop(image: Pixels, tile: Tile) -> Pixels:
    """A view, not a copy: a 20,000 px mosaic is never duplicated tile by tile (nor an
    image decoded on the device)."""
    return image[tile.y0 : tile.y1, tile.x0 : tile.x1]


def predict_tiled(
    predict: Predict, image: np.ndarray, options: TilingOptions, batch_size: int = 1
) -> Detections:
    """Detections for a whole (H, W, 3) image, in its pixels, sorted by score;
    `options.batch_size`, when set, overrides `batch_size`."""
    plan = TilePlan.for_image(*image.shape[:2], options)
    outputs: list[Detections] = []
    for batch in plan.batches(options.batch_size or batch_size):
        outputs += predict([crop(image, t) for t in batch])
    return plan.merge(outputs)


def _shape(tile: Tile) -> tuple[int, int]:
    return tile.y1 - tile.y0, tile.x1 - tile.x0


def _shift(det: Detections, tile: Tile) -> Detections:
    offset = torch.tensor([tile.x0, tile.y0, tile.x0, tile.y0], dtype=det.boxes.dtype)
    return Detections(det.boxes + offset, det.scores, det.classes, det.image_size)


def merge_tiles(
    parts: list[Detections], sources: list[int], tiles: list[Tile], options: TilingOptions
) -> Detections:
    """Merge per-tile detections (already in image pixels); `sources[i]` is the index in
    `tiles` that `parts[i]` came from."""
    if not parts:
        return Detections.empty()
    merged = Detections.cat(parts)
    if len(merged) == 0:
        return merged
    tile_of_box = torch.cat(
        [torch.full((len(p),), s, dtype=torch.int64) for p, s in zip(parts, sources, strict=True)]
    )
    order = torch.argsort(merged.scores, descending=True, stable=True)
    merged, tile_of_box = merged.select(order), tile_of_box[order]
    neighbours = _overlap_graph(merged, tile_of_box, tiles, options)
    keep, groups = _greedy(len(merged), neighbours)
    boxes = merged.boxes[keep].clone()
    if options.merge == "greedy":
        for row, members in enumerate(groups):
            if members:
                group = merged.boxes[[keep[row], *members]]
                boxes[row] = torch.cat(
                    [group[:, :2].min(dim=0).values, group[:, 2:].max(dim=0).values]
                )
    index = torch.tensor(keep, dtype=torch.int64)
    return Detections(boxes, merged.scores[index], merged.classes[index], merged.image_size)


def _overlap_graph(
    det: Detections, tile_of_box: torch.Tensor, tiles: list[Tile], options: TilingOptions
) -> list[list[int]]:
    """For each box (in score order), the later boxes of the same class it overlaps above
    the threshold; only boxes from intersecting tiles are compared."""
    neighbours: list[list[int]] = [[] for _ in range(len(det))]
    members = {
        t: torch.nonzero(tile_of_box == t, as_tuple=True)[0]
        for t in torch.unique(tile_of_box).tolist()
    }
    present = sorted(members)
    for a_pos, a in enumerate(present):
        for b in present[a_pos:]:
            if not tiles[a].intersects(tiles[b]):
                continue
            ia, ib = members[a], members[b]
            score = _pairwise(det.boxes[ia], det.boxes[ib], options.metric)
            linked = (score > options.threshold) & (det.classes[ia][:, None] == det.classes[ib])
            if a == b:  # each pair once, never a box with itself
                linked = torch.triu(linked, diagonal=1)
            hits = torch.nonzero(linked)
            for i, j in zip(ia[hits[:, 0]].tolist(), ib[hits[:, 1]].tolist(), strict=True):
                neighbours[min(i, j)].append(max(i, j))
    return neighbours


def _pairwise(a: torch.Tensor, b: torch.Tensor, metric: Metric) -> torch.Tensor:
    wh = (torch.min(a[:, None, 2:], b[:, 2:]) - torch.max(a[:, None, :2], b[:, :2])).clamp(min=0)
    inter = wh.prod(dim=2)
    area_a, area_b = box_area(a)[:, None], box_area(b)[None, :]
    denom = torch.minimum(area_a, area_b) if metric == "ios" else area_a + area_b - inter
    return torch.where(denom > 0, inter / denom.clamp(min=1e-9), torch.zeros_like(inter))


def _greedy(count: int, neighbours: list[list[int]]) -> tuple[list[int], list[list[int]]]:
    """NMS over a graph whose nodes are in descending score order: keep a node unless an
    earlier kept node overlaps it; return kept nodes and what each one suppressed."""
    suppressed = [False] * count
    keep: list[int] = []
    groups: list[list[int]] = []
    for node in range(count):
        if suppressed[node]:
            continue
        keep.append(node)
        group = [n for n in neighbours[node] if not suppressed[n]]
        for n in group:
            suppressed[n] = True
        groups.append(group)
    return keep, groups
