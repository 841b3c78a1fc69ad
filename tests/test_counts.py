"""Survey counts with intervals and empty-image triage (backend/counts.py): calibrated on val
apart from what annotators are offered, every class counted."""

from __future__ import annotations

import numpy as np

from backend.counts import (
    Counting,
    calibrate_counts,
    choose_triage,
    count_figures,
    estimate,
    triage_threshold,
)
from backend.effort import EffortSettings, Scored, choose_thresholds
from backend.imagery.counts import interval


def _survey(rng: np.random.Generator, images: int, empty: float = 0.9, recall: float = 0.8,
            rocks: float = 0.4) -> Scored:
    """A sparse survey as a detector sees it: most images empty, herds of zebras in the
    rest; each zebra found with probability 0.8 (scores 0.4-1), plus look-alikes (rocks) at
    scores 0.1-0.7 in any image (`recall` and `rocks` change both). Detections carry no
    match flags: counting needs none."""
    image, score, truth_image = [], [], []
    for i in range(images):
        animals = 0 if rng.random() < empty else int(rng.integers(1, 9))
        truth_image += [i] * animals
        found = int(rng.binomial(animals, recall))
        confusers = int(rng.poisson(rocks))
        image += [i] * (found + confusers)
        score += [*rng.uniform(0.4, 1.0, found), *rng.uniform(0.1, 0.7, confusers)]
    n = len(score)
    return Scored(image=np.array(image, int), cls=np.zeros(n, int), score=np.array(score),
                  overlap=np.zeros(n), truth_image=np.array(truth_image, int),
                  truth_cls=np.zeros(len(truth_image), int), images=images, names=("zebra",))


def test_the_count_interval_covers_the_truth_of_new_surveys_95_percent_of_the_time():
    """Calibrated on 300 val images, applied to 200 new ones of the same survey: over 300
    draws the 95% interval holds the true count in 90-99% of them, and the estimate is
    unbiased."""
    rng = np.random.default_rng(0)
    covered, errors, raw_errors = 0, [], []
    for _ in range(300):
        calibration = calibrate_counts(_survey(rng, 300))["per_class"]["zebra"]
        new = _survey(rng, 200)
        counted = int((new.score >= calibration["threshold"]).sum())
        mean, sd = estimate(calibration, counted, new.images)
        low, high = interval(mean, sd)
        true = len(new.truth_cls)
        covered += low <= true <= high
        errors.append((mean - true) / true)
        raw_errors.append((int((new.score >= 0.8).sum()) - true) / true)
    assert 0.90 <= covered / 300 <= 0.99
    # unbiased, where the boxes an annotator-like threshold (0.8) offers undercount by half
    assert abs(np.mean(errors)) < 0.03 and np.mean(raw_errors) < -0.4


def test_a_detector_that_finds_half_the_animals_is_corrected_by_the_ratio():
    """No look-alikes and half the animals missed: no threshold balances the count, so the
    ratio (about 2) does, and the interval still holds the truth."""
    rng = np.random.default_rng(4)
    calibration = calibrate_counts(_survey(rng, 1000, recall=0.5, rocks=0.0))
    zebra = calibration["per_class"]["zebra"]
    assert 1.7 < zebra["ratio"] < 2.3
    new = _survey(rng, 1000, recall=0.5, rocks=0.0)
    mean, sd = estimate(zebra, int((new.score >= zebra["threshold"]).sum()), new.images)
    low, high = interval(mean, sd)
    assert low <= len(new.truth_cls) <= high and abs(mean / len(new.truth_cls) - 1) < 0.15


def test_a_class_annotators_are_not_offered_is_still_counted():
    """Too few val zebras to offer their boxes with confidence, yet the survey counts them."""
    scored = _survey(np.random.default_rng(1), 60)
    offered = choose_thresholds(scored, EffortSettings(min_boxes=1000))
    assert offered["per_class"]["zebra"] is None
    calibration = calibrate_counts(scored, min_boxes=10)
    zebra = count_figures(scored, calibration)["per_class"]["zebra"]
    assert zebra["estimate"] > 0 and zebra["low"] <= zebra["count_true"] <= zebra["high"]
    counting = Counting.of_model({"count_calibration": calibration}, ["zebra"])
    assert 0 < counting.of(0) <= 1 and counting.estimate(0, 10, 60)[0] > 0


def test_a_rare_class_is_counted_by_the_pooled_calibration():
    scored = _survey(np.random.default_rng(2), 200)
    rare = np.zeros(len(scored.truth_cls), int)
    rare[:3] = 1  # three birds in val
    dets = np.zeros(len(scored.cls), int)
    dets[:2] = 1
    scored = Scored(scored.image, dets, scored.score, scored.overlap, scored.truth_image, rare,
                    scored.images, ("zebra", "bird"))
    calibration = calibrate_counts(scored, min_boxes=10)
    assert calibration["per_class"]["zebra"]["source"] == "own"
    assert calibration["per_class"]["bird"]["source"] == "pooled"
    assert calibration["per_class"]["bird"]["ratio"] == calibration["pooled"]["ratio"]


def test_a_class_without_evidence_that_the_model_calls_another_is_still_covered():
    """Few val zebras, and the model calls zebras elephants (as the savanna model does): the
    pooled ratio gives the zebras of a new survey an estimate of 0, so their interval runs to
    the survey total's upper bound instead of a width fitted to other classes."""
    def called_elephants(scored: Scored, zebras: int) -> Scored:
        truth = np.zeros(len(scored.truth_cls), int)
        truth[:zebras] = 1  # the first herds are zebras, every detection says elephant
        return Scored(scored.image, np.zeros(len(scored.cls), int), scored.score,
                      scored.overlap, scored.truth_image, truth, scored.images,
                      ("elephant", "zebra"))

    rng = np.random.default_rng(5)
    val = called_elephants(_survey(rng, 300), zebras=4)
    calibration = calibrate_counts(val, min_boxes=10)
    assert calibration["per_class"]["zebra"]["source"] == "pooled"
    new = called_elephants(_survey(rng, 200), zebras=40)
    zebra = count_figures(new, calibration)["per_class"]["zebra"]
    assert zebra["estimate"] == 0 and zebra["low"] == 0 and zebra["high"] >= 40
    counting = Counting.of_model({"count_calibration": calibration}, ["elephant", "zebra"])
    everything = int((new.score >= counting.fallback).sum())
    assert counting.bounds(1, 0, new.images, everything)[2] >= 40
    assert "no evidence of its own" in counting.method(1)


def test_an_uncalibrated_model_says_so_and_counts_from_one_half():
    counting = Counting.of_model({}, ["zebra"])
    assert counting.of(0) == 0.5 and counting.estimate(0, 3, 10) is None
    assert "uncalibrated" in counting.method(0) and "no count calibration" in counting.source
    assert Counting.uniform(0.3, "--count-threshold").of(0) == 0.3


def test_triage_keeps_the_recall_asked_for_and_says_what_it_skips():
    """On a 90%-empty survey the triage threshold keeps >= 95% of the images with animals,
    on val and on folds it was not chosen on, and spares most of the empty ones."""
    scored = _survey(np.random.default_rng(3), 400)
    triage = choose_triage(scored, recall=0.95)
    assert triage["image_recall"] >= 0.95
    assert triage["threshold"] == triage_threshold(scored, 0.95)
    assert triage["skipped_share"] > 0.7  # most images are empty and need not be opened
    assert triage["out_of_sample"]["image_recall"] >= 0.9
    assert triage["animals_in_skipped"] < 0.05 * len(scored.truth_cls)
    looser = choose_triage(scored, recall=0.8)
    assert looser["threshold"] > triage["threshold"]
    assert looser["skipped_share"] >= triage["skipped_share"]


def test_a_val_with_few_herds_triages_nothing():
    """Nine images with animals cannot show 95% recall: no threshold, nothing skipped."""
    scored = _survey(np.random.default_rng(6), 60)
    assert 0 < len(np.unique(scored.truth_image)) < 32
    triage = choose_triage(scored, recall=0.95)
    assert triage["threshold"] is None and triage["skipped_images"] == 0


def test_animals_in_one_or_two_val_images_calibrate_nothing():
    """A ratio fitted to two images fits them exactly: a zero-width interval would be a lie."""
    two = Scored(np.array([0, 1, 1]), np.zeros(3, int), np.array([0.9, 0.8, 0.7]), np.zeros(3),
                 np.array([0, 0, 1, 1, 1]), np.zeros(5, int), 10, ("zebra",))
    assert calibrate_counts(two, min_boxes=1)["per_class"]["zebra"] is None


def test_val_without_animals_calibrates_nothing():
    empty = Scored(np.array([0]), np.array([0]), np.array([0.6]), np.zeros(1), np.zeros(0, int),
                   np.zeros(0, int), 3, ("zebra",))
    assert calibrate_counts(empty)["per_class"]["zebra"] is None
    assert choose_triage(empty)["threshold"] is None
    counting = Counting.of_model({"count_calibration": calibrate_counts(empty)}, ["zebra"])
    assert counting.estimate(0, 1, 3) is None and counting.of(0) == 0.5


def test_the_count_bench_scores_the_shipped_model_on_new_surveys_per_seed():
    """`bench --counts`: per seed the counts, the effort interval and triage on frames the
    figures were not fitted on, then how often each held, with intervals over the seeds."""
    from backend.bench.counts import CountBench, run_count_benchmark

    *seeds, summary = run_count_benchmark(CountBench(seeds=2, val_frames=8, survey_frames=6,
                                                     empty_fraction=0.7))
    assert [s["seed"] for s in seeds] == [0, 1]
    for seed in seeds:
        assert set(seed["counts"]) == {"elephant", "zebra", "bird"}
        truth = sum(c["true"] for c in seed["counts"].values())
        assert truth > 0 and seed["effort"]["out_of_sample"] >= 0
    assert any(c["estimate"] is not None for s in seeds for c in s["counts"].values())
    assert summary["seeds"] == 2 and set(summary["count_coverage"]) == set(seeds[0]["counts"])
