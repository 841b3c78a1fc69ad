"""A trained model's workload from random weights, for benchmarks.

Seeded random weights make activations grow layer after layer; the RPN then predicts wild
boxes, almost all are dropped, and res5 (most of a C4 model's cost) runs on a few dozen
proposals where a trained model at detectron2's test settings runs on 1000. Setting each
batch norm's statistics from its own input on a calibration tile, layer by layer, keeps
activations standardised as training would: the RPN keeps POST_NMS_TOPK_TEST proposals and
the heads return DETECTIONS_PER_IMAGE boxes, as a trained model does on a busy survey tile.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..detection.config import bundled_config, dump_config, load_config
from ..detection.model import GeneralizedRCNN
from ..detection.structures import Proposals
from ..model_dir import ModelDir, write_model_dir
from ..synthetic import CLASSES, survey_scene


def calibration_tile(size: int = 800) -> np.ndarray:
    """A busy survey tile that no benchmark times."""
    return survey_scene(np.random.default_rng(12345), size, size, 30).image


def _has_statistics(module: nn.Module) -> bool:
    return isinstance(getattr(module, "running_mean", None), torch.Tensor) and isinstance(
        getattr(module, "running_var", None), torch.Tensor
    )


@torch.no_grad()
def condition_norms(model: nn.Module, calibrate: Callable[[], object]) -> int:
    """Give every batch norm (ours, torchvision's frozen or plain ones) the mean and
    variance of what it receives while `calibrate()` runs the model once. The hooks fire in
    forward order, so each layer is set from inputs of already-conditioned layers. Returns
    how many norms were set."""
    done: set[nn.Module] = set()

    def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        if module in done:  # a trident stage runs each block once per branch
            return
        x = args[0].detach().float()
        module.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        module.running_var.copy_(x.var(dim=(0, 2, 3), unbiased=False))
        done.add(module)

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if _has_statistics(m)]
    try:
        calibrate()
    finally:
        for handle in handles:
            handle.remove()
    return len(done)


def conditioned_model(config: str, overrides: dict[str, object] | None = None) -> GeneralizedRCNN:
    """A bundled config (or config file) with seeded, conditioned random weights, on the CPU."""
    torch.manual_seed(0)
    model = GeneralizedRCNN(load_config(_config_path(config), overrides)).eval()
    tile = torch.from_numpy(calibration_tile()).permute(2, 0, 1)
    condition_norms(model, lambda: model.inference([tile]))
    return model


def conditioned_model_dir(dest: Path, config: str, labels: list[str] | None = None) -> ModelDir:
    """The same as a model directory, for benchmarks of whole jobs and servers."""
    labels = labels or list(CLASSES)
    overrides = {"MODEL.ROI_HEADS.NUM_CLASSES": len(labels)}
    model = conditioned_model(config, overrides)
    return write_model_dir(
        dest,
        dump_config(_config_path(config), overrides),
        model.state_dict(),
        labels,
        {"version": "bench"},
    )


def _config_path(config: str) -> Path:
    path = Path(config)
    return path if path.suffix in (".yaml", ".yml") and path.is_file() else bundled_config(config)


class WorkloadCounter:
    """Counts proposals and final detections per image while a model runs: the figures that
    show a benchmark ran a trained model's workload."""

    def __init__(self) -> None:
        self.images = 0
        self.proposals = 0
        self.detections = 0

    def watch_ours(self, model: GeneralizedRCNN) -> Callable[[], None]:
        def count(_module: nn.Module, _args: object, output: tuple[Proposals, object]) -> None:
            self.proposals += len(output[0].boxes)

        handle = model.proposal_generator.register_forward_hook(count)
        return handle.remove

    def watch_torchvision(self, model: nn.Module) -> Callable[[], None]:
        def count(_module: nn.Module, _args: object, output: tuple[list, object]) -> None:
            self.proposals += sum(len(boxes) for boxes in output[0])

        handle = model.rpn.register_forward_hook(count)
        return handle.remove

    def add_outputs(self, images: int, detections: int) -> None:
        self.images += images
        self.detections += detections

    def per_image(self) -> dict[str, float]:
        images = max(self.images, 1)
        return {
            "proposals_per_image": round(self.proposals / images, 1),
            "detections_per_image": round(self.detections / images, 1),
        }
