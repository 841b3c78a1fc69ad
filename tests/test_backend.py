"""The ML backend over real HTTP: protocol answers, results equal to the engine's, registry
hot reload, training jobs, basic auth and bad input."""

from __future__ import annotations

import base64
import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from backend.imagery.images import load_image
from backend.media.fetch import MediaFetcher, MediaSettings
from backend.model_dir import ModelDir
from backend.registry import Registry
from backend.serving.auth import BasicAuth
from backend.serving.backend import Backend, ServerSettings
from backend.serving.jobs import TrainingJobs
from backend.serving.model_source import ModelSource

from .servers import ANIMAL_CONFIG as CONFIG
from .servers import make_model_dir, serve_in_thread, wait_until


@pytest.fixture(scope="module")
def world(tmp_path_factory, fixture_image):
    root = tmp_path_factory.mktemp("backend")
    registry = Registry(root / "registry")
    for version in ("v1", "v2"):
        registry.add(make_model_dir(root / f"src-{version}", version=version))
    registry.switch("v1")
    images = root / "images"
    images.mkdir()
    Image.fromarray(fixture_image[:480, :640]).save(images / "small.png")
    Image.fromarray(
        np.ascontiguousarray(np.concatenate([fixture_image, fixture_image[:200]]))
    ).save(images / "large.png")  # 800 wide, 1000 high: whole (no recipe), as DefaultPredictor
    (images / "broken.png").write_bytes(b"\x89PNG not really")
    marker = root / "runs.txt"
    command = (
        f"{sys.executable} -c \"import time,sys; f=open('{marker}','a'); "
        "f.write(f'start {time.time()}\\n'); f.flush(); time.sleep(1.0); "
        "f.write(f'end {time.time()}\\n')\""
    )
    backend = Backend(
        ModelSource(registry=registry, device="cpu"),
        MediaFetcher(MediaSettings(local_roots=[images], cache_dir=root / "cache")),
        TrainingJobs(command, root, root / "jobs"),
        ServerSettings(score_threshold=0.5, basic_auth=BasicAuth(b"annotator", b"s3cret")),
    )
    with serve_in_thread(backend) as url:
        yield {
            "url": url,
            "registry": registry,
            "images": images,
            "marker": marker,
            "backend": backend,
        }


def client(world, auth=("annotator", "s3cret")) -> httpx.Client:
    return httpx.Client(base_url=world["url"], auth=auth, timeout=120)


def task(task_id: int, image: str) -> dict:
    return {"id": task_id, "data": {"image": image}, "annotations": [], "predictions": []}


def predict(world, tasks, **extra) -> httpx.Response:
    body = {
        "tasks": tasks,
        "project": "7.1795377860",
        "label_config": CONFIG,
        "params": {"login": None, "password": None, "context": None},
        **extra,
    }
    with client(world) as c:
        return c.post("/predict", json=body)


def expected_regions(path: Path, threshold: float = 0.5) -> list[dict]:
    """What the engine says for this image, run by the served model's recipe (none stored:
    whole, as DefaultPredictor), as percent boxes."""
    model = ModelDir.open(Registry(path.parents[1] / "registry").current().path)
    image = load_image(path)
    det = model.predictor(device="cpu").detect(image, model.recipe)
    height, width = image.shape[:2]
    names = {0: "Elephant", 1: "Zebra", 2: "Avian"}
    return [
        {
            "label": names[c],
            "score": s,
            "box": [
                100 * b[0] / width,
                100 * b[1] / height,
                100 * (b[2] - b[0]) / width,
                100 * (b[3] - b[1]) / height,
            ],
        }
        for b, s, c in zip(
            det.boxes.tolist(), det.scores.tolist(), det.classes.tolist(), strict=True
        )
        if s >= threshold
    ]


def test_health_is_up_with_the_model_version(world):
    answer = httpx.get(world["url"] + "/health").json()
    assert answer["status"] == "UP" and answer["model_version"] == "v1"


def test_setup_answers_the_model_version(world):
    with client(world) as c:
        r = c.post(
            "/setup",
            json={
                "project": "7.1795377860",
                "schema": CONFIG,
                "hostname": "http://localhost:8080",
                "access_token": "x",
                "extra_params": {},
            },
        )
    assert r.status_code == 200 and r.json() == {"model_version": "v1"}


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        (
            "<View><Image name='i' value='$image'/><Choices name='c' toName='i'/></View>",
            "no <RectangleLabels>",
        ),
        (
            "<View><Image name='i' value='$image'/><RectangleLabels name='r' toName='i'>"
            "<Label value='Car'/></RectangleLabels></View>",
            "none of the model's classes",
        ),
        ("<View><Image", "label config is not valid"),
    ],
)
def test_setup_rejects_configs_it_cannot_serve(world, schema, message):
    with client(world) as c:
        r = c.post("/setup", json={"project": "8.1", "schema": schema})
    assert r.status_code == 400 and message in r.json()["error"]


def test_predictions_equal_the_engine_in_percent_of_the_original(world):
    images = world["images"]
    r = predict(world, [task(1, str(images / "small.png")), task(2, str(images / "large.png"))])
    assert r.status_code == 200
    results = r.json()["results"]
    assert len(results) == 2
    for answer, name in zip(results, ("small.png", "large.png"), strict=True):
        expected = expected_regions(images / name)
        assert answer["model_version"] == "v1"
        regions = answer["result"]
        assert len(regions) == len(expected) > 0
        for region, want in zip(regions, expected, strict=True):
            value = region["value"]
            assert region["type"] == "rectanglelabels"
            assert (region["from_name"], region["to_name"]) == ("label", "image")
            assert value["rectanglelabels"] == [want["label"]]
            got = [value["x"], value["y"], value["width"], value["height"]]
            assert got == pytest.approx(want["box"], abs=1e-3)
            assert region["score"] == pytest.approx(want["score"], abs=1e-5)
        width, height = Image.open(images / name).size
        assert {(r["original_width"], r["original_height"]) for r in regions} == {(width, height)}
        # The task score is the image's uncertainty (error-rate: expected errors per
        # expected object), over every box the model kept.
        every = [r["score"] for r in expected_regions(images / name, threshold=0.0)]
        errors = sum(min(s, 1 - s) for s in every) / (sum(every) + 1)
        assert answer["score"] == pytest.approx(errors, abs=1e-5)


def test_threshold_from_setup_extra_params_wins(world):
    with client(world) as c:
        c.post(
            "/setup",
            json={"project": "9.5", "schema": CONFIG, "extra_params": {"score_threshold": 0.95}},
        )
        body = {"tasks": [task(1, str(world["images"] / "small.png"))], "project": "9.5"}
        regions = c.post("/predict", json=body).json()["results"][0]["result"]
    assert regions and all(r["score"] >= 0.95 for r in regions)
    assert len(regions) < len(expected_regions(world["images"] / "small.png"))


def test_a_bad_task_gets_an_empty_result_and_the_others_are_served(world):
    images = world["images"]
    r = predict(
        world,
        [
            task(1, str(images / "broken.png")),
            task(2, str(images / "small.png")),
            task(3, "/etc/passwd"),
            task(4, str(images / "absent.png")),
            {"id": 5, "data": {}},
        ],
    )
    results = r.json()["results"]
    assert r.status_code == 200 and len(results) == 5
    assert [len(a["result"]) > 0 for a in results] == [False, True, False, False, False]
    assert all(a["model_version"] == "v1" for a in results)


def test_malformed_and_oversized_requests_are_refused_clearly(world):
    with client(world) as c:
        bad = c.post("/predict", content=b"{not json", headers={"content-type": "application/json"})
        assert bad.status_code == 400 and "malformed JSON" in bad.json()["error"]
        assert c.post("/predict", json=[1, 2]).status_code == 400
        assert c.post("/predict", json={"tasks": "nope"}).status_code == 400
        huge = c.post("/predict", content=b"x" * (33 * 1024**2))
        assert huge.status_code == 413 and "exceeds" in huge.json()["error"]
        assert c.get("/health").status_code == 200  # and it keeps serving


def test_basic_auth_rejects_wrong_credentials(world):
    body = {"tasks": [], "project": "7.1", "label_config": CONFIG}
    for auth in (None, ("annotator", "wrong")):
        r = httpx.post(world["url"] + "/predict", json=body, auth=auth)
        assert r.status_code == 401 and "basic auth" in r.json()["error"]
    with client(world) as c:
        assert c.post("/predict", json=body).status_code == 200


def test_annotation_webhooks_are_counted_without_auth(world):
    for _ in range(2):
        r = httpx.post(world["url"] + "/webhook", json={"action": "ANNOTATION_CREATED"}, timeout=1)
    assert r.status_code == 200 and r.json()["count"] == 2
    r = httpx.post(world["url"] + "/webhook", json={"action": "START_TRAINING"}, timeout=1)
    assert r.status_code == 401


def test_training_runs_are_queued_and_never_overlap(world):
    with client(world) as c:
        started = time.monotonic()
        first = c.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 7}})
        assert time.monotonic() - started < 1.0  # Label Studio waits only 1 s
        job = first.json()["job"]
        time.sleep(0.3)
        second = c.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 7}})
        third = c.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 7}})
        assert second.json()["job"] == third.json()["job"] != job  # one waiting run, shared
        deadline = time.monotonic() + 30
        while c.get(f"/jobs/{second.json()['job']}").json()["status"] != "succeeded":
            assert time.monotonic() < deadline
            time.sleep(0.2)
        status = c.get(f"/jobs/{job}").json()
        assert status["status"] == "succeeded" and status["returncode"] == 0
        assert "time.sleep" in status["log_tail"]
        assert c.get("/jobs/nope").status_code == 404
    lines = world["marker"].read_text().split()
    stamps = [float(v) for v in lines[1::2]]
    assert lines[0::2] == ["start", "end", "start", "end"]
    assert stamps[1] <= stamps[2]  # the second run started after the first ended


def test_a_webhook_from_another_project_fails_clearly_instead_of_training_this_one(tmp_path):
    """The loop's project lives in params.yaml alone (dvc.lock records it): a webhook from
    another project is refused with the fix, never run on this project's data."""
    (tmp_path / "params.yaml").write_text("labelstudio:\n  project: 1\n")
    jobs = TrainingJobs("true", tmp_path, tmp_path / "jobs")
    other = jobs.request("webhook", "3")
    wait_until(lambda: other.status not in ("queued", "running"), 30, "the job settled")
    assert other.status == "failed"
    assert "project 3" in other.note and "labelstudio.project" in other.note
    assert "project 3" in Path(other.log_path).read_text()
    same = jobs.request("webhook", "1")
    wait_until(lambda: same.status not in ("queued", "running"), 30, "the job settled")
    assert same.status == "succeeded"


def test_registry_switch_changes_the_version_without_failing_requests(world):
    registry = world["registry"]
    body = [task(1, str(world["images"] / "small.png"))]
    failures, versions = [], set()
    stop = threading.Event()

    def hammer():
        while not stop.is_set():
            r = predict(world, body)
            if r.status_code != 200:
                failures.append(r.status_code)
            else:
                versions.add(r.json()["results"][0]["model_version"])

    with ThreadPoolExecutor(3) as pool:
        for _ in range(3):
            pool.submit(hammer)
        time.sleep(1.0)
        registry.switch("v2")
        time.sleep(4.0)
        stop.set()
    assert not failures
    assert "v2" in versions
    assert predict(world, body).json()["results"][0]["model_version"] == "v2"
    with client(world) as c:
        listed = c.get("/versions").json()
    assert listed["versions"] == ["v1", "v2"] and listed["current"] == "v2"
    registry.switch("v1")


def test_health_and_setup_name_a_new_deployment_without_a_predict_first(world):
    """The registry's watcher reloads on its own: /health, which must never block, names
    the new version within seconds, and /setup names it at once."""
    registry = world["registry"]

    def health_names(c: httpx.Client, version: str) -> None:
        deadline = time.monotonic() + 30
        while c.get("/health").json()["model_version"] != version:
            assert time.monotonic() < deadline, f"/health does not name {version}"
            time.sleep(0.2)

    with client(world) as c:
        health_names(c, "v1")  # an earlier test may have just switched back
        registry.switch("v2")
        health_names(c, "v2")
        registry.switch("v1")
        setup = c.post("/setup", json={"project": "1", "schema": CONFIG})
        assert setup.json()["model_version"] == "v1"


def test_a_request_during_a_reload_waits_for_the_new_version(tmp_path, monkeypatch):
    """The watcher noticed a deploy and is still loading it: a request that arrives then is
    answered by the new version, not the old one (seen once through Label Studio)."""
    registry = Registry(tmp_path / "registry")
    for version in ("v1", "v2"):
        registry.add(make_model_dir(tmp_path / version, version=version))
    registry.switch("v1")
    source = ModelSource(registry=registry, device="cpu", watch_seconds=3600)
    loading, release = threading.Event(), threading.Event()
    load = source._load

    def slow_load(model_dir, name):
        loading.set()
        release.wait(10)
        return load(model_dir, name)

    monkeypatch.setattr(source, "_load", slow_load)
    registry.switch("v2")
    with ThreadPoolExecutor(2) as pool:
        watcher = pool.submit(source.get)
        assert loading.wait(10)
        request = pool.submit(source.get)
        time.sleep(0.2)
        release.set()
        assert (watcher.result().version, request.result().version) == ("v2", "v2")
    source.close()


def test_a_model_json_recalibrated_in_place_is_served_without_a_restart(tmp_path):
    """`tridentloop calibrate` rewrites a served model's model.json: the next request is
    offered boxes by the new thresholds, from the same loaded weights."""
    model = ModelDir.open(make_model_dir(tmp_path / "m", version="m1"))
    source = ModelSource(model_dir=model.path, device="cpu", watch_seconds=3600)
    before = source.get()
    assert before.thresholds.of(0) == 0.5
    model.update_metadata({"score_thresholds": {"per_class": {"Elephant": 0.8, "zebra": None},
                                                "pooled": 0.7}})
    after = source.get()
    assert (after.thresholds.of(0), after.thresholds.of(1), after.thresholds.of(2)) == (
        0.8, None, 0.7)
    assert after.predictor is before.predictor and source.get() is after
    source.close()


def test_basic_auth_header_is_parsed_strictly(world):
    garbage = {"Authorization": "Basic " + base64.b64encode(b"\xff\xfe").decode()}
    assert httpx.get(world["url"] + "/versions", headers=garbage).status_code == 401


def test_health_body_is_json(world):
    assert json.loads(httpx.get(world["url"] + "/health").text)["status"] == "UP"


PAIRED_CONFIG = """<View>
  <Image name="photo" value="$image"/>
  <Rectangle name="box" toName="photo"/>
  <Labels name="kind" toName="photo">
    <Label value="Elephant"/><Label value="Avian" predicted_values="bird"/>
  </Labels>
  <RectangleLabels name="zebras" toName="photo"><Label value="Zebra"/></RectangleLabels>
</View>"""


def test_labels_beside_a_rectangle_and_several_controls_get_their_own_regions(world):
    """Label Studio's own reading of the config (label_studio_sdk): a Labels control beside
    a Rectangle receives merged `rectanglelabels` regions; each control gets only its
    classes; results pass Label Studio's validation."""
    r = predict(world, [task(1, str(world["images"] / "small.png"))], label_config=PAIRED_CONFIG)
    regions = r.json()["results"][0]["result"]
    by_control = {}
    for region in regions:
        assert region["type"] == "rectanglelabels" and region["to_name"] == "photo"
        by_control.setdefault(region["from_name"], set()).update(
            region["value"]["rectanglelabels"]
        )
    expected = {w["label"] for w in expected_regions(world["images"] / "small.png")}
    assert set(by_control) <= {"kind", "zebras"} and by_control
    assert by_control.get("zebras", set()) <= {"Zebra"}
    assert by_control.get("kind", set()) <= {"Elephant", "Avian"}
    assert set().union(*by_control.values()) == expected


def test_setup_state_stays_bounded(tmp_path, world):
    """Distinct projects and configs cannot grow the server's memory without bound: the
    least recently set up project is forgotten (it must send its config again)."""
    from backend.serving.backend import HTTPError

    backend = Backend(world["backend"].models, world["backend"].media,
                      TrainingJobs("true", tmp_path, tmp_path / "jobs"),
                      ServerSettings(max_projects=3, max_configs=2))
    for project in range(10):
        backend.setup({"project": f"{project}.1", "schema": CONFIG.replace("Zebra", f"Z{project}")})
    assert backend.predict({"tasks": [], "project": "9.1"}) == {"results": []}
    with pytest.raises(HTTPError, match="no label config for project 0"):
        backend.predict({"tasks": [], "project": "0.1"})


def test_serve_takes_config_overrides_and_a_value_range(tmp_path):
    """`serve --opt` (a lower NMS threshold, say) and `--value-range` for deep rasters, as
    `predict` and `prelabel` take them."""
    from backend.cli import build_parser, recipe_overrides
    from backend.serving.server import build_backend

    model = make_model_dir(tmp_path / "m", version="v1")
    args = build_parser().parse_args([
        "serve", "--model", str(model), "--device", "cpu", "--work-dir", str(tmp_path / "w"),
        "--opt", "MODEL.ROI_HEADS.NMS_THRESH_TEST=0.3", "--value-range", "0", "4095"])
    backend = build_backend(args, recipe_overrides(args))
    assert backend.models.current().predictor.cfg.roi_heads.nms_thresh_test == 0.3
    assert list(backend.settings.scaling.value_range) == [0, 4095]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--model", str(model), "--opt", "NO_EQUALS"])


def _smart(kind: str, value: dict, **extra) -> dict:
    return {"id": "prompt1", "type": kind, "from_name": "label", "to_name": "image",
            "origin": "manual", "original_width": 640, "original_height": 480,
            "image_rotation": 0, "value": value, **extra}


def _ask(world, *items) -> httpx.Response:
    """A smart-tool request as Label Studio's interactive-annotating endpoint sends it."""
    body = {"tasks": [task(5, str(world["images"] / "small.png"))], "project": "7.1795377860",
            "label_config": CONFIG,
            "params": {"login": None, "password": None, "context": {"result": list(items)}}}
    with client(world) as c:
        return c.post("/predict", json=body)


def _best_batch_region(world) -> dict:
    answer = predict(world, [task(5, str(world["images"] / "small.png"))]).json()
    return max(answer["results"][0]["result"], key=lambda r: r["score"])


def test_a_smart_rectangle_gets_the_boxes_centred_in_it_with_fresh_ids(world):
    best = _best_batch_region(world)["value"]
    x, y = max(0.0, best["x"] - 10), max(0.0, best["y"] - 10)
    w, h = min(100 - x, best["width"] + 20), min(100 - y, best["height"] + 20)
    answer = _ask(world, _smart("rectanglelabels", {"x": x, "y": y, "width": w, "height": h,
                                                    "rotation": 0, "rectanglelabels": []}))
    assert answer.status_code == 200
    (result,) = answer.json()["results"]
    regions = result["result"]
    assert regions and result["model_version"] in ("v1", "v2")
    for region in regions:
        v = region["value"]
        cx, cy = v["x"] + v["width"] / 2, v["y"] + v["height"] / 2
        assert x <= cx <= x + w and y <= cy <= y + h
        assert (region["from_name"], region["to_name"]) == ("label", "image")
        assert v["rectanglelabels"][0] in ("Elephant", "Zebra", "Avian")
    ids = [r["id"] for r in regions]
    assert len(set(ids)) == len(ids) and "prompt1" not in ids
    restricted = _ask(world, _smart("rectanglelabels", {
        "x": x, "y": y, "width": w, "height": h, "rectanglelabels": ["Zebra"]})).json()
    assert {r["value"]["rectanglelabels"][0] for r in restricted["results"][0]["result"]} <= {
        "Zebra"}


def test_a_click_boxes_the_one_animal_under_it_and_an_alt_click_excludes(world):
    best = _best_batch_region(world)["value"]
    cx, cy = best["x"] + best["width"] / 2, best["y"] + best["height"] / 2
    point = {"x": cx, "y": cy, "width": 0.5, "keypointlabels": [], "labels": []}
    (result,) = _ask(world, _smart("keypointlabels", point, is_positive=True)).json()["results"]
    (region,) = result["result"]
    v = region["value"]
    assert v["x"] <= cx <= v["x"] + v["width"] and v["y"] <= cy <= v["y"] + v["height"]
    assert region["type"] == "rectanglelabels" and region["from_name"] == "label"
    excluded = _ask(world, _smart("keypointlabels", point, is_positive=True),
                    _smart("keypointlabels", point, is_positive=False)).json()
    assert excluded["results"][0]["result"] == []  # every box under the Alt-click is out


@pytest.mark.parametrize(("context", "message"), [
    ({"result": [_smart("polygonlabels", {"x": 1, "y": 1, "points": []})]}, "smart tools here"),
    ({"result": [_smart("rectanglelabels", {"x": 150, "y": 1, "width": 5, "height": 5})]},
     "outside 0-100"),
    ({"result": [_smart("keypointlabels", {"x": float("nan"), "y": 1})]}, "outside 0-100"),
    ({"result": [_smart("keypointlabels", {"x": 1, "y": 1})] * 65}, "1 to 64 expected"),
    ({"results": []}, "needs a 'result' list"),
    ({"result": [_smart("rectanglelabels", {"x": 1, "y": 1, "width": "wide", "height": 5})]},
     "not a number"),
    ({"result": [_smart("rectanglelabels", {"x": 1, "y": 1, "width": 5, "height": 5},
                        image_rotation=90)]}, "image_rotation=90"),
    ({"result": [_smart("rectanglelabels", {"x": 1, "y": 1, "width": 5, "height": 5,
                                            "rotation": 30})]}, "rotation=30"),
])
def test_a_context_that_does_not_parse_is_a_400_naming_the_problem(world, context, message):
    body = {"tasks": [task(5, str(world["images"] / "small.png"))], "project": "7.1",
            "label_config": CONFIG, "params": {"context": context}}
    with client(world) as c:
        answer = c.post("/predict", content=json.dumps(body))
    assert answer.status_code == 400 and message in answer.json()["error"]


@pytest.mark.parametrize(("image", "status", "message"), [
    ("missing.png", 502, "could not be fetched"),
    ("broken.png", 502, "not an image file"),
])
def test_a_smart_tool_on_an_image_that_fails_names_it(world, image, status, message):
    body = {"tasks": [task(5, str(world["images"] / image))], "project": "7.1",
            "label_config": CONFIG, "params": {"context": {"result": [
                _smart("keypointlabels", {"x": 50, "y": 50, "keypointlabels": []})]}}}
    with client(world) as c:
        answer = c.post("/predict", json=body)
    assert answer.status_code == status
    assert image in answer.json()["error"] and message in answer.json()["error"]


def test_a_smart_tool_on_an_image_over_the_pixel_limit_is_a_422_naming_it(world, tmp_path):
    from backend.serving.backend import HTTPError

    backend = Backend(world["backend"].models, world["backend"].media,
                      TrainingJobs("true", tmp_path, tmp_path / "jobs"),
                      ServerSettings(max_pixels=10_000))
    with pytest.raises(HTTPError) as refused:
        backend.predict({"tasks": [task(5, str(world["images"] / "small.png"))],
                         "project": "7.1", "label_config": CONFIG, "params": {"context": {
                             "result": [_smart("keypointlabels", {"x": 50, "y": 50})]}}})
    assert refused.value.status == 422 and "small.png" in str(refused.value)


def test_a_smart_tool_request_on_a_full_queue_is_a_503_with_retry_after(world, tmp_path):
    from backend.serving.backend import HTTPError
    from backend.serving.inference_queue import InferenceQueue

    from .conftest import held_batches

    queue = InferenceQueue(max_pending=1, max_batch=1)
    backend = Backend(world["backend"].models, world["backend"].media,
                      TrainingJobs("true", tmp_path, tmp_path / "jobs"), ServerSettings(),
                      queue=queue)
    predictor = backend.models.current().predictor
    photo = np.zeros((64, 64, 3), np.uint8)
    body = {"tasks": [task(5, str(world["images"] / "small.png"))], "project": "7.1",
            "label_config": CONFIG, "params": {"context": {"result": [
                _smart("keypointlabels", {"x": 50, "y": 50, "keypointlabels": []})]}}}
    with held_batches(predictor) as (gate, _):
        held = queue.submit(predictor, photo, None)  # on the device, held at the gate
        wait_until(lambda: queue.pending() == 0, 30, "the first image taken to the device")
        waiting = queue.submit(predictor, photo, None)  # fills the queue
        with pytest.raises(HTTPError) as refused:
            backend.predict(body)
        gate.set()
        held.result(timeout=120), waiting.result(timeout=120)
    queue.close()
    assert (refused.value.status, refused.value.retry_after) == (503, 5)


def test_smart_tool_work_jumps_the_queue_ahead_of_batch_work(fixture_image):
    """Batch images wait behind an interactive one submitted after them."""
    from backend.detection.predictor import Predictor
    from backend.serving.inference_queue import InferenceQueue

    from .conftest import fixture_dir, fixture_weights, held_batches

    name = "faster_rcnn_R_50_FPN_1x"
    predictor = Predictor.from_files(fixture_dir(name) / "config.yaml", fixture_weights(name),
                                     device="cpu")
    photo = np.ascontiguousarray(fixture_image[:320, :320])
    queue = InferenceQueue(max_batch=1)
    finished: list[str] = []
    with held_batches(predictor) as (gate, _):
        first = queue.submit(predictor, photo, None)  # on the device, held at the gate
        time.sleep(0.5)
        batch = [queue.submit(predictor, photo, None) for _ in range(3)]
        urgent = queue.submit(predictor, photo, None, urgent=True)
        for label, future in [("batch", f) for f in batch] + [("urgent", urgent)]:
            future.add_done_callback(lambda _, label=label: finished.append(label))
        gate.set()
        for future in [first, *batch, urgent]:
            future.result(timeout=120)
    queue.close()
    assert finished[0] == "urgent"
