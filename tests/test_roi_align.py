"""The Triton ROIAlign (backend/detection/roi_align.py), the GPU's default for C4 heads,
runs on the CPU through Triton's interpreter and matches torchvision's."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

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


def test_roi_align_method_is_an_option_with_a_clear_error():
    assert DeviceOptions.create("cpu").roi_align == "torchvision"
    with pytest.raises(ValueError, match="ROIAlign 'fast'"):
        DeviceOptions.create("cpu", roi_align="fast")
