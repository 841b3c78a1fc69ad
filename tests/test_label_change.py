"""A label-set change (a class added, renamed or reordered) never deploys an untrained or
unchecked model by accident: training warm-starts from the deployed model with a new box
predictor started from what the deployed one's knew, both models are scored on the same val
images by class name, and the gate asks a person before deploying. And where a round starts
when the loop began from another model."""

from __future__ import annotations

import hashlib

import pytest
import torch

from backend.detection.config import load_config
from backend.detection.model import GeneralizedRCNN
from backend.imagery.images import load_image
from backend.model_dir import ModelDir
from backend.registry import Registry
from pipelines.deploy import GateSettings, gate
from pipelines.evaluate import detections_for
from pipelines.train import _start_weights

from .conftest import D2_FIXTURES, fixture_dir
from .servers import LABELS, make_model_dir

FIXTURE = "faster_rcnn_R_50_FPN_1x"


def _registry(tmp_path) -> Registry:
    registry = Registry(tmp_path / "registry")
    registry.switch(registry.add(make_model_dir(tmp_path / "m", FIXTURE, version="v0001")))
    return registry


def _model() -> GeneralizedRCNN:
    torch.manual_seed(0)
    return GeneralizedRCNN(load_config(fixture_dir(FIXTURE) / "config.yaml"))


def test_a_new_label_set_warm_starts_from_the_deployed_model_and_what_its_head_knew(tmp_path):
    registry = _registry(tmp_path)
    deployed = torch.load(registry.current().path / "model_final.pth", weights_only=True)
    deployed = deployed.get("model", deployed)
    same, renamed = _model(), _model()
    link = _start_weights(same, {}, LABELS, registry.current(), "d" * 64, None, tmp_path)
    assert link.start == "deployed model v0001" and link.sha256 == "d" * 64
    link = _start_weights(renamed, {}, ["Elephant", "BIRD", "zebra"], registry.current(),
                          "d" * 64, None, tmp_path)
    assert "box predictor started from the mean of its classes" in link.start
    assert "v0001" in link.start
    for name, value in renamed.state_dict().items():
        if not name.startswith("roi_heads.box_predictor."):
            assert torch.equal(value, same.state_dict()[name]), name
    # each new class starts as the deployed model's classes on average (what it knows of an
    # animal and its box), background as its background
    old = {k.split("box_predictor.")[1]: v for k, v in deployed.items() if "box_predictor." in k}
    head = renamed.roi_heads.box_predictor
    for part in ("weight", "bias"):
        scores = getattr(head.cls_score, part).detach()
        torch.testing.assert_close(scores[:-1], old[f"cls_score.{part}"][:-1].float().mean(0)
                                   .expand_as(scores[:-1]))
        torch.testing.assert_close(scores[-1], old[f"cls_score.{part}"][-1].float())
        deltas = getattr(head.bbox_pred, part).detach()
        mean = old[f"bbox_pred.{part}"].float().reshape(-1, 4, *deltas.shape[1:]).mean(0)
        torch.testing.assert_close(deltas, mean.repeat(3, *([1] * (deltas.dim() - 1))))
    # Nothing deployed yet (no model has saved annotators work): the last candidate goes on.
    fresh = _model()
    link = _start_weights(fresh, {}, LABELS, None, None, registry.current(), tmp_path)
    assert link.start == "the last candidate (not deployed)"
    assert link.sha256 == hashlib.sha256(registry.current().weights.read_bytes()).hexdigest()
    assert all(torch.equal(v, same.state_dict()[k]) for k, v in fresh.state_dict().items())
    backbone = next(k for k in same.state_dict() if k.startswith("backbone."))
    assert torch.equal(same.state_dict()[backbone].float(), deployed[backbone].float())


def test_the_gate_refuses_a_label_change_unless_a_person_allows_it():
    metrics = {"ap50": 0.9, "per_class_ap": {"gnu": 0.9, "zebra": 0.9},
               "deployed": {"version": "v0003", "ap50": 0.2, "labels": ["zebra"],
                            "label_set_changed": True}}
    ok, reason = gate(metrics)
    assert not ok and "label set changed" in reason and "allow_label_change" in reason
    assert "on the same val images" in reason
    ok, reason = gate(metrics, GateSettings(allow_label_change=True))
    assert ok and "allow_label_change is set" in reason


def test_both_models_are_scored_on_the_val_split_by_class_name(tmp_path):
    model = ModelDir.open(make_model_dir(tmp_path / "m", FIXTURE, version="v0001"))
    val = {"images": [{"id": 7, "file_name": "input.png", "width": 800, "height": 800}],
           "annotations": [],
           "categories": [{"id": 0, "name": "zebra"}, {"id": 1, "name": "Elephant"}]}
    ours = detections_for(model, val, D2_FIXTURES, None, "cpu")
    raw = model.predictor(device="cpu")(load_image(D2_FIXTURES / "input.png"))
    names = [LABELS[c] for c in raw.classes.tolist()]
    want = [{"zebra": 0, "Elephant": 1}[n] for n in names if n != "BIRD"]  # BIRD: not in val
    assert [r["category_id"] for r in ours] == want and len(want) < len(names)


def _with_lineage(path, **lineage) -> ModelDir:
    model = ModelDir.open(path)
    model.update_metadata(lineage)
    return ModelDir.open(path)


def test_a_loop_started_from_last_seasons_model_goes_on_from_what_it_trained(tmp_path):
    """`train.base_weights` is where the loop starts: once a model trained from it exists
    (deployed, else the last candidate), rounds go on from that model and add to what the
    loop learnt; `each_round: restart` starts every round from base_weights, and so does a
    base_weights the loop's models do not descend from (the user changed it)."""
    base = make_model_dir(tmp_path / "last-season", version="savanna")
    base_sha = hashlib.sha256((base / "model_final.pth").read_bytes()).hexdigest()
    params = {"base_weights": str(base)}
    registry = _registry(tmp_path)
    ours = _with_lineage(registry.current().path, start_sha256="c" * 64,
                         chain=[{"sha256": "c" * 64}, {"sha256": base_sha}])
    assert _start_weights(_model(), params, LABELS, ours, "d" * 64, None,
                          tmp_path).start == "deployed model v0001"
    assert _start_weights(_model(), {**params, "each_round": "restart"}, LABELS, ours,
                          "d" * 64, None, tmp_path).start == f"weights {base}"
    theirs = _with_lineage(registry.current().path, start_sha256="e" * 64, chain=[])
    assert _start_weights(_model(), params, LABELS, theirs, "d" * 64, None,
                          tmp_path).start == f"weights {base}"
    candidate = _with_lineage(make_model_dir(tmp_path / "candidate", version="candidate"),
                              start_sha256=base_sha)
    assert _start_weights(_model(), params, LABELS, None, None, candidate,
                          tmp_path).start == "the last candidate (not deployed)"
    with pytest.raises(SystemExit, match="each_round is continue or restart"):
        _start_weights(_model(), {**params, "each_round": "again"}, LABELS, ours, "d" * 64,
                       None, tmp_path)
