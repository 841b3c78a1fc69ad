"""Annotator effort (backend/effort.py): the corrections a person makes to pre-labels, the
thresholds that make the fewest, and what a survey's counts come to."""

from __future__ import annotations

import numpy as np
import pytest

from backend.effort import (
    EffortSettings,
    at_thresholds,
    best_threshold,
    choose_thresholds,
    cross_fitted,
    curve,
    match,
    precision_lower_bound,
    report,
    score_coco,
)


def _coco(truth: dict[int, list[tuple[str, list[float]]]], names=("zebra", "bird")) -> dict:
    ids = {n: i for i, n in enumerate(names)}
    annotations = [{"id": k, "image_id": image, "category_id": ids[name], "bbox": box}
                   for k, (image, name, box) in enumerate(
                       (im, n, b) for im, boxes in truth.items() for n, b in boxes)]
    return {"images": [{"id": i} for i in sorted(truth)], "annotations": annotations,
            "categories": [{"id": i, "name": n} for n, i in ids.items()]}


def _record(image: int, cls: int, box: list[float], score: float) -> dict:
    return {"image_id": image, "category_id": cls, "bbox": box, "score": score}


def test_corrections_count_deletions_and_drawings_at_each_threshold():
    """Three zebras; boxes at 0.9 (hit), 0.8 (miss), 0.7 (hit), 0.3 (miss), 0.2 (hit)."""
    coco = _coco({1: [("zebra", [0, 0, 10, 10]), ("zebra", [20, 0, 10, 10]),
                      ("zebra", [40, 0, 10, 10])]})
    records = [_record(1, 0, [0, 0, 10, 10], 0.9), _record(1, 0, [60, 0, 10, 10], 0.8),
               _record(1, 0, [20, 1, 10, 10], 0.7), _record(1, 0, [80, 0, 10, 10], 0.3),
               _record(1, 0, [40, 0, 10, 10], 0.2)]
    scored = score_coco(coco, records)
    at = {t: report(scored, {"zebra": t})["per_class"]["zebra"] for t in (0.9, 0.7, 0.2)}
    assert (at[0.7]["kept"], at[0.7]["deleted"], at[0.7]["drawn"]) == (2, 1, 1)
    assert (at[0.2]["kept"], at[0.2]["deleted"], at[0.2]["drawn"]) == (3, 2, 0)
    assert at[0.7]["effort_ratio"] == pytest.approx(2 / 3, abs=1e-4)
    assert at[0.7]["precision"] == at[0.7]["recall"] == pytest.approx(2 / 3, abs=1e-4)
    # 2 corrections at 0.9, 0.7 and 0.2 alike: the highest threshold wins the tie (taking
    # five boxes' precisions at face value: confidence 0.5).
    plain = EffortSettings(confidence=0.5)
    assert best_threshold(*scored.subset(0), plain) == (0.9, pytest.approx(2 / 3))
    # A delete that costs half a draw moves it: offering more is cheaper.
    assert best_threshold(*scored.subset(0), EffortSettings(delete_cost=0.5,
                                                            confidence=0.5))[0] == 0.2
    # Five boxes are too few to be confident that offering them pays: not offered.
    assert best_threshold(*scored.subset(0), EffortSettings())[0] is None


def test_a_threshold_needs_evidence_that_its_boxes_pay_off():
    """7 of 10 boxes right (70%) beats drawing on val, but 10 boxes cannot show it with 90%
    confidence; 70 of 100 can. The bound is Wilson's."""
    for n, offered in ((10, False), (100, True)):
        scores = np.linspace(0.99, 0.6, n)
        matched = np.tile([True, False, True, True, False, True, True, False, True, True],
                          n // 10)  # 70% at every depth
        threshold, _ = best_threshold(scores, matched, n, EffortSettings())
        assert (threshold is not None) == offered
    bound = precision_lower_bound(np.array([7, 70]), np.array([10, 100]), 0.9)
    assert 0.45 < bound[0] < 0.5 < 0.63 < bound[1] < 0.7


def test_a_box_is_kept_once_greedily_by_score():
    truth = np.array([[0, 0, 10, 10]], float)
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [1, 1, 10, 10]], float)
    which, overlap = match(boxes, np.array([0.5, 0.9, 0.7]), truth, 0.5)
    assert which.tolist() == [-1, 0, -1] and overlap.tolist() == [0.0, 1.0, 0.0]
    assert (match(boxes, np.array([0.5, 0.9, 0.7]), np.zeros((0, 4)), 0.5)[0] == -1).all()


def test_a_class_no_threshold_makes_cheaper_than_drawing_is_not_offered():
    """Birds: 12 real, the model's bird boxes mostly elsewhere; zebras: good boxes."""
    truth = {i: [("zebra", [0, 0, 10, 10]), ("bird", [50, 50, 5, 5])] for i in range(12)}
    records = [_record(i, 0, [0, 0, 10, 10], 0.8) for i in range(12)]
    records += [_record(i, 1, [90, 90, 5, 5], 0.6 + i / 100) for i in range(12)]
    records += [_record(i, 1, [50, 50, 5, 5], 0.1) for i in range(2)]
    chosen = choose_thresholds(score_coco(_coco(truth), records))
    assert chosen["per_class"]["zebra"] == 0.8
    assert chosen["per_class"]["bird"] is None  # 0.5+ corrections per bird at best
    assert "cheaper than drawing" in chosen["withheld"]["bird"]
    figures = report(score_coco(_coco(truth), records), chosen["per_class"])
    assert figures["per_class"]["bird"]["effort_ratio"] == 1.0  # drawn from scratch
    assert figures["overall"]["effort_ratio"] == pytest.approx(12 / 24)
    assert figures["overall"]["corrections_per_image"] == pytest.approx(1.0)


def test_a_class_without_evidence_is_withheld_unless_pooled_is_asked_for():
    """One bird in val cannot show that bird boxes pay: not offered, and model.json says
    why; `offer_rare: pooled` gives it the threshold chosen on every class."""
    truth = {i: [("zebra", [0, 0, 10, 10])] for i in range(20)}
    truth[0].append(("bird", [50, 50, 5, 5]))
    records = [_record(i, 0, [0, 0, 10, 10], 0.7) for i in range(20)]
    records += [_record(i, 0, [30, 30, 10, 10], 0.3) for i in range(20)]  # false zebras
    records.append(_record(0, 1, [50, 50, 5, 5], 0.2))
    scored = score_coco(_coco(truth), records)
    chosen = choose_thresholds(scored)
    assert chosen["per_class"] == {"zebra": 0.7, "bird": None}
    assert "1 val box(es), fewer than effort.min_boxes 10" in chosen["withheld"]["bird"]
    pooled = choose_thresholds(scored, EffortSettings(offer_rare="pooled"))
    assert pooled["pooled"] == 0.7 and pooled["per_class"]["bird"] == 0.7
    assert "bird" not in pooled["withheld"]
    with pytest.raises(ValueError, match="offer_rare"):
        EffortSettings(offer_rare="always")


def test_the_effort_ratio_is_in_units_of_drawing_whatever_the_costs():
    """A model offering nothing costs exactly drawing every box (1.0) whether a draw is
    priced 0.5 or 2; pricier drawing makes good boxes worth offering."""
    truth = {i: [("zebra", [0, 0, 10, 10])] for i in range(40)}
    records = [_record(i, 0, [0, 0, 10, 10], 0.9) for i in range(30)]
    records += [_record(i, 0, [50, 50, 10, 10], 0.8) for i in range(30)]  # 50% precision
    scored = score_coco(_coco(truth, names=("zebra",)), records)
    for draw in (0.5, 1.0, 2.0):
        settings = EffortSettings(draw_cost=draw, confidence=0.5)
        nothing = report(scored, {"zebra": None}, settings)["overall"]
        assert nothing["effort_ratio"] == 1.0 and nothing["drawn"] == 40
    # at 0.9: 30 kept, 10 drawn: 10 draws of 40. At 0.8 30 more deletes: with draw 2,
    # 30 deletes + 10 draws * 2 = 50 of 80 (0.625); with draw 1, 40 of 40: not worth it.
    assert best_threshold(*scored.subset(0), EffortSettings(draw_cost=2.0))[0] == 0.9
    assert report(scored, {"zebra": 0.8}, EffortSettings(draw_cost=2.0))["overall"][
        "effort_ratio"] == pytest.approx(50 / 80)
    assert report(scored, {"zebra": 0.8})["overall"]["effort_ratio"] == 1.0


def test_a_loose_box_costs_an_adjustment_not_nothing():
    """A zebra box at IoU 0.6 is matched (not drawn) but must be adjusted: adjust_cost;
    one at IoU 1 is kept as it is."""
    truth = {0: [("zebra", [0, 0, 10, 10]), ("zebra", [40, 0, 10, 10])]}
    records = [_record(0, 0, [0, 0, 10, 10], 0.9), _record(0, 0, [40, 0, 10, 6], 0.8)]
    figures = report(score_coco(_coco(truth, names=("zebra",)), records), {"zebra": 0.5},
                     EffortSettings(adjust_cost=0.5))["overall"]
    assert (figures["kept"], figures["adjusted"], figures["deleted"], figures["drawn"]) == (
        1, 1, 0, 0)
    assert figures["corrections"] == 0.5 and figures["effort_ratio"] == 0.25
    strict = report(score_coco(_coco(truth, names=("zebra",)), records), {"zebra": 0.5},
                    EffortSettings(keep_iou=0.5))["overall"]
    assert strict["adjusted"] == 0 and strict["corrections"] == 0


def _noise(seed: int, images: int = 200) -> tuple[dict, list[dict]]:
    """One zebra an image and one box on it whose score says nothing: right 62% of the time."""
    rng = np.random.default_rng(seed)
    truth = {i: [("zebra", [0, 0, 10, 10])] for i in range(images)}
    records = [_record(i, 0, [0, 0, 10, 10] if rng.random() < 0.62 else [50, 50, 10, 10],
                       float(rng.uniform())) for i in range(images)]
    return _coco(truth, names=("zebra",)), records


def test_effort_scored_out_of_sample_does_not_flatter_a_lucky_threshold():
    """Thresholds fitted to noise look better on the images they were fitted to than on
    folds they were not chosen on; the out-of-sample figure's interval holds what a fresh
    batch shows at those thresholds."""
    settings = EffortSettings(confidence=0.5)
    coco, records = _noise(0)
    scored = score_coco(coco, records)
    chosen = choose_thresholds(scored, settings)["per_class"]
    in_sample = report(scored, chosen, settings)["overall"]["effort_ratio"]
    held = cross_fitted(scored, settings)
    assert held["folds"] == 5 and held["images"] == 200
    assert held["effort_ratio"] > in_sample + 0.02
    assert held["low"] < held["effort_ratio"] < held["high"]
    fresh = at_thresholds(score_coco(*_noise(1, 2000)), chosen, settings)["effort_ratio"]
    assert held["low"] <= fresh <= held["high"]


def test_the_batch_interval_holds_what_small_fresh_batches_show():
    """The interval for the expected ratio is narrow with 200 val images; one batch of 10
    images scatters far wider. The batch interval (images drawn 10 at a time) holds the
    ratio of most 10-image batches; the interval of the mean holds few."""
    settings = EffortSettings(confidence=0.5)
    scored = score_coco(*_noise(0))
    chosen = choose_thresholds(scored, settings)["per_class"]
    held = cross_fitted(scored, settings, batch=10)
    assert held["batch_low"] < held["low"] < held["high"] < held["batch_high"]
    fresh = [at_thresholds(score_coco(*_noise(seed, 10)), chosen, settings)["effort_ratio"]
             for seed in range(100, 140)]
    in_batch = np.mean([held["batch_low"] <= f <= held["batch_high"] for f in fresh])
    in_mean = np.mean([held["low"] <= f <= held["high"] for f in fresh])
    assert in_batch >= 0.85 and in_mean <= 0.6


def test_a_model_that_offers_nothing_costs_exactly_drawing_out_of_sample_too():
    """Fifteen zebras found, but one image holds fifteen confident wrong boxes: on all of val
    no threshold pays, so nothing is offered and annotators draw every box (a ratio of
    exactly 1), though the folds without that image would have offered boxes."""
    truth = {i: [("zebra", [10, 10, 20, 20])] for i in range(15)}
    truth |= {i: [] for i in range(15, 20)}
    records = [_record(i, 0, [10, 10, 20, 20], 0.9) for i in range(15)]
    records += [_record(19, 0, [50 + 3 * k, 50, 2, 2], 0.95) for k in range(15)]
    scored = score_coco(_coco(truth), records)
    assert choose_thresholds(scored)["per_class"]["zebra"] is None
    held = cross_fitted(scored)
    assert (held["effort_ratio"], held["low"], held["high"]) == (1.0, 1.0, 1.0)


def test_the_plotted_curve_and_the_matching_agree_at_every_threshold():
    """One greedy pass gives every threshold: matching only the boxes above a threshold
    anew gives the same kept count."""
    rng = np.random.default_rng(0)
    truth = {i: [("zebra", [*rng.uniform(0, 80, 2), 10, 10]) for _ in range(5)]
             for i in range(8)}
    records = [_record(i, 0, list(np.add(b, rng.normal(0, 2, 4) * [1, 1, 0, 0])),
                       float(rng.uniform())) for i, boxes in truth.items() for _, b in boxes
               for _ in range(2)]
    scored = score_coco(_coco(truth, names=("zebra",)), records)
    for point in curve(scored):
        t = point["threshold"]
        above = [r for r in records if r["score"] >= t]
        again = report(score_coco(_coco(truth, names=("zebra",)), above), {"zebra": t})
        assert point["effort_ratio"] == again["per_class"]["zebra"]["effort_ratio"]
