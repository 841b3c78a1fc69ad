"""detectron2 YAML configs -> a typed, frozen config.

Users bring the `config.yaml` that detectron2 dumped next to their trained model (every key
present) or a hand-written file that inherits through `_BASE_` chains. Both are merged over
detectron2's defaults for the keys our engine uses; keys we do not model (keypoints, solver
details, ...) are accepted and ignored so that full dumps load, while settings that would
change the detections in ways we do not implement are refused with a clear error.
"""

from __future__ import annotations

import ast
import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config file that cannot be read or asks for something the engine does not do."""


# detectron2's defaults (config/defaults.py and TridentNet's add_tridentnet_config) for every
# key the engine reads. A full dump overrides all of them; a _BASE_ chain overrides some.
DEFAULTS: dict[str, Any] = {
    "INPUT": {"FORMAT": "BGR", "MIN_SIZE_TEST": 800, "MAX_SIZE_TEST": 1333},
    "MODEL": {
        "META_ARCHITECTURE": "GeneralizedRCNN",
        "PIXEL_MEAN": [103.53, 116.28, 123.675],
        "PIXEL_STD": [1.0, 1.0, 1.0],
        "MASK_ON": False,
        "KEYPOINT_ON": False,
        "LOAD_PROPOSALS": False,
        "WEIGHTS": "",
        "BACKBONE": {"NAME": "build_resnet_backbone", "FREEZE_AT": 2},
        "RESNETS": {
            "DEPTH": 50,
            "OUT_FEATURES": ["res4"],
            "NUM_GROUPS": 1,
            "NORM": "FrozenBN",
            "WIDTH_PER_GROUP": 64,
            "STRIDE_IN_1X1": True,
            "RES5_DILATION": 1,
            "RES2_OUT_CHANNELS": 256,
            "STEM_OUT_CHANNELS": 64,
            "DEFORM_ON_PER_STAGE": [False, False, False, False],
        },
        "FPN": {"IN_FEATURES": [], "OUT_CHANNELS": 256, "NORM": "", "FUSE_TYPE": "sum"},
        "TRIDENT": {
            "NUM_BRANCH": 3,
            "BRANCH_DILATIONS": [1, 2, 3],
            "TRIDENT_STAGE": "res4",
            "TEST_BRANCH_IDX": 1,
        },
        "PROPOSAL_GENERATOR": {"NAME": "RPN", "MIN_SIZE": 0},
        "ANCHOR_GENERATOR": {
            "NAME": "DefaultAnchorGenerator",
            "SIZES": [[32, 64, 128, 256, 512]],
            "ASPECT_RATIOS": [[0.5, 1.0, 2.0]],
            "OFFSET": 0.0,
        },
        "RPN": {
            "HEAD_NAME": "StandardRPNHead",
            "IN_FEATURES": ["res4"],
            "BOUNDARY_THRESH": -1,
            "IOU_THRESHOLDS": [0.3, 0.7],
            "IOU_LABELS": [0, -1, 1],
            "BATCH_SIZE_PER_IMAGE": 256,
            "POSITIVE_FRACTION": 0.5,
            "BBOX_REG_LOSS_TYPE": "smooth_l1",
            "BBOX_REG_LOSS_WEIGHT": 1.0,
            "BBOX_REG_WEIGHTS": [1.0, 1.0, 1.0, 1.0],
            "SMOOTH_L1_BETA": 0.0,
            "LOSS_WEIGHT": 1.0,
            "PRE_NMS_TOPK_TRAIN": 12000,
            "PRE_NMS_TOPK_TEST": 6000,
            "POST_NMS_TOPK_TRAIN": 2000,
            "POST_NMS_TOPK_TEST": 1000,
            "NMS_THRESH": 0.7,
            "CONV_DIMS": [-1],
        },
        "ROI_HEADS": {
            "NAME": "Res5ROIHeads",
            "NUM_CLASSES": 80,
            "IN_FEATURES": ["res4"],
            "IOU_THRESHOLDS": [0.5],
            "IOU_LABELS": [0, 1],
            "BATCH_SIZE_PER_IMAGE": 512,
            "POSITIVE_FRACTION": 0.25,
            "SCORE_THRESH_TEST": 0.05,
            "NMS_THRESH_TEST": 0.5,
            "PROPOSAL_APPEND_GT": True,
        },
        "ROI_BOX_HEAD": {
            "NAME": "",
            "BBOX_REG_LOSS_TYPE": "smooth_l1",
            "BBOX_REG_LOSS_WEIGHT": 1.0,
            "BBOX_REG_WEIGHTS": [10.0, 10.0, 5.0, 5.0],
            "SMOOTH_L1_BETA": 0.0,
            "POOLER_RESOLUTION": 14,
            "POOLER_SAMPLING_RATIO": 0,
            "POOLER_TYPE": "ROIAlignV2",
            "NUM_FC": 0,
            "FC_DIM": 1024,
            "NUM_CONV": 0,
            "CONV_DIM": 256,
            "NORM": "",
            "CLS_AGNOSTIC_BBOX_REG": False,
            "USE_SIGMOID_CE": False,
            "USE_FED_LOSS": False,
            "TRAIN_ON_PRED_BOXES": False,
        },
    },
    "TEST": {"DETECTIONS_PER_IMAGE": 100},
}

_BACKBONES = ("build_resnet_backbone", "build_resnet_fpn_backbone", "build_trident_resnet_backbone")
_ROI_HEADS = ("Res5ROIHeads", "TridentRes5ROIHeads", "StandardROIHeads")
_PROPOSAL_GENERATORS = ("RPN", "TridentRPN")
_POOLERS = ("ROIAlignV2", "ROIAlign")


@dataclass(frozen=True)
class ResNetConfig:
    depth: int
    out_features: tuple[str, ...]
    num_groups: int
    width_per_group: int
    stride_in_1x1: bool
    res5_dilation: int
    res2_out_channels: int
    stem_out_channels: int
    freeze_at: int


@dataclass(frozen=True)
class TridentConfig:
    num_branch: int
    branch_dilations: tuple[int, ...]
    trident_stage: str
    test_branch_idx: int


@dataclass(frozen=True)
class FPNConfig:
    in_features: tuple[str, ...]
    out_channels: int
    fuse_type: str


@dataclass(frozen=True)
class AnchorConfig:
    sizes: tuple[tuple[float, ...], ...]
    aspect_ratios: tuple[tuple[float, ...], ...]
    offset: float


@dataclass(frozen=True)
class RPNConfig:
    in_features: tuple[str, ...]
    iou_thresholds: tuple[float, ...]
    iou_labels: tuple[int, ...]
    batch_size_per_image: int
    positive_fraction: float
    bbox_reg_weights: tuple[float, ...]
    smooth_l1_beta: float
    loss_weight: float
    bbox_reg_loss_weight: float
    pre_nms_topk: tuple[int, int]  # (train, test)
    post_nms_topk: tuple[int, int]  # (train, test)
    nms_thresh: float
    min_box_size: float
    boundary_thresh: float


@dataclass(frozen=True)
class ROIHeadsConfig:
    name: str
    num_classes: int
    in_features: tuple[str, ...]
    iou_thresholds: tuple[float, ...]
    iou_labels: tuple[int, ...]
    batch_size_per_image: int
    positive_fraction: float
    score_thresh_test: float
    nms_thresh_test: float
    proposal_append_gt: bool
    detections_per_image: int
    # box head
    bbox_reg_weights: tuple[float, ...]
    smooth_l1_beta: float
    bbox_reg_loss_weight: float
    pooler_resolution: int
    pooler_sampling_ratio: int
    pooler_aligned: bool
    num_fc: int
    fc_dim: int
    cls_agnostic_bbox_reg: bool


@dataclass(frozen=True)
class DetectorConfig:
    """Everything needed to build a model and run DefaultPredictor's pre/postprocessing."""

    input_format: str
    min_size_test: int
    max_size_test: int
    pixel_mean: tuple[float, ...]
    pixel_std: tuple[float, ...]
    backbone: str
    resnet: ResNetConfig
    fpn: FPNConfig | None
    trident: TridentConfig | None
    anchors: AnchorConfig
    rpn: RPNConfig
    roi_heads: ROIHeadsConfig
    source: str  # where it came from, for error messages

    @property
    def is_trident(self) -> bool:
        return self.trident is not None

    @property
    def uses_fpn(self) -> bool:
        return self.fpn is not None


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> DetectorConfig:
    """Read a detectron2 config file (with its `_BASE_` chain) into a DetectorConfig.

    `overrides` maps dotted keys (`MODEL.ROI_HEADS.SCORE_THRESH_TEST`) to values, like
    detectron2's `--opts`.
    """
    return from_dict(resolve_config(path, overrides), source=str(path))


def resolve_config(path: str | Path, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The merged mapping (defaults <- _BASE_ chain <- file <- overrides)."""
    raw = _merge(copy.deepcopy(DEFAULTS), _load_with_bases(Path(path), seen=()))
    for dotted, value in (overrides or {}).items():
        _set_dotted(raw, dotted, value)
    return raw


def dump_config(path: str | Path, overrides: dict[str, Any] | None = None) -> str:
    """A standalone YAML (no _BASE_) to save next to trained weights, like cfg.dump()."""
    raw = resolve_config(path, overrides)
    from_dict(raw, source=str(path))  # refuse to write what we could not load back
    return yaml.safe_dump(raw, sort_keys=True)


def config_from_yaml_text(text: str, source: str = "<text>") -> DetectorConfig:
    """Parse a config held in memory (a single file, no `_BASE_`)."""
    data = _decode_literals(yaml.safe_load(text) or {})
    if "_BASE_" in data:
        raise ConfigError(f"{source}: _BASE_ needs a file path; use load_config")
    return from_dict(_merge(copy.deepcopy(DEFAULTS), data), source=source)


def _load_with_bases(path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    path = path.expanduser().resolve()
    if path in seen:
        chain = " -> ".join(str(p) for p in (*seen, path))
        raise ConfigError(f"config _BASE_ chain loops: {chain}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError as exc:
        where = f" (a _BASE_ of {seen[-1]})" if seen else ""
        raise ConfigError(f"config file not found: {path}{where}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a YAML mapping, got {type(data).__name__}")
    data = _decode_literals(data)
    base = data.pop("_BASE_", None)
    if base is None:
        return data
    base_path = Path(str(base)).expanduser()
    if not base_path.is_absolute():
        base_path = path.parent / base_path
    return _merge(_load_with_bases(base_path, (*seen, path)), data)


def _decode_literals(node: Any) -> Any:
    """yacs reads strings such as "(640, 672)" as Python literals; so do we."""
    if isinstance(node, dict):
        return {key: _decode_literals(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_decode_literals(value) for value in node]
    if isinstance(node, str):
        try:
            return ast.literal_eval(node)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            return node
    return node


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge `override` into `base` (in place): mappings merge, everything else replaces."""
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    node = raw
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {part} is not a section")
    node[leaf] = yaml.safe_load(value) if isinstance(value, str) else value


def from_dict(raw: dict[str, Any], source: str) -> DetectorConfig:
    """Validate a merged detectron2 config mapping and turn it into a DetectorConfig."""
    model = raw["MODEL"]
    _refuse_unsupported(raw, source)
    backbone = model["BACKBONE"]["NAME"]
    res = model["RESNETS"]
    anchors = model["ANCHOR_GENERATOR"]
    trident = model["TRIDENT"] if backbone == "build_trident_resnet_backbone" else None
    fpn = model["FPN"] if backbone == "build_resnet_fpn_backbone" else None
    return DetectorConfig(
        input_format=str(raw["INPUT"]["FORMAT"]).upper(),
        min_size_test=int(raw["INPUT"]["MIN_SIZE_TEST"]),
        max_size_test=int(raw["INPUT"]["MAX_SIZE_TEST"]),
        pixel_mean=tuple(float(v) for v in model["PIXEL_MEAN"]),
        pixel_std=tuple(float(v) for v in model["PIXEL_STD"]),
        backbone=backbone,
        resnet=ResNetConfig(
            depth=int(res["DEPTH"]),
            out_features=tuple(res["OUT_FEATURES"]),
            num_groups=int(res["NUM_GROUPS"]),
            width_per_group=int(res["WIDTH_PER_GROUP"]),
            stride_in_1x1=bool(res["STRIDE_IN_1X1"]),
            res5_dilation=int(res["RES5_DILATION"]),
            res2_out_channels=int(res["RES2_OUT_CHANNELS"]),
            stem_out_channels=int(res["STEM_OUT_CHANNELS"]),
            freeze_at=int(model["BACKBONE"]["FREEZE_AT"]),
        ),
        fpn=None
        if fpn is None
        else FPNConfig(
            in_features=tuple(fpn["IN_FEATURES"]),
            out_channels=int(fpn["OUT_CHANNELS"]),
            fuse_type=str(fpn["FUSE_TYPE"]),
        ),
        trident=None
        if trident is None
        else TridentConfig(
            num_branch=int(trident["NUM_BRANCH"]),
            branch_dilations=tuple(int(d) for d in trident["BRANCH_DILATIONS"]),
            trident_stage=str(trident["TRIDENT_STAGE"]),
            test_branch_idx=int(trident["TEST_BRANCH_IDX"]),
        ),
        anchors=AnchorConfig(
            sizes=tuple(tuple(float(s) for s in level) for level in anchors["SIZES"]),
            aspect_ratios=tuple(tuple(float(r) for r in lv) for lv in anchors["ASPECT_RATIOS"]),
            offset=float(anchors["OFFSET"]),
        ),
        rpn=_rpn(model),
        roi_heads=_roi_heads(model, raw),
        source=source,
    )


def _rpn(model: dict[str, Any]) -> RPNConfig:
    rpn = model["RPN"]
    return RPNConfig(
        in_features=tuple(rpn["IN_FEATURES"]),
        iou_thresholds=tuple(float(t) for t in rpn["IOU_THRESHOLDS"]),
        iou_labels=tuple(int(t) for t in rpn["IOU_LABELS"]),
        batch_size_per_image=int(rpn["BATCH_SIZE_PER_IMAGE"]),
        positive_fraction=float(rpn["POSITIVE_FRACTION"]),
        bbox_reg_weights=tuple(float(w) for w in rpn["BBOX_REG_WEIGHTS"]),
        smooth_l1_beta=float(rpn["SMOOTH_L1_BETA"]),
        loss_weight=float(rpn["LOSS_WEIGHT"]),
        bbox_reg_loss_weight=float(rpn["BBOX_REG_LOSS_WEIGHT"]),
        pre_nms_topk=(int(rpn["PRE_NMS_TOPK_TRAIN"]), int(rpn["PRE_NMS_TOPK_TEST"])),
        post_nms_topk=(int(rpn["POST_NMS_TOPK_TRAIN"]), int(rpn["POST_NMS_TOPK_TEST"])),
        nms_thresh=float(rpn["NMS_THRESH"]),
        min_box_size=float(model["PROPOSAL_GENERATOR"]["MIN_SIZE"]),
        boundary_thresh=float(rpn["BOUNDARY_THRESH"]),
    )


def _roi_heads(model: dict[str, Any], raw: dict[str, Any]) -> ROIHeadsConfig:
    roi, box = model["ROI_HEADS"], model["ROI_BOX_HEAD"]
    return ROIHeadsConfig(
        name=str(roi["NAME"]),
        num_classes=int(roi["NUM_CLASSES"]),
        in_features=tuple(roi["IN_FEATURES"]),
        iou_thresholds=tuple(float(t) for t in roi["IOU_THRESHOLDS"]),
        iou_labels=tuple(int(t) for t in roi["IOU_LABELS"]),
        batch_size_per_image=int(roi["BATCH_SIZE_PER_IMAGE"]),
        positive_fraction=float(roi["POSITIVE_FRACTION"]),
        score_thresh_test=float(roi["SCORE_THRESH_TEST"]),
        nms_thresh_test=float(roi["NMS_THRESH_TEST"]),
        proposal_append_gt=bool(roi["PROPOSAL_APPEND_GT"]),
        detections_per_image=int(raw["TEST"]["DETECTIONS_PER_IMAGE"]),
        bbox_reg_weights=tuple(float(w) for w in box["BBOX_REG_WEIGHTS"]),
        smooth_l1_beta=float(box["SMOOTH_L1_BETA"]),
        bbox_reg_loss_weight=float(box["BBOX_REG_LOSS_WEIGHT"]),
        pooler_resolution=int(box["POOLER_RESOLUTION"]),
        pooler_sampling_ratio=int(box["POOLER_SAMPLING_RATIO"]),
        pooler_aligned=box["POOLER_TYPE"] == "ROIAlignV2",
        num_fc=int(box["NUM_FC"]),
        fc_dim=int(box["FC_DIM"]),
        cls_agnostic_bbox_reg=bool(box["CLS_AGNOSTIC_BBOX_REG"]),
    )


def _refuse_unsupported(raw: dict[str, Any], source: str) -> None:
    """Fail loudly on settings that would silently give other detections than detectron2."""
    model = raw["MODEL"]
    checks = [
        (model["META_ARCHITECTURE"] == "GeneralizedRCNN", "MODEL.META_ARCHITECTURE"),
        (model["BACKBONE"]["NAME"] in _BACKBONES, "MODEL.BACKBONE.NAME"),
        (
            model["PROPOSAL_GENERATOR"]["NAME"] in _PROPOSAL_GENERATORS,
            "MODEL.PROPOSAL_GENERATOR.NAME",
        ),
        (model["ROI_HEADS"]["NAME"] in _ROI_HEADS, "MODEL.ROI_HEADS.NAME"),
        (model["ROI_BOX_HEAD"]["POOLER_TYPE"] in _POOLERS, "MODEL.ROI_BOX_HEAD.POOLER_TYPE"),
        (model["RESNETS"]["DEPTH"] in (50, 101, 152), "MODEL.RESNETS.DEPTH (50, 101 or 152)"),
        (model["RESNETS"]["NORM"] == "FrozenBN", "MODEL.RESNETS.NORM (FrozenBN only)"),
        (not any(model["RESNETS"]["DEFORM_ON_PER_STAGE"]), "MODEL.RESNETS.DEFORM_ON_PER_STAGE"),
        (model["FPN"]["NORM"] == "", "MODEL.FPN.NORM"),
        (model["ROI_BOX_HEAD"]["NUM_CONV"] == 0, "MODEL.ROI_BOX_HEAD.NUM_CONV"),
        (model["ROI_BOX_HEAD"]["NORM"] == "", "MODEL.ROI_BOX_HEAD.NORM"),
        (not model["ROI_BOX_HEAD"]["USE_SIGMOID_CE"], "MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE"),
        (not model["ROI_BOX_HEAD"]["USE_FED_LOSS"], "MODEL.ROI_BOX_HEAD.USE_FED_LOSS"),
        (model["RPN"]["HEAD_NAME"] == "StandardRPNHead", "MODEL.RPN.HEAD_NAME"),
        (list(model["RPN"]["CONV_DIMS"]) == [-1], "MODEL.RPN.CONV_DIMS"),
        (
            model["ANCHOR_GENERATOR"]["NAME"] == "DefaultAnchorGenerator",
            "MODEL.ANCHOR_GENERATOR.NAME",
        ),
        (model["RPN"]["BBOX_REG_LOSS_TYPE"] == "smooth_l1", "MODEL.RPN.BBOX_REG_LOSS_TYPE"),
        (
            model["ROI_BOX_HEAD"]["BBOX_REG_LOSS_TYPE"] == "smooth_l1",
            "MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE",
        ),
        (str(raw["INPUT"]["FORMAT"]).upper() in ("BGR", "RGB"), "INPUT.FORMAT (BGR or RGB)"),
        (not model["LOAD_PROPOSALS"], "MODEL.LOAD_PROPOSALS"),
    ]
    bad = [name for ok, name in checks if not ok]
    if bad:
        values = ", ".join(f"{name}={_get_dotted(raw, name.split(' ')[0])!r}" for name in bad)
        raise ConfigError(f"{source}: unsupported setting(s): {values}")
    is_c4 = model["ROI_HEADS"]["NAME"] in ("Res5ROIHeads", "TridentRes5ROIHeads")
    is_fpn = model["BACKBONE"]["NAME"] == "build_resnet_fpn_backbone"
    if is_c4 == is_fpn:
        raise ConfigError(
            f"{source}: MODEL.ROI_HEADS.NAME={model['ROI_HEADS']['NAME']!r} does not fit "
            f"MODEL.BACKBONE.NAME={model['BACKBONE']['NAME']!r} (C4 heads need a plain or "
            "trident ResNet backbone, StandardROIHeads an FPN one)"
        )


def _get_dotted(raw: dict[str, Any], dotted: str) -> Any:
    node: Any = raw
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


BUNDLED_CONFIGS = Path(__file__).parent / "configs"


def bundled_config(name: str) -> Path:
    """Path of a config shipped with tridentloop (model-zoo bases and the tiny demo model)."""
    path = BUNDLED_CONFIGS / (name if name.endswith(".yaml") else name + ".yaml")
    if not path.is_file():
        names = sorted(p.stem for p in BUNDLED_CONFIGS.glob("*.yaml"))
        raise ConfigError(f"no bundled config {name!r}; available: {', '.join(names)}")
    return path
