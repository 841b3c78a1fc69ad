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
                              channels_last=None, compile=False, opt=[],
                              uncertainty="least-confidence", threads=1)
    items = [Item(f) for f in image_files(str(survey["root"])) if f.endswith(".png")]
    results = list(ray_detect_stream(args, ModelDir.open(survey["model"]), TilingOptions(320),
                                     _DiesOnce(tmp_path / "died"), items))
    assert (tmp_path / "died").exists()  # a worker really was lost
    assert sorted(r.item.uri for r in results) == sorted(i.uri for i in items)
    assert all(r.error is None and r.crops >= 1 for r in results)
