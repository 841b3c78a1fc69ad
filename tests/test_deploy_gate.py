"""The deploy gate (pipelines/deploy.py): a candidate is served only when its pre-labels
beat drawing out of sample, it is not worse than the deployed model (at the thresholds
that model serves) for annotators and for AP, each by its own tolerance, and val is large
enough to tell."""

from __future__ import annotations

import pytest

from backend.effort import EffortSettings
from pipelines.deploy import GateSettings, gate


def _candidate(ap50: float, held_out: float, objects: int = 100, in_sample: float = 0.1,
               per_class: dict | None = None, deployed: dict | None = None) -> dict:
    return {"ap50": ap50, "effort": {"overall": {"effort_ratio": in_sample,
                                                 "ground_truth": objects}},
            "effort_out_of_sample": {"effort_ratio": held_out},
            "score_thresholds": {"per_class": per_class or {"zebra": 0.7}},
            "deployed": deployed}


def _deployed(ap50: float, served: float) -> dict:
    return {"version": "v0003", "ap50": ap50, "effort_served": {"effort_ratio": served}}


def test_the_gate_refuses_a_worse_model_by_ap50_with_its_own_tolerance():
    ok, reason = gate(_candidate(0.40, 0.3, deployed=_deployed(0.5, 0.3)))
    assert not ok and "keeping v0003" in reason and "deploy.ap50_tolerance" in reason
    assert gate(_candidate(0.495, 0.3, deployed=_deployed(0.5, 0.3)))[0]
    assert gate(_candidate(0.45, 0.3, deployed=_deployed(0.5, 0.3)),
                GateSettings(ap50_tolerance=0.06))[0]


def test_the_gate_decides_on_out_of_sample_effort_not_the_flattering_in_sample_one():
    """In sample 0.1, out of sample 1.02: as costly as drawing, refused."""
    ok, reason = gate(_candidate(0.9, 1.02, in_sample=0.1))
    assert not ok and "out-of-sample effort ratio 1.020" in reason
    assert "deploy.max_effort_ratio" in reason
    assert gate(_candidate(0.9, 0.9))[0]
    assert not gate(_candidate(0.9, 0.9), GateSettings(max_effort_ratio=0.8))[0]


def test_the_gate_compares_with_the_deployed_model_at_its_served_thresholds():
    deployed = _deployed(0.5, 0.40)
    ok, reason = gate(_candidate(0.6, 0.55, deployed=deployed))
    assert not ok and "effort ratio 0.550 > deployed v0003 0.400" in reason
    assert "deploy.effort_tolerance" in reason
    assert gate(_candidate(0.6, 0.41, deployed=deployed))[0]  # within 0.02
    assert not gate(_candidate(0.6, 0.41, deployed=deployed),
                    GateSettings(effort_tolerance=0.0))[0]


def test_a_val_too_small_to_tell_is_refused_with_how_many_more_labels_it_needs():
    ok, reason = gate(_candidate(0.9, 0.2, objects=7))
    assert not ok
    assert "val holds 7 labelled boxes, fewer than deploy.min_val_objects 25" in reason
    assert "label 18 more val boxes" in reason
    assert gate(_candidate(0.9, 0.2, objects=7), GateSettings(min_val_objects=5))[0]


def test_a_refusal_when_nothing_would_be_offered_says_so_and_names_the_settings():
    ok, reason = gate(_candidate(0.9, 1.0, per_class={"zebra": None, "bird": None}))
    assert not ok and "none would be offered" in reason
    assert "would cost annotators as much" not in reason
    assert "effort.confidence" in reason


def test_the_old_shared_tolerance_is_an_error_naming_the_two_new_settings():
    with pytest.raises(SystemExit, match=r"deploy\.ap50_tolerance and deploy\.effort_tolerance"):
        GateSettings.from_params({"tolerance": 0.01})
    assert GateSettings.from_params({"min_val_objects": "40"}).min_val_objects == 40


def test_the_deployed_model_is_scored_at_the_thresholds_it_serves_not_refitted(tmp_path):
    """It serves zebras from 0.95, which offers nothing on these val images; refitting would
    pick 0.8 and flatter it."""
    from backend.model_dir import ModelDir
    from pipelines.evaluate import served_figures

    val = {"images": [{"id": i} for i in range(12)],
           "categories": [{"id": 0, "name": "zebra"}],
           "annotations": [{"id": i, "image_id": i, "category_id": 0, "bbox": [0, 0, 10, 10]}
                           for i in range(12)]}
    records = [{"image_id": i, "category_id": 0, "bbox": [0, 0, 10, 10], "score": 0.8}
               for i in range(12)]
    model = ModelDir(tmp_path, ["zebra"], {"score_thresholds": {"per_class": {"zebra": 0.95},
                                                                "pooled": 0.95}})
    served = served_figures(model, val, records, EffortSettings())
    assert served["score_thresholds"]["per_class"] == {"zebra": 0.95}
    assert served["effort_served"]["effort_ratio"] == 1.0  # nothing offered: all drawn
    assert served["effort"]["overall"]["drawn"] == 12
