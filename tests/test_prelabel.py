"""`tridentloop prelabel` on image files: the stream gives the engine's detections, results
and progress survive a stop, failures are reported, uncertainty ranks doubtful images."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import fsspec
import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

from backend.cli import main
from backend.detection.predictor import Predictor
from backend.detection.structures import Detections
from backend.detection.tiling import TilingOptions
from backend.labelstudio.retry import OutageError, with_retry
from backend.prelabel.sinks import read_results
from backend.prelabel.sources import FileLoader, Item, image_files
from backend.prelabel.stream import detect_stream
from backend.synthetic import survey_scene
from backend.uncertainty import (
    class_weights,
    counterparts,
    disagreement,
    entropy,
    least_confidence,
    score,
)

from .conftest import D2_FIXTURES, REPO, assert_same_detections, expected_detections, fixture_dir

TILING = TilingOptions(tile_size=320, overlap=0.2)


def _as_records(det: Detections) -> list[dict]:
    return [
        {"box": b, "score": s, "class_id": c}
        for b, s, c in zip(det.boxes.tolist(), det.scores.tolist(), det.classes.tolist(),
                           strict=True)
    ]


def test_stream_gives_each_image_the_engines_tiled_detections(fpn_predictor, survey):
    files = image_files(str(survey["root"]))
    results = list(detect_stream([Item(f) for f in files], FileLoader(), [fpn_predictor],
                                 TILING, workers=3))
    assert sorted(r.item.uri for r in results) == files  # every image, once
    for result in results:
        if result.item.uri.endswith("broken.jpg"):
            assert "broken.jpg: cannot be decoded" in result.error
            continue
        image = FileLoader()(result.item)
        expected = fpn_predictor.detect(image, TILING)
        assert torch.equal(result.detections[0].boxes, expected.boxes)
        assert torch.equal(result.detections[0].scores, expected.scores)
        assert (result.height, result.width) == image.shape[:2]


def test_single_tile_images_share_batches_across_images(fpn_predictor, monkeypatch):
    """Camera-trap photos are one crop each: crops of one shape from different images fill
    a batch together instead of running one by one."""
    predictor = Predictor(fpn_predictor.model, "cpu", batch_size=4)
    rng = np.random.default_rng(5)
    images = [survey_scene(rng, 320, 400, 5).image for _ in range(6)]
    batches: list[int] = []
    run = predictor.predict_prepared

    def recording(prepared):
        batches.append(len(prepared))
        return run(prepared)

    monkeypatch.setattr(predictor, "predict_prepared", recording)
    results = list(detect_stream(range(6), images.__getitem__, [predictor], None, workers=2))
    assert sum(batches) == 6 and max(batches) > 1
    for result in results:
        # Boxes of exactly equal score may come in either order, as NMS leaves them.
        alone = fpn_predictor(images[result.item])
        assert np.allclose(_canonical(result.detections[0]), _canonical(alone), atol=1e-2)


def _canonical(det: Detections) -> np.ndarray:
    rows = np.column_stack([det.scores.numpy(), det.classes.numpy(), det.boxes.numpy()])
    return rows[np.lexsort(rows.T[::-1])]


def test_stream_stops_its_workers_when_closed(fpn_predictor, survey):
    items = [Item(f) for f in image_files(str(survey["root"]))] * 50
    stream = detect_stream(items, FileLoader(), [fpn_predictor], TILING, workers=2)
    next(stream)
    stream.close()
    time.sleep(0.5)
    assert not [t for t in threading.enumerate() if t.name.startswith("prelabel-decode")]


def test_folder_job_writes_results_coco_and_a_report_and_resumes(survey, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    args = ["prelabel", "--images", str(survey["root"]), "--model", str(survey["model"]),
            "--output", str(out), "--coco", str(tmp_path / "coco.json"), "--device", "cpu",
            "--tile-size", "320"]
    assert main([*args, "--limit", "3"]) == 1  # the broken file is among the first three
    first = read_results(out)
    assert len(first) == 3  # the broken file has its line, with the error, as predict's
    (failed,) = [r for r in first if "error" in r]
    assert failed["image"].endswith("broken.jpg")
    report = json.loads((tmp_path / "out.report.json").read_text())
    assert report["failed"][0]["image"].endswith("broken.jpg")
    assert (report["done"], report["model_version"]) == (2, "survey-v1")

    # A kill mid-write leaves half a line: it is dropped and that image redone.
    out.write_text(out.read_text() + '{"image": "half')
    main(args)
    records = read_results(out)  # each image's last line
    assert len(records) == 5 and sum("error" in r for r in records) == 1
    assert "3 image(s) to do, 2 already done" in capsys.readouterr().err  # broken: retried
    record = next(r for r in records if "error" not in r)
    assert record["model_version"] == "survey-v1" and 0 <= record["uncertainty"] <= 1
    assert {"box", "score", "class_id", "label"} <= set(record["detections"][0])

    coco = COCO(str(tmp_path / "coco.json"))  # pycocotools reads it, info() included
    coco.info()
    assert len(coco.getImgIds()) == 4  # COCO has no place for a failure
    assert len(coco.getAnnIds()) == sum(len(r.get("detections") or []) for r in records)
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["Elephant", "zebra", "BIRD"]


def test_images_are_read_from_any_fsspec_url(survey, tmp_path):
    fs = fsspec.filesystem("memory")
    for path in sorted(survey["root"].glob("img*.png"))[:2]:
        fs.pipe(f"/bucket/flight1/{path.name}", path.read_bytes())
    found = image_files("memory://bucket/flight1/*.png")
    assert [f.rsplit("/", 1)[-1] for f in found] == ["img0.png", "img1.png"]
    assert all(f.startswith("memory://") for f in found)  # URLs that open as they are
    out = tmp_path / "bucket.jsonl"
    assert main(["prelabel", "--images", "memory://bucket/flight1", "--model",
                 str(survey["model"]), "--output", str(out), "--device", "cpu"]) == 0
    assert len(out.read_text().splitlines()) == 2


def test_missing_images_and_output_are_clear_errors(survey, tmp_path, capsys):
    model = ["--model", str(survey["model"]), "--device", "cpu"]
    assert main(["prelabel", "--images", str(tmp_path / "nowhere"), *model,
                 "--output", str(tmp_path / "o.jsonl")]) == 2
    assert "no such file, folder or glob match" in capsys.readouterr().err
    assert main(["prelabel", "--images", str(survey["root"]), *model]) == 2
    assert "--images needs --output" in capsys.readouterr().err


def test_ctrl_c_stops_cleanly_and_a_rerun_finishes_the_rest(survey, tmp_path):
    root = tmp_path / "many"
    root.mkdir()
    rng = np.random.default_rng(5)
    for i in range(30):  # ~30 s of work: the interrupt lands mid-run on a busy machine too
        Image.fromarray(survey_scene(rng, 320, 320, 4).image).save(root / f"s{i:02d}.png")
    out = tmp_path / "many.jsonl"
    cmd = [sys.executable, "-m", "backend.cli", "prelabel", "--images", str(root), "--model",
           str(survey["model"]), "--output", str(out), "--device", "cpu", "--threads", "1"]
    # as a terminal's Ctrl-C finds it: SIGINT at its default, whatever the suite's own
    # process inherited or set (an ignored SIGINT is inherited across exec)
    proc = subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while (not out.exists() or not out.read_text()) and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "run the same command to resume" in err
    saved = [json.loads(line)["image"] for line in out.read_text().splitlines()]
    assert 1 <= len(saved) < 30
    assert json.loads((tmp_path / "many.report.json").read_text())["interrupted"]

    rerun = subprocess.run(cmd, cwd=REPO, stderr=subprocess.PIPE, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{30 - len(saved)} image(s) to do, {len(saved)} already done" in rerun.stderr
    images = [json.loads(line)["image"] for line in out.read_text().splitlines()]
    assert sorted(images) == sorted(str(p) for p in root.glob("*.png"))


def _det(scores, boxes=None, classes=None) -> Detections:
    n = len(scores)
    boxes = boxes if boxes is not None else [[10.0 * i, 0, 10.0 * i + 8, 8] for i in range(n)]
    return Detections(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                      torch.tensor(scores, dtype=torch.float32),
                      torch.tensor(classes if classes is not None else [0] * n,
                                   dtype=torch.int64))


def test_uncertainty_is_highest_for_coin_flip_boxes_and_stays_within_0_and_1():
    sure, doubtful = _det([0.99, 0.98]), _det([0.99, 0.5])
    assert least_confidence(_det([])) == entropy(_det([])) == 0.0
    assert least_confidence(sure) < 0.05 and least_confidence(doubtful) == pytest.approx(1.0)
    assert entropy(_det([0.5])) == pytest.approx(0.5)  # one coin flip: 1 bit
    assert entropy(_det([0.5, 0.5])) == pytest.approx(0.75)
    # Several doubtful boxes outrank one under entropy; least confidence cannot tell.
    assert entropy(_det([0.5, 0.6, 0.4])) > entropy(_det([0.5, 0.99, 0.99]))


def test_rare_animals_put_the_frames_of_a_scarce_class_first():
    """A pool whose answers are known: likely-animals puts the frames with animals before
    the rock and the empty frame; weighted by the labelled boxes (2 birds, 90 zebras) the
    frame with one likely bird comes before the frame of two likely zebras."""
    labels = ["Elephant", "Zebra", "Bird"]
    pool = {"empty": _det([]), "rock": _det([0.1]), "zebras": _det([0.7, 0.6], classes=[1, 1]),
            "bird": _det([0.7], classes=[2])}

    def ranked(method, weights=None) -> list[str]:
        return sorted(pool, key=lambda name: -score(method, [pool[name]], None, weights))

    labelled = class_weights(labels, {"Elephant": 60, "Zebra": 90, "Bird": 2})
    assert ranked("likely-animals") == ["zebras", "bird", "rock", "empty"]
    assert ranked("rare-animals", labelled) == ["bird", "zebras", "rock", "empty"]
    assert ranked("rare-animals") == ranked("likely-animals")  # no counts: every weight 1
    balanced = class_weights(labels, {"Elephant": 5, "Zebra": 5, "Bird": 5})
    assert balanced.tolist() == pytest.approx([1.0, 1.0, 1.0])
    assert all(0 <= score("rare-animals", [d], None, labelled) < 1 for d in pool.values())


def test_select_counts_the_labelled_boxes_per_label_without_cancelled_annotations():
    from pipelines.select import labelled_boxes

    def annotation(*labels: str, cancelled: bool = False) -> dict:
        return {"was_cancelled": cancelled, "result": [
            {"type": "rectanglelabels", "value": {"rectanglelabels": [label]}}
            for label in labels]}

    tasks = [{"annotations": [annotation("Zebra", "Zebra", "Bird")]},
             {"annotations": [annotation("Zebra"), annotation("Bird", cancelled=True)]},
             {"annotations": []}]
    assert labelled_boxes(tasks) == {"Zebra": 3, "Bird": 1}


def test_prelabel_weighs_classes_by_the_labelled_boxes_it_is_given(survey, tmp_path, capsys):
    """`--labelled-boxes`: each image's rare-animals score is its boxes' scores weighted by
    their class's rarity among the counts given (the model's labels: Elephant, zebra,
    BIRD)."""
    labelled = {"Elephant": 500, "zebra": 40}
    weights = class_weights(["Elephant", "zebra", "BIRD"], labelled).tolist()
    out = tmp_path / "weighted.jsonl"
    common = ["prelabel", "--images", str(survey["root"]), "--model", str(survey["model"]),
              "--device", "cpu", "--tile-size", "320", "--uncertainty", "rare-animals"]
    assert main([*common, "--output", str(out), "--labelled-boxes",
                 json.dumps(labelled)]) == 1  # the broken file
    records = [r for r in read_results(out) if "error" not in r]
    assert len(records) == 4 and any(r["detections"] for r in records)
    for record in records:
        expected = sum(d["score"] * weights[d["class_id"]] for d in record["detections"])
        assert record["uncertainty"] == pytest.approx(expected / (expected + 1), rel=1e-4)
    with pytest.raises(SystemExit):
        main([*common, "--output", str(out), "--labelled-boxes", '["zebra"]'])
    assert "expected an object of label names and box counts" in capsys.readouterr().err


def test_disagreement_is_zero_for_agreeing_views_and_one_for_disjoint():
    a = _det([0.9, 0.6])
    assert disagreement(a, a) == pytest.approx(0.0)
    assert disagreement(a, _det([])) == 1.0
    shifted = _det([0.9, 0.6], boxes=[[100, 100, 108, 108], [200, 0, 208, 8]])
    assert disagreement(a, shifted) == 1.0
    other_class = _det([0.9, 0.6], classes=[1, 1])
    assert disagreement(a, other_class) == 1.0
    assert 0 < disagreement(a, _det([0.9])) < 1


def test_branch_counterpart_of_tridentnet_fast_is_detectron2s_all_branch_model():
    d = fixture_dir("tridentnet_fast_R_50_C4_1x")
    fast = Predictor.from_files(d / "config.yaml", d / "model_final.pth", device="cpu")
    (all_branches,) = counterparts("disagreement", fast)
    shared = dict(all_branches.model.named_parameters())
    assert all(p.data_ptr() == shared[n].data_ptr() for n, p in fast.model.named_parameters())
    image = FileLoader()(Item(str(D2_FIXTURES / "input.png")))
    got = _as_records(all_branches(image))
    assert_same_detections(got, expected_detections("tridentnet_3branch_R_50_C4_1x")["detections"])


def test_disagreement_needs_a_tridentnet(fpn_predictor):
    with pytest.raises(ValueError, match=r"no MODEL\.TRIDENT section"):
        counterparts("disagreement", fpn_predictor)


def test_outages_are_retried_with_back_off_and_other_errors_are_not():
    import httpx

    waits: list[float] = []
    calls = iter([httpx.ConnectError("down"), httpx.ConnectError("down"), "ok"])

    def flaky():
        value = next(calls)
        if isinstance(value, Exception):
            raise value
        return value

    assert with_retry(flaky, "import", sleep=waits.append) == "ok"
    assert waits == [1.0, 2.0]
    with pytest.raises(OutageError, match="run the same command to resume"):
        with_retry(lambda: (_ for _ in ()).throw(httpx.ConnectError("down")), "import",
                   give_up_after=0.5, sleep=lambda s: None)
    with pytest.raises(KeyError):
        with_retry(lambda: {}["missing"], "import", sleep=waits.append)


def test_diversity_takes_one_image_per_cluster_before_a_second_of_any():
    """Three clusters of embeddings (three near-copies of one herd, two of another, one
    lone frame), the copies scored highest: a batch of three takes one of each, where
    ranking alone (all in one folder) would take the three copies."""
    from pipelines.select import diverse, spread

    rng = np.random.default_rng(0)
    centres = torch.eye(8)[:3] * 4
    members = [0, 0, 0, 1, 1, 2]
    vectors = centres[members] + 0.05 * torch.from_numpy(rng.normal(size=(6, 8))).float()
    pool = [{"id": i, "uncertainty": u, "group": "flight1"}
            for i, u in enumerate([0.9, 0.89, 0.88, 0.5, 0.49, 0.3])]
    assert [c["id"] for c in spread(pool, 3)] == [0, 1, 2]
    assert [c["id"] for c in diverse(pool, vectors, 3)] == [0, 3, 5]
    assert len(diverse(pool, vectors, 10)) == 6 and diverse([], torch.zeros(0, 8), 3) == []


def test_selection_takes_the_most_uncertain_spread_across_folders():
    from pipelines.select import group_of, spread

    assert group_of("s3://survey/flight2/img7.jpg") == "s3://survey/flight2"
    assert group_of("/data/local-files/?d=traps/station4/x.jpg") == "traps/station4"
    pool = [{"id": i, "uncertainty": u, "group": g} for i, (u, g) in enumerate(
        [(0.9, "a"), (0.89, "a"), (0.88, "a"), (0.5, "b"), (0.4, "c"), (0.1, "b")])]
    assert [c["id"] for c in spread(pool, 4)] == [0, 3, 4, 1]  # one per folder, then again
    assert [c["id"] for c in spread(pool, 10)] == [0, 3, 4, 1, 5, 2]
    assert spread([], 5) == []
