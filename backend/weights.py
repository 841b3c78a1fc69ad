"""Where a training start comes from (`train.base_weights`, `tridentloop init --from`): a
weights file, another project's model directory or registry (its current version), an
fsspec URL (`https://`, `s3://`, `gs://`, ...) or a detectron2 model-zoo name
(`detectron2://ImageNetPretrained/MSRA/R-50.pkl`, `detectron2://COCO-Detection/...`),
resolved to its public address as detectron2 resolves it.

Teams start from last season's model or the zoo, not from random weights, so a start is
named exactly: downloads land in a cache (`$TRIDENTLOOP_CACHE`, else
`~/.cache/tridentloop`), keyed by their URL, and the file's SHA-256 goes into the model's
lineage. A `#sha256=<hex>` suffix pins the expected content: a download or cached file that
differs is refused. Offline, the error names the URL and the path to place the file at.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .files import file_sha256
from .model_dir import ModelDir, ModelDirError
from .registry import Registry, RegistryError

ZOO_SCHEME = "detectron2://"
# detectron2's own model zoo; TRIDENTLOOP_D2_ZOO_URL points elsewhere (a mirror, a test).
ZOO_BASE = "https://dl.fbaipublicfiles.com/detectron2/"
CACHE_ENV = "TRIDENTLOOP_CACHE"


class StartError(ValueError):
    """A start that cannot be had: missing, unreachable, or not the pinned content."""


@dataclass(frozen=True)
class Start:
    """Weights to start training from, and what names them in a lineage."""

    weights: Path  # a local file
    sha256: str
    source: str  # as the user gave it
    url: str | None = None  # where it was downloaded from
    labels: list[str] | None = None  # a model directory's classes (None: unknown)
    lineage: dict[str, Any] | None = None  # a model directory's model.json (None: none)

    @property
    def location(self) -> str:
        """Where a teammate finds these weights again: the address, else the local path."""
        return self.url or str(self.weights.absolute())


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "tridentloop")


def zoo_url(name: str) -> str:
    """`detectron2://X` as detectron2 resolves it: its zoo's base address + X."""
    base = os.environ.get("TRIDENTLOOP_D2_ZOO_URL") or ZOO_BASE
    return base.rstrip("/") + "/" + name[len(ZOO_SCHEME):].lstrip("/")


def _split_pin(spec: str) -> tuple[str, str | None]:
    if "#sha256=" in spec:
        spec, pinned = spec.split("#sha256=", 1)
        return spec, pinned.strip().lower()
    return spec, None


def resolve_start(spec: str) -> Start:
    """The local weights `spec` names, downloaded into the cache if it is remote."""
    target, pinned = _split_pin(spec.strip())
    if target.startswith(ZOO_SCHEME):
        return _download(zoo_url(target), spec, pinned)
    if "://" in target:
        return _download(target, spec, pinned)
    start = _local(Path(target).expanduser(), spec)
    if pinned and start.sha256 != pinned:
        raise StartError(f"{target} has SHA-256 {start.sha256}, not the pinned {pinned}")
    return start


def _local(path: Path, spec: str) -> Start:
    if path.is_file():
        return Start(path, file_sha256(path), spec)
    if not path.is_dir():
        raise StartError(f"train.base_weights: {path} does not exist (a weights file, a model "
                         "directory, a registry, a URL or a detectron2:// name)")
    try:
        model = ModelDir.open(path)
    except ModelDirError:
        try:
            model = Registry(path).current()
        except (RegistryError, ValueError) as exc:
            raise StartError(f"train.base_weights: {path} is neither a model directory nor a "
                             f"registry with a current version ({exc})") from exc
    return Start(model.weights, file_sha256(model.weights), spec, labels=model.labels,
                 lineage=model.metadata)


def cached_path(url: str) -> Path:
    """Where a download of `url` lives: one folder per URL, the file's own name kept."""
    key = hashlib.sha256(url.encode()).hexdigest()[:16]
    return cache_dir() / "weights" / key / (url.rstrip("/").rsplit("/", 1)[-1] or "weights")


def _download(url: str, spec: str, pinned: str | None) -> Start:
    import fsspec

    path = cached_path(url)
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkstemp(prefix=".part-", dir=path.parent)[1])
        try:
            with fsspec.open(url, "rb") as source, tmp.open("wb") as out:
                while chunk := source.read(1 << 22):
                    out.write(chunk)
        except Exception as exc:  # every filesystem raises its own kinds
            tmp.unlink(missing_ok=True)
            raise StartError(f"cannot download {url} ({type(exc).__name__}: {exc}); offline, "
                             f"place the file at {path}") from exc
        tmp.replace(path)
    digest = file_sha256(path)
    if pinned and digest != pinned:
        raise StartError(f"{url} (cached at {path}) has SHA-256 {digest}, not the pinned "
                         f"{pinned}: delete the cached file to download it again, or fix the "
                         "pin")
    return Start(path, digest, spec, url=url)
