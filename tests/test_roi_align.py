"""The Triton ROIAlign (backend/detection/roi_align.py), the GPU's default for C4 heads,
runs on the CPU through Triton's interpreter and matches torchvision's; the CPU's default,
torchvision's kernel with the ROIs shared among threads, gives the same bits."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torchvision.ops import roi_align as torchvision_roi_align

from backend.detection import roi_align
from backend.detection.device import DeviceOptions

from .conftest import REPO


@pytest.mark.skipif(not roi_align.available(), reason="no triton in this environment")
def test_triton_kernel_through_the_interpreter_matches_torchvision():
    proc = subprocess.run(
        [sys.executable, "-m", "tests.interpreted_roi_align"], cwd=REPO,
        env=dict(os.environ, TRITON_INTERPRET="1"), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("ok")


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("count", [0, 40, 1001])
def test_rois_shared_among_threads_pool_exactly_what_one_call_does(threads, count):
    """Shares of unequal size, none, or too few ROIs to share: bit for bit the same."""
    gen = torch.Generator().manual_seed(count)
    feature = torch.randn(2, 64, 25, 30, generator=gen).contiguous(
        memory_format=torch.channels_last)
    corners = torch.rand(count, 2, generator=gen) * 200 - 10
    rois = torch.cat([torch.randint(0, 2, (count, 1), generator=gen).float(), corners,
                      corners + torch.rand(count, 2, generator=gen) * 120], dim=1)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for aligned, sampling in ((True, 0), (False, 2)):
            got = roi_align.roi_align_threads(feature, rois, (7, 7), 1 / 8, sampling, aligned)
            want = torchvision_roi_align(feature, rois, (7, 7), 1 / 8, sampling, aligned)
            assert torch.equal(got, want)
    finally:
        torch.set_num_threads(before)


def test_roi_align_method_is_an_option_with_a_clear_error():
    assert DeviceOptions.create("cpu").roi_align == "threads"
    assert DeviceOptions.create("cpu", roi_align="torchvision").roi_align == "torchvision"
    with pytest.raises(ValueError, match="ROIAlign 'fast'"):
        DeviceOptions.create("cpu", roi_align="fast")
