"""What a batch job labels: the tasks of a Label Studio project that have no prediction of
this model version yet, or the image files an fsspec URL, folder or glob names. Each item
knows how it is loaded; the stream only ever calls `load`."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import fsspec
import torch

from ..detection.tiling import Pixels
from ..imagery.device_jpeg import load_pixels
from ..imagery.images import DEFAULT_MAX_PIXELS, DEFAULT_SCALING, PixelScaling
from ..imagery.raster import WindowedRaster, open_image
from ..labelstudio.tasks import is_labeled, list_tasks
from ..media.fetch import MediaFetcher, MediaSettings

JPEG_SUFFIXES = (".jpg", ".jpeg")
IMAGE_SUFFIXES = (*JPEG_SUFFIXES, ".png", ".tif", ".tiff", ".bmp", ".webp")


@dataclass(frozen=True)
class Item:
    uri: str
    task_id: int | None = None  # Label Studio mode


def image_files(pattern: str) -> list[str]:
    """The images a local path, folder, glob or fsspec URL (s3://, gs://, memory://...)
    names, sorted; local ones as plain paths."""
    fs, path = fsspec.core.url_to_fs(pattern)
    if fs.isdir(path):
        found = [p for p in fs.find(path) if p.lower().endswith(IMAGE_SUFFIXES)]
    elif any(ch in path for ch in "*?["):
        found = fs.glob(path)
    elif fs.isfile(path):
        found = [path]
    else:
        raise FileNotFoundError(f"--images {pattern}: no such file, folder or glob match")
    return sorted(_as_named(fs, p) for p in found)


def listing_root(pattern: str) -> str:
    """The folder `--images` names (for a glob, its fixed part; for one file, its folder), in
    the form `image_files` gives: an image's path under it names the image wherever the
    survey is mounted, which is what an array job partitions by."""
    fs, path = fsspec.core.url_to_fs(pattern)
    if not fs.isdir(path):
        wildcard = min((path.index(ch) for ch in "*?[" if ch in path), default=len(path))
        path = path[:wildcard].rsplit("/", 1)[0] if "/" in path[:wildcard] else ""
    return _as_named(fs, path.rstrip("/"))


def _as_named(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """Local paths plain, others as URLs."""
    local = "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))
    return path if local else fs.unstrip_protocol(path)


class FileLoader:
    """Reads image files through fsspec, so buckets work like folders. With `jpeg_device`,
    JPEGs are decoded on that device (`--decode device`), everything else as before."""

    def __init__(
        self, max_pixels: int = DEFAULT_MAX_PIXELS, scaling: PixelScaling = DEFAULT_SCALING,
        jpeg_device: torch.device | None = None,
    ) -> None:
        self.max_pixels = max_pixels
        self.scaling = scaling
        self.jpeg_device = jpeg_device

    def __call__(self, item: Item) -> Pixels | WindowedRaster:
        local = "://" not in item.uri
        if local and not (self.jpeg_device and item.uri.lower().endswith(JPEG_SUFFIXES)):
            return open_image(item.uri, self.max_pixels, self.scaling)  # tiled TIFFs by window
        with fsspec.open(item.uri, "rb") as f:
            data = f.read()
        return load_pixels(data, self.max_pixels, item.uri, self.scaling, self.jpeg_device)


class TaskLoader:
    """Reads a task's image wherever Label Studio says it lives (the backend's media layer).
    The fetcher is made on first use, so a loader can be shipped to Ray workers."""

    def __init__(self, media: MediaSettings, max_pixels: int = DEFAULT_MAX_PIXELS,
                 jpeg_device: torch.device | None = None) -> None:
        self.settings = media
        self.max_pixels = max_pixels
        self.jpeg_device = jpeg_device

    @cached_property
    def media(self) -> MediaFetcher:
        return MediaFetcher(self.settings)

    def __call__(self, item: Item) -> Pixels:
        data = self.media.fetch(item.uri, item.task_id)
        return load_pixels(data, self.max_pixels, item.uri, jpeg_device=self.jpeg_device)


def project_tasks(
    client: Any,
    project: int,
    data_key: str,
    model_version: str,
    give_up_after: float,
    only_unlabeled: bool = False,
) -> tuple[list[Item], int]:
    """Tasks still to pre-label (no prediction of `model_version`), and how many already
    have one: a rerun after a stop picks up where it left off. `only_unlabeled` leaves out
    tasks someone annotated or skipped: the active-learning pool."""
    todo, done = [], 0
    for task in list_tasks(client, project, give_up_after):
        if only_unlabeled and is_labeled(task):
            continue
        versions = {p.get("model_version") for p in task.get("predictions") or []}
        if model_version in versions:
            done += 1
        else:
            todo.append(Item(str((task.get("data") or {}).get(data_key, "")), task["id"]))
    return todo, done
