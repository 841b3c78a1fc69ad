"""Shared test fixtures: detectron2 reference outputs and tiny generated data."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from backend.detection.boxes import pairwise_iou
from backend.detection.structures import Detections

REPO = Path(__file__).resolve().parents[1]
# `make gpu-check` runs from a copy of the tree alone and names the fixtures' folder.
D2_FIXTURES = Path(
    os.environ.get("TRIDENTLOOP_D2_FIXTURES") or REPO.parent / "shared" / "fixtures" / "detectron2"
)
FIXTURE_MODELS = (
    "tridentnet_fast_R_50_C4_1x",
    "tridentnet_3branch_R_50_C4_1x",
    "faster_rcnn_R_50_C4_1x",
    "faster_rcnn_R_50_FPN_1x",
)

torch.set_num_threads(min(2, os.cpu_count() or 1))


def fixture_dir(name: str) -> Path:
    path = D2_FIXTURES / name
    if not path.is_dir():
        pytest.fail(f"detectron2 reference fixtures missing at {path} (shared/ beside the repo)")
    return path


def fixture_weights(name: str) -> Path:
    """The fixture's checkpoint. The 3-branch fixture's is a symbolic link to the fast
    one's; where a copy or a checkout without symlinks (git's core.symlinks=false) turned it
    into a small file holding the link's target, the target is followed."""
    path = fixture_dir(name) / "model_final.pth"
    if path.stat().st_size < 1024:
        target = path.parent / path.read_text().strip()
        if target.is_file():
            return target
    return path


def expected_detections(name: str) -> dict:
    return json.loads((fixture_dir(name) / "expected.json").read_text())


@pytest.fixture(scope="session")
def fixture_image() -> np.ndarray:
    from backend.imagery.images import load_image

    return load_image(D2_FIXTURES / "input.png")


@pytest.fixture(scope="session")
def fpn_predictor():
    """The narrow R50-FPN fixture model on CPU: the quickest real detectron2 model."""
    from backend.detection.predictor import Predictor

    name = "faster_rcnn_R_50_FPN_1x"
    return Predictor.from_files(
        fixture_dir(name) / "config.yaml", fixture_weights(name), device="cpu"
    )


def run_predict_cli(model: str, out: Path, *images: Path, extra: tuple[str, ...] = ()) -> int:
    """`tridentloop predict` with a fixture model's config and weights, on the CPU."""
    from backend.cli import main

    return main(["predict", "--config", str(fixture_dir(model) / "config.yaml"), "--weights",
                 str(fixture_weights(model)), "--device", "cpu", "--output", str(out),
                 *extra, *map(str, images)])


def assert_same_detections(
    got: list[dict], expected: list[dict], box_tol: float = 0.01, score_tol: float = 1e-4
) -> None:
    """detectron2 fidelity: same count and order, same class, box and score within tol."""
    assert len(got) == len(expected), f"{len(got)} detections, expected {len(expected)}"
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert g["class_id"] == e["class_id"], f"detection {i}: class {g} vs {e}"
        assert max(abs(a - b) for a, b in zip(g["box"], e["box"], strict=True)) <= box_tol, (
            f"detection {i}: box {g['box']} vs {e['box']}"
        )
        assert abs(g["score"] - e["score"]) <= score_tol, f"detection {i}: score {g} vs {e}"


def twin_fraction(reference: Detections, other: Detections, min_score: float = 0.5) -> float:
    """Agreement measure: the share of reference detections scoring above `min_score` that
    have a twin in `other` (same class, IoU >= 0.95)."""
    strong = reference.scores > min_score
    if not strong.any():
        return 1.0
    iou = pairwise_iou(reference.boxes[strong], other.boxes)
    iou[reference.classes[strong][:, None] != other.classes[None, :]] = 0
    best = iou.max(dim=1).values if len(other) else torch.zeros(int(strong.sum()))
    return float((best >= 0.95).float().mean())


def as_detections(records: list[dict]) -> Detections:
    return Detections(
        torch.tensor([r["box"] for r in records]).reshape(-1, 4),
        torch.tensor([r["score"] for r in records]),
        torch.tensor([r["class_id"] for r in records], dtype=torch.int64),
    )


@contextmanager
def held_batches(predictor) -> Iterator[tuple[threading.Event, list[int]]]:
    """Hold the predictor's forward passes until the yielded gate is set, so that queued
    work piles up behind the first; records each batch's size."""
    gate = threading.Event()
    sizes: list[int] = []
    run = predictor.predict_prepared

    def held(prepared):
        gate.wait(30)
        sizes.append(len(prepared))
        return run(prepared)

    predictor.predict_prepared = held
    try:
        yield gate, sizes
    finally:
        gate.set()
        predictor.predict_prepared = run


@pytest.fixture(scope="session")
def survey(tmp_path_factory):
    """Four generated survey images (two of several tiles, two of one), one broken file."""
    from backend.synthetic import survey_scene

    from .servers import make_model_dir

    root = tmp_path_factory.mktemp("survey")
    rng = np.random.default_rng(3)
    for i, (h, w) in enumerate([(400, 600), (320, 320), (500, 380), (200, 300)]):
        Image.fromarray(survey_scene(rng, h, w, 6).image).save(root / f"img{i}.png")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    model = make_model_dir(tmp_path_factory.mktemp("models") / "m", version="survey-v1")
    return {"root": root, "model": model}


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory):
    """A real Label Studio server for the whole test session (first start ~50 s)."""
    from backend.labelstudio.local import local_label_studio

    with local_label_studio(tmp_path_factory.mktemp("label-studio")) as server:
        yield server
