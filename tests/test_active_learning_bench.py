"""`tridentloop bench --active-learning`: every strategy run as `select` chooses, over seeds,
on generated surveys started from last season's model, with intervals and headline figures
that a learning curve falling back cannot flatter."""

from __future__ import annotations

import pytest

from backend.bench.active_learning import (
    ActiveLearningBench,
    _ratio_interval,
    bars,
    fewer_tiles,
    labels_to_reach,
    run_active_learning_benchmark,
    strategy,
)


def test_labels_to_reach_counts_the_crossing_after_which_the_curve_stays():
    assert labels_to_reach([(0, 0.1), (10, 0.3), (20, 0.5)], 0.4) == 15
    # touches the target at 10, falls back, reaches it for good between 20 and 30
    assert labels_to_reach([(0, 0.1), (10, 0.5), (20, 0.2), (30, 0.6)], 0.4) == 25
    assert labels_to_reach([(0, 0.1), (10, 0.5), (20, 0.3)], 0.4) is None
    assert labels_to_reach([(0, 0.5), (10, 0.6)], 0.4) == 0
    # effort: lower is better
    assert labels_to_reach([(0, 1.0), (10, 0.8), (20, 0.6)], 0.7,
                           higher_is_better=False) == pytest.approx(15)


def test_fewer_tiles_compares_only_seeds_where_random_improved_on_the_start():
    randoms = {0: [(0, 0.0), (16, 0.2), (32, 0.4)],
               1: [(0, 0.1), (16, 0.0), (32, 0.1)],  # random ends where it started
               2: [(0, 0.0), (16, 0.1), (32, 0.2)]}
    mine = {0: [(0, 0.0), (16, 0.4), (32, 0.5)], 1: [(0, 0.1), (16, 0.1), (32, 0.1)],
            2: [(0, 0.0), (16, 0.1), (32, 0.1)]}  # seed 2: never reaches 0.2
    found = fewer_tiles(mine, randoms, higher=True)
    assert (found["seeds_compared"], found["seeds_reached"]) == (2, 1)
    assert found["pct_fewer_tiles"]["mean"] == 25.0  # (50 + 0) / 2
    effort = fewer_tiles({0: [(0, 1.0), (16, 0.6)]}, {0: [(0, 1.0), (16, 1.0)]}, higher=False)
    assert effort["seeds_compared"] == 0 and effort["pct_fewer_tiles"] is None


def _head(compared: int, fewer: tuple[float, float], animals: float, aulc_high: float):
    return {"to_random_final_ap50": {"seeds_compared": compared, "pct_fewer_tiles": {
                "mean": fewer[0], "low": fewer[1]}},
            "animals_per_tile_first_two_batches_vs_random": {"mean": animals},
            "aulc_ap50_minus_random": {"high": aulc_high}}


def test_the_bench_says_which_bars_a_run_meets_and_which_it_cannot_measure():
    met = bars(_head(4, (41.0, 12.0), 2.8, 0.05), seeds=5)
    assert met == {"fewer_tiles_to_random_final_ap50": "met",
                   "animals_per_tile_2x_random": "met", "no_worse_than_random": "yes"}
    short = bars(_head(2, (50.0, 20.0), 1.4, -0.01), seeds=5)
    assert short["fewer_tiles_to_random_final_ap50"] == (
        "not measurable: random improved on the start model's AP50 in 2 of 5 seeds (needs 3)")
    assert short["animals_per_tile_2x_random"] == "not met"
    assert short["no_worse_than_random"] == "no: worse"
    assert bars(_head(5, (35.0, -4.0), 2.0, 0.0), seeds=5)[
        "fewer_tiles_to_random_final_ap50"] == "not met"  # the interval reaches 0


def test_a_ratio_to_a_random_draw_that_found_nothing_has_no_upper_end():
    assert _ratio_interval([2, 2, 2, 1, 3], [1, 1, 1, 0.5, 0.5]) == {
        "mean": 2.5, "low": 2.0, "high": 4.0, "seeds": 5}
    sparse = _ratio_interval([2, 2, 2, 1, 3], [0, 0, 1, 0, 0.5])  # random: 2 seeds of 5
    assert sparse["mean"] == 6.67 and sparse["high"] is None


def test_the_default_strategy_is_the_loops_select_settings():
    assert strategy("default", {"uncertainty": "rare-animals", "diversity": "embeddings",
                                "pool_factor": 3}).diversity == "embeddings"
    assert strategy("random", {}).score is None
    with pytest.raises(ValueError, match="choose from"):
        strategy("most-zebras", {})


def test_the_bench_runs_every_strategy_over_seeds_and_reports_intervals():
    """On a survey of the start model's own species (savanna), ranking by its likely
    animals finds the herds that a random draw of a 90%-empty pool mostly misses. Another
    run's surveys start at `first_seed`."""
    bench = ActiveLearningBench(seeds=2, first_seed=1, biome="savanna", empty_fraction=0.8,
                                pool=40, jobs=2, held_out=8, per_round=4, rounds=2, iterations=2,
                                strategies=("random", "likely-animals", "error-rate",
                                            "embeddings"))
    *rows, summary = run_active_learning_benchmark(bench)
    assert len(rows) == 2 * 4 * 2
    assert {(r["seed"], r["strategy"], r["round"]) for r in rows} == {
        (s, n, r) for s in (1, 2) for n in bench.strategies for r in (1, 2)}
    first = {(r["seed"], r["strategy"]): r for r in rows if r["round"] == 1}
    for seed in (1, 2):  # the same cold-start batch, so the same model and figures
        assert first[(seed, "likely-animals")]["ap50"] == first[(seed, "error-rate")]["ap50"]
        assert (first[(seed, "likely-animals")]["batch_animals_per_image"]
                > first[(seed, "random")]["batch_animals_per_image"])
    last = {(r["seed"], r["strategy"]): r for r in rows if r["round"] == 2}
    assert all(0 <= r["pool_animals_labelled"] <= 1 for r in last.values())
    head = summary["headline"]["likely-animals"]
    assert head["animals_per_tile_first_two_batches_vs_random"]["mean"] > 1
    assert set(head) == {"aulc_ap50_minus_random", "to_random_final_ap50",
                         "to_random_final_effort",
                         "animals_per_tile_first_two_batches_vs_random", "bars"}
    line = summary["per_round"][0]["random"]["ap50"]
    assert line["seeds"] == 2 and line["low"] <= line["mean"] <= line["high"]
