"""`tridentloop prelabel --project` against a real Label Studio: predictions imported with
the model version and an uncertainty score, unreadable images reported, an outage in the
middle of the import ridden out, and a rerun that redoes nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import numpy as np
import pytest
import yaml
from label_studio_sdk import LabelStudio

from backend.cli import main
from backend.detection.tiling import TilingOptions
from backend.imagery.images import load_image
from backend.labelstudio.label_config import parse_label_config
from backend.labelstudio.local import import_image
from backend.labelstudio.results import rectangle_results
from backend.model_dir import ModelDir
from backend.models import SAVANNA_V1
from backend.registry import Registry
from backend.synthetic import PoolSettings, label_config, png_bytes, survey_pool, survey_scene
from backend.thresholds import ScoreThresholds
from backend.uncertainty import entropy

from .conftest import REPO
from .servers import ANIMAL_CONFIG, FlakyProxy, make_model_dir

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(label_studio, tmp_path_factory):
    root = tmp_path_factory.mktemp("prelabel-project")
    ls = LabelStudio(base_url=label_studio.url, api_key=label_studio.token)
    created = ls.projects.create(title="survey pool", label_config=ANIMAL_CONFIG)
    rng = np.random.default_rng(11)
    images = {}
    for i, (h, w) in enumerate([(400, 560), (320, 320), (360, 300)]):
        images[f"pool{i}.png"] = png_bytes(survey_scene(rng, h, w, 5).image)
        import_image(label_studio, created.id, f"pool{i}.png", images[f"pool{i}.png"])
    import_image(label_studio, created.id, "corrupt.png", b"\x89PNG\r\n\x1a\n cut short")
    model = make_model_dir(root / "model", version="pool-v1")
    return {"ls": ls, "id": created.id, "images": images, "model": model, "root": root}


def _tasks(project) -> dict[str, dict]:
    tasks = project["ls"].tasks.list(project=project["id"], fields="all")
    return {t.data["image"].rsplit("-", 1)[-1]: t.model_dump() for t in tasks}


def test_prelabel_imports_predictions_through_an_outage(project, label_studio, monkeypatch):
    args = ["prelabel", "--project", str(project["id"]), "--model", str(project["model"]),
            "--device", "cpu", "--tile-size", "320", "--chunk", "2",
            "--uncertainty", "entropy", "--report", str(project["root"] / "report.json")]
    with FlakyProxy(label_studio.url, "/import/predictions", failures=2) as proxy:
        monkeypatch.setenv("LABEL_STUDIO_URL", proxy.url)
        monkeypatch.setenv("LABEL_STUDIO_API_KEY", label_studio.token)
        assert main(args) == 1  # the corrupt image failed, and the run says so
        assert proxy.refused == 2  # both refusals were retried, nothing was lost

    report = json.loads((project["root"] / "report.json").read_text())
    assert report["done"] == 3 and [f["image"] for f in report["failed"]] == [
        _tasks(project)["corrupt.png"]["data"]["image"]]

    model = ModelDir.open(project["model"])
    predictor = model.predictor(device="cpu")
    (control, class_map), = parse_label_config(ANIMAL_CONFIG).usable(model.labels)
    for name, data in project["images"].items():
        (prediction,) = _tasks(project)[name]["predictions"]
        image = load_image(data)
        det = predictor.detect(image, TilingOptions(tile_size=320))
        expected = rectangle_results(det, image.shape[1], image.shape[0], control, class_map,
                                     ScoreThresholds.uniform(0.5, "test"))
        assert prediction["model_version"] == "pool-v1"
        assert prediction["score"] == pytest.approx(entropy(det), rel=1e-5)
        assert [r["value"]["rectanglelabels"] for r in prediction["result"]] == [
            r["value"]["rectanglelabels"] for r in expected]
        for got, want in zip(prediction["result"], expected, strict=True):
            assert got["value"]["x"] == pytest.approx(want["value"]["x"], abs=1e-4)


def test_a_rerun_skips_tasks_that_have_this_versions_prediction(project, label_studio,
                                                                 monkeypatch, capsys):
    monkeypatch.setenv("LABEL_STUDIO_URL", label_studio.url)
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", label_studio.token)
    main(["prelabel", "--project", str(project["id"]), "--model", str(project["model"]),
          "--device", "cpu", "--report", str(project["root"] / "again.json")])
    assert "1 image(s) to do, 3 already done" in capsys.readouterr().err  # only the corrupt one
    assert all(len(t["predictions"]) <= 1 for t in _tasks(project).values())


def test_prelabel_refuses_a_project_whose_labels_fit_no_class(label_studio, monkeypatch,
                                                              capsys, project):
    other = project["ls"].projects.create(
        title="plants",
        label_config="<View><Image name='image' value='$image'/><RectangleLabels name='l' "
        "toName='image'><Label value='Tree'/></RectangleLabels></View>",
    )
    monkeypatch.setenv("LABEL_STUDIO_URL", label_studio.url)
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", label_studio.token)
    assert main(["prelabel", "--project", str(other.id), "--model", str(project["model"]),
                 "--device", "cpu"]) == 2
    assert "none of the model's classes" in capsys.readouterr().err


def test_select_stage_ranks_unlabeled_tasks_and_makes_a_view(project, label_studio, tmp_path):
    registry = Registry(tmp_path / "registry")
    registry.switch(registry.add(project["model"]))  # the version that pre-labelled the pool
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({
        "labelstudio": {"project": project["id"]},
        "deploy": {"registry": str(tmp_path / "registry")},
        "select": {"k": 2, "create_view": True, "output": "next.json"},
    }))
    env = {**os.environ, "PYTHONPATH": str(REPO), "LABEL_STUDIO_URL": label_studio.url,
           "LABEL_STUDIO_API_KEY": label_studio.token}
    proc = subprocess.run([sys.executable, "-m", "pipelines.select"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    chosen = json.loads((tmp_path / "next.json").read_text())
    tasks = _tasks(project)
    scores = sorted((t["predictions"][0]["score"], t["id"]) for t in tasks.values()
                    if t["predictions"])
    assert [t["id"] for t in chosen["tasks"]] == [i for _, i in reversed(scores)][:2]
    assert chosen["without_prediction"] == [tasks["corrupt.png"]["id"]]
    view_tasks = httpx.get(f"{label_studio.url}/api/tasks", params={"view": chosen["view"]},
                           headers={"Authorization": f"Token {label_studio.token}"}).json()
    assert [t["id"] for t in view_tasks["tasks"]] == [t["id"] for t in chosen["tasks"]]


def _select(tmp_path, project, label_studio, **params) -> tuple[dict, str]:
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({
        "labelstudio": {"project": project["id"]},
        "deploy": {"registry": str(tmp_path / "empty-registry")},
        "select": {"k": 2, "create_view": False, "output": "next.json", "device": "cpu"},
        **params,
    }))
    env = {**os.environ, "PYTHONPATH": str(REPO), "LABEL_STUDIO_URL": label_studio.url,
           "LABEL_STUDIO_API_KEY": label_studio.token}
    proc = subprocess.run([sys.executable, "-m", "pipelines.select"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads((tmp_path / "next.json").read_text()), proc.stdout


def test_select_with_no_model_at_all_still_gives_a_spread_sample(project, label_studio,
                                                                 tmp_path):
    """A cold start before anything is trained: never an empty batch, and the same one on
    every run."""
    chosen, printed = _select(tmp_path, project, label_studio,
                              train={"output": str(tmp_path / "no-candidate")})
    assert len(chosen["tasks"]) == 2 and chosen["model_version"] is None
    assert "no model has been trained yet, so a spread sample" in printed
    unlabeled = {t["id"] for t in _tasks(project).values()}
    assert {t["id"] for t in chosen["tasks"]} <= unlabeled
    again, _ = _select(tmp_path, project, label_studio,
                       train={"output": str(tmp_path / "no-candidate")})
    assert again["tasks"] == chosen["tasks"]


def test_select_before_any_deploy_ranks_by_the_last_candidate(project, label_studio, tmp_path):
    """Nothing deployed (the gate held the first models back) but a candidate exists: it
    ranks the pool, its predictions tagged as a candidate's, the most doubtful first."""
    chosen, printed = _select(tmp_path, project, label_studio,
                              train={"output": str(project["model"])})
    tag = chosen["model_version"]
    assert tag.startswith("candidate-") and f"ranked by the last candidate {tag}" in printed
    assert len(chosen["tasks"]) == 2
    tasks = _tasks(project)
    ranked = sorted(((p["score"], t["id"]) for t in tasks.values() for p in t["predictions"]
                     if p["model_version"] == tag), reverse=True)
    assert [t["id"] for t in chosen["tasks"]] == [i for _, i in ranked][:2]
    # the gate held it back: its predictions order the pool and show annotators no box
    assert all(p["result"] == [] for t in tasks.values() for p in t["predictions"]
               if p["model_version"] == tag)


def test_select_before_anything_is_trained_ranks_by_the_start_models_likely_animals(
        label_studio, tmp_path):
    """A new survey of other species, mostly empty frames, nothing labelled or trained: the
    start model (savanna-v1, whose classes this project lacks) ranks the pool by the animals
    it likely finds, so the first batch holds the frames with herds, and shows no box."""
    ls = LabelStudio(base_url=label_studio.url, api_key=label_studio.token)
    steppe = ls.projects.create(title="new survey", label_config=label_config(
        ["saiga", "horse", "wolf"]))
    rng = np.random.default_rng(4)
    frames = {f"ground{i}.png": f for i, f in enumerate(survey_pool(
        rng, 4, PoolSettings(empty_fraction=1.0, confusers=0.0)))}
    frames |= {"herd0.png": survey_scene(rng, 480, 640, 6),
               "herd1.png": survey_scene(rng, 480, 640, 6)}
    for name, frame in frames.items():  # the empty frames first: a tie would pick them
        import_image(label_studio, steppe.id, name, png_bytes(frame.image))
    chosen, printed = _select(tmp_path, {"id": steppe.id}, label_studio,
                              train={"output": str(tmp_path / "no-candidate"),
                                     "base_weights": str(SAVANNA_V1)})
    assert chosen["model_version"].startswith("start-") and "the start model" in printed
    names = {t["id"]: t["image"].rsplit("-", 1)[-1] for t in chosen["tasks"]}
    assert sorted(names.values()) == ["herd0.png", "herd1.png"]
    tasks = ls.tasks.list(project=steppe.id, fields="all")
    predictions = [p for t in tasks for p in t.predictions]
    assert len(predictions) == 6 and all(p.result == [] for p in predictions)


def test_select_spread_by_embeddings_takes_one_view_of_a_herd(label_studio, tmp_path):
    """Two views of one big herd (the frame and its mirror image) outscore a small herd;
    all frames share one upload folder. Spread by folder the batch of two is both views;
    by the start model's embeddings it is one view and the other herd."""
    ls = LabelStudio(base_url=label_studio.url, api_key=label_studio.token)
    steppe = ls.projects.create(title="two views", label_config=label_config(["saiga"]))
    rng = np.random.default_rng(5)
    big = survey_scene(rng, 480, 640, 12).image
    frames = {"big.png": big, "big-mirror.png": np.ascontiguousarray(big[:, ::-1]),
              "small.png": survey_scene(rng, 480, 640, 3).image}
    frames |= {f"ground{i}.png": f.image for i, f in enumerate(survey_pool(
        rng, 2, PoolSettings(empty_fraction=1.0, confusers=0.0)))}
    for name, image in frames.items():
        import_image(label_studio, steppe.id, name, png_bytes(image))
    train = {"output": str(tmp_path / "no-candidate"), "base_weights": str(SAVANNA_V1)}

    def chosen(diversity: str) -> list[str]:
        (tmp_path / diversity).mkdir()
        picked, printed = _select(tmp_path / diversity, {"id": steppe.id}, label_studio,
                                  train=train, select={
                                      "k": 2, "create_view": False, "output": "next.json",
                                      "device": "cpu", "diversity": diversity})
        assert f"spread by {diversity}" in printed
        return sorted(t["image"].rsplit("-", 1)[-1] for t in picked["tasks"])

    assert chosen("folders") == ["big.png", "mirror.png"]
    by_model = chosen("embeddings")
    assert "small.png" in by_model and len(by_model) == 2


def _triaged(project, path, cut: int) -> tuple[dict[str, float], float]:
    """A copy of the project's model at `path` with a triage threshold between its `cut`-th
    and next frame by best score; the frames' best scores and the threshold."""
    import shutil

    shutil.copytree(project["model"], path)
    model = ModelDir.open(path)
    predictor = model.predictor(device="cpu")
    best = {name: predictor.detect(load_image(data), None).best_score()
            for name, data in project["images"].items()}
    ranked = sorted(best.values())
    threshold = (ranked[cut - 1] + ranked[cut]) / 2  # `cut` frames under it
    model.update_metadata({"version": path.name, "triage": {"threshold": threshold}})
    return best, threshold


def _tabs_shown(project) -> dict[str, set[int]]:
    from backend.labelstudio.views import EMPTY_TAB, REVIEW_TAB

    views = {v.data["title"]: v for v in project["ls"].views.list(project=project["id"])}
    return {title: set(views[title].data["filters"]["items"][0]["value"])
            for title in (EMPTY_TAB, REVIEW_TAB)}


def _assert_sorted(project, best: dict[str, float], threshold: float, empty: int) -> None:
    from backend.labelstudio.views import EMPTY_TAB, REVIEW_TAB

    tasks, shown = _tasks(project), _tabs_shown(project)
    assert shown[EMPTY_TAB] == {tasks[n]["id"] for n, b in best.items() if b < threshold}
    assert shown[REVIEW_TAB] == {tasks[n]["id"] for n, b in best.items() if b >= threshold}
    assert len(shown[EMPTY_TAB]) == empty


def test_prelabel_sorts_tasks_into_to_review_and_likely_empty_tabs(project, label_studio,
                                                                   monkeypatch, tmp_path):
    """A model with a triage threshold: the frames whose best detection scores under it go
    to a "likely empty" Data Manager tab, the others to "to review"."""
    best, threshold = _triaged(project, tmp_path / "triaged", cut=1)
    monkeypatch.setenv("LABEL_STUDIO_URL", label_studio.url)
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", label_studio.token)
    main(["prelabel", "--project", str(project["id"]), "--model", str(tmp_path / "triaged"),
          "--device", "cpu", "--report", str(tmp_path / "r.json")])
    _assert_sorted(project, best, threshold, empty=1)


def test_served_predictions_sort_tasks_into_the_same_tabs(project, label_studio, tmp_path,
                                                          caplog):
    """`serve` with a triaged model: the tasks Label Studio asks it about move into the
    tabs by the served model's verdict (here one frame more is likely empty than the
    prelabel run before said), written when the backend flushes them; a flush Label Studio
    refuses loses nothing, the next one writes it."""
    from backend.media.fetch import MediaFetcher, MediaSettings
    from backend.serving.backend import Backend, ServerSettings
    from backend.serving.jobs import TrainingJobs
    from backend.serving.model_source import ModelSource
    from backend.serving.triage_tabs import TriageTabs

    best, threshold = _triaged(project, tmp_path / "served", cut=2)
    with FlakyProxy(label_studio.url, "/api/dm/views", failures=1000) as proxy:
        tabs = TriageTabs(lambda: LabelStudio(base_url=proxy.url, api_key=label_studio.token),
                          every_s=3600)
        backend = Backend(
            ModelSource(model_dir=tmp_path / "served", device="cpu", watch_seconds=3600),
            MediaFetcher(MediaSettings(label_studio_url=label_studio.url,
                                       api_key=label_studio.token,
                                       cache_dir=tmp_path / "cache")),
            TrainingJobs("true", tmp_path, tmp_path / "jobs"), ServerSettings(), triage=tabs)
        tasks = _tasks(project)
        answer = backend.predict({"tasks": [tasks[n] for n in best],
                                  "label_config": ANIMAL_CONFIG,
                                  "project": f"{project['id']}.1733400000"})
        assert len(answer["results"]) == len(best)
        tabs.flush()  # refused
        assert proxy.refused >= 1 and "triage tabs of project" in caplog.text
        proxy.failures = proxy.refused  # Label Studio is back
        tabs.close()
    _assert_sorted(project, best, threshold, empty=2)
