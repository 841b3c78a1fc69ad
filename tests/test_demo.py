"""The demo's survey (backend/demo.py): a new wetland survey's tiles, as many as the round's
effort figure needs, labelled by a scripted annotator who counts what pre-labels save."""

from __future__ import annotations

import numpy as np

from backend.demo import IMAGE_SIZE, SPECIES, review, survey_tiles
from backend.labelstudio.results import rectangle_region
from backend.synthetic import empty_tile_share


def test_a_round_holds_the_animals_its_effort_figure_rests_on_in_a_mostly_empty_survey():
    tiles = survey_tiles(np.random.default_rng(0), 50)
    animals = [len(t.boxes) for t in tiles]
    assert sum(animals) >= 50 > sum(animals[:-1])  # no more tiles than it takes
    assert all(t.image.shape[:2] == IMAGE_SIZE for t in tiles)
    assert empty_tile_share(tiles) >= 0.85
    classes = {SPECIES[c] for t in tiles for c in t.classes.tolist()}
    assert classes <= set(SPECIES) and len(classes) >= 2


def test_the_scripted_annotator_keeps_good_boxes_moves_loose_ones_deletes_and_draws():
    tiles = survey_tiles(np.random.default_rng(1), 4)
    scene = next(t for t in tiles if len(t.boxes) >= 3)
    height, width = IMAGE_SIZE
    x0, y0, x1, y1 = scene.boxes[1].tolist()
    exact, loose = scene.boxes[0].tolist(), [x0, y0, x1 + 0.5 * (x1 - x0), y1]  # IoU 2/3
    name = {i: SPECIES[c] for i, c in enumerate(scene.classes.tolist())}
    predicted = [{**rectangle_region(exact, name[0], width, height), "score": 0.9},
                 {**rectangle_region(loose, name[1], width, height), "score": 0.8},
                 {**rectangle_region([0, 0, 20, 20], name[0], width, height), "score": 0.7}]
    result, tally = review(predicted, scene)
    assert (tally.offered, tally.matched, tally.adjusted, tally.truth) == (
        3, 2, 1, len(scene.boxes))
    assert len(result) == len(scene.boxes)  # every animal boxed once, the wrong box gone
