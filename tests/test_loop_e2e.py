"""The DVC loop end to end: a real Label Studio with annotated generated survey images, a
real git + DVC project in a temp dir, `dvc repro` exporting, splitting, training, evaluating
and deploying into a registry; the stages' guarantees checked one by one."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from label_studio_sdk import LabelStudio

from backend.labelstudio.local import import_image
from backend.labelstudio.results import rectangle_region
from backend.ports import free_port
from backend.registry import Registry
from backend.synthetic import CLASSES, png_bytes, survey_scene
from pipelines.deployed import snapshot
from pipelines.split import is_val

from .servers import LoopbackServer

pytestmark = pytest.mark.slow

CONFIG = (
    "<View><Image name='image' value='$image'/><RectangleLabels name='label' "
    "toName='image'>"
    + "".join(f"<Label value='{c}'/>" for c in CLASSES)
    + "</RectangleLabels></View>"
)
VENV_BIN = str(Path(sys.executable).parent)


def run(
    cmd: list[str], cwd: Path, env: dict[str, str], check: bool = True, timeout: float = 600
) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def new_project(root: Path, project_id: int, env: dict[str, str]) -> Path:
    """A git + DVC checkout of the loop made as a user makes one, `tridentloop init`, with
    tiny training settings."""
    settings = {"train.iterations": 12, "train.checkpoint_period": 4, "train.warmup_iters": 4,
                "train.device": "cpu", "evaluate.device": "cpu",
                # 12 iterations cannot beat drawing; these tests are about the loop's
                # mechanics, so the effort gate lets a model that offers nothing through
                "deploy.max_effort_ratio": 1.01, "deploy.min_val_objects": 0}
    run([sys.executable, "-m", "backend.cli", "init", str(root), "--project", str(project_id),
         *[a for key, value in settings.items() for a in ("--set", f"{key}={value}")]],
        Path(__file__).resolve().parents[1], env)
    return root


def annotate(ls: LabelStudio, task_id: int, boxes: np.ndarray, classes: np.ndarray,
             size: tuple[int, int], cancelled: bool = False) -> None:
    """A person's submitted annotation (or skip) drawing the ground truth."""
    width, height = size
    result = [rectangle_region(b, CLASSES[c], width, height)
              for b, c in zip(boxes.tolist(), classes.tolist(), strict=True)]
    ls.annotations.create(id=task_id, result=[] if cancelled else result, was_cancelled=cancelled)


@pytest.fixture(scope="module")
def loop(label_studio, tmp_path_factory):
    root = tmp_path_factory.mktemp("loop")
    ls = LabelStudio(base_url=label_studio.url, api_key=label_studio.token)
    project = ls.projects.create(title="loop", label_config=CONFIG)
    rng = np.random.default_rng(7)
    scenes = {}
    for i in range(10):
        scene = survey_scene(rng, 320, 320, 5)
        import_image(label_studio, project.id, f"scene{i:02d}.png", png_bytes(scene.image))
        scenes[f"scene{i:02d}.png"] = scene
    import_image(label_studio, project.id, "corrupt.png", b"\x89PNG\r\n\x1a\n truncated garbage")
    for name in ("pool0.png", "pool1.png"):  # nobody labels these: the active-learning pool
        pool_scene = survey_scene(rng, 320, 320, 5)
        import_image(label_studio, project.id, name, png_bytes(pool_scene.image))
    import_image(label_studio, project.id, "unreadable.png", b"not an image")
    tasks = {t.data["image"].rsplit("-", 1)[-1]: t.id for t in ls.tasks.list(project=project.id)}
    for name, scene in scenes.items():
        annotate(
            ls, tasks[name], scene.boxes, scene.classes, (320, 320), cancelled=name == "scene09.png"
        )
    annotate(ls, tasks["corrupt.png"], np.array([[1, 1, 5, 5]]), np.array([0]), (320, 320))
    # A holdout kept by hand: a scene the hash would train on, pinned to val in its data.
    pinned = next(tasks[n] for n in sorted(scenes) if n != "scene09.png"
                  and not is_val(tasks[n], 25, 0))
    ls.tasks.update(id=str(pinned), data={**ls.tasks.get(id=str(pinned)).data, "split": "val"})
    env = {
        **os.environ,
        "PATH": VENV_BIN + os.pathsep + os.environ["PATH"],
        "LABEL_STUDIO_URL": label_studio.url,
        "LABEL_STUDIO_API_KEY": label_studio.token,
        "DVC_NO_ANALYTICS": "1",
    }
    checkout = new_project(root / "project", project.id, env)
    first = run(["dvc", "repro"], checkout, env)
    status = run(["git", "status", "--porcelain"], checkout, env).stdout
    return {
        "status_after_first": status,
        "ls": ls,
        "project": project.id,
        "root": root,
        "dir": checkout,
        "env": env,
        "first": first,
        "label_studio": label_studio,
        "pinned": pinned,
    }


def test_init_makes_a_loop_whose_first_repro_changes_no_tracked_file(loop):
    """`tridentloop init` wrote dvc.yaml, params.yaml, the code, git and DVC; `dvc repro`
    then only adds what a user commits (dvc.lock, metrics, .gitignore entries): dvc.yaml,
    params.yaml and the code stay as committed (dvclive once rewrote dvc.yaml)."""
    changed = [line for line in loop["status_after_first"].splitlines()
               if not line.startswith("??")]
    assert all(line.endswith(".gitignore") for line in changed), changed
    params = yaml.safe_load((loop["dir"] / "params.yaml").read_text())
    assert params["labelstudio"]["project"] == loop["project"]
    assert params["train"]["iterations"] == 12


def test_repro_exports_trains_evaluates_and_deploys(loop):
    checkout = loop["dir"]
    manifest = json.loads((checkout / "data/dataset/manifest.json").read_text())
    assert manifest["images"] == 9  # 10 annotated scenes, one of them a skip (was_cancelled)
    (corrupt,) = manifest["skipped"]  # the corrupt upload: reported, not fatal
    assert corrupt["image"].endswith("corrupt.png") and "not an image file" in corrupt["reason"]
    assert sum(manifest["boxes_per_class"].values()) == manifest["boxes"] > 0
    assert manifest["dropped_regions"] == {}  # every drawn box made it into the dataset
    assert manifest["images_fetched"] == 9 and manifest["fetched_bytes"] > 0
    assert not loop["ls"].projects.exports.list(loop["project"])  # its snapshot deleted once read
    val = json.loads((checkout / "data/split/val.json").read_text())
    assert loop["pinned"] in {image["id"] for image in val["images"]}
    metrics = json.loads((checkout / "metrics.json").read_text())
    assert {"ap", "ap50", "ap75", "ap_small", "per_class_ap"} <= set(metrics)
    assert metrics["deployed"] is None
    registry = Registry(checkout / "models/registry")
    assert registry.current_name() == "v0001"
    lineage = registry.current().metadata
    assert lineage["metrics"]["ap50"] == metrics["ap50"]
    assert lineage["dataset"] and lineage["git_revision"]
    params = yaml.safe_load((checkout / "params.yaml").read_text())
    assert lineage["recipe"] == params["recipe"]  # the deployed model runs as it was trained
    assert registry.current().recipe.tile_size == params["recipe"]["tile_size"]
    assert "train: it 12/12 loss" in loop["first"].stdout + loop["first"].stderr  # progress
    assert json.loads((checkout / "deploy.json").read_text())["deployed"] is True
    assert (checkout / "dvclive/metrics.json").is_file()
    assert (checkout / "plots/pr.json").is_file()


def test_repro_prelabels_the_pool_with_the_new_model_and_picks_the_next_batch(loop):
    chosen = json.loads((loop["dir"] / "data/select/next.json").read_text())
    tasks = {t.data["image"].rsplit("-", 1)[-1]: t
             for t in loop["ls"].tasks.list(project=loop["project"], fields="all")}
    assert chosen["model_version"] == "v0001"
    pool = {tasks[name].id for name in ("pool0.png", "pool1.png")}
    assert {t["id"] for t in chosen["tasks"]} == pool
    assert chosen["without_prediction"] == [tasks["unreadable.png"].id]  # reported, not fatal
    scores = [t["uncertainty"] for t in chosen["tasks"]]
    assert scores == sorted(scores, reverse=True)
    for task in chosen["tasks"]:
        (prediction,) = tasks[task["image"].rsplit("-", 1)[-1]].predictions
        assert prediction.model_version == "v0001"
        assert prediction.score == pytest.approx(task["uncertainty"])
    assert not tasks["scene00.png"].predictions  # labeled tasks are not pre-labelled again


def test_after_a_deploy_the_loop_keeps_its_model_then_runs_nothing(loop):
    """The deployed model is a declared input of train and evaluate: the run after a deploy
    finds the candidate is that model and keeps it (nothing trained, nothing deployed), and
    the run after that has nothing to do."""
    checkout, env = loop["dir"], loop["env"]
    lock = yaml.safe_load((checkout / "dvc.lock").read_text())["stages"]
    for stage in ("train", "evaluate"):
        assert "data/deployed.json" in {dep["path"] for dep in lock[stage]["deps"]}
    second = run(["dvc", "repro"], checkout, env)
    out = second.stdout + second.stderr
    assert "deployed: v0001" in out and "kept as it is" in out and "train: it " not in out
    assert "the candidate is deployed already, as v0001" in out
    registry = Registry(checkout / "models/registry")
    assert registry.version_names() == ["v0001"]
    assert json.loads((checkout / "data/deployed.json").read_text())["weights_sha256"] == (
        hashlib.sha256(registry.current().weights.read_bytes()).hexdigest())
    # annotations re-read, images not: only the corrupt upload is fetched again
    manifest = json.loads((checkout / "data/dataset/manifest.json").read_text())
    assert (manifest["images_fetched"], manifest["images_reused"]) == (0, 9)
    assert "fetched 0 new or changed image(s) (0.0 MB), reused 9" in out
    run(["git", "add", "-A"], checkout, env)
    run(["git", "commit", "-qm", "the deployed model kept"], checkout, env)
    third = run(["dvc", "repro"], checkout, env)
    out = third.stdout + third.stderr
    for stage in ("split", "train", "evaluate", "deploy"):
        assert f"Running stage '{stage}'" not in out, stage
    # export, deployed and select ran again and found nothing new: nothing for git either
    assert run(["git", "status", "--porcelain"], checkout, env).stdout == ""


def test_datasets_and_models_push_to_and_pull_from_the_remote_init_set(loop):
    """The README's team workflow with no DVC configuration by hand: `init` committed a
    default remote beside the checkout; commit, `dvc push`, and a teammate's clone elsewhere
    `dvc pull`s the same dataset and model."""
    checkout, env = loop["dir"], loop["env"]
    run(["git", "add", "-A"], checkout, env)
    run(["git", "commit", "-qm", "dataset and model version", "--allow-empty"], checkout, env)
    run(["dvc", "push"], checkout, env)
    assert (loop["root"] / "tridentloop-dvc-remote").is_dir()
    clone = loop["root"] / "elsewhere" / "teammate"
    run(["git", "clone", "-q", str(checkout), str(clone)], loop["root"], env)
    run(["dvc", "pull"], clone, env)
    for path in (
        "data/dataset/annotations.json",
        "models/candidate/model_final.pth",
        "data/split/val.json",
    ):
        assert (clone / path).read_bytes() == (checkout / path).read_bytes()
    assert len(list((clone / "data/dataset/images").iterdir())) == 9


def test_experiments_override_params(loop):
    proc = run(
        ["dvc", "exp", "run", "-S", "train.lr=0.005", "-S", "train.iterations=4"],
        loop["dir"],
        loop["env"],
    )
    assert "Ran experiment" in proc.stdout + proc.stderr
    shown = run(["dvc", "exp", "show", "--json"], loop["dir"], loop["env"]).stdout
    assert "0.005" in shown


def test_deploy_stage_leaves_the_registry_alone_for_a_worse_model(loop, tmp_path):
    checkout, env = loop["dir"], loop["env"]
    registry = Registry(checkout / "models/registry")
    before = registry.version_names()
    params = yaml.safe_load((checkout / "params.yaml").read_text())
    params["evaluate"]["metrics"] = str(tmp_path / "worse.json")
    params["deploy"]["record"] = str(tmp_path / "decision.json")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "worse.json").write_text(
        json.dumps({"ap50": 0.0, "deployed": {"version": registry.current_name(), "ap50": 0.5}})
    )
    proc = run(
        [sys.executable, "-m", "pipelines.deploy"],
        checkout,
        {**env, "TRIDENTLOOP_PARAMS": str(tmp_path / "params.yaml")},
    )
    assert "not deployed" in proc.stdout
    assert registry.version_names() == before
    assert json.loads((tmp_path / "decision.json").read_text())["deployed"] is False


def _train_params(loop, tmp_path: Path, name: str, **train) -> dict[str, str]:
    params = yaml.safe_load((loop["dir"] / "params.yaml").read_text())
    params["train"].update(
        {
            "output": str(tmp_path / name / "model"),
            "checkpoints": str(tmp_path / name / "ckpt"),
            **train,
        }
    )
    params["deploy"]["snapshot"] = str(tmp_path / "nothing-deployed.json")
    (tmp_path / "nothing-deployed.json").write_text(json.dumps(snapshot(str(tmp_path / "none"))))
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(params))
    return {**loop["env"], "TRIDENTLOOP_PARAMS": str(path)}


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path / "model_final.pth", weights_only=True)["model"]


def test_killed_training_resumes_from_its_checkpoint(loop, tmp_path):
    env = _train_params(loop, tmp_path, "killed", iterations=12, checkpoint_period=4)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipelines.train"],
        cwd=loop["dir"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    ckpt_dir = tmp_path / "killed" / "ckpt"
    deadline = time.monotonic() + 300
    while not (ckpt_dir.is_dir() and any(ckpt_dir.glob("*.pth"))):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = run([sys.executable, "-m", "pipelines.train"], loop["dir"], env)
    assert "resumed at iteration" in resumed.stdout
    assert "starting from random weights" not in resumed.stdout  # it starts from iteration 4
    lineage = json.loads((tmp_path / "killed" / "model" / "model.json").read_text())
    assert "checkpoint" not in lineage["start"]  # the checkpoint is gone; the start is not
    assert lineage["resumed_at_iteration"] > 0
    assert lineage["iterations_total"] == 12  # the resumed iterations are not counted twice
    straight_env = _train_params(loop, tmp_path, "straight", iterations=12, checkpoint_period=4)
    run([sys.executable, "-m", "pipelines.train"], loop["dir"], straight_env)
    got = _weights(tmp_path / "killed" / "model")
    want = _weights(tmp_path / "straight" / "model")
    for key in want:
        assert torch.allclose(got[key], want[key], atol=1e-6), key


def test_a_model_names_the_exact_weights_it_started_from(loop, tmp_path):
    """A detectron2:// model-zoo name, its zoo a real HTTP server on loopback: downloaded
    into the cache, trained from, and named by its address and SHA-256."""
    deployed = Registry(loop["dir"] / "models/registry").current().path / "model_final.pth"
    (tmp_path / "zoo" / "Survey").mkdir(parents=True)
    shutil.copy(deployed, tmp_path / "zoo" / "Survey" / "last.pth")
    env = _train_params(loop, tmp_path, "child", iterations=2,
                        base_weights="detectron2://Survey/last.pth")
    with LoopbackServer(functools.partial(_Quiet, directory=str(tmp_path / "zoo"))) as zoo:
        env.update(TRIDENTLOOP_D2_ZOO_URL=zoo.url, TRIDENTLOOP_CACHE=str(tmp_path / "cache"))
        run([sys.executable, "-m", "pipelines.train"], loop["dir"], env)
    lineage = json.loads((tmp_path / "child/model/model.json").read_text())
    assert lineage["start"] == (f"weights detectron2://Survey/last.pth "
                                f"({zoo.url}/Survey/last.pth)")
    assert lineage["start_sha256"] == hashlib.sha256(deployed.read_bytes()).hexdigest()


def test_a_model_counts_every_iteration_its_weights_saw_and_names_its_ancestors(loop,
                                                                                tmp_path):
    """A round started from the deployed model: its lineage adds the parent's iterations,
    names the parent (SHA-256, where it is) and the parent's own start, and dvclive's loss
    curve goes on from the parent's last step instead of starting again at 0."""
    parent = Registry(loop["dir"] / "models/registry").current()
    env = _train_params(loop, tmp_path, "round2", iterations=2, base_weights=str(parent.path))
    run([sys.executable, "-m", "pipelines.train"], loop["dir"], env)
    lineage = json.loads((tmp_path / "round2/model/model.json").read_text())
    seen = parent.metadata["iterations_total"]  # 12 a round, more after experiments
    assert seen >= 12
    assert (lineage["iterations"], lineage["iterations_total"]) == (2, seen + 2)
    first, *before = lineage["chain"]
    assert first == {"start": f"weights {parent.path}",
                     "sha256": hashlib.sha256(parent.weights.read_bytes()).hexdigest(),
                     "location": str(parent.weights.absolute()), "iterations_total": seen}
    assert before == parent.metadata["chain"]  # and the parent's own starts, newest first
    curve = (loop["dir"] / "dvclive/plots/metrics/train/total_loss.tsv").read_text()
    steps = [int(row.split("\t")[0]) for row in curve.splitlines()[1:]]
    assert steps[-2:] == [seen, seen + 1] and steps == sorted(steps)


def test_a_frozen_backbone_trains_only_the_heads_and_never_random_weights(loop, tmp_path):
    """`train.freeze_at: 4` from a start model: its backbone comes out as it went in, the
    proposals and box head learn; with nothing to start from it is refused, naming why."""
    parent = Registry(loop["dir"] / "models/registry").current()
    run([sys.executable, "-m", "pipelines.train"], loop["dir"], _train_params(
        loop, tmp_path, "frozen", iterations=2, base_weights=str(parent.path), freeze_at=4))
    start, got = _weights(parent.path), _weights(tmp_path / "frozen" / "model")
    backbone = [k for k in start if k.startswith("backbone.") and "num_batches" not in k]
    assert backbone and all(torch.equal(start[k], got[k]) for k in backbone)
    assert not torch.equal(start["roi_heads.box_predictor.cls_score.weight"],
                           got["roi_heads.box_predictor.cls_score.weight"])
    assert "FREEZE_AT: 4" in (tmp_path / "frozen/model/config.yaml").read_text()
    refused = subprocess.run(
        [sys.executable, "-m", "pipelines.train"], cwd=loop["dir"], text=True,
        capture_output=True, env=_train_params(loop, tmp_path, "scratch", iterations=2,
                                               base_weights="", freeze_at=4))
    assert refused.returncode != 0
    assert "would keep random weights frozen" in refused.stderr


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def test_init_from_another_loop_s_registry_trains_a_new_head(loop):
    """Last season's loop (its registry) starts this season's project, whose label set
    differs: its weights, a new box predictor."""
    ls = loop["ls"]
    labels = ("zebra", "bird")
    config = ("<View><Image name='image' value='$image'/><RectangleLabels name='label' "
              "toName='image'>" + "".join(f"<Label value='{c}'/>" for c in labels)
              + "</RectangleLabels></View>")
    season = ls.projects.create(title="next season", label_config=config)
    rng = np.random.default_rng(3)
    for i in range(6):
        scene = survey_scene(rng, 320, 320, 4, classes=labels)
        import_image(loop["label_studio"], season.id, f"s{i}.png", png_bytes(scene.image))
        (task,) = [t for t in ls.tasks.list(project=season.id)
                   if t.data["image"].endswith(f"s{i}.png")]
        ls.annotations.create(id=task.id, was_cancelled=False, result=[
            rectangle_region(b, labels[c], 320, 320)
            for b, c in zip(scene.boxes.tolist(), scene.classes.tolist(), strict=True)])
    registry = loop["dir"] / "models/registry"
    checkout = loop["root"] / "next-season"
    proc = run([sys.executable, "-m", "backend.cli", "init", str(checkout), "--project",
                str(season.id), "--from", str(registry), "--set", "train.iterations=2",
                "--set", "train.device=cpu", "--set", "split.val_percent=50"],
               Path(__file__).resolve().parents[1], loop["env"])
    assert f"the loop starts from {registry}" in proc.stdout
    assert yaml.safe_load((checkout / "params.yaml").read_text())["train"][
        "base_weights"] == str(registry)
    run(["dvc", "repro", "train"], checkout, loop["env"])
    lineage = json.loads((checkout / "models/candidate/model.json").read_text())
    served = Registry(registry).current().weights
    assert lineage["start_sha256"] == hashlib.sha256(served.read_bytes()).hexdigest()
    assert "box predictor started from the mean of its classes for the new label set" in (
        lineage["start"])
    assert (checkout / "models/candidate/labels.txt").read_text().split() == list(labels)


def _train_one_and_distributed(loop, tmp_path: Path, torchrun: list[list[str]]
                               ) -> tuple[dict, dict, dict]:
    """The start, one process's weights and the weights of the torchrun commands run side
    by side (the nodes of one job), 3 iterations from the deployed model each."""
    deployed = Registry(loop["dir"] / "models/registry").current().path / "model_final.pth"
    common = {"iterations": 3, "batch_size": 2, "base_weights": str(deployed)}
    run([sys.executable, "-m", "pipelines.train"], loop["dir"],
        _train_params(loop, tmp_path, "one", **common))
    env = {**_train_params(loop, tmp_path, "two", **common), "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *args, "-m",
                               "pipelines.train"], cwd=loop["dir"], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for args in torchrun]
    for node in nodes:
        output = node.communicate(timeout=600)[0]
        assert node.returncode == 0, output
    assert json.loads((tmp_path / "two/model/model.json").read_text())["processes"] == 2
    start = torch.load(deployed, weights_only=True)["model"]
    return start, _weights(tmp_path / "one" / "model"), _weights(tmp_path / "two" / "model")


def _assert_same_training(start: dict, single: dict, ddp: dict) -> None:
    """Distributed training must train what one process does, up to float rounding: summed
    in another order, a gradient can flip a near-tied proposal in or out of the sampled ROIs
    (seen on CI: 1e-4 of a weight apart). A real fault (gradients summed, not averaged; the
    wrong shard of the data; a rank with its own seed) moves the weights as far as training
    does, so each tensor's distance between the runs is measured against how far training
    moved it from the weights both started from, and frozen tensors must not move at all."""
    trained = set()
    for key, weight in single.items():
        moved = (weight - start[key]).double().norm()
        apart = (weight - ddp[key]).double().norm()
        if moved == 0:
            assert torch.equal(ddp[key], start[key]), key
        else:
            trained.add(key)
            assert apart <= 0.02 * moved, (key, float(apart / moved))  # 2e-4 at most, here
    assert {"roi_heads.box_predictor.cls_score.weight", "backbone.res4.0.conv1.weight"} <= trained


def test_two_gloo_processes_train_the_same_model_as_one(loop, tmp_path):
    _assert_same_training(*_train_one_and_distributed(
        loop, tmp_path, [["--standalone", "--nproc_per_node=2"]]))


def test_two_nodes_rendezvousing_over_tcp_train_the_same_model_as_one(loop, tmp_path):
    """Two machines, one process each, as docs/loop.md runs them: torchrun on each node,
    `--nnodes 2` with a c10d rendezvous at the first node's address (here 127.0.0.1, two
    agents with their own process trees); a node's rank comes from the rendezvous."""
    endpoint = f"127.0.0.1:{free_port()}"
    node = ["--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d",
            f"--rdzv_endpoint={endpoint}", "--rdzv_id=tridentloop-test", "--max_restarts=0"]
    _assert_same_training(*_train_one_and_distributed(loop, tmp_path, [node, node]))


def test_export_with_no_accepted_labels_deploys_nothing(loop):
    ls = loop["ls"]
    empty = ls.projects.create(title="nothing accepted", label_config=CONFIG)
    lonely = png_bytes(survey_scene(np.random.default_rng(1), 128, 128, 2).image)
    import_image(loop["label_studio"], empty.id, "lonely.png", lonely)
    checkout = new_project(loop["root"] / "empty", empty.id, loop["env"])
    proc = run(["dvc", "repro"], checkout, loop["env"], check=False)
    assert proc.returncode != 0
    assert "no accepted annotations" in proc.stdout + proc.stderr
    assert Registry(checkout / "models/registry").version_names() == []


def test_calibrate_chooses_thresholds_on_a_label_studio_project(loop, tmp_path):
    """A model brought from outside, calibrated on the project's accepted annotations: the
    thresholds land in its model.json and the effort table is printed."""

    model = tmp_path / "outside"
    shutil.copytree(Registry(loop["dir"] / "models/registry").current().path, model)
    proc = run([sys.executable, "-m", "backend.cli", "calibrate", "--model", str(model),
                "--project", str(loop["project"]), "--work-dir", str(tmp_path / "work"),
                "--device", "cpu"], loop["dir"], loop["env"])
    assert "overall: effort ratio" in proc.stdout
    stored = json.loads((model / "model.json").read_text())["score_thresholds"]
    assert set(stored["per_class"]) == set(CLASSES)
    assert stored["chosen_on"] == f"Label Studio project {loop['project']}"
    exported = json.loads((loop["dir"] / "data/dataset/manifest.json").read_text())
    assert stored["images"] == exported["images"]  # the accepted ones, as the loop exports
    trained = json.loads((model / "model.json").read_text())["train_tasks"]
    assert f"was trained on {len(trained)} of these {exported['images']} tasks" in proc.stdout
    again = run([sys.executable, "-m", "backend.cli", "calibrate", "--model", str(model),
                 "--project", str(loop["project"]), "--work-dir", str(tmp_path / "work"),
                 "--device", "cpu", "--exclude-trained", "--confidence", "0.8"],
                loop["dir"], loop["env"])
    assert f"left out the {len(trained)} tasks" in again.stdout
    stored = json.loads((model / "model.json").read_text())["score_thresholds"]
    assert stored["images"] == exported["images"] - len(trained)
    assert stored["confidence"] == 0.8
    # the candidate is train's DVC output: edited in place, the next repro would adopt it
    candidate = loop["dir"] / "models/candidate/model.json"
    before = candidate.read_bytes()
    refused = run([sys.executable, "-m", "backend.cli", "calibrate", "--model",
                   "models/candidate", "--project", str(loop["project"]), "--work-dir",
                   str(tmp_path / "work"), "--device", "cpu"], loop["dir"], loop["env"],
                  check=False)
    assert refused.returncode != 0
    assert "an output of the DVC stage 'train'" in refused.stderr
    assert "cp -r models/candidate my-model" in refused.stderr
    assert candidate.read_bytes() == before


def test_export_reads_only_what_changed_and_misses_no_change(loop):
    """After a first export, an updated annotation, a deleted one and a new one: the second
    run lists only the tasks changed since the first, reads the two that changed or
    appeared, drops the one left without an annotation, keeps the untouched and the skipped
    ones from its index, and the dataset shows all three changes. A deleted task is seen by
    the count of annotated tasks, and the third run lists every task to find it."""
    ls = loop["ls"]
    project = ls.projects.create(title="incremental", label_config=CONFIG)
    rng = np.random.default_rng(5)
    scenes = [survey_scene(rng, 160, 160, 3) for _ in range(6)]
    for i, scene in enumerate(scenes):
        import_image(loop["label_studio"], project.id, f"inc{i}.png", png_bytes(scene.image))
    changed, deleted, untouched, new, skipped, removed = sorted(
        t.id for t in ls.tasks.list(project=project.id))
    for task_id in (changed, deleted, untouched, removed):
        annotate(ls, task_id, scenes[0].boxes, scenes[0].classes, (160, 160))
    ls.annotations.create(id=skipped, result=[], was_cancelled=True)
    checkout = new_project(loop["root"] / "incremental", project.id, loop["env"])
    export = [sys.executable, "-m", "pipelines.export"]
    run(export, checkout, loop["env"])
    (annotation,) = ls.annotations.list(id=changed)
    moved = np.array([[2.0, 2.0, 40.0, 40.0]])
    ls.annotations.update(id=annotation.id, result=[
        rectangle_region(moved[0].tolist(), CLASSES[0], 160, 160)])
    (gone,) = ls.annotations.list(id=deleted)
    ls.annotations.delete(id=gone.id)
    annotate(ls, new, scenes[3].boxes, scenes[3].classes, (160, 160))

    def exported() -> tuple[dict, dict]:
        run(export, checkout, loop["env"])
        manifest = json.loads((checkout / "data/dataset/manifest.json").read_text())
        coco = json.loads((checkout / "data/dataset/annotations.json").read_text())
        return manifest, coco

    manifest, coco = exported()
    assert manifest["tasks_listed"] == "changed tasks"
    assert (manifest["tasks_read"], manifest["tasks_unchanged"], manifest["tasks_gone"]) == (
        2, 3, 1)
    assert sorted(im["id"] for im in coco["images"]) == [changed, untouched, new, removed]
    boxes = [a["bbox"] for a in coco["annotations"] if a["image_id"] == changed]
    assert boxes == [pytest.approx([2.0, 2.0, 38.0, 38.0], abs=1e-3)]
    assert len([a for a in coco["annotations"] if a["image_id"] == new]) == len(scenes[3].boxes)
    ls.tasks.delete(id=removed)
    manifest, coco = exported()
    assert (manifest["tasks_listed"], manifest["tasks_gone"]) == ("all tasks", 1)
    assert sorted(im["id"] for im in coco["images"]) == [changed, untouched, new]


def test_start_training_webhook_runs_dvc_repro_in_the_checkout(loop, tmp_path, monkeypatch):
    """What Label Studio's Train button triggers: one `dvc repro` run, its log kept."""
    import httpx

    from backend.media.fetch import MediaFetcher, MediaSettings
    from backend.serving.auth import BasicAuth
    from backend.serving.backend import Backend, ServerSettings
    from backend.serving.jobs import TrainingJobs
    from backend.serving.model_source import ModelSource
    from backend.serving.server import serve_in_thread

    for key in ("LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY"):
        monkeypatch.setenv(key, loop["env"][key])
    checkout = loop["dir"]
    backend = Backend(
        ModelSource(registry=Registry(checkout / "models/registry"), device="cpu"),
        MediaFetcher(MediaSettings()),
        TrainingJobs("dvc repro", checkout, tmp_path / "jobs"),
        ServerSettings(basic_auth=BasicAuth(b"trainer", b"pass")),  # training always needs it
    )
    auth = ("trainer", "pass")
    with serve_in_thread(backend) as url:
        answer = httpx.post(
            url + "/webhook",
            timeout=1,
            auth=auth,
            json={"action": "START_TRAINING", "project": {"id": loop["project"]}},
        )
        job = answer.json()["job"]
        deadline = time.monotonic() + 600
        while (status := httpx.get(f"{url}/jobs/{job}", auth=auth).json())["status"] in (
            "queued",
            "running",
        ):
            assert time.monotonic() < deadline
            time.sleep(1)
    assert status["status"] == "succeeded", status["log_tail"]
    assert "$ dvc repro" in status["log_tail"]
    assert "Running stage 'export'" in status["log_tail"]
