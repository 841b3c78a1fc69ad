"""detectron2 YAML configs: full dumps, _BASE_ chains, TridentNet keys, clear refusals."""

from __future__ import annotations

import pytest

from backend.detection.config import ConfigError, bundled_config, load_config

from .conftest import fixture_dir


def test_full_dump_from_a_trained_model_loads():
    cfg = load_config(fixture_dir("tridentnet_fast_R_50_C4_1x") / "config.yaml")
    assert cfg.is_trident and not cfg.uses_fpn
    assert cfg.trident.num_branch == 3
    assert cfg.trident.branch_dilations == (1, 2, 3)
    assert cfg.trident.test_branch_idx == 1
    assert cfg.resnet.width_per_group == 16
    assert cfg.roi_heads.num_classes == 3
    assert cfg.roi_heads.batch_size_per_image == 128
    assert cfg.rpn.post_nms_topk == (500, 1000)


def test_fpn_dump_reads_pyramid_settings():
    cfg = load_config(fixture_dir("faster_rcnn_R_50_FPN_1x") / "config.yaml")
    assert cfg.uses_fpn and cfg.fpn.out_channels == 64
    assert cfg.rpn.in_features == ("p2", "p3", "p4", "p5", "p6")
    assert cfg.anchors.sizes == ((32.0,), (64.0,), (128.0,), (256.0,), (512.0,))
    assert cfg.roi_heads.pooler_resolution == 7 and cfg.roi_heads.num_fc == 2


def test_base_chain_merges_child_over_parent_over_defaults(tmp_path):
    (tmp_path / "bases").mkdir()
    (tmp_path / "bases" / "Base-RCNN-C4.yaml").write_text(
        "MODEL:\n  RPN:\n    PRE_NMS_TOPK_TEST: 6000\n  ROI_HEADS:\n    NAME: Res5ROIHeads\n"
        "INPUT:\n  MIN_SIZE_TRAIN: (640, 672)\n"
    )
    (tmp_path / "bases" / "Base-Trident.yaml").write_text(
        '_BASE_: "Base-RCNN-C4.yaml"\n'
        "MODEL:\n  BACKBONE:\n    NAME: build_trident_resnet_backbone\n"
        "  ROI_HEADS:\n    NAME: TridentRes5ROIHeads\n    NUM_CLASSES: 5\n"
        "  PROPOSAL_GENERATOR:\n    NAME: TridentRPN\n"
        "  TRIDENT:\n    NUM_BRANCH: 2\n    BRANCH_DILATIONS: [1, 3]\n    TEST_BRANCH_IDX: -1\n"
    )
    (tmp_path / "mine.yaml").write_text(
        '_BASE_: "bases/Base-Trident.yaml"\n'
        "MODEL:\n  RESNETS:\n    DEPTH: 101\n  ROI_HEADS:\n    SCORE_THRESH_TEST: 0.3\n"
    )
    cfg = load_config(tmp_path / "mine.yaml")
    assert cfg.resnet.depth == 101
    assert cfg.roi_heads.name == "TridentRes5ROIHeads"
    assert cfg.roi_heads.num_classes == 5  # from the middle file
    assert cfg.roi_heads.score_thresh_test == 0.3  # from the child
    assert cfg.rpn.pre_nms_topk == (12000, 6000)  # train from defaults, test from the root
    assert cfg.trident.branch_dilations == (1, 3) and cfg.trident.test_branch_idx == -1


def test_overrides_apply_like_detectron2_opts():
    cfg = load_config(
        bundled_config("faster_rcnn_R_50_FPN"),
        {"MODEL.ROI_HEADS.SCORE_THRESH_TEST": "0.7", "INPUT.MIN_SIZE_TEST": 640},
    )
    assert cfg.roi_heads.score_thresh_test == 0.7
    assert cfg.min_size_test == 640


@pytest.mark.parametrize(
    "name",
    [
        "tridentnet_fast_R_50_C4",
        "tridentnet_fast_R_101_C4",
        "faster_rcnn_R_50_C4",
        "faster_rcnn_R_50_FPN",
        "tiny_tridentnet",
    ],
)
def test_bundled_configs_load(name):
    assert load_config(bundled_config(name)).resnet.depth in (50, 101)


def test_missing_base_names_the_file_that_asked_for_it(tmp_path):
    (tmp_path / "a.yaml").write_text('_BASE_: "nowhere.yaml"\n')
    with pytest.raises(ConfigError, match=r"nowhere\.yaml.*a _BASE_ of .*a\.yaml"):
        load_config(tmp_path / "a.yaml")


def test_base_loop_is_reported(tmp_path):
    (tmp_path / "a.yaml").write_text('_BASE_: "b.yaml"\n')
    (tmp_path / "b.yaml").write_text('_BASE_: "a.yaml"\n')
    with pytest.raises(ConfigError, match="loops"):
        load_config(tmp_path / "a.yaml")


@pytest.mark.parametrize(
    ("yaml_text", "key"),
    [
        (
            "MODEL:\n  RESNETS:\n    DEFORM_ON_PER_STAGE: [false, false, true, true]\n",
            "DEFORM_ON_PER_STAGE",
        ),
        ("MODEL:\n  RESNETS:\n    NORM: GN\n", "MODEL.RESNETS.NORM"),
        ("MODEL:\n  META_ARCHITECTURE: RetinaNet\n", "META_ARCHITECTURE"),
        ("MODEL:\n  RESNETS:\n    DEPTH: 34\n", "DEPTH"),
        ("MODEL:\n  ROI_HEADS:\n    NAME: StandardROIHeads\n", "does not fit"),
    ],
)
def test_unsupported_settings_are_refused_by_name(tmp_path, yaml_text, key):
    (tmp_path / "c.yaml").write_text(yaml_text)
    with pytest.raises(ConfigError, match=key):
        load_config(tmp_path / "c.yaml")


def test_not_a_mapping_is_a_clear_error(tmp_path):
    (tmp_path / "c.yaml").write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(tmp_path / "c.yaml")
