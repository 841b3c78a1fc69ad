"""Tiled inference: full coverage, edge tiles inside the image, exact per-tile boxes,
cross-tile merging, and bounded memory on huge images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.ops import batched_nms

from backend.detection.structures import Detections
from backend.detection.tiling import Tile, TilingOptions, merge_tiles, predict_tiled, tile_grid


def test_grid_covers_the_image_with_full_tiles_shifted_inside():
    tiles = tile_grid(2000, 1500, 800, 0.2)
    assert all(t.y1 - t.y0 == 800 and t.x1 - t.x0 == 800 for t in tiles)
    assert all(t.x0 >= 0 and t.x1 <= 1500 and t.y0 >= 0 and t.y1 <= 2000 for t in tiles)
    covered = np.zeros((2000, 1500), bool)
    for t in tiles:
        covered[t.y0 : t.y1, t.x0 : t.x1] = True
    assert covered.all()
    assert sorted({t.x0 for t in tiles}) == [0, 350, 700]  # the last column flush with the edge
    assert sorted({t.y0 for t in tiles}) == [0, 600, 1200]


def test_neighbouring_tiles_overlap_at_least_as_asked():
    for length in (801, 1440, 2000, 6000, 20_000):
        starts = sorted({t.x0 for t in tile_grid(800, length, 800, 0.2)})
        gaps = np.diff(starts)
        assert gaps.max() <= 640, (length, starts)  # overlap never below 20%
        assert starts[-1] == length - 800


def test_small_image_is_a_single_tile_of_its_own_size():
    assert tile_grid(300, 500, 800, 0.2) == [Tile(0, 0, 300, 500)]


def test_survey_image_of_54_tiles():
    assert len(tile_grid(3840, 5760, 800, 0.2)) == 6 * 9


def test_object_inside_one_tile_keeps_the_box_of_that_tile_run_alone(fpn_predictor, fixture_image):
    rng = np.random.default_rng(1)
    canvas = rng.integers(0, 256, size=(1400, 1400, 3), dtype=np.uint8)
    canvas[:800, :800] = fixture_image  # exactly the first tile
    merged = predict_tiled(fpn_predictor.predict, canvas, TilingOptions(batch_size=2))
    alone = fpn_predictor(fixture_image)
    # Tiles start at 0 and 600: boxes ending before 600 lie in the first tile only.
    private = (alone.boxes[:, 2] < 600) & (alone.boxes[:, 3] < 600)
    assert private.sum() > 10
    for box, score, cls in zip(
        alone.boxes[private], alone.scores[private], alone.classes[private], strict=True
    ):
        same = (merged.boxes == box).all(dim=1) & (merged.classes == cls)
        assert same.any(), f"box {box.tolist()} changed or vanished"
        assert merged.scores[same][0] == score
    assert merged.image_size == (1400, 1400)
    assert (merged.scores[:-1] >= merged.scores[1:]).all()


def test_without_tiling_needed_tiled_equals_whole_image(fpn_predictor, fixture_image):
    tiled = predict_tiled(fpn_predictor.predict, fixture_image, TilingOptions())
    whole = fpn_predictor(fixture_image)
    assert torch.equal(tiled.boxes, whole.boxes)


def _dets(boxes, scores, classes) -> Detections:
    return Detections(
        torch.tensor(boxes, dtype=torch.float32), torch.tensor(scores), torch.tensor(classes)
    )


def test_sparse_merge_equals_class_aware_nms():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 700, size=(400, 2))
    wh = rng.uniform(10, 100, size=(400, 2))
    boxes = np.concatenate([xy, xy + wh], axis=1)
    scores = rng.uniform(0, 1, size=400).astype(np.float32)
    classes = rng.integers(0, 3, size=400)
    det = _dets(boxes.tolist(), scores.tolist(), classes.tolist())
    tile = Tile(0, 0, 800, 800)
    merged = merge_tiles([det], [0], [tile], TilingOptions())
    keep = batched_nms(det.boxes, det.scores, det.classes, 0.5)
    assert torch.equal(merged.boxes, det.boxes[keep])


def test_boxes_of_disjoint_tiles_are_never_compared():
    tiles = [Tile(0, 0, 100, 100), Tile(0, 200, 100, 300)]
    a = _dets([[10, 10, 50, 50]], [0.9], [0])
    b = _dets([[210, 10, 250, 50]], [0.8], [0])
    assert len(merge_tiles([a, b], [0, 1], tiles, TilingOptions())) == 2


def test_greedy_ios_merge_joins_an_object_split_by_a_tile_edge():
    """Tile A ends at x=110 and tile B starts at x=80: one animal from x=60 to x=130 is
    seen as two pieces, which greedy merging with IoS turns back into one box."""
    tiles = [Tile(0, 0, 100, 110), Tile(0, 80, 100, 190)]
    left = _dets([[60, 20, 110, 50]], [0.9], [1])
    right = _dets([[80, 21, 130, 50]], [0.7], [1])
    nms = merge_tiles([left, right], [0, 1], tiles, TilingOptions())
    assert len(nms) == 2  # IoU 0.42: plain NMS keeps both pieces
    greedy = merge_tiles(
        [left, right], [0, 1], tiles, TilingOptions(merge="greedy", metric="ios", threshold=0.5)
    )
    assert greedy.boxes.tolist() == [[60.0, 20.0, 130.0, 50.0]]
    assert greedy.scores.tolist() == pytest.approx([0.9])


def test_different_classes_are_not_merged():
    tiles = [Tile(0, 0, 100, 100)]
    det = _dets([[10, 10, 50, 50], [10, 10, 50, 50]], [0.9, 0.8], [0, 1])
    assert len(merge_tiles([det], [0], tiles, TilingOptions())) == 2


def test_full_image_pass_adds_whole_image_detections():
    calls = []

    def predict(images):
        calls.append([im.shape[:2] for im in images])
        return [_dets([[1, 1, 60, 60]], [0.5], [0]) for _ in images]

    image = np.zeros((1000, 1000, 3), np.uint8)
    out = predict_tiled(predict, image, TilingOptions(full_image_pass=True, batch_size=8))
    assert calls[-1] == [(1000, 1000)]
    # Four tiles give four shifted boxes; the whole image's box equals tile 0's and merges.
    assert len(out) == 4


def test_huge_image_is_processed_a_batch_of_tile_views_at_a_time():
    """20,000 x 20,000 px: never more than batch_size tiles in flight, each a view."""
    image = np.zeros((20_000, 20_000, 3), np.uint8)  # zero pages: not resident until touched
    seen = []

    def predict(tiles):
        seen.append(len(tiles))
        assert all(t.base is not None for t in tiles)  # views, not copies
        return [Detections.empty(t.shape[:2]) for t in tiles]

    out = predict_tiled(predict, image, TilingOptions(batch_size=8))
    assert len(out) == 0
    assert sum(seen) == len(tile_grid(20_000, 20_000, 800, 0.2)) == 31 * 31
    assert max(seen) == 8


@pytest.mark.parametrize(
    "bad",
    [{"overlap": 1.0}, {"tile_size": 8}, {"batch_size": 0}, {"threshold": 0.0}, {"merge": "avg"}],
)
def test_bad_tiling_options_are_refused(bad):
    with pytest.raises(ValueError):
        TilingOptions(**bad)
