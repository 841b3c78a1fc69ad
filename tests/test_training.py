"""Training mode returns detectron2's losses and fine-tuning lowers them."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from backend.detection.config import bundled_config, load_config
from backend.detection.model import GeneralizedRCNN
from backend.detection.structures import Targets
from backend.detection.tiling import TilingOptions
from backend.detection.training import (
    Sample,
    StepCrops,
    TrainOptions,
    init_from_scratch,
    make_optimizer,
    objects_per_sample,
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


def test_object_crops_show_the_animals_of_a_mostly_empty_survey():
    """A survey is mostly empty ground: crops placed around labelled animals show one every
    time, where crops drawn anywhere in the frames rarely do; the share is as asked."""
    scene = survey_scene(np.random.default_rng(0), 480, 640, 1)
    ground = Sample(np.zeros((480, 640, 3), np.uint8), np.zeros((0, 4), np.float32),
                    np.zeros(0, np.int64))
    samples = [Sample(scene.image, scene.boxes, scene.classes)] + [ground] * 9

    def holding_an_animal(share: float) -> float:
        options = TrainOptions(iterations=200, batch_size=2, crop_size=160, object_crops=share)
        crops = StepCrops(samples, options, [0, 1], 0, "BGR")
        return float(np.mean([len(crops[n].target.boxes) > 0 for n in range(len(crops))]))

    assert holding_an_animal(1.0) == 1.0
    assert holding_an_animal(0.0) < 0.1
    assert 0.4 < holding_an_animal(0.5) < 0.6
    with pytest.raises(ValueError, match="object_crops"):
        TrainOptions(object_crops=1.5)


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


def _small_fp16_run() -> tuple[list[Sample], TrainOptions]:
    rng = np.random.default_rng(0)
    scenes = [survey_scene(rng, 160, 160, 4) for _ in range(3)]
    options = TrainOptions(iterations=4, batch_size=2, lr=0.01, warmup_iters=1, crop_size=128,
                           precision="fp16", checkpoint_period=2, workers=0)
    return [Sample(s.image, s.boxes, s.classes) for s in scenes], options


def _fresh() -> GeneralizedRCNN:
    torch.manual_seed(0)
    overrides = {"MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE": 16}  # fp16 is emulated on CPUs
    model = GeneralizedRCNN(load_config(bundled_config("tiny_tridentnet"), overrides))
    init_from_scratch(model)
    return model


def _largest_difference(a: torch.nn.Module, b: torch.nn.Module) -> float:
    theirs = b.state_dict()
    return max(float((v.float() - theirs[k].float()).abs().max())
               for k, v in a.state_dict().items())


def test_a_resumed_mixed_precision_run_equals_an_uninterrupted_one():
    """fp16 autocast with its loss scaler (on the CPU here, as on CUDA): a run stopped at a
    checkpoint and resumed with the scaler's state ends with the uninterrupted run's weights,
    and so does a run whose images were decoded by worker processes."""
    samples, options = _small_fp16_run()
    saved: dict = {}
    straight = _fresh()

    def checkpoint(done, optimizer, scaler) -> None:
        if done == 2:
            saved.update(model=copy.deepcopy(straight.state_dict()),
                         optimizer=copy.deepcopy(optimizer.state_dict()),
                         scaler=scaler.state_dict())

    train(straight, samples, options, on_checkpoint=checkpoint)
    assert saved["scaler"]["scale"] < 65536.0  # overflows happened: the scale moved

    def resumed(scaler_state) -> GeneralizedRCNN:
        model = _fresh()
        model.load_state_dict(saved["model"])
        optimizer = make_optimizer(model, options)
        optimizer.load_state_dict(saved["optimizer"])
        train(model, samples, options, start_iteration=2, optimizer=optimizer,
              scaler_state=scaler_state)
        return model

    assert _largest_difference(straight, resumed(saved["scaler"])) == 0.0
    assert _largest_difference(straight, resumed(None)) > 0.0  # the state is what matters
    with_workers = _fresh()
    train(with_workers, samples, dataclasses.replace(options, workers=2))
    assert _largest_difference(straight, with_workers) == 0.0


def test_training_images_are_decoded_when_a_step_reads_them(tmp_path):
    from pipelines.dataset import StreamedSamples

    scene = survey_scene(np.random.default_rng(0), 120, 160, 3)
    Image.fromarray(scene.image).save(tmp_path / "a.png")
    coco = {"images": [{"id": 7, "file_name": "a.png"}, {"id": 8, "file_name": "gone.png"}],
            "annotations": [{"image_id": 7, "bbox": [1, 2, 10, 20], "category_id": 1}]}
    samples = StreamedSamples(coco, tmp_path)  # nothing decoded yet: gone.png is not missed
    assert len(samples) == 2
    first = samples[0]
    np.testing.assert_array_equal(first.image, scene.image)
    np.testing.assert_array_equal(first.boxes, [[1, 2, 11, 22]])
    assert first.classes.tolist() == [1] and samples.boxes[1].shape == (0, 4)
    assert objects_per_sample(samples).tolist() == [1, 0]  # gone.png is still not read
    with pytest.raises(ValueError, match=r"gone\.png: file not found"):
        samples[1]

