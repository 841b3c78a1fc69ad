"""Our engine gives the same detections as detectron2's DefaultPredictor."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from backend.detection.checkpoint import load_weights
from backend.detection.config import load_config
from backend.detection.model import GeneralizedRCNN
from backend.detection.predictor import Predictor, resized_shape

from .conftest import (
    D2_FIXTURES,
    FIXTURE_MODELS,
    assert_same_detections,
    expected_detections,
    fixture_dir,
    run_predict_cli,
)


@pytest.mark.parametrize("name", FIXTURE_MODELS)
def test_predict_cli_reproduces_detectron2(name, tmp_path):
    out = tmp_path / "out.jsonl"
    rc = run_predict_cli(name, out, D2_FIXTURES / "input.png", extra=("--no-tiling",))
    assert rc == 0
    (line,) = out.read_text().splitlines()
    record = json.loads(line)
    expected = expected_detections(name)
    assert (record["width"], record["height"]) == (expected["width"], expected["height"])
    assert all(det["label"] is None for det in record["detections"])
    # the default mode (folded norms, NHWC, threaded ROIAlign): the README's stated bound
    assert_same_detections(record["detections"], expected["detections"], 0.001, 1e-5)


@pytest.mark.parametrize("name", FIXTURE_MODELS)
def test_exact_mode_reproduces_detectron2_bit_for_bit(name, tmp_path):
    """`--exact`: every detection's class, box and score equal DefaultPredictor's, with no
    tolerance (the default mode stays within 0.01 px and 1e-4: the test above)."""
    out = tmp_path / "out.jsonl"
    assert run_predict_cli(name, out, D2_FIXTURES / "input.png",
                           extra=("--no-tiling", "--exact")) == 0
    got = json.loads(out.read_text())["detections"]
    assert_same_detections(got, expected_detections(name)["detections"], 0.0, 0.0)


def test_a_model_asks_for_the_exact_mode_and_clashing_settings_are_refused(tmp_path):
    from backend.model_dir import ModelDir

    from .servers import make_model_dir

    model = ModelDir.open(make_model_dir(tmp_path / "m"))
    assert ModelDir.open(model.path).predictor(device="cpu").options.fold_norms is True
    model.update_metadata({"exact": True})
    options = ModelDir.open(model.path).predictor(device="cpu").options
    assert (options.exact, options.fold_norms, options.channels_last, options.roi_align) == (
        True, False, False, "torchvision")
    with pytest.raises(ValueError, match="drop --precision bf16, --compile"):
        ModelDir.open(model.path).predictor(device="cpu", precision="bf16", compile="default")


def test_console_script_writes_the_json_lines_contract(tmp_path):
    d = fixture_dir("faster_rcnn_R_50_FPN_1x")
    labels = tmp_path / "labels.txt"
    labels.write_text("elephant\nzebra\nbird\n")
    out = tmp_path / "out.jsonl"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "backend.cli",
            "predict",
            "--config",
            str(d / "config.yaml"),
            "--weights",
            str(d / "model_final.pth"),
            "--labels",
            str(labels),
            "--no-tiling",
            "--device",
            "cpu",
            "-o",
            str(out),
            str(D2_FIXTURES / "input.png"),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "1 image(s), 100 detection(s), 0 failed" in proc.stderr
    record = json.loads(out.read_text())
    assert set(record) == {"image", "width", "height", "detections"}
    first = record["detections"][0]
    assert set(first) == {"box", "score", "class_id", "label"}
    assert first["label"] == ["elephant", "zebra", "bird"][first["class_id"]]


def test_trident_fast_equals_c4_model_with_res4_dilated_by_two(fixture_image):
    """TridentNet-Fast is a plain R50-C4 whose res4 3x3 convs run at dilation 2."""
    trident = fixture_dir("tridentnet_fast_R_50_C4_1x")
    fast = Predictor.from_files(trident / "config.yaml", trident / "model_final.pth", device="cpu")(
        fixture_image
    )
    c4 = GeneralizedRCNN(load_config(fixture_dir("faster_rcnn_R_50_C4_1x") / "config.yaml"))
    load_weights(c4, trident / "model_final.pth", for_inference=True)
    for block in c4.backbone.res4:
        block.dilation = 2
    plain = Predictor(c4, device="cpu")(fixture_image)
    assert torch.equal(fast.boxes, plain.boxes)
    assert torch.equal(fast.scores, plain.scores)


@pytest.mark.parametrize(
    ("height", "width", "expected"),
    [
        (800, 800, (800, 800)),
        (600, 1000, (800, 1333)),  # short side up to 800, long side 1333.3 -> 1333
        (500, 2000, (333, 1333)),  # long side clamped to MAX_SIZE_TEST
        (1200, 900, (1067, 800)),
        (3000, 4000, (800, 1067)),
    ],
)
def test_resize_shortest_edge_matches_detectron2(height, width, expected):
    assert resized_shape(height, width, 800, 1333) == expected


def test_resized_non_square_image_maps_boxes_back_to_original_pixels(fpn_predictor, fixture_image):
    crop = np.ascontiguousarray(fixture_image[100:700, 50:500])  # 600 x 450 -> 1067 x 800
    det = fpn_predictor(crop)
    assert det.image_size == (600, 450)
    assert len(det) > 0
    assert det.boxes[:, 0::2].max() <= 450 and det.boxes[:, 1::2].max() <= 600
    assert det.boxes.min() >= 0


def test_batched_images_equal_images_run_one_by_one(fpn_predictor, fixture_image):
    tiles = [
        np.ascontiguousarray(fixture_image[:400, :400]),
        np.ascontiguousarray(fixture_image[400:, 400:]),
    ]
    batched = fpn_predictor.predict(tiles)
    for tile, det in zip(tiles, batched, strict=True):
        alone = fpn_predictor(tile)
        assert len(alone) == len(det)
        assert torch.allclose(alone.boxes, det.boxes, atol=1e-3)
        assert torch.allclose(alone.scores, det.scores, atol=1e-5)
