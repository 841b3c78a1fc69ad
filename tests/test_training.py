"""Training mode returns detectron2's losses and fine-tuning lowers them."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from backend.detection.config import bundled_config, load_config
from backend.detection.model import GeneralizedRCNN
from backend.detection.structures import Targets
from backend.detection.tiling import TilingOptions
from backend.detection.training import (
    Sample,
    TrainOptions,
    init_from_scratch,
    random_crop,
    to_model_input,
    train,
)
from backend.synthetic import survey_scene

from .conftest import fixture_dir

LOSSES = {"loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg"}


def _tiny() -> GeneralizedRCNN:
    torch.manual_seed(0)
    model = GeneralizedRCNN(load_config(bundled_config("tiny_tridentnet")))
    init_from_scratch(model)
    return model


def test_losses_of_every_architecture_are_finite_and_reach_trainable_weights():
    scene = survey_scene(np.random.default_rng(0), 256, 256, 6)
    image, target = to_model_input(Sample(scene.image, scene.boxes, scene.classes), "BGR")
    for name in ("tridentnet_fast_R_50_C4_1x", "faster_rcnn_R_50_FPN_1x"):
        model = GeneralizedRCNN(load_config(fixture_dir(name) / "config.yaml"))
        model.train()
        losses = model.losses([image], [target])
        assert set(losses) == LOSSES
        assert all(torch.isfinite(v) for v in losses.values())
        sum(losses.values()).backward()
        head = model.roi_heads.box_predictor.cls_score.weight
        assert head.grad is not None and head.grad.abs().sum() > 0
        assert model.backbone.state_dict()  # frozen stem gets no gradient:
        stem = next(p for n, p in model.named_parameters() if "stem" in n)
        assert stem.grad is None


def test_images_without_boxes_train_as_background():
    model = _tiny().train()
    image = torch.zeros(3, 128, 128)
    losses = model.losses([image], [Targets(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))])
    assert losses["loss_box_reg"] == 0 and losses["loss_rpn_loc"] == 0
    assert losses["loss_cls"] > 0


def test_fine_tuning_lowers_the_loss():
    rng = np.random.default_rng(0)
    scenes = [survey_scene(rng, 320, 320, 8) for _ in range(2)]
    samples = [Sample(s.image, s.boxes, s.classes) for s in scenes]
    history: list[float] = []
    train(
        _tiny(),
        samples,
        TrainOptions(
            iterations=16,
            batch_size=2,
            lr=0.02,
            warmup_iters=4,
            scale_jitter=(1, 1),
            colour_jitter=0.0,
            crop_size=320,
        ),
        on_step=lambda i, losses: history.append(losses["total_loss"]),
    )
    assert np.mean(history[-4:]) < 0.7 * np.mean(history[:4])


def _steps(options: TrainOptions, samples: list[Sample]) -> tuple[list[float], float]:
    """Losses per step and how far the box classifier's weights moved."""
    torch.manual_seed(0)
    # Fewer sampled ROIs: reduced precision is emulated (about 5x slower) on CPUs without
    # bf16/fp16 units, and res5 on the ROIs is most of a step.
    overrides = {"MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE": 16}
    model = GeneralizedRCNN(load_config(bundled_config("tiny_tridentnet"), overrides))
    init_from_scratch(model)
    head = model.roi_heads.box_predictor.cls_score.weight
    before = head.detach().clone()
    history: list[float] = []
    train(model, samples, options, on_step=lambda i, losses: history.append(losses["total_loss"]))
    return history, float((head.detach() - before).abs().max())


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_training_follows_fp32(precision):
    """AMP as CUDA runs it (autocast; fp16 with loss scaling) on the CPU: finite losses
    that start where fp32's do, and steps that move the weights (an fp16 step whose
    scaled gradients overflow is skipped, as AMP does, and the scale halves)."""
    rng = np.random.default_rng(0)
    scenes = [survey_scene(rng, 192, 192, 5) for _ in range(2)]
    samples = [Sample(s.image, s.boxes, s.classes) for s in scenes]
    options = TrainOptions(iterations=5, batch_size=1, lr=0.01, warmup_iters=1, crop_size=192)
    reference, _ = _steps(options, samples)
    losses, moved = _steps(dataclasses.replace(options, precision=precision), samples)
    assert all(np.isfinite(losses))
    assert abs(losses[0] - reference[0]) <= 0.05 * reference[0]
    assert moved > 0


def test_random_crops_keep_boxes_inside_and_flip_with_the_image():
    scene = survey_scene(np.random.default_rng(3), 600, 700, 20)
    sample = Sample(scene.image, scene.boxes, scene.classes)
    rng = np.random.default_rng(0)
    options = TrainOptions(crop_size=256)
    for _ in range(20):
        crop = random_crop(sample, rng, options)
        assert crop.image.shape[:2] == (256, 256)
        assert len(crop.boxes) == len(crop.classes)
        assert (crop.boxes >= 0).all() and (crop.boxes <= 256).all()
        assert (crop.boxes[:, 2] > crop.boxes[:, 0]).all()


def test_crop_of_an_unscaled_unflipped_image_moves_boxes_with_it():
    image = np.zeros((100, 100, 3), np.uint8)
    image[20:40, 30:60] = 255
    sample = Sample(image, np.array([[30, 20, 60, 40]], np.float32), np.array([1]))
    options = TrainOptions(crop_size=100, scale_jitter=(1, 1), colour_jitter=0)
    rng = np.random.default_rng(0)
    for _ in range(6):
        crop = random_crop(sample, rng, options)
        x0, y0, x1, y1 = crop.boxes[0].astype(int)
        assert crop.image[y0:y1, x0:x1].min() == 255


def test_a_whole_image_model_trains_on_whole_images_resized_as_at_inference():
    """A whole-image recipe: no crop, the image at DefaultPredictor's size (short side
    MIN_SIZE, long side at most MAX_SIZE), boxes scaled with it."""
    image = np.zeros((500, 1400, 3), np.uint8)
    image[100:200, 700:900] = 255
    sample = Sample(image, np.array([[700, 100, 900, 200]], np.float32), np.array([0]))
    options = TrainOptions(whole_image=(800, 1333), scale_jitter=(1, 1), colour_jitter=0)
    rng = np.random.default_rng(0)
    for _ in range(4):
        crop = random_crop(sample, rng, options)
        assert crop.image.shape[:2] == (476, 1333)  # ResizeShortestEdge(800, max 1333)
        (box,) = crop.boxes
        width = box[2] - box[0]
        assert width == pytest.approx(200 * 1333 / 1400, abs=0.5)
        x0, y0, x1, y1 = np.round(box).astype(int)
        assert crop.image[y0 + 2 : y1 - 2, x0 + 2 : x1 - 2].min() == 255


def test_training_crops_follow_the_recipe_in_params():
    from pipelines.train import train_options

    cfg = load_config(bundled_config("tiny_tridentnet"))
    tiled = train_options({"iterations": 5}, TilingOptions(tile_size=256), cfg)
    assert (tiled.crop_size, tiled.whole_image, tiled.iterations) == (256, None, 5)
    whole = train_options({}, None, cfg)
    assert whole.whole_image == (cfg.min_size_test, cfg.max_size_test)
    with pytest.raises(SystemExit, match="crop_size is now the recipe's tile_size"):
        train_options({"crop_size": 320}, None, cfg)
