"""The inference recipe travels with the model: model.json says whole image or tiles, every
command runs the model by it, flags override it visibly, and a detectron2 model brought
without one runs exactly as DefaultPredictor."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from PIL import Image

from backend.cli import main as cli
from backend.detection.predictor import Predictor
from backend.detection.tiling import TilingOptions
from backend.model_dir import ModelDir, ModelDirError, init_model_dir
from backend.predict import detection_records
from backend.recipe import RecipeError, RecipeOverrides, parse_recipe, recipe_json
from backend.registry import Registry
from backend.serving.model_source import ModelSource

from .conftest import assert_same_detections, fixture_dir, fixture_weights
from .servers import LABELS

FIXTURE = "faster_rcnn_R_50_FPN_1x"
TILED = {"mode": "tiled", "tile_size": 512, "overlap": 0.25, "merge": "greedy",
         "merge_metric": "ios", "merge_threshold": 0.4, "full_image_pass": True,
         "views": 1}


@pytest.fixture(scope="module")
def brought(tmp_path_factory):
    """A user's detectron2 files: config, weights, class names."""
    root = tmp_path_factory.mktemp("brought")
    (root / "labels.txt").write_text("\n".join(LABELS) + "\n")
    return {"config": fixture_dir(FIXTURE) / "config.yaml", "weights": fixture_weights(FIXTURE),
            "labels": root / "labels.txt", "root": root}


@pytest.fixture(scope="module")
def wide_image(tmp_path_factory, fixture_image):
    """Non-square and larger than 800 px: DefaultPredictor resizes it to 1333 x 476."""
    image = np.ascontiguousarray(
        np.concatenate([fixture_image[150:650], fixture_image[150:650, :600]], axis=1)
    )
    path = tmp_path_factory.mktemp("wide") / "wide.png"
    Image.fromarray(image).save(path)
    return path, image


def test_a_recipe_round_trips_with_every_value_explicit():
    tiled = parse_recipe(TILED, "model.json")
    assert tiled == TilingOptions(512, 0.25, None, "greedy", "ios", 0.4, True, 1)
    assert recipe_json(tiled) == TILED
    assert parse_recipe(None, "model.json") is None
    assert recipe_json(None) == {"mode": "whole"}
    assert parse_recipe({"mode": "tiled"}, "x") == TilingOptions()


@pytest.mark.parametrize(
    ("recipe", "named"),
    [({"mode": "patches"}, "patches"), ({"mode": "tiled", "tile": 800}, "tile"),
     ({"mode": "tiled", "overlap": 1.5}, "overlap"), ("tiled", "mapping")],
)
def test_a_bad_recipe_is_refused_naming_the_file_and_the_problem(recipe, named):
    with pytest.raises(RecipeError, match=rf"models/m/model.json: .*{named}"):
        parse_recipe(recipe, "models/m/model.json")


def test_flags_override_the_recipe_and_say_so(caplog):
    tiled = parse_recipe(TILED, "x")
    with caplog.at_level(logging.INFO):
        assert RecipeOverrides().apply(tiled, "v1") == tiled
        assert "runs by its recipe: tiled 512 px" in caplog.text
        assert RecipeOverrides(whole=True).apply(tiled, "v1") is None
        assert "overrides its recipe" in caplog.records[-1].getMessage()
    assert RecipeOverrides(overlap=0.1).apply(tiled, "v1").overlap == 0.1
    assert RecipeOverrides(tile_size=800).apply(None, "v1") == TilingOptions(800)
    assert RecipeOverrides(batch_size=4).apply(tiled, "v1").batch_size == 4
    assert RecipeOverrides(batch_size=4).apply(None, "v1") is None


def test_a_tiling_flag_without_a_tile_size_does_not_turn_a_whole_model_into_a_tiled_one():
    with pytest.raises(RecipeError, match="give --tile-size"):
        RecipeOverrides(overlap=0.3).apply(None, "camera-trap")
    with pytest.raises(RecipeError, match="--no-tiling goes with no other"):
        RecipeOverrides(whole=True, tile_size=800).apply(None, "camera-trap")


def test_model_init_makes_a_validated_standalone_directory(brought, tmp_path):
    model = init_model_dir(tmp_path / "cam", brought["config"], brought["weights"],
                           brought["labels"], parse_recipe(TILED, "x"), version="cam-1")
    assert model.labels == LABELS and model.version == "cam-1"
    assert model.recipe == parse_recipe(TILED, "x")
    assert "_BASE_" not in (model.path / "config.yaml").read_text()
    source = model.metadata["source"]
    assert source["weights"] == str(brought["weights"].resolve())
    assert len(source["weights_sha256"]) == 64
    # the stored weights give the brought checkpoint's detections
    image = np.asarray(Image.open(fixture_dir(FIXTURE).parent / "input.png").convert("RGB"))
    direct = Predictor.from_files(brought["config"], brought["weights"], device="cpu")
    stored = model.predictor(device="cpu").predict([image])[0]
    assert_same_detections(detection_records(stored, None),
                           detection_records(direct.predict([image])[0], None))


def test_model_init_refuses_labels_that_do_not_fit_and_leaves_nothing(brought, tmp_path):
    two = tmp_path / "two.txt"
    two.write_text("a\nb\n")
    with pytest.raises(ModelDirError, match=r"two.txt names 2 classes .*NUM_CLASSES=3"):
        init_model_dir(tmp_path / "m", brought["config"], brought["weights"], two, None)
    other = fixture_weights("faster_rcnn_R_50_C4_1x")  # weights of another architecture
    with pytest.raises(ValueError, match=r"missing|mismatch|unexpected"):
        init_model_dir(tmp_path / "m", brought["config"], other, brought["labels"], None)
    assert [p.name for p in tmp_path.iterdir()] == ["two.txt"]  # no model, no temp dir


def test_model_show_prints_recipe_classes_version_and_lineage(brought, tmp_path, capsys):
    dest = tmp_path / "survey"
    assert cli(["model", "init", str(dest), "--config", str(brought["config"]), "--weights",
                str(brought["weights"]), "--labels", str(brought["labels"]),
                "--tiled", "640", "--overlap", "0.3"]) == 0
    capsys.readouterr()
    assert cli(["model", "show", str(dest), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["version"] == "survey" and shown["classes"] == LABELS
    assert shown["recipe"]["tile_size"] == 640 and shown["recipe"]["overlap"] == 0.3
    assert shown["lineage"]["source"]["weights_sha256"]
    assert cli(["model", "show", str(dest)]) == 0
    text = capsys.readouterr().out
    assert "runs     tiled 640 px, overlap 0.3" in text and "Elephant, zebra, BIRD" in text


def test_a_model_without_a_recipe_predicts_exactly_as_default_predictor(
    brought, wide_image, tmp_path
):
    path, image = wide_image
    model = init_model_dir(tmp_path / "whole", brought["config"], brought["weights"],
                           brought["labels"], None)
    (model.path / "model.json").unlink()  # detectron2 files as brought: no model.json at all
    out = tmp_path / "out.jsonl"
    assert cli(["predict", "--model", str(model.path), "--device", "cpu", "-o", str(out),
                str(path)]) == 0
    got = json.loads(out.read_text())["detections"]
    want = ModelDir.open(model.path).predictor(device="cpu").predict([image])[0]
    assert len(got) == len(want) > 0
    np.testing.assert_allclose([d["box"] for d in got], want.boxes.numpy(), atol=1e-3)
    np.testing.assert_allclose([d["score"] for d in got], want.scores.numpy(), atol=1e-6)


def test_a_tiled_model_predicts_by_its_tiles_and_a_flag_overrides_them(
    brought, wide_image, tmp_path
):
    path, image = wide_image
    model = init_model_dir(tmp_path / "tiled", brought["config"], brought["weights"],
                           brought["labels"], parse_recipe({"mode": "tiled", "tile_size": 400},
                                                           "x"))
    predictor = model.predictor(device="cpu")

    def boxes(*flags: str) -> np.ndarray:
        out = tmp_path / "out.jsonl"
        assert cli(["predict", "--model", str(model.path), "--device", "cpu", "-o", str(out),
                    *flags, str(path)]) == 0
        return np.array([d["box"] for d in json.loads(out.read_text())["detections"]])

    tiled = predictor.detect(image, model.recipe).boxes.numpy()
    whole = predictor.predict([image])[0].boxes.numpy()
    assert tiled.shape != whole.shape or not np.allclose(tiled, whole)
    np.testing.assert_allclose(boxes(), tiled, atol=1e-3)
    np.testing.assert_allclose(boxes("--no-tiling"), whole, atol=1e-3)


def test_a_served_registry_runs_each_version_by_its_own_recipe(brought, tmp_path):
    registry = Registry(tmp_path / "registry")
    registry.add(init_model_dir(tmp_path / "tiles-v1", brought["config"], brought["weights"],
                                brought["labels"], parse_recipe(TILED, "x")).path)
    registry.add(init_model_dir(tmp_path / "whole-v2", brought["config"], brought["weights"],
                                brought["labels"], None).path)
    registry.switch("tiles-v1")
    source = ModelSource(registry=registry, device="cpu")
    assert source.get().tiling == parse_recipe(TILED, "x")
    registry.switch("whole-v2")
    assert source.get().tiling is None
    flagged = ModelSource(registry=registry, recipe_overrides=RecipeOverrides(tile_size=300),
                          device="cpu")
    assert flagged.get().tiling == TilingOptions(300)


def test_a_model_the_loop_trained_before_recipes_keeps_running_on_its_training_tiles(
    brought, tmp_path
):
    model = init_model_dir(tmp_path / "v0007", brought["config"], brought["weights"],
                           brought["labels"], None)
    (model.path / "model.json").write_text(json.dumps(
        {"version": "v0007", "params": {"crop_size": 320, "iterations": 150}}))
    assert ModelDir.open(model.path).recipe == TilingOptions(tile_size=320)
