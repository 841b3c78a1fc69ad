"""Run by tests/test_roi_align.py in a process of its own with TRITON_INTERPRET=1, which
must be set before Triton compiles anything: the ROIAlign kernel the GPU runs, executed on
the CPU by Triton's interpreter, against torchvision's roi_align and inside the engine."""

from __future__ import annotations

import os
import sys

import torch
from torchvision.ops import roi_align

from backend.detection.predictor import Predictor
from backend.detection.roi_align import roi_align_channels_last
from backend.imagery.images import load_image

from .conftest import D2_FIXTURES, fixture_dir, fixture_weights


def kernel_equals_torchvision() -> None:
    """Boxes inside, across and outside the map, inverted and tiny; both alignments,
    adaptive and fixed sampling, every bin or every other one; fp32 exactly, bf16 within
    one bf16 step (the interpreter rounds bf16 by truncation, a GPU to nearest)."""
    gen = torch.Generator().manual_seed(0)
    feature = torch.randn(2, 24, 9, 13, generator=gen)
    xy = torch.rand(5, 2, generator=gen) * torch.tensor([13 * 8.0, 9 * 8.0]) - 10
    rois = torch.cat([torch.tensor([[0.0], [1.0], [0.0], [1.0], [1.0]]), xy,
                      xy + torch.rand(5, 2, generator=gen) * 90], dim=1)
    rois[3, 1:] = torch.tensor([50.0, 50.0, 40.0, 45.0])  # inverted
    rois[4, 1:] = torch.tensor([-90.0, -90.0, -40.0, -50.0])  # beyond the top left
    nhwc = feature.contiguous(memory_format=torch.channels_last)
    for aligned, sampling, step in ((True, 0, 2), (False, 2, 1)):
        expected = roi_align(feature, rois, (14, 14), 1 / 8, sampling, aligned)
        got = roi_align_channels_last(nhwc, rois, (14, 14), 1 / 8, sampling, aligned, step)
        assert got.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(got, expected[:, :, ::step, ::step]), (aligned, sampling, step)
    half = roi_align_channels_last(feature.bfloat16(), rois, (14, 14), 1 / 8, 0, True, 2)
    expected = roi_align(feature.bfloat16().float(), rois, (14, 14), 1 / 8, 0, True)
    step = expected.abs()[:, :, ::2, ::2] / 128 + 1e-6
    assert half.dtype == torch.bfloat16
    assert ((half.float() - expected[:, :, ::2, ::2]).abs() <= step).all()


def engine_detections_do_not_change() -> None:
    """TridentNet-Fast on the fixture image with its 20 best proposals (the interpreter
    runs a program at a time): the same detections through either ROIAlign."""
    name = "tridentnet_fast_R_50_C4_1x"
    image = load_image(D2_FIXTURES / "input.png")
    found = [
        Predictor.from_files(fixture_dir(name) / "config.yaml", fixture_weights(name),
                             {"MODEL.RPN.POST_NMS_TOPK_TEST": 20}, device="cpu",
                             channels_last=True, roi_align=method)(image)
        for method in ("torchvision", "triton")
    ]
    assert len(found[0]) > 0
    assert torch.equal(found[0].classes, found[1].classes)
    assert torch.allclose(found[0].boxes, found[1].boxes, atol=1e-4)
    assert torch.allclose(found[0].scores, found[1].scores, atol=1e-6)


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    torch.set_num_threads(2)
    kernel_equals_torchvision()
    engine_detections_do_not_change()
    print("ok")
    sys.exit(0)
