"""Score thresholds chosen on labelled data (`tridentloop calibrate`, the loop's evaluate)
travel in model.json and are what predict, prelabel and serve offer and count by, unless a
person sets one number."""

from __future__ import annotations

import csv
import json

import numpy as np
import torch
from PIL import Image

from backend.cli import main
from backend.detection.structures import Detections
from backend.model_dir import ModelDir
from backend.prelabel.sinks import read_results
from backend.synthetic import CLASSES, coco_of, survey_scene
from backend.thresholds import ScoreThresholds

from .servers import make_model_dir


def test_a_model_s_thresholds_yield_to_a_flag_and_a_project_s_setting():
    model = ScoreThresholds.of_model(
        {"score_thresholds": {"per_class": {"zebra": 0.7, "bird": None}, "pooled": 0.6}},
        ["zebra", "bird", "gnu"])
    assert (model.of(0), model.of(1), model.of(2), model.of(7)) == (0.7, None, 0.6, 0.6)
    # a model calibrated before "not offered" was stored as null wrote 1.01
    legacy = ScoreThresholds.of_model(
        {"score_thresholds": {"per_class": {"zebra": 1.01}, "pooled": 1.01}}, ["zebra"])
    assert legacy.of(0) is None and legacy.fallback is None and not legacy.any_offered
    assert "zebra 0.7, bird not offered, gnu 0.6" in model.describe(["zebra", "bird", "gnu"])
    det = Detections(torch.zeros(3, 4), torch.tensor([0.8, 0.99, 0.65]), torch.tensor([0, 1, 0]))
    assert model.offered(det).tolist() == [True, False, False]
    flag = model.resolve(0.3, "--score-threshold")
    assert flag.offered(det).all() and "--score-threshold" in flag.describe()
    assert model.resolve(None, "--score-threshold") is model
    project = flag.resolve(0.9, "project 3's extra_params")
    assert project.offered(det).tolist() == [False, True, False]
    assert ScoreThresholds.of_model({}, ["zebra"]).of(0) == 0.5  # no thresholds chosen


def test_calibrate_on_a_coco_file_writes_the_thresholds_predict_counts_by(tmp_path, capsys):
    model = make_model_dir(tmp_path / "m")
    (model / "labels.txt").write_text("\n".join(CLASSES) + "\n")
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    scenes = []
    for i in range(3):
        scene = survey_scene(rng, 320, 320, 6)
        Image.fromarray(scene.image).save(images / f"s{i}.png")
        scenes.append((f"s{i}.png", scene.boxes, scene.classes, (320, 320)))
    (tmp_path / "coco.json").write_text(json.dumps(coco_of(scenes)))
    assert main(["calibrate", "--model", str(model), "--coco", str(tmp_path / "coco.json"),
                 "--images", str(images), "--device", "cpu", "--min-boxes", "3"]) == 0
    printed = capsys.readouterr().out
    assert "overall: effort ratio" in printed and all(c in printed for c in CLASSES)
    stored = ModelDir.open(model).metadata["score_thresholds"]
    assert set(stored["per_class"]) == set(CLASSES)
    assert stored["chosen_on"] == str(tmp_path / "coco.json") and stored["images"] == 3
    thresholds = ModelDir.open(model).thresholds
    assert "chosen on validation" in thresholds.source

    assert "1.01" not in (model / "model.json").read_text()  # no number means "not offered"

    out, table = tmp_path / "out.jsonl", tmp_path / "counts.csv"
    main(["predict", "--model", str(model), "--device", "cpu", "--output", str(out),
          "--counts", str(table), *[str(images / f"s{i}.png") for i in range(3)]])
    counting = ModelDir.open(model).counting  # calibrated apart from what annotators see
    assert "count calibration" in counting.source
    expected = sum(d["score"] >= counting.of(d["class_id"])
                   for r in read_results(out) for d in r["detections"])
    with table.open() as stream:
        rows = {row[0]: row for row in csv.reader(stream)}
    # three val images cannot show 95% recall: no triage threshold, no likely_empty column
    assert ModelDir.open(model).triage_threshold is None and "likely_empty" not in rows["image"]
    assert int(rows["TOTAL"][-1]) == expected
    low, estimate, high = (float(rows[k][-1]) for k in ("count_low", "count_estimate",
                                                         "count_high"))
    assert 0 <= low <= estimate <= high
    assert all("ratio" in cell for cell in rows["method"][1:-1])
