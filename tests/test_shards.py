"""Array jobs (AWS Batch, SLURM, Kubernetes Indexed Jobs): each index pre-labels its shard of
a survey, knowing nothing of the others, and `--merge-shards` gives what one run gives."""

from __future__ import annotations

import csv
import json

import pytest

from backend.cli import main
from backend.prelabel.shards import Shard, shard_key
from backend.prelabel.sinks import read_results
from backend.prelabel.sources import image_files, listing_root


def _rows(path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


def _by_image(records: list[dict]) -> dict[str, dict]:
    return {r["image"]: r for r in records}


def test_shards_of_an_array_job_merge_into_what_one_run_writes(survey, tmp_path, monkeypatch,
                                                               capsys):
    model = ["--images", str(survey["root"]), "--model", str(survey["model"]), "--device",
             "cpu", "--tile-size", "320"]

    def run(folder: str, *extra: str) -> int:
        out = tmp_path / folder
        return main(["prelabel", *model, "--output", str(out / "out.jsonl"), "--counts",
                     str(out / "counts.csv"), "--megadetector", str(out / "md.json"), *extra])

    assert run("one") == 1  # the broken file fails, and is listed, in both
    for index in (2, 0):  # AWS Batch runs the indices in any order
        monkeypatch.setenv("AWS_BATCH_JOB_ARRAY_INDEX", str(index))
        monkeypatch.setenv("AWS_BATCH_JOB_ARRAY_SIZE", "3")
        run("array", "--shard", "auto")
    shards = sorted(p.name for p in (tmp_path / "array").iterdir())
    assert shards == ["out.shard-0-of-3.jsonl", "out.shard-0-of-3.report.json",
                      "out.shard-2-of-3.jsonl", "out.shard-2-of-3.report.json"]
    capsys.readouterr()
    assert run("array", "--merge-shards") == 2  # index 1 has not run: nothing merged
    assert "shard(s) [1] of 3 have written nothing yet" in capsys.readouterr().err
    assert not (tmp_path / "array/out.jsonl").exists()

    run("array", "--shard", "1/3")
    assert run("array", "--merge-shards") == 1
    one, merged = (read_results(tmp_path / f / "out.jsonl") for f in ("one", "array"))
    assert len(merged) == 5 and _by_image(merged) == _by_image(one)
    counts = [sorted(_rows(tmp_path / f / "counts.csv")) for f in ("one", "array")]
    assert counts[1] == counts[0]
    md = [json.loads((tmp_path / f / "md.json").read_text()) for f in ("one", "array")]
    assert sorted(md[1]["images"], key=lambda i: i["file"]) == sorted(
        md[0]["images"], key=lambda i: i["file"])
    sizes = [len(read_results(tmp_path / f"array/out.shard-{i}-of-3.jsonl")) for i in range(3)]
    assert sum(sizes) == 5 and max(sizes) < 5  # each image once, the work shared


def test_a_merge_names_the_images_a_shard_still_owes(survey, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    args = ["prelabel", "--images", str(survey["root"]), "--model", str(survey["model"]),
            "--device", "cpu", "--output", str(out)]
    for index in range(2):
        main([*args, "--shard", f"{index}/2"])
    shard = tmp_path / "out.shard-1-of-2.jsonl"
    lines = shard.read_text().splitlines(keepends=True)
    shard.write_text("".join(lines[:-1]))  # the index was killed before its last image
    capsys.readouterr()
    assert main([*args, "--merge-shards"]) == 2
    assert "1 image(s) not done yet" in capsys.readouterr().err
    kept = sum("error" not in r for r in read_results(shard))
    main([*args, "--shard", "1/2"])  # the retried index resumes: what it finished is kept
    assert f"{kept} already done" in capsys.readouterr().err
    assert main([*args, "--merge-shards"]) == 1 and len(read_results(out)) == 5


def test_the_partition_is_stable_and_read_from_each_scheduler():
    names = [f"flight{f}/img{i}.jpg" for f in range(4) for i in range(50)]
    owner = {n: [i for i in range(4) if Shard(i, 4).holds(n)] for n in names}
    assert all(len(o) == 1 for o in owner.values())  # every image in exactly one shard
    assert min(sum(o == [i] for o in owner.values()) for i in range(4)) > 30  # and spread
    # a survey relisted with images added: no image changes shard
    assert all(Shard(owner[n][0], 4).holds(n) for n in reversed(names))
    assert Shard.parse("3/10") == Shard(3, 10)
    slurm = {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "1",
             "SLURM_ARRAY_TASK_COUNT": "8"}
    assert Shard.parse("auto", slurm) == Shard(4, 8)
    k8s = {"JOB_COMPLETION_INDEX": "2", "TRIDENTLOOP_SHARDS": "6"}
    assert Shard.parse("auto", k8s) == Shard(2, 6)
    with pytest.raises(ValueError, match="no array job found"):
        Shard.parse("auto", {"JOB_COMPLETION_INDEX": "2"})
    with pytest.raises(ValueError, match="index runs from 0"):
        Shard.parse("10/10")
    with pytest.raises(ValueError, match="INDEX/COUNT"):
        Shard.parse("3 of 10")


def test_an_image_keeps_its_shard_wherever_a_worker_mounts_the_survey():
    import fsspec

    memory = fsspec.filesystem("memory")
    names = [f"flight{f}/img{i}.jpg" for f in range(2) for i in range(20)]
    split = {}
    for mount in ("memory://mnt/a/survey", "memory://data/survey"):
        for name in names:
            memory.pipe(f"{mount}/{name}", b"")
        for pattern in (mount, f"{mount}/flight*/*.jpg"):
            root = listing_root(pattern)
            split[pattern] = [[shard_key(f, root) for f in image_files(pattern)
                               if Shard(i, 3).holds(shard_key(f, root))] for i in range(3)]
    assert all(s == split["memory://data/survey"] for s in split.values())
    assert sorted(k for shard in split["memory://data/survey"] for k in shard) == sorted(names)
