"""What the smart tools add over the pre-labels, as specifications of `interactive.answer`:
a rectangle around an animal too small for the normal pass gets it from the zoomed pass,
and an Alt-click removes exactly the box under it. The detector here is a stand-in that
needs pixels (it sees a bright blob only when the blob spans 24 px or more), so which pass
finds what is known exactly."""

from __future__ import annotations

import numpy as np
import torch

from backend.detection.structures import Detections
from backend.detection.tiling import TilingOptions
from backend.labelstudio.label_config import RectangleControl
from backend.serving.interactive import Prompt, Target, answer

TARGET = Target(RectangleControl("label", "image", "image", ("Zebra",)), {0: "Zebra"})
MIN_PIXELS = 24


def _boxes(boxes: list[list[float]], scores: list[float], size: tuple[int, int]) -> Detections:
    return Detections(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                      torch.tensor(scores), torch.zeros(len(scores), dtype=torch.int64), size)


def needs_pixels(image: np.ndarray) -> Detections:
    """The bright blob's box when it spans at least MIN_PIXELS, nothing otherwise."""
    ys, xs = np.nonzero(image[..., 0] > 128)
    size = image.shape[:2]
    if len(xs) == 0 or min(np.ptp(xs), np.ptp(ys)) + 1 < MIN_PIXELS:
        return _boxes([], [], size)
    return _boxes([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], [0.9], size)


def _percent(x0: float, y0: float, x1: float, y1: float, width: int, height: int) -> dict:
    return {"x": 100 * x0 / width, "y": 100 * y0 / height,
            "width": 100 * (x1 - x0) / width, "height": 100 * (y1 - y0) / height}


def test_a_rectangle_around_an_animal_too_small_for_the_normal_pass_gets_it_zoomed():
    height, width = 1200, 1600
    image = np.zeros((height, width, 3), np.uint8)
    image[600:610, 800:810] = 255  # 10 px: the normal pass cannot see it
    normal = needs_pixels(image)
    assert len(normal) == 0
    drawn = _percent(790, 590, 820, 620, width, height)
    prompt = Prompt("rectangle", "image", None, drawn["x"], drawn["y"], drawn["width"],
                    drawn["height"])
    (region,) = answer([prompt], image, normal, TARGET, TilingOptions(tile_size=320),
                       needs_pixels, threshold=0.2)
    found = region["value"]
    for key, want in _percent(800, 600, 810, 610, width, height).items():
        assert abs(found[key] - want) < 0.05, (key, found[key], want)
    assert found["rectanglelabels"] == ["Zebra"]


def test_an_alt_click_removes_exactly_the_box_under_it_and_other_clicks_still_answer():
    """Two overlapping animals under one click, the larger scoring higher: an Alt-click on
    the larger's edge leaves the smaller; a click elsewhere still boxes its animal."""
    height, width = 800, 800
    image = np.zeros((height, width, 3), np.uint8)
    normal = _boxes([[100, 100, 300, 300], [180, 180, 260, 260], [500, 500, 560, 560]],
                    [0.9, 0.8, 0.7], (height, width))

    def click(x: float, y: float, positive: bool = True) -> Prompt:
        return Prompt("point", "image", None, 100 * x / width, 100 * y / height,
                      positive=positive)

    def boxes(prompts: list[Prompt]) -> list[tuple[float, ...]]:
        regions = answer(prompts, image, normal, TARGET, TilingOptions(tile_size=320),
                         needs_pixels, threshold=0.2)
        return [tuple(round(r["value"][k] * width / 100) for k in ("x", "y", "width", "height"))
                for r in regions]

    assert boxes([click(200, 200)]) == [(100, 100, 200, 200)]  # the best box under it
    assert boxes([click(200, 200), click(120, 120, positive=False), click(530, 530)]) == [
        (180, 180, 80, 80), (500, 500, 60, 60)]
