"""One greedy NMS for a whole batch (backend/detection/nms.py) keeps exactly the boxes, in
exactly the order, that torchvision's NMS keeps group by group and image by image."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import nms

from backend.detection.boxes import nms_per_image
from backend.detection.nms import batched_greedy_nms, strict_threshold


def torchvision_reference(boxes, scores, groups, images, threshold, topk) -> torch.Tensor:
    """torchvision's `nms` run on each (image, group) alone, on the boxes' device; each
    image's kept boxes by descending score (ties: lower index first), the first `topk` of
    them. Returned on the CPU."""
    kept, host_scores = [], scores.cpu().tolist()
    for image in images.unique().tolist():
        rows = torch.nonzero(images == image)[:, 0]
        mine = []
        for group in groups[rows].unique().tolist():
            members = rows[groups[rows] == group]
            mine += members[nms(boxes[members], scores[members], threshold)].tolist()
        ordered = sorted(mine, key=lambda i: (-host_scores[i], i))
        kept += ordered if topk < 0 else ordered[:topk]
    return torch.tensor(kept, dtype=torch.int64)


def random_boxes(gen: torch.Generator, n: int, span: float = 300, size: float = 80):
    xy = torch.rand(n, 2, generator=gen) * span
    return torch.cat([xy, xy + torch.rand(n, 2, generator=gen) * size], dim=1)


@pytest.mark.parametrize("seed", range(6))
def test_random_batches_equal_torchvision_group_by_group(seed):
    gen = torch.Generator().manual_seed(seed)
    n = int(torch.randint(50, 2500, (1,), generator=gen))
    boxes = random_boxes(gen, n)
    scores = torch.rand(n, generator=gen)
    groups = torch.randint(3, (n,), generator=gen)
    images = torch.randint(4, (n,), generator=gen)
    threshold, topk, block = [(0.5, -1, 1024), (0.7, 1000, 64), (0.3, 7, 5)][seed % 3]
    got = batched_greedy_nms(boxes, scores, groups, images, threshold, topk, block)
    assert torch.equal(got, torchvision_reference(boxes, scores, groups, images, threshold, topk))


def test_adversarial_boxes_equal_torchvision():
    """Integer boxes (many exact ties in IoU), identical boxes with identical scores,
    zero-area boxes, boxes inside each other, and scores of one tenth (ties in order)."""
    gen = torch.Generator().manual_seed(7)
    boxes = random_boxes(gen, 1500, span=60, size=20).round()
    boxes[:200] = boxes[0]  # 200 copies of one box
    boxes[200:300, 2:] = boxes[200:300, :2]  # zero area
    boxes[300:400, 2] = boxes[300:400, 0]  # zero width
    scores = (torch.rand(1500, generator=gen) * 10).round() / 10
    scores[:200] = 0.5
    groups = torch.randint(2, (1500,), generator=gen)
    images = torch.randint(2, (1500,), generator=gen)
    for threshold in (0.0, 0.5, 0.7, 1.0):
        got = batched_greedy_nms(boxes, scores, groups, images, threshold, -1, block=128)
        assert torch.equal(got, torchvision_reference(boxes, scores, groups, images,
                                                      threshold, -1))


def test_a_long_suppression_chain_settles_exactly():
    """Each box overlaps the next one just above the threshold: greedy keeps every other
    box, which the fixed point reaches only after as many rounds as the chain is long."""
    xs = torch.arange(300, dtype=torch.float32) * 2
    boxes = torch.stack([xs, torch.zeros(300), xs + 10, torch.full((300,), 10.0)], dim=1)
    scores = torch.linspace(1, 0.1, 300)
    zeros = torch.zeros(300, dtype=torch.int64)
    got = batched_greedy_nms(boxes, scores, zeros, zeros, 0.5, -1, block=64)
    assert torch.equal(got, nms(boxes, scores, 0.5))


def test_huge_counts_stop_at_topk_with_torchvision_s_first_boxes():
    gen = torch.Generator().manual_seed(1)
    boxes = random_boxes(gen, 24_000, span=780, size=120)
    scores = torch.rand(24_000, generator=gen)
    images = torch.arange(4).repeat_interleave(6000)  # 4 RPN images of 6000 boxes
    zeros = torch.zeros(24_000, dtype=torch.int64)
    got = batched_greedy_nms(boxes, scores, zeros, images, 0.7, 1000)
    for image in range(4):
        rows = torch.nonzero(images == image)[:, 0]
        assert torch.equal(got[image * 1000 : (image + 1) * 1000],
                           rows[nms(boxes[rows], scores[rows], 0.7)][:1000])


def test_empty_input_and_reduced_precision_inputs():
    empty = torch.zeros(0, 4)
    none = torch.zeros(0, dtype=torch.int64)
    assert batched_greedy_nms(empty, torch.zeros(0), none, none, 0.5).numel() == 0
    gen = torch.Generator().manual_seed(2)
    boxes, scores = random_boxes(gen, 400), torch.rand(400, generator=gen)
    zeros = torch.zeros(400, dtype=torch.int64)
    half = batched_greedy_nms(boxes.half(), scores.half(), zeros, zeros, 0.5)
    assert torch.equal(half, torchvision_reference(boxes.half().float(), scores.half().float(),
                                                   zeros, zeros, 0.5, -1))


def test_threshold_is_compared_strictly_as_in_real_arithmetic():
    assert strict_threshold(0.5) == 0.5
    for t in (0.3, 0.6, 0.7, 0.65):
        t32 = strict_threshold(t)
        above = torch.nextafter(torch.tensor(t32), torch.tensor(2.0)).item()
        assert t32 <= t < above


def test_both_methods_of_the_engine_keep_the_same_boxes():
    gen = torch.Generator().manual_seed(0)
    boxes = random_boxes(gen, 3000, span=200, size=50)
    scores = torch.rand(3000, generator=gen)
    owner = torch.randint(3, (3000,), generator=gen)
    cls = torch.randint(4, (3000,), generator=gen)
    exact = nms_per_image(boxes, scores, cls, owner, 4, 0.5, 7, "exact")
    assert torch.equal(exact, nms_per_image(boxes, scores, cls, owner, 4, 0.5, 7, "torchvision"))
    assert torch.equal(owner[exact], torch.sort(owner[exact]).values)  # grouped by image
    with pytest.raises(ValueError, match="NMS method"):
        nms_per_image(boxes, scores, cls, owner, 4, 0.5, 7, "fast")
