"""`tridentloop prelabel --ray`: the same job on a (local) Ray cluster gives the same
predictions as one process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from backend.cli import main
from backend.ports import free_port
from backend.synthetic import survey_scene

from .servers import make_model_dir

pytestmark = pytest.mark.slow


def _records(path) -> dict[str, dict]:
    return {r["image"]: r for r in map(json.loads, path.read_text().splitlines())}


def test_two_ray_workers_predict_exactly_what_one_process_does(survey, tmp_path):
    common = ["prelabel", "--images", str(survey["root"]), "--model", str(survey["model"]),
              "--device", "cpu", "--threads", "1", "--tile-size", "320",
              "--uncertainty", "entropy"]
    one, ray = tmp_path / "one.jsonl", tmp_path / "ray.jsonl"
    assert main([*common, "--output", str(one)]) == 1  # the broken file, reported
    assert main([*common, "--output", str(ray), "--ray", "local", "--ray-workers", "2"]) == 1
    assert _records(ray) == _records(one)
    assert len(_records(ray)) == 5  # the broken file has its line, with the error
    report = json.loads((tmp_path / "ray.report.json").read_text())
    assert [f["image"].rsplit("/", 1)[-1] for f in report["failed"]] == ["broken.jpg"]


class _DiesOnce:
    """Loads images, but the first worker to load one is killed: a lost node."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __call__(self, item):
        import os

        from backend.prelabel.sources import FileLoader

        if not self.marker.exists():
            self.marker.write_text("died once\n")
            os._exit(1)
        return FileLoader()(item)


def test_a_lost_ray_worker_s_images_are_redone(survey, tmp_path):
    import argparse

    import ray

    from backend.detection.tiling import TilingOptions
    from backend.model_dir import ModelDir
    from backend.prelabel.ray_runner import ray_detect_stream
    from backend.prelabel.sources import Item, image_files

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    args = argparse.Namespace(ray="local", ray_workers=1, device="cpu", precision="fp32",
                              channels_last=None, compile=None, exact=False, opt=[],
                              uncertainty="least-confidence", threads=1)
    items = [Item(f) for f in image_files(str(survey["root"])) if f.endswith(".png")]
    results = list(ray_detect_stream(args, ModelDir.open(survey["model"]), TilingOptions(320),
                                     _DiesOnce(tmp_path / "died"), items))
    assert (tmp_path / "died").exists()  # a worker really was lost
    assert sorted(r.item.uri for r in results) == sorted(i.uri for i in items)
    assert all(r.error is None and r.crops >= 1 for r in results)


def test_replicas_the_cluster_cannot_hold_are_refused_naming_the_numbers():
    from backend.prelabel.ray_runner import check_room

    check_room(2, 0, 2.0)  # CPU replicas decode their own images
    check_room(4, 4, 2.0)  # GPU replicas hold no CPU; their decode tasks have two
    with pytest.raises(ValueError, match=r"--ray-workers 3 on a cluster of 2 CPUs: each CPU "
                                         r"replica holds 1 CPU.*use --ray-workers 2"):
        check_room(3, 0, 2.0)
    with pytest.raises(ValueError, match=r"decode tasks feeding the GPU replicas no CPU"):
        check_room(1, 1, 0.0)


def test_a_job_that_stops_making_progress_says_what_it_waits_for(caplog):
    from backend.prelabel.ray_runner import Watchdog

    watchdog = Watchdog(lambda: "the cluster has 0 of 2 CPUs free", stall_s=0.2)
    try:
        time.sleep(0.7)
    finally:
        watchdog.stop()
    assert "no image finished for" in caplog.text
    assert "the cluster has 0 of 2 CPUs free" in caplog.text


# A subprocess cluster's own token (Ray's default token file may be another cluster's);
# a cluster this process joins keeps Ray's default: Ray reads its token once per process.
_TOKEN = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "2f" * 32}


def _ray(*args: str, own_token: bool = True, timeout: float = 120) -> None:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **(_TOKEN if own_token else {})}
    done = subprocess.run([str(Path(sys.executable).parent / "ray"), *args], env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"ray {' '.join(args)}:\n{done.stdout}{done.stderr}"


def test_ray_local_starts_its_own_cluster_beside_a_running_one(survey, tmp_path, capsys):
    """A cluster `ray start` runs on this machine, too small for three CPU replicas:
    joining it is refused with the numbers (not a silent hang); `--ray local` starts its own
    and gives what one process gives."""
    _ray("start", "--head", "--num-cpus", "2", "--include-dashboard", "false",
         "--disable-usage-stats", "--node-ip-address", "127.0.0.1", own_token=False)
    try:
        common = ["prelabel", "--images", str(survey["root"]), "--model",
                  str(survey["model"]), "--device", "cpu", "--threads", "1",
                  "--tile-size", "320", "--ray-workers", "3"]
        assert main([*common, "--output", str(tmp_path / "joined.jsonl"),
                     "--ray", "auto"]) == 2
        assert "--ray-workers 3 on a cluster of 2 CPUs: each CPU replica holds 1 CPU" in (
            capsys.readouterr().err)
        assert main([*common, "--output", str(tmp_path / "own.jsonl"), "--ray", "local"]) == 1
        assert len(_records(tmp_path / "own.jsonl")) == 5
    finally:
        _ray("stop", "--force", own_token=False)


def _node_processes(manager_port: int) -> list:
    """The raylet started with this node manager port and everything under it: one node."""
    import psutil

    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if "raylet" in cmdline and f"--node_manager_port={manager_port}" in cmdline:
            return [proc, *proc.children(recursive=True)]
    raise AssertionError(f"no raylet with node manager port {manager_port}")


def _lose_a_node_mid_job(command: list[str], env: dict[str, str], done: Callable[[], int],
                         log: Path) -> int:
    """`ray start --head` and a second node (its own raylet) on this machine, two CPUs each;
    `command` (a prelabel job with two CPU replicas, which Ray Data spreads over both nodes)
    runs against them, and once `done()` says 4 images are saved, the second node, which
    holds a replica, loses every process. The job must still finish; returns the images
    done before the loss."""
    port, manager_port = free_port(), free_port()
    job = None
    _ray("start", "--head", "--port", str(port), "--num-cpus", "2", "--node-ip-address",
         "127.0.0.1", "--include-dashboard", "false", "--disable-usage-stats")
    try:
        _ray("start", "--address", f"127.0.0.1:{port}", "--num-cpus", "2",
             "--node-ip-address", "127.0.0.1", "--node-manager-port", str(manager_port),
             "--resources", '{"second_node": 1}', "--disable-usage-stats")
        with log.open("w") as stderr:
            job = subprocess.Popen(
                [sys.executable, "-m", "backend.cli", *command, "--ray", f"127.0.0.1:{port}",
                 "--ray-workers", "2"], env={**os.environ, **env, **_TOKEN,
                                            "RAY_USAGE_STATS_ENABLED": "0"},
                stdout=subprocess.DEVNULL, stderr=stderr)
        deadline = time.monotonic() + 300
        while done() < 4:
            assert job.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        node = _node_processes(manager_port)
        held = [" ".join(p.cmdline()) for p in node[1:]]
        assert any("_Replica" in c for c in held), held  # the second node held a replica
        done_before = done()
        for proc in node:
            os.kill(proc.pid, signal.SIGKILL)
        assert job.wait(timeout=400) in (0, 1), log.read_text()[-3000:]
        return done_before
    finally:
        if job is not None and job.poll() is None:
            job.kill()
        _ray("stop", "--force")


@pytest.fixture(scope="module")
def flight(tmp_path_factory) -> dict[str, Path]:
    """24 one-tile frames (the single-process run takes seconds) and a model."""
    root = tmp_path_factory.mktemp("flight")
    rng = np.random.default_rng(29)
    for i in range(24):
        Image.fromarray(survey_scene(rng, 320, 320, 3).image).save(root / f"f{i:02d}.png")
    return {"images": root, "model": make_model_dir(root.parent / "m", version="scale-v1")}


def _job(flight: dict[str, Path]) -> list[str]:
    return ["prelabel", "--model", str(flight["model"]), "--device", "cpu", "--threads", "1",
            "--tile-size", "320"]


def test_a_two_node_cluster_losing_a_node_mid_job_labels_every_image_once(flight, tmp_path):
    """Folder to JSON Lines: the job completes, every image appears exactly once, and the
    predictions are those of one process."""
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    assert main([*_job(flight), "--images", str(flight["images"]), "--output", str(one)]) == 0
    done_before = _lose_a_node_mid_job(
        [*_job(flight), "--images", str(flight["images"]), "--output", str(two)], {},
        lambda: len(two.read_text().splitlines()) if two.exists() else 0, tmp_path / "log")
    assert done_before < 24 and len(two.read_text().splitlines()) == 24
    assert _records(two) == _records(one)


def test_a_project_pre_labelled_by_a_cluster_losing_a_node_gets_one_prediction_per_task(
        flight, label_studio, tmp_path):
    """Label Studio target: after the loss every task has exactly one prediction."""
    from label_studio_sdk import LabelStudio

    from backend.labelstudio.local import import_images

    from .servers import ANIMAL_CONFIG

    ls = LabelStudio(base_url=label_studio.url, api_key=label_studio.token)
    project = ls.projects.create(title="two nodes", label_config=ANIMAL_CONFIG).id
    import_images(label_studio, project, [(f.name, f.read_bytes())
                                          for f in sorted(flight["images"].glob("*.png"))])

    def predicted() -> list[int]:
        return [len(t.predictions) for t in ls.tasks.list(project=project, fields="all")]

    done_before = _lose_a_node_mid_job(
        [*_job(flight), "--project", str(project), "--chunk", "1",
         "--report", str(tmp_path / "report.json")],
        {"LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": label_studio.token},
        lambda: sum(predicted()), tmp_path / "log")
    assert done_before < 24 and predicted() == [1] * 24
