"""Results out in the formats ecologists' tools read: MegaDetector batch output (Timelapse
and the camera-trap tools) and counts per image and class with the survey's total."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import tifffile

from backend.counts import Counting
from backend.imagery import counts, geojson, megadetector
from backend.imagery.exports import Exports
from backend.predict import run_predict
from backend.prelabel.sinks import read_results

from .conftest import D2_FIXTURES, run_predict_cli

LABELS = ["zebra", "gnu"]
HALF = Counting.uniform(0.5, "test")


def _records(root) -> list[dict]:
    return [
        {"image": str(root / "station1" / "a.jpg"), "width": 200, "height": 100, "detections": [
            {"box": [20.0, 10.0, 60.0, 30.0], "score": 0.9, "class_id": 0, "label": "zebra"},
            {"box": [150.0, 50.0, 210.0, 100.0], "score": 0.3, "class_id": 1, "label": "gnu"},
        ]},
        {"image": str(root / "station1" / "empty.jpg"), "width": 200, "height": 100,
         "detections": []},
        {"image": str(root / "station2" / "cut.jpg"), "error": "cannot be decoded"},
        {"image": "s3://bucket/c.jpg", "width": 100, "height": 100, "detections": [
            {"box": [0.0, 0.0, 10.0, 10.0], "score": 0.7, "class_id": 1, "label": "gnu"},
        ]},
    ]


def test_megadetector_output_has_the_documented_fields(tmp_path):
    """https://lila.science/megadetector-output-format, format 1.4."""
    path = tmp_path / "md.json"
    megadetector.write(path, _records(tmp_path), LABELS, "survey-v3", threshold=0.5)
    doc = json.loads(path.read_text())
    assert doc["info"]["format_version"] == "1.4" and doc["info"]["detector"] == "survey-v3"
    assert doc["info"]["detector_metadata"]["typical_detection_threshold"] == 0.5
    assert doc["detection_categories"] == {"1": "zebra", "2": "gnu"}  # string-formatted ints
    found, empty, failed, remote = doc["images"]
    # Files relative to the results file's folder, as Timelapse reads them; URLs as given.
    assert [found["file"], failed["file"], remote["file"]] == [
        "station1/a.jpg", "station2/cut.jpg", "s3://bucket/c.jpg"]
    zebra, gnu = found["detections"]
    assert zebra == {"category": "1", "conf": 0.9, "bbox": [0.1, 0.1, 0.2, 0.2]}
    assert gnu["bbox"] == [0.75, 0.5, 0.25, 0.5]  # [x, y, w, h] as fractions, clipped to 1
    assert found["max_detection_conf"] == 0.9
    assert empty["detections"] == [] and "failure" not in empty
    assert failed == {"file": "station2/cut.jpg", "failure": "cannot be decoded",
                      "detections": None}
    for image in doc["images"]:
        for det in image["detections"] or []:
            assert det["category"] in doc["detection_categories"]
            assert 0 <= det["conf"] <= 1 and all(0 <= v <= 1 for v in det["bbox"])


def test_counts_per_image_and_class_with_the_survey_total(tmp_path):
    rows = counts.table(_records(tmp_path), LABELS, HALF)
    assert rows[0] == ["image", "zebra", "gnu", "total"]
    assert [row[1:] for row in rows[1:-1]] == [[1, 0, 1], [0, 0, 0], ["", "", ""], [0, 1, 1],
                                             [1, 1, 2]]
    assert rows[3][0].endswith("cut.jpg")  # the unreadable image: listed, no zero count
    assert rows[-2][0] == counts.TOTAL
    assert rows[-1] == ["method", "detections >= 0.5, uncalibrated",
                        "detections >= 0.5, uncalibrated", ""]
    # With the model's triage threshold: which frames are likely empty (best score below it)
    flagged = counts.table(_records(tmp_path), LABELS, HALF, triage=0.8)
    assert flagged[0][-1] == "likely_empty"
    assert [row[-1] for row in flagged[1:5]] == ["no", "yes", "", "yes"]
    assert {len(row) for row in flagged} == {5}
    # A model without labels still gets a column per class it found.
    assert counts.table(_records(tmp_path), None, HALF)[0] == [
        "image", "class0", "class1", "total"]


def test_a_calibrated_count_carries_its_estimate_interval_and_method(tmp_path):
    """zebras: 2 true animals per counted detection on val; gnus counted by the pooled
    calibration. The survey (3 images read) counted 1 zebra and 1 gnu."""
    zebra = {"threshold": 0.5, "ratio": 2.0, "image_variance": 0.5, "ratio_variance": 0.01,
             "source": "own", "val_true": 40}
    gnu = {**zebra, "threshold": 0.25, "ratio": 1.0, "source": "pooled"}
    model = Counting.of_model({"count_calibration": {"per_class": {"zebra": zebra, "gnu": gnu},
                                                     "pooled": gnu}}, LABELS)
    rows = {row[0]: row[1:] for row in counts.table(_records(tmp_path), LABELS, model)}
    assert rows[counts.TOTAL] == [1, 2, 3]  # the gnu at 0.3 counts from 0.25
    sd_zebra, sd_gnu = (3 * 0.5 + 0.01) ** 0.5, (3 * 0.5 + 4 * 0.01) ** 0.5
    assert rows["count_estimate"] == [2.0, 2.0, 4.0]
    assert rows["count_high"][0] == pytest.approx(round(2 + 1.96 * sd_zebra, 1))
    assert rows["count_low"][:2] == [0.0, 0.0]  # never below zero
    assert rows["count_high"][2] == pytest.approx(
        round(4 + 1.96 * (sd_zebra ** 2 + sd_gnu ** 2) ** 0.5, 1))
    assert rows["method"][0].startswith("ratio 2.000 at 0.5 (own")
    assert "pooled" in rows["method"][1]


def test_predict_writes_megadetector_and_counts_beside_its_json_lines(tmp_path):
    image = D2_FIXTURES / "input.png"
    out, md, table = tmp_path / "out.jsonl", tmp_path / "md.json", tmp_path / "counts.csv"
    assert run_predict_cli("faster_rcnn_R_50_FPN_1x", out, image, extra=(
        "--megadetector", str(md), "--counts", str(table), "--count-threshold", "0.5")) == 0
    (record,) = read_results(out)
    doc = json.loads(md.read_text())
    (entry,) = doc["images"]
    assert len(entry["detections"]) == len(record["detections"]) > 0
    assert doc["info"]["detector"] == "model_final.pth"
    with table.open() as stream:
        rows = list(csv.reader(stream))
    above = sum(d["score"] >= 0.5 for d in record["detections"])
    assert rows[-2][0] == "TOTAL" and int(rows[-2][-1]) == int(rows[1][-1]) == above


def test_predict_writes_nothing_extra_unless_asked(tmp_path, fpn_predictor):
    with (tmp_path / "out.jsonl").open("w") as stream:
        run_predict([str(D2_FIXTURES / "input.png")], fpn_predictor, stream, None,
                    exports=Exports(), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]


def test_a_project_run_refuses_file_exports(tmp_path, capsys):
    from backend.cli import main

    assert main(["prelabel", "--project", "1", "--model", str(tmp_path), "--counts",
                 str(tmp_path / "c.csv")]) == 2
    assert "--megadetector, --counts and --geojson go with --images" in capsys.readouterr().err


def test_a_survey_job_writes_them_from_its_results_file(survey, tmp_path):
    from backend.cli import main

    out, md, table = tmp_path / "out.jsonl", tmp_path / "md.json", tmp_path / "counts.csv"
    main(["prelabel", "--images", str(survey["root"]), "--model", str(survey["model"]),
          "--output", str(out), "--megadetector", str(md), "--counts", str(table),
          "--device", "cpu", "--tile-size", "320"])  # exit 1: the survey has a broken file
    records = read_results(out)
    doc = json.loads(md.read_text())
    assert len(doc["images"]) == len(records) > 0
    (broken,) = [i for i in doc["images"] if i["file"].endswith("broken.jpg")]  # as predict
    assert broken["detections"] is None and "cannot be decoded" in broken["failure"]
    assert doc["info"]["detector"] == "survey-v1"
    assert list(doc["detection_categories"].values()) == ["Elephant", "zebra", "BIRD"]
    with table.open() as stream:
        rows = list(csv.reader(stream))
    assert rows[0] == ["image", "Elephant", "zebra", "BIRD", "total"]
    assert len(rows) == len(records) + 3  # header, TOTAL, method (the model is uncalibrated)


def _geotiff(path, raster_type: int = 1, transform=None) -> None:
    """A 100 x 200 UTM 33N GeoTIFF: top-left corner at (500000, 4100000), 0.5 m pixels."""
    keys = [1, 1, 0, 3, 1024, 0, 1, 1, 1025, 0, 1, raster_type, 3072, 0, 1, 32633]
    tags = [(34735, "H", len(keys), keys, True)]
    if transform is None:
        tags += [(33550, "d", 3, (0.5, 0.5, 0.0), True),
                 (33922, "d", 6, (0, 0, 0, 500000.0, 4100000.0, 0), True)]
    else:
        tags += [(34264, "d", 16, transform, True)]
    image = np.random.default_rng(0).integers(0, 255, (100, 200, 3), dtype=np.uint8)
    tifffile.imwrite(path, image, photometric="rgb", extratags=tags)


@pytest.mark.parametrize("variant", ["tiepoint", "pixel-is-point", "transformation"])
def test_a_box_on_a_geotiff_lands_at_its_map_coordinates(tmp_path, variant):
    path = tmp_path / "ortho.tif"
    if variant == "tiepoint":
        _geotiff(path)
    elif variant == "pixel-is-point":  # tiepoint names the first pixel's centre
        _geotiff(path, raster_type=2)
    else:
        _geotiff(path, transform=(0.5, 0, 0, 500000.0, 0, -0.5, 0, 4100000.0,
                                  0, 0, 0, 0, 0, 0, 0, 1))
    record = {"image": str(path), "width": 200, "height": 100, "detections": [
        {"box": [20.0, 10.0, 60.0, 30.0], "score": 0.9, "class_id": 1, "label": "gnu"}]}
    (doc,) = geojson.documents([record], LABELS, "survey-v3").values()
    assert doc["crs"]["properties"]["name"] == "urn:ogc:def:crs:EPSG::32633"
    (feature,) = doc["features"]
    shift = -0.25 if variant == "pixel-is-point" else 0.0  # half a 0.5 m pixel
    x0, y0, x1, y1 = 500010 + shift, 4099995 - shift, 500030 + shift, 4099985 - shift
    ring = feature["geometry"]["coordinates"][0]
    expected = [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]][::-1]  # counter-clockwise
    assert np.allclose(ring, expected, rtol=0, atol=1e-6), ring
    assert feature["properties"] == {"class": "gnu", "class_id": 1, "score": 0.9,
                                     "image": str(path), "model_version": "survey-v3"}


def test_predict_writes_geojson_for_georeferenced_images_only(tmp_path, caplog):
    ortho, plain = tmp_path / "ortho.tif", tmp_path / "plain.png"
    _geotiff(ortho)
    shutil.copy(D2_FIXTURES / "input.png", plain)
    out, geo = tmp_path / "out.jsonl", tmp_path / "found.geojson"
    assert run_predict_cli("faster_rcnn_R_50_FPN_1x", out, ortho, plain,
                           extra=("--geojson", str(geo), "--no-tiling")) == 0
    ortho_record = read_results(out)[0]
    doc = json.loads(geo.read_text())
    assert len(doc["features"]) == len(ortho_record["detections"])
    assert {f["properties"]["image"] for f in doc["features"]} <= {str(ortho)}
    assert "1 image(s) have no georeference" in caplog.text
