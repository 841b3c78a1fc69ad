"""Dense scenes (hundreds of trees or birds in one image) are measured and ranked as
faithfully as sparse ones: evaluation counts every box up to `evaluate.max_detections`, and
the default uncertainty still tells dense images apart."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from backend.detection.structures import Detections
from backend.synthetic import survey_scene
from backend.uncertainty import entropy, error_rate, least_confidence, score, top_doubt
from pipelines.evaluate import coco_metrics
from pipelines.params import load_params


@pytest.fixture(scope="module")
def dense_scene():
    scene = survey_scene(np.random.default_rng(3), 1600, 1600, 340)
    assert len(scene.boxes) >= 300
    return scene


def _coco(scene) -> dict:
    """One class, as a tree-crown or a colony survey has."""
    annotations = [
        {"id": i + 1, "image_id": 1, "category_id": 0,
         "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0)}
        for i, (x0, y0, x1, y1) in enumerate(scene.boxes.tolist())
    ]
    return {"images": [{"id": 1, "width": 1600, "height": 1600, "file_name": "dense.png"}],
            "annotations": annotations, "categories": [{"id": 0, "name": "animal"}]}


def test_evaluation_counts_every_box_of_a_dense_scene(dense_scene):
    coco = _coco(dense_scene)
    # A perfect detector: every ground-truth box, scores falling from 1.
    records = [{"image_id": 1, "category_id": a["category_id"], "bbox": a["bbox"],
                "score": 1.0 - i / 1000} for i, a in enumerate(coco["annotations"])]
    capped, _ = coco_metrics(coco, records, max_detections=100)
    counted, curve = coco_metrics(coco, records, max_detections=400)
    assert capped["ap50"] < 0.45  # pycocotools' default: 100 of 300+ boxes count
    assert counted["ap50"] == counted["ap"] == pytest.approx(1.0)
    assert counted["max_detections"] == 400
    assert all(point["precision"] == pytest.approx(1.0) for point in curve)


def test_the_loop_evaluates_dense_scenes_by_default(tmp_path, capsys):
    """`auto`: every detection a tiled model can return on the largest val image counts
    (100 per 320 px tile x 25 tiles of 1600 x 1600); a fixed cap that an image reaches is
    said."""
    from backend.detection.tiling import TilingOptions
    from backend.model_dir import ModelDir
    from pipelines.evaluate import detection_cap, warn_if_capped

    from .servers import make_model_dir

    assert load_params()["evaluate"]["max_detections"] == "auto"
    model = ModelDir.open(make_model_dir(tmp_path / "m"))
    coco = {"images": [{"id": 1, "height": 1600, "width": 1600}]}
    per_tile = model.config.roi_heads.detections_per_image
    assert detection_cap("auto", model, coco, TilingOptions(320, 0.0)) == per_tile * 25
    assert detection_cap(120, model, coco, None) == 120
    warn_if_capped([{"image_id": 1, "category_id": 0}] * 120, 120, "v1")
    assert "1 image/class pair(s) reach evaluate.max_detections=120" in capsys.readouterr().out


def _dense(scores: list[float]) -> Detections:
    n = len(scores)
    boxes = torch.tensor([[10.0 * i, 0, 10.0 * i + 8, 8] for i in range(n)]).reshape(-1, 4)
    return Detections(boxes, torch.tensor(scores), torch.zeros(n, dtype=torch.int64))


def test_top_doubt_orders_dense_images_that_the_other_scores_tie():
    rng = np.random.default_rng(0)
    confident = list(rng.uniform(0.9, 0.99, 299))
    one_doubt = _dense([*confident, 0.5])  # one coin flip among 300 sure boxes
    many_doubts = _dense([*confident[:280], *rng.uniform(0.4, 0.6, 20)])
    weak_many = _dense(list(rng.uniform(0.05, 0.2, 300)))  # a tile of weak boxes
    # Saturated: least confidence sees a coin flip in each; entropy sums to ~1 for all.
    assert least_confidence(one_doubt) == pytest.approx(least_confidence(many_doubts), abs=0.03)
    assert min(entropy(d) for d in (one_doubt, many_doubts, weak_many)) > 0.999
    # Top-doubt keeps them apart, in the order an annotator's time is worth.
    assert top_doubt(many_doubts) > top_doubt(weak_many) > top_doubt(one_doubt)
    assert top_doubt(many_doubts) > 0.8 and top_doubt(one_doubt) < 0.3


def test_top_doubt_is_bounded_and_scores_the_doubt_an_annotator_resolves():
    assert top_doubt(_dense([])) == 0.0
    assert top_doubt(_dense([0.5])) == pytest.approx(0.1)  # one coin flip of ten
    assert top_doubt(_dense([0.5] * 5 + [0.99] * 3)) == pytest.approx(0.5 + 0.006, abs=1e-3)
    assert top_doubt(_dense([0.5] * 50)) == pytest.approx(1.0)
    assert score("top-doubt", [_dense([0.5])]) == top_doubt(_dense([0.5]))


def _ranks(values: list[float]) -> np.ndarray:
    return np.argsort(np.argsort(values)).astype(float)


def _spearman(a: list[float], b: list[float]) -> float:
    return float(np.corrcoef(_ranks(a), _ranks(b))[0, 1])


def test_error_rate_ranks_a_dense_pool_by_the_error_a_person_will_fix():
    """200 dense tiles (100-300 boxes each) of a calibrated model: a box of score s is an
    animal with probability s. A tile is harder the larger its share of boxes near 0.5.
    Its realised error is what an annotator fixes at the 0.5 threshold (false boxes shown,
    animals not shown) per animal. error-rate follows it; top-doubt saturates (every tile
    has ten near coin flips: 0.94-1.0) and orders the pool far less well."""
    rng = np.random.default_rng(0)
    pool, realised = [], []
    for _ in range(200):
        n, hard = int(rng.integers(100, 300)), rng.uniform(0.15, 0.5)
        coin = rng.random(n) < hard
        sure_real = rng.random(n) < 0.6
        scores = np.where(coin, rng.uniform(0.42, 0.58, n),
                          np.where(sure_real, rng.uniform(0.9, 0.99, n), rng.uniform(0.01, 0.1, n)))
        real = rng.random(n) < scores
        shown = scores >= 0.5
        realised.append(((shown & ~real).sum() + (~shown & real).sum()) / max(real.sum(), 1))
        pool.append(_dense(scores.tolist()))
    ours = _spearman([error_rate(d) for d in pool], realised)
    saturated = _spearman([top_doubt(d) for d in pool], realised)
    assert min(top_doubt(d) for d in pool) > 0.9  # every tile: ten near coin flips
    assert ours > 0.85 and ours > saturated + 0.2, (ours, saturated)  # 0.90 and 0.59


def test_error_rate_is_bounded_and_zero_for_sure_answers():
    assert error_rate(_dense([])) == 0.0
    assert error_rate(_dense([0.999] * 50 + [0.001] * 50)) < 0.01
    assert error_rate(_dense([0.5])) == pytest.approx(0.5 / 1.5)
    assert 0 <= error_rate(_dense([0.5] * 500)) < 1
    assert score("error-rate", [_dense([0.5])]) == error_rate(_dense([0.5]))
