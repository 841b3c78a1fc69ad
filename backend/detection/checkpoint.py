"""Weights users bring -> our model's state dict, with a clear report of what did not fit.

Accepted: detectron2 DetectionCheckpointer `.pth` (`{"model": ...}`), raw state dicts,
model-zoo `.pkl` (numpy arrays, detectron2 names), Caffe2-named ImageNet backbones such as
MSRA's `R-50.pkl`, and torchvision ImageNet ResNet weights (as a backbone start). When the
class count differs from the checkpoint's, the box predictor is re-initialised with a
warning, which is what fine-tuning on new classes needs.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

PREDICTOR_KEYS = ("roi_heads.box_predictor.cls_score.", "roi_heads.box_predictor.bbox_pred.")
_DETECTRON2_ROOTS = ("backbone.", "proposal_generator.", "roi_heads.")
TRUST_ENV = "TRIDENTLOOP_TRUST_CHECKPOINTS"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or does not fit the configured model."""


@dataclass
class LoadReport:
    source: str
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    reinitialised: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"loaded {self.source}"]
        for label, keys in (
            ("missing", self.missing),
            ("unexpected", self.unexpected),
            ("shape mismatch", self.mismatched),
            ("re-initialised", self.reinitialised),
        ):
            if keys:
                parts.append(f"{label} ({len(keys)}): {_abbreviate(keys)}")
        return "; ".join(parts)


def _abbreviate(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Any supported checkpoint file -> tensors under detectron2 key names (backbone keys
    are relative to the ResNet, without a `backbone.` prefix, for ImageNet formats)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix == ".pkl":
        return _read_pickle(path)
    return _read_torch(path)


def _read_torch(path: Path) -> dict[str, torch.Tensor]:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if os.environ.get(TRUST_ENV) != "1":
            raise CheckpointError(
                f"{path}: holds Python objects beyond tensors, which are not loaded by "
                f"default; if you trust the file, set {TRUST_ENV}=1 ({exc})"
            ) from exc
        data = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError) as exc:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({exc})") from exc
    if isinstance(data, dict) and isinstance(data.get("model"), dict):
        data = data["model"]
    elif isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not data:
        raise CheckpointError(f"{path}: no state dict found")
    tensors = {
        _strip_parallel(k): torch.as_tensor(v)
        for k, v in data.items()
        if isinstance(v, torch.Tensor | np.ndarray)
    }
    if _looks_like_torchvision_resnet(tensors):
        return _rename(tensors, _torchvision_name)
    return tensors


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        with path.open("rb") as f:
            data = pickle.load(f, encoding="latin1")
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError) as exc:
        raise CheckpointError(f"{path}: not a readable model-zoo pickle ({exc})") from exc
    if isinstance(data, dict) and "blobs" in data:
        data = data["blobs"]
    elif isinstance(data, dict) and isinstance(data.get("model"), dict):
        data = data["model"]
    tensors = {
        k: torch.as_tensor(np.asarray(v))
        for k, v in data.items()
        if isinstance(v, np.ndarray | torch.Tensor) and not k.endswith("_momentum")
    }
    if any(k.startswith(_DETECTRON2_ROOTS) for k in tensors):
        return tensors
    return _rename(tensors, _caffe2_name)


def _strip_parallel(key: str) -> str:
    return key[len("module.") :] if key.startswith("module.") else key


def _rename(
    tensors: dict[str, torch.Tensor], rename: Callable[[str], str | None]
) -> dict[str, torch.Tensor]:
    renamed = {}
    for key, value in tensors.items():
        new = rename(key)
        if new is not None:
            renamed[new] = value
    return renamed


_C2_SUFFIX = {
    "_w": ".weight",
    "_b": ".bias",
    "_bn_s": ".norm.weight",
    "_bn_b": ".norm.bias",
    "_bn_rm": ".norm.running_mean",
    "_bn_riv": ".norm.running_var",
}
_C2_BRANCH = {"branch1": "shortcut", "branch2a": "conv1", "branch2b": "conv2", "branch2c": "conv3"}


def _caffe2_name(key: str) -> str | None:
    """`res2_0_branch2a_bn_s` -> `res2.0.conv1.norm.weight`; `conv1_w` -> stem; the
    ImageNet classifier (`fc1000`, `pred`) is dropped."""
    if key.startswith(("fc1000", "pred_")):
        return None
    for suffix in sorted(_C2_SUFFIX, key=len, reverse=True):
        if key.endswith(suffix):
            stem, tail = key[: -len(suffix)], _C2_SUFFIX[suffix]
            break
    else:
        return key
    if stem in ("conv1", "res_conv1"):
        return "stem.conv1" + tail
    match = re.fullmatch(r"res(\d)_(\d+)_(branch1|branch2[abc])", stem)
    if match is None:
        return key
    stage, block, branch = match.groups()
    return f"res{stage}.{block}.{_C2_BRANCH[branch]}{tail}"


def _looks_like_torchvision_resnet(tensors: dict[str, torch.Tensor]) -> bool:
    return "conv1.weight" in tensors and "layer1.0.conv1.weight" in tensors


def _torchvision_name(key: str) -> str | None:
    """`layer1.0.bn2.weight` -> `res2.0.conv2.norm.weight`, `downsample.0` -> `shortcut`."""
    if key.startswith("fc.") or key.endswith("num_batches_tracked"):
        return None
    if key.startswith("conv1."):
        return "stem.conv1." + key[len("conv1.") :]
    if key.startswith("bn1."):
        return "stem.conv1.norm." + key[len("bn1.") :]
    match = re.fullmatch(r"layer(\d)\.(\d+)\.(conv\d|bn\d|downsample\.[01])\.(\w+)", key)
    if match is None:
        return key
    layer, block, part, param = match.groups()
    if part.startswith("bn"):
        part = f"conv{part[2:]}.norm"
    elif part == "downsample.0":
        part = "shortcut"
    elif part == "downsample.1":
        part = "shortcut.norm"
    return f"res{int(layer) + 1}.{block}.{part}.{param}"


def _place_backbone(tensors: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """ImageNet weights carry bare ResNet names: put them where this model keeps them
    (`backbone.` or `backbone.bottom_up.`; res5 inside the C4 ROI head)."""
    if any(k.startswith(_DETECTRON2_ROOTS) for k in tensors):
        return tensors
    own = model.state_dict()
    prefix = "backbone.bottom_up." if "backbone.bottom_up.stem.conv1.weight" in own else "backbone."
    placed = {}
    for key, value in tensors.items():
        target = prefix + key
        if target not in own and key.startswith("res5.") and "roi_heads." + key in own:
            target = "roi_heads." + key
        placed[target] = value
    return placed


def predictor_state(path: str | Path) -> dict[str, torch.Tensor]:
    """A checkpoint's box predictor (`cls_score.*`, `bbox_pred.*`): what a head for other
    classes starts from (`BoxPredictor.start_from_other_classes`); empty for a backbone."""
    prefix = "roi_heads.box_predictor."
    return {k[len(prefix):]: v for k, v in read_state_dict(path).items() if k.startswith(prefix)}


def load_weights(model: nn.Module, path: str | Path, for_inference: bool) -> LoadReport:
    """Load `path` into `model`.

    For inference every parameter must come from the checkpoint: anything missing or
    mismatched raises CheckpointError. For fine-tuning, a box predictor sized for another
    class count is re-initialised, and what is missing is reported as a warning.
    """
    tensors = _place_backbone(read_state_dict(path), model)
    own = model.state_dict()
    report = LoadReport(str(path))
    to_load = {}
    for key, value in tensors.items():
        if key not in own:
            report.unexpected.append(key)
        elif tuple(own[key].shape) != tuple(value.shape):
            if key.startswith(PREDICTOR_KEYS) and not for_inference:
                report.reinitialised.append(key)
            else:
                report.mismatched.append(
                    f"{key} {tuple(value.shape)} vs model {tuple(own[key].shape)}"
                )
        else:
            to_load[key] = value
    report.missing = [
        k
        for k in own
        if k not in to_load and k not in report.reinitialised and not _optional_buffer(k, tensors)
    ]
    if for_inference and (report.missing or report.mismatched):
        raise CheckpointError(
            f"{path} does not fit the configured model (check MODEL.RESNETS.DEPTH, widths "
            f"and ROI_HEADS.NUM_CLASSES): {report.summary()}"
        )
    if report.reinitialised:
        log.warning(
            "%s: class count differs from the config; re-initialised the box predictor (%s)",
            path,
            ", ".join(report.reinitialised),
        )
    model.load_state_dict(to_load, strict=False)
    if report.missing or report.unexpected or report.mismatched:
        log.warning(report.summary())
    return report


def _optional_buffer(key: str, tensors: dict[str, torch.Tensor]) -> bool:
    """Caffe2 backbones store no BN statistics: identity defaults are right, not missing."""
    if not key.endswith((".norm.running_mean", ".norm.running_var")):
        return False
    return key.rsplit(".", 1)[0] + ".weight" in tensors
