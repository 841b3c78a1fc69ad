"""Checkpoints users bring load into our model, with clear reports when they do not fit."""

from __future__ import annotations

import argparse
import logging
import pickle

import pytest
import torch
import torchvision

from backend.detection.checkpoint import CheckpointError, load_weights
from backend.detection.config import bundled_config, load_config
from backend.detection.model import GeneralizedRCNN
from backend.detection.predictor import Predictor

from .conftest import fixture_dir, fixture_weights

FPN = "faster_rcnn_R_50_FPN_1x"


def _fixture_model(name: str = FPN, **overrides) -> GeneralizedRCNN:
    return GeneralizedRCNN(load_config(fixture_dir(name) / "config.yaml", overrides))


def _state(name: str = FPN) -> dict[str, torch.Tensor]:
    return torch.load(fixture_weights(name), weights_only=True)["model"]


def _detections(model: GeneralizedRCNN, image):
    return Predictor(model, device="cpu")(image)


@pytest.fixture(scope="module")
def reference(fixture_image):
    model = _fixture_model()
    load_weights(model, fixture_weights(FPN), for_inference=True)
    return _detections(model, fixture_image)


def test_raw_state_dict_gives_the_same_detections(tmp_path, fixture_image, reference):
    torch.save(_state(), tmp_path / "raw.pth")
    model = _fixture_model()
    report = load_weights(model, tmp_path / "raw.pth", for_inference=True)
    assert not (report.missing or report.unexpected or report.mismatched)
    assert torch.equal(_detections(model, fixture_image).boxes, reference.boxes)


def test_model_zoo_pickle_of_numpy_arrays_gives_the_same_detections(
    tmp_path, fixture_image, reference
):
    zoo = {"model": {k: v.numpy() for k, v in _state().items()}, "__author__": "Detectron2"}
    with (tmp_path / "model_final.pkl").open("wb") as f:
        pickle.dump(zoo, f)
    model = _fixture_model()
    load_weights(model, tmp_path / "model_final.pkl", for_inference=True)
    assert torch.equal(_detections(model, fixture_image).boxes, reference.boxes)


def test_data_parallel_prefix_is_stripped(tmp_path, fixture_image, reference):
    torch.save({"model": {"module." + k: v for k, v in _state().items()}}, tmp_path / "ddp.pth")
    model = _fixture_model()
    load_weights(model, tmp_path / "ddp.pth", for_inference=True)
    assert torch.equal(_detections(model, fixture_image).scores, reference.scores)


def test_caffe2_imagenet_backbone_names_are_mapped(tmp_path):
    """MSRA R-50.pkl style: res2_0_branch2a_w, res_conv1_bn_s, no BN statistics."""
    state = _state("faster_rcnn_R_50_C4_1x")
    blobs = {
        "conv1_w": state["backbone.stem.conv1.weight"].numpy(),
        "res_conv1_bn_s": state["backbone.stem.conv1.norm.weight"].numpy(),
        "res_conv1_bn_b": state["backbone.stem.conv1.norm.bias"].numpy(),
        "res2_0_branch2a_w": state["backbone.res2.0.conv1.weight"].numpy(),
        "res2_0_branch2a_bn_s": state["backbone.res2.0.conv1.norm.weight"].numpy(),
        "res3_0_branch1_w": state["backbone.res3.0.shortcut.weight"].numpy(),
        "res5_2_branch2c_w": state["roi_heads.res5.2.conv3.weight"].numpy(),
        "fc1000_w": torch.zeros(1000, 2048).numpy(),
    }
    with (tmp_path / "R-50.pkl").open("wb") as f:
        pickle.dump({"blobs": blobs}, f)
    model = _fixture_model("faster_rcnn_R_50_C4_1x")
    report = load_weights(model, tmp_path / "R-50.pkl", for_inference=False)
    own = model.state_dict()
    assert torch.equal(
        own["backbone.res3.0.shortcut.weight"], state["backbone.res3.0.shortcut.weight"]
    )
    assert torch.equal(own["roi_heads.res5.2.conv3.weight"], state["roi_heads.res5.2.conv3.weight"])
    assert torch.equal(
        own["backbone.stem.conv1.norm.weight"], state["backbone.stem.conv1.norm.weight"]
    )
    assert not report.unexpected  # the ImageNet classifier is dropped, not reported
    # No statistics in the file: BN stays an exact affine layer, not "missing".
    assert "backbone.stem.conv1.norm.running_var" not in report.missing
    assert "backbone.res3.1.conv1.weight" in report.missing


def test_torchvision_imagenet_resnet_starts_the_backbone(tmp_path):
    torch.manual_seed(0)
    resnet = torchvision.models.resnet50(weights=None)
    torch.save(resnet.state_dict(), tmp_path / "resnet50.pth")
    cfg_overrides = {"MODEL.RESNETS.STRIDE_IN_1X1": False}
    model = GeneralizedRCNN(load_config(bundled_config("faster_rcnn_R_50_C4"), cfg_overrides))
    report = load_weights(model, tmp_path / "resnet50.pth", for_inference=False)
    own = model.state_dict()
    tv = resnet.state_dict()
    assert torch.equal(own["backbone.stem.conv1.weight"], tv["conv1.weight"])
    assert torch.equal(
        own["backbone.res2.0.conv2.norm.running_var"], tv["layer1.0.bn2.running_var"]
    )
    assert torch.equal(
        own["backbone.res3.0.shortcut.norm.weight"], tv["layer2.0.downsample.1.weight"]
    )
    assert torch.equal(own["roi_heads.res5.0.conv1.weight"], tv["layer4.0.conv1.weight"])
    assert not report.unexpected and not report.mismatched
    assert all(
        k.startswith(("proposal_generator.", "roi_heads.box_predictor.")) for k in report.missing
    )


def test_other_class_count_reinitialises_the_box_predictor_for_fine_tuning(caplog):
    model = _fixture_model(**{"MODEL.ROI_HEADS.NUM_CLASSES": 5})
    with caplog.at_level(logging.WARNING):
        report = load_weights(model, fixture_weights(FPN), for_inference=False)
    assert sorted(report.reinitialised) == [
        "roi_heads.box_predictor.bbox_pred.bias",
        "roi_heads.box_predictor.bbox_pred.weight",
        "roi_heads.box_predictor.cls_score.bias",
        "roi_heads.box_predictor.cls_score.weight",
    ]
    assert "re-initialised the box predictor" in caplog.text
    assert torch.equal(
        model.state_dict()["roi_heads.box_head.fc1.weight"],
        _state()["roi_heads.box_head.fc1.weight"],
    )


def test_inference_refuses_a_checkpoint_that_does_not_fit():
    model = _fixture_model(**{"MODEL.ROI_HEADS.NUM_CLASSES": 5})
    with pytest.raises(CheckpointError, match=r"cls_score\.weight \(4, 256\) vs model \(6, 256\)"):
        load_weights(model, fixture_weights(FPN), for_inference=True)


def test_inference_refuses_missing_weights(tmp_path):
    state = _state()
    del state["roi_heads.box_head.fc2.weight"]
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match=r"missing \(1\): roi_heads\.box_head\.fc2\.weight"):
        load_weights(_fixture_model(), tmp_path / "partial.pth", for_inference=True)


def test_wrong_depth_is_refused_with_the_keys(tmp_path):
    model = GeneralizedRCNN(
        load_config(fixture_dir(FPN) / "config.yaml", {"MODEL.RESNETS.DEPTH": 101})
    )
    with pytest.raises(CheckpointError, match=r"missing .*res4\.6"):
        load_weights(model, fixture_weights(FPN), for_inference=True)


def test_unreadable_files_are_clear_errors(tmp_path):
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match=r"junk\.pth"):
        load_weights(_fixture_model(), tmp_path / "junk.pth", for_inference=True)
    with pytest.raises(CheckpointError, match="not found"):
        load_weights(_fixture_model(), tmp_path / "absent.pth", for_inference=True)


def test_pickled_python_objects_need_explicit_trust(tmp_path, monkeypatch):
    torch.save({"model": _state(), "cfg": argparse.Namespace(lr=0.02)}, tmp_path / "objects.pth")
    with pytest.raises(CheckpointError, match="TRIDENTLOOP_TRUST_CHECKPOINTS"):
        load_weights(_fixture_model(), tmp_path / "objects.pth", for_inference=True)
    monkeypatch.setenv("TRIDENTLOOP_TRUST_CHECKPOINTS", "1")
    load_weights(_fixture_model(), tmp_path / "objects.pth", for_inference=True)
