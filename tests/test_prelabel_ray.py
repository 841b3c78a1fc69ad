"""`tridentloop prelabel --ray`: the same job on a (local) Ray cluster gives the same
predictions as one process."""

from __future__ import annotations

import json

import pytest

from backend.cli import main

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
    import sys

    import ray

    from backend.detection.tiling import TilingOptions
    from backend.model_dir import ModelDir
    from backend.prelabel.ray_runner import ray_detect_stream
    from backend.prelabel.sources import Item, image_files

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    args = argparse.Namespace(ray="local", ray_workers=1, device="cpu", precision="fp32",
                              channels_last=None, compile=False, exact=False, opt=[],
                              uncertainty="least-confidence", threads=1)
    items = [Item(f) for f in image_files(str(survey["root"])) if f.endswith(".png")]
    results = list(ray_detect_stream(args, ModelDir.open(survey["model"]), TilingOptions(320),
                                     _DiesOnce(tmp_path / "died"), items))
    assert (tmp_path / "died").exists()  # a worker really was lost
    assert sorted(r.item.uri for r in results) == sorted(i.uri for i in items)
    assert all(r.error is None and r.crops >= 1 for r in results)


def test_cpu_replicas_that_leave_decoding_no_cpu_are_refused_naming_the_numbers():
    from backend.prelabel.ray_runner import check_room

    check_room(2, 0, 3.0)  # two replicas, one CPU left for decoding
    check_room(4, 4, 2.0)  # GPU replicas hold no CPU
    with pytest.raises(ValueError, match=r"--ray-workers 2 on a cluster of 2 CPUs leaves "
                                         r"decoding no CPU .*use --ray-workers 1"):
        check_room(2, 0, 2.0)
    with pytest.raises(ValueError, match=r"needs at least 1\.5 CPUs"):
        check_room(1, 0, 1.0)


def test_a_job_that_stops_making_progress_says_what_it_waits_for(caplog):
    import time

    from backend.prelabel.ray_runner import Watchdog

    watchdog = Watchdog(lambda: "the cluster has 0 of 2 CPUs free", stall_s=0.2)
    try:
        time.sleep(0.7)
    finally:
        watchdog.stop()
    assert "no image finished for" in caplog.text
    assert "the cluster has 0 of 2 CPUs free" in caplog.text


def test_ray_local_starts_its_own_cluster_beside_a_running_one(survey, tmp_path, capsys):
    """A cluster `ray start` runs on this machine, too small for two CPU replicas: joining
    it is refused with the numbers (not a silent hang); `--ray local` starts its own and
    gives what one process gives."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    ray_cli = str(Path(sys.executable).parent / "ray")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    subprocess.run([ray_cli, "start", "--head", "--num-cpus", "2", "--include-dashboard",
                    "false", "--disable-usage-stats", "--node-ip-address", "127.0.0.1"],
                   check=True, env=env, capture_output=True, timeout=120)
    try:
        common = ["prelabel", "--images", str(survey["root"]), "--model",
                  str(survey["model"]), "--device", "cpu", "--threads", "1",
                  "--tile-size", "320", "--ray-workers", "2"]
        assert main([*common, "--output", str(tmp_path / "joined.jsonl"),
                     "--ray", "auto"]) == 2
        assert "--ray-workers 2 on a cluster of 2 CPUs leaves decoding no CPU" in (
            capsys.readouterr().err)
        assert main([*common, "--output", str(tmp_path / "own.jsonl"), "--ray", "local"]) == 1
        assert len(_records(tmp_path / "own.jsonl")) == 5
    finally:
        subprocess.run([ray_cli, "stop", "--force"], env=env, capture_output=True,
                       timeout=120)
