"""`tridentloop bench --uncertainty-check`: each uncertainty score set against the corrections
an annotator then makes, on generated surveys a trained model did not draw."""

from __future__ import annotations

import numpy as np

from backend.bench.uncertainty_check import UncertaintyCheck, run_uncertainty_check, spearman


def test_spearman_ranks_ties_together_and_refuses_a_constant():
    assert spearman(np.array([1, 2, 3, 4]), np.array([10, 20, 30, 40])) == 1.0
    assert spearman(np.array([1, 2, 3, 4]), np.array([4, 3, 2, 1])) == -1.0
    assert abs(spearman(np.array([0, 0, 1, 1]), np.array([0, 0, 0, 1])) - 0.577) < 1e-3
    assert spearman(np.array([1, 2, 3]), np.array([5, 5, 5])) is None


def test_the_scores_are_set_against_what_annotators_correct():
    seed, summary = run_uncertainty_check(UncertaintyCheck(
        seeds=1, val_frames=10, frames=16, empty_fraction=0.7))
    error_rate = seed["methods"]["error-rate"]
    assert error_rate["spearman_corrections"] > 0  # the frames needing work rank first
    low, median, high = error_rate["spread"]
    assert low <= median <= high and error_rate["distinct"] > 1
    assert set(seed["methods"]) == set(summary["spearman_over_seeds"])
