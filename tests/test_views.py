"""Mirrored test-time views: a recipe may ask for each tile to be run mirrored too; the boxes
one animal gets in each view are fused into one, and what a single view alone sees keeps
only its share of the score."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from backend.detection.structures import Detections
from backend.detection.views import fuse, mirrored, unmirrored
from backend.model_dir import ModelDir
from backend.models import SAVANNA_V1
from backend.recipe import RecipeError, parse_recipe
from backend.synthetic import PoolSettings, survey_pool


def found(boxes, scores, classes) -> Detections:
    return Detections(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                      torch.tensor(scores), torch.tensor(classes), (100, 200))


def test_one_animals_boxes_from_two_views_become_their_score_weighted_mean():
    first = found([[10, 10, 50, 50], [100, 60, 120, 80]], [0.9, 0.6], [0, 0])
    second = found([[14, 14, 54, 54], [12, 12, 52, 52]], [0.3, 0.9], [0, 1])
    fused = fuse([first, second], limit=100)
    by_class = {(int(c), round(float(s), 3)): b.tolist()
                for b, s, c in zip(fused.boxes, fused.scores, fused.classes, strict=True)}
    assert by_class == {
        (0, 0.6): [11.0, 11.0, 51.0, 51.0],  # (0.9 * 10 + 0.3 * 14) / 1.2; (0.9 + 0.3) / 2
        (1, 0.45): [12.0, 12.0, 52.0, 52.0],  # another class: seen by one view of two
        (0, 0.3): [100.0, 60.0, 120.0, 80.0],
    }
    assert fused.scores.tolist() == sorted(fused.scores.tolist(), reverse=True)
    assert len(fuse([first, second], limit=2)) == 2  # TEST.DETECTIONS_PER_IMAGE holds


def test_a_box_found_on_a_mirrored_image_lands_back_on_the_same_pixels():
    image = torch.zeros(100, 200, 3, dtype=torch.uint8)
    image[20:40, 10:30] = 255  # rows 20-39, columns 10-29: the box (10, 20, 30, 40)
    for left_right, up_down in ((True, False), (False, True), (True, True)):
        rows, cols = torch.nonzero(mirrored(image, left_right, up_down)[:, :, 0]).T
        box = [[cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]]
        back = unmirrored(found(box, [1.0], [0]), (100, 200), left_right, up_down)
        assert back.boxes.tolist() == [[10.0, 20.0, 30.0, 40.0]]


@pytest.fixture(scope="module")
def two_views(tmp_path_factory) -> ModelDir:
    """Last season's model, its recipe asking for two views."""
    path = tmp_path_factory.mktemp("views") / "model"
    shutil.copytree(SAVANNA_V1, path)
    metadata = json.loads((path / "model.json").read_text())
    metadata["recipe"]["views"] = 2
    (path / "model.json").write_text(json.dumps(metadata))
    return ModelDir.open(path)


def test_a_recipe_with_two_views_fuses_the_tile_and_its_mirror(two_views):
    tiles = survey_pool(np.random.default_rng(0), 40, PoolSettings(height=320, width=320))
    herd = next(t for t in tiles if len(t.boxes) >= 3)
    one = ModelDir.open(SAVANNA_V1).predictor(device="cpu")
    both = two_views.predictor(device="cpu")
    assert (one.views, both.views) == (1, 2)
    mirror = np.ascontiguousarray(herd.image[:, ::-1])
    expected = fuse([one.detect(herd.image, None),
                     unmirrored(one.detect(mirror, None), (320, 320), True, False)], 100)
    got, single = both.detect(herd.image, None), one.detect(herd.image, None)
    assert len(got) >= 3
    torch.testing.assert_close(got.boxes, expected.boxes)
    torch.testing.assert_close(got.scores, expected.scores)
    assert len(got) != len(single) or not torch.equal(got.boxes, single.boxes)


def test_a_tile_where_the_first_view_finds_nothing_is_not_run_again(two_views, monkeypatch):
    both = two_views.predictor(device="cpu")
    ground = np.full((320, 320, 3), (120, 110, 80), np.uint8)
    passes = []
    forward = both._forward
    monkeypatch.setattr(both, "_forward", lambda p: passes.append(len(p)) or forward(p))
    assert len(both.detect(ground, two_views.recipe)) == 0
    assert passes == [1]


def test_a_recipe_asks_for_one_two_or_four_views():
    assert parse_recipe({"mode": "tiled", "views": 4}, "model.json").views == 4
    with pytest.raises(RecipeError, match="views 3 must be one of"):
        parse_recipe({"mode": "tiled", "views": 3}, "model.json")
    with pytest.raises(RecipeError, match="views 2 needs mode tiled"):
        parse_recipe({"mode": "whole", "views": 2}, "params.yaml")
    assert parse_recipe({"mode": "whole", "views": 1}, "params.yaml") is None


def test_the_views_bench_compares_each_way_with_one_view_on_the_same_frames(capsys):
    """`bench --views`: per seed each way's effort on new frames at thresholds it chose on
    val; over the seeds each one's mean, its difference from one view and its time ratio."""
    from backend.cli import main as cli

    assert cli(["bench", "--views", "--seeds", "2", "--val-frames", "3", "--survey-frames",
                "3", "--empty-fraction", "0.3"]) == 0
    *seeds, summary = [json.loads(line) for line in capsys.readouterr().out.splitlines()
                       if line.startswith("{")]
    assert [s["seed"] for s in seeds] == [0, 1]
    for seed in seeds:
        assert {k for k in seed if k.startswith("views_")} == {"views_1", "views_2", "views_4"}
        assert seed["views_1"]["ground_truth"] == seed["views_4"]["ground_truth"] > 0
    one = [s["views_1"]["effort_ratio"] for s in seeds]
    four = [s["views_4"]["effort_ratio"] for s in seeds]
    assert summary["views_4"]["minus_one_view"]["mean"] == pytest.approx(
        np.mean(np.subtract(four, one)), abs=1e-3)
    assert summary["views_2"]["time_ratio"] > 0 and "minus_one_view" not in summary["views_1"]
