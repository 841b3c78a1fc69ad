"""Array jobs: a survey split across N one-GPU workers that know nothing of each other (AWS
Batch array jobs, SLURM arrays, Kubernetes Indexed Jobs), then merged into what one run
writes.

An image belongs to shard `sha256(its path under --images) mod N`: the partition needs no
coordination, does not move when images are added to the folder or listed in another order
or when each worker mounts the survey at another path, and spreads a survey's flights
evenly. Each shard writes its own results file beside `--output`
(`results.shard-3-of-10.jsonl`), its progress file as in a single run, so a retried array
index resumes where it stopped. `--merge-shards` checks that every shard is there and that
every image of the listing was done exactly once, then writes the results file and the
exports (COCO, MegaDetector, counts, GeoJSON) one run would have written.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .sinks import read_results

# index, count: the array's environment as each scheduler sets it
_SCHEDULERS = (
    ("AWS Batch", "AWS_BATCH_JOB_ARRAY_INDEX", "AWS_BATCH_JOB_ARRAY_SIZE"),
    ("SLURM", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT"),
    ("Kubernetes Indexed Job", "JOB_COMPLETION_INDEX", "TRIDENTLOOP_SHARDS"),
)


@dataclass(frozen=True)
class Shard:
    index: int  # from 0
    count: int

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"--shard {self.index}/{self.count}: the index runs from 0 to "
                             "the count - 1")

    @classmethod
    def parse(cls, spec: str, environ: Mapping[str, str] = os.environ) -> Shard:
        """`I/N`, or `auto`: the array index and size of the scheduler running this job."""
        if spec == "auto":
            return cls.from_environment(environ)
        match = re.fullmatch(r"(\d+)/(\d+)", spec.strip())
        if match is None:
            raise ValueError(f"--shard {spec!r}: give INDEX/COUNT (from 0, e.g. 3/10) or auto")
        return cls(int(match[1]), int(match[2]))

    @classmethod
    def from_environment(cls, environ: Mapping[str, str]) -> Shard:
        for name, index, count in _SCHEDULERS:
            if index in environ and count in environ:
                first = int(environ.get("SLURM_ARRAY_TASK_MIN", "0")) if name == "SLURM" else 0
                return cls(int(environ[index]) - first, int(environ[count]))
        raise ValueError(
            "--shard auto: no array job found in the environment (AWS Batch sets "
            "AWS_BATCH_JOB_ARRAY_INDEX/SIZE, SLURM SLURM_ARRAY_TASK_ID/COUNT; for a "
            "Kubernetes Indexed Job set TRIDENTLOOP_SHARDS to its completions); or give "
            "--shard INDEX/COUNT")

    def holds(self, key: str) -> bool:
        return owner(key, self.count) == self.index

    def path(self, output: Path) -> Path:
        """Where this shard writes what a single run writes to `output`."""
        return output.with_name(f"{output.stem}.shard-{self.index}-of-{self.count}"
                                f"{output.suffix}")


def owner(key: str, count: int) -> int:
    """The shard of `count` an image (its `shard_key`) belongs to."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % count


def shard_key(image: str, root: str) -> str:
    """An image's path under the listing's root: the same on every worker, wherever it
    mounts the survey (`/mnt/a/survey/f1/x.jpg` and `/data/survey/f1/x.jpg` are `f1/x.jpg`)."""
    return image[len(root):].lstrip("/") if image.startswith(root) else image


def shard_files(output: Path) -> tuple[int, list[Path]]:
    """The shard count and the shards' results files beside `output`, in index order;
    an error names any shard missing (its array index has not run)."""
    pattern = re.compile(re.escape(output.stem) + r"\.shard-(\d+)-of-(\d+)"
                         + re.escape(output.suffix))
    found = {}
    for path in output.parent.glob(f"{output.stem}.shard-*-of-*{output.suffix}"):
        match = pattern.fullmatch(path.name)
        if match is not None:
            found[(int(match[1]), int(match[2]))] = path
    counts = {count for _, count in found}
    if not counts:
        raise FileNotFoundError(f"--merge-shards: no shard files beside {output} "
                                f"({output.stem}.shard-I-of-N{output.suffix})")
    if len(counts) > 1:
        raise ValueError(f"--merge-shards: shard files of different splits beside {output} "
                         f"(counts {sorted(counts)}): remove the old ones")
    count = counts.pop()
    missing = [i for i in range(count) if (i, count) not in found]
    if missing:
        raise FileNotFoundError(
            f"--merge-shards: shard(s) {missing} of {count} have written nothing yet (run those "
            "array indices)")
    return count, [found[(i, count)] for i in range(count)]


def merge_results(output: Path, images: Sequence[str], root: str) -> list[dict[str, Any]]:
    """Every shard's records, in listing order, each image exactly once: an error names the
    images a shard has not done (rerun its index) or did although another shard owns them."""
    count, files = shard_files(output)
    by_image: dict[str, dict[str, Any]] = {}
    for index, path in enumerate(files):
        shard = Shard(index, count)
        for record in read_results(path):
            if not shard.holds(shard_key(record["image"], root)) or record["image"] in by_image:
                raise ValueError(f"--merge-shards: {path} holds {record['image']}, which "
                                 "belongs to another shard (files of another listing?)")
            by_image[record["image"]] = record
    not_done = [image for image in images if image not in by_image]
    if not_done:
        owners = sorted({owner(shard_key(image, root), count) for image in not_done})
        raise ValueError(f"--merge-shards: {len(not_done)} image(s) not done yet (e.g. "
                         f"{not_done[0]}); rerun shard(s) {owners} of {count}")
    return [by_image[image] for image in images if image in by_image]
