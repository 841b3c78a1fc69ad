"""The deployed model is a declared input of the loop: the `deployed` stage names it (version
and weights' SHA-256) in a file train and evaluate depend on, the stages read exactly the
weights it names, and a run that finds its candidate deployed already keeps it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from backend.files import file_sha256
from backend.model_dir import ModelDir, copy_model_dir
from backend.registry import Registry
from pipelines.deploy import gate
from pipelines.deployed import deployed_model, snapshot, why_no_deployed_model
from pipelines.params import code_sha256
from pipelines.train import _already_trained

from .servers import make_model_dir


def _params(tmp_path: Path) -> dict:
    return {"deploy": {"snapshot": str(tmp_path / "deployed.json")}}


def _write_snapshot(tmp_path: Path, registry: Registry) -> dict:
    params = _params(tmp_path)
    (tmp_path / "deployed.json").write_text(json.dumps(snapshot(str(registry.root))))
    return params


def test_the_snapshot_names_the_served_weights_and_the_stages_read_exactly_those(tmp_path):
    registry = Registry(tmp_path / "registry")
    registry.switch(registry.add(make_model_dir(tmp_path / "m", version="v0001")))
    params = _write_snapshot(tmp_path, registry)
    model, record = deployed_model(params)
    assert record["version"] == "v0001" and model.version == "v0001"
    assert record["weights_sha256"] == file_sha256(registry.current().weights)
    with registry.current().weights.open("ab") as weights:
        weights.write(b"\0")  # the registry changed after the snapshot was taken
    with pytest.raises(SystemExit, match=r"changed after .*run `dvc repro` again"):
        deployed_model(params)


def test_an_empty_registry_gives_a_snapshot_that_says_why(tmp_path, monkeypatch):
    params = _write_snapshot(tmp_path, Registry(tmp_path / "none"))
    model, record = deployed_model(params)
    assert model is None and record["why_none"] == f"no deployed model in {tmp_path / 'none'} yet"
    (tmp_path / "deployed.json").unlink()
    with pytest.raises(SystemExit, match="the `deployed` stage writes it"):
        deployed_model(params)


def test_a_temporary_dvc_experiment_says_why_it_starts_from_scratch(tmp_path, monkeypatch):
    workspace = tmp_path / "repo/.dvc/tmp/exps/run/abc123"
    workspace.mkdir(parents=True)
    monkeypatch.chdir(workspace)
    why = why_no_deployed_model(Path("models/registry"))
    assert "dvc exp run --temp" in why and "absolute path" in why
    monkeypatch.chdir(tmp_path)
    assert why_no_deployed_model(Path("models/registry")) == (
        "no deployed model in models/registry yet")


def test_deploying_copies_the_weights_byte_for_byte(tmp_path):
    candidate = ModelDir.open(make_model_dir(tmp_path / "candidate", version="candidate"))
    deployed = copy_model_dir(candidate, tmp_path / "v0001", {"version": "v0001"})
    assert file_sha256(deployed.weights) == file_sha256(candidate.weights)
    assert deployed.labels == candidate.labels and deployed.version == "v0001"


def _candidate(tmp_path: Path, lineage: dict, start_sha256: str | None) -> Path:
    out = tmp_path / "candidate"
    out.mkdir()
    (out / "config.yaml").write_text("MODEL: {}\n")
    (out / "model_final.pth").write_bytes(b"candidate weights")
    (out / "model.json").write_text(json.dumps({**lineage, "start_sha256": start_sha256}))
    return out


def test_a_candidate_is_kept_only_when_it_is_what_training_would_produce(tmp_path):
    lineage = {"dataset": "d1", "params": {"iterations": 10}, "recipe": {"mode": "whole"},
               "code_sha256": "c1"}
    out = _candidate(tmp_path, lineage, "s" * 64)
    itself = file_sha256(out / "model_final.pth")
    assert _already_trained(out, lineage, "s" * 64)  # same start: trained already
    assert _already_trained(out, lineage, itself)  # the deployed model is this candidate
    assert not _already_trained(out, lineage, "t" * 64)  # another deployed model
    assert not _already_trained(out, lineage, None)  # from random weights: train again
    for key, changed in (("dataset", "d2"), ("params", {"iterations": 11}),
                         ("recipe", {"mode": "tiled"}), ("code_sha256", "c2")):
        assert not _already_trained(out, {**lineage, key: changed}, itself), key
    assert not _already_trained(out, {**lineage, "code_sha256": None}, itself)  # outside DVC
    assert not _already_trained(tmp_path / "absent", lineage, itself)


def test_the_gate_does_not_deploy_the_deployed_model_again():
    ok, reason = gate({"ap50": 0.5, "deployed": {"version": "v0002", "ap50": 0.5,
                                                 "is_candidate": True}}, 0.01)
    assert not ok and reason == "the candidate is deployed already, as v0002"


def test_code_fingerprint_covers_the_code_a_stage_declares(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert code_sha256("train") is None  # not a DVC project
    (tmp_path / "pipelines").mkdir()
    (tmp_path / "backend/detection").mkdir(parents=True)
    (tmp_path / "pipelines/train.py").write_text("a = 1\n")
    (tmp_path / "pipelines/serve.py").write_text("b = 1\n")
    (tmp_path / "backend/detection/model.py").write_text("c = 1\n")
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n  train:\n    cmd: x\n    deps:\n      - pipelines/train.py\n"
        "      - backend/detection\n      - data/split/train.json\n")
    first = code_sha256("train")
    (tmp_path / "pipelines/serve.py").write_text("b = 2\n")  # not declared by train
    assert code_sha256("train") == first
    (tmp_path / "backend/detection/model.py").write_text("c = 2\n")
    assert code_sha256("train") != first
