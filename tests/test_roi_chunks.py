"""The ROI heads pool and classify proposals in chunks bounded in bytes and in 32-bit
indexing, with the detections of one pass."""

from __future__ import annotations

import pytest
import torch

from backend.detection import roi_heads
from backend.detection.predictor import Predictor

from .conftest import (
    as_detections,
    assert_same_detections,
    expected_detections,
    fixture_dir,
    fixture_weights,
)

THREE_BRANCH = "tridentnet_3branch_R_50_C4_1x"


@pytest.fixture
def pooled_sizes(monkeypatch) -> list[int]:
    """Bytes of every ROIAlign output (fp32), as the heads call it (in one thread or
    shared among threads, the CPU's default)."""
    sizes: list[int] = []

    def recording(align):
        def record(*args, **kwargs):
            out = align(*args, **kwargs)
            sizes.append(out.numel() * out.element_size())
            return out
        return record

    for name in ("roi_align", "roi_align_threads"):
        monkeypatch.setattr(roi_heads, name, recording(getattr(roi_heads, name)))
    return sizes


def _three_branch(**options) -> Predictor:
    return Predictor.from_files(fixture_dir(THREE_BRANCH) / "config.yaml",
                                fixture_weights(THREE_BRANCH), device="cpu", **options)


def test_tiny_chunks_give_detectron2_s_detections_and_stay_in_budget(
    fixture_image, pooled_sizes
):
    """3,000 proposals (1,000 per branch) in chunks of 1 MB: five ROIs each."""
    chunked = _three_branch(roi_budget_mb=1)(fixture_image)
    calls = len(pooled_sizes)
    assert calls >= 100 and max(pooled_sizes) <= 2**20
    expected = expected_detections(THREE_BRANCH)["detections"]
    got = [{"box": b.tolist(), "score": float(s), "class_id": int(c)}
           for b, s, c in zip(chunked.boxes, chunked.scores, chunked.classes, strict=True)]
    assert_same_detections(got, expected)
    one_pass = _three_branch(roi_budget_mb=4096)(fixture_image)
    assert len(pooled_sizes) == calls + 1  # the whole head in one ROIAlign call
    assert torch.allclose(one_pass.boxes, chunked.boxes, atol=1e-3)
    assert torch.allclose(one_pass.scores, chunked.scores, atol=1e-6)
    assert torch.equal(as_detections(got).classes, one_pass.classes)


def test_chunks_also_respect_32_bit_indexing():
    """However large the budget, a chunk's pooled tensor stays under 2**31 elements (the
    crash: 4 tiles x 3 branches x 1000 proposals x 1024 x 14 x 14 = 2.46e9)."""
    heads = _three_branch(roi_budget_mb=1 << 20).model.roi_heads
    full_width = {heads.cfg.in_features[0]: torch.zeros(1, 1024, 1, 1)}
    rois = heads.chunk_size(full_width)
    assert rois * 1024 * 14 * 14 < 2**31 and rois > 10_000

