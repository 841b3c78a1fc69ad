"""`tridentloop prelabel --ray`: the same job on a (local) Ray cluster gives the same
predictions as one process."""

from __future__ import annotations

import json

import pytest

from backend.cli import main

pytestmark = pytest.mark.slow


def _records(path) -> dict[str, dict]:
    return {r["image"]: r for r in map(json.loads, path.read_text().splitlines())}


def test_two_ray_workers_predict_exactly_what_one_process_does(survey, tmp_path):
    common = ["prelabel", "--images", str(survey["root"]), "--model", str(survey["model"]),
              "--device", "cpu", "--threads", "1", "--tile-size", "320",
              "--uncertainty", "entropy"]
    one, ray = tmp_path / "one.jsonl", tmp_path / "ray.jsonl"
    assert main([*common, "--output", str(one)]) == 1  # the broken file, reported
    assert main([*common, "--output", str(ray), "--ray", "local", "--ray-workers", "2"]) == 1
    assert _records(ray) == _records(one)
    assert len(_records(ray)) == 4
    report = json.loads((tmp_path / "ray.report.json").read_text())
    assert [f["image"].rsplit("/", 1)[-1] for f in report["failed"]] == ["broken.jpg"]
