"""Model versions on disk and the pointer to the one being served.

```
registry/
  versions/<name>/    model directories (config.yaml, model_final.pth, labels.txt, model.json)
  current             the served version's name; replaced atomically (write + rename)
  history.jsonl       every switch, for rollback and audit
```

A server polls `current` (one stat per request) and hot-reloads when it changes; a deploy
writes a new version directory atomically, then switches the pointer.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from .model_dir import ModelDir, ModelDirError

VERSIONS = "versions"
CURRENT = "current"
HISTORY = "history.jsonl"


class RegistryError(ValueError):
    """A registry operation that cannot be done (unknown version, no current version...)."""


class Registry:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @property
    def versions_dir(self) -> Path:
        return self.root / VERSIONS

    def version_names(self) -> list[str]:
        if not self.versions_dir.is_dir():
            return []
        return sorted(
            p.name for p in self.versions_dir.iterdir() if p.is_dir() and not p.name.startswith(".")
        )

    def current_name(self) -> str | None:
        try:
            name = (self.root / CURRENT).read_text().strip()
        except FileNotFoundError:
            return None
        return name or None

    def pointer_stamp(self) -> tuple[int, int] | None:
        """Cheap change detector for the `current` pointer: (inode, mtime_ns)."""
        try:
            stat = (self.root / CURRENT).stat()
        except FileNotFoundError:
            return None
        return stat.st_ino, stat.st_mtime_ns

    def open(self, name: str) -> ModelDir:
        path = self.versions_dir / name
        if not path.is_dir():
            raise RegistryError(
                f"no version {name!r} in {self.root} "
                f"(have: {', '.join(self.version_names()) or 'none'})"
            )
        return ModelDir.open(path)

    def current(self) -> ModelDir:
        name = self.current_name()
        if name is None:
            raise RegistryError(f"registry {self.root} has no current version yet")
        return self.open(name)

    def add(self, source: str | Path, name: str | None = None) -> str:
        """Copy a model directory in as a new version (atomically); returns its name."""
        model = ModelDir.open(source)
        name = name or model.version
        dest = self.versions_dir / name
        if dest.exists():
            raise RegistryError(f"version {name!r} already exists in {self.root}")
        tmp = self.versions_dir / f".{name}.incoming"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(model.path, tmp)
        os.replace(tmp, dest)
        return name

    def switch(self, name: str, reason: str = "switch") -> None:
        """Point `current` at `name` once it is shown to serve (config, weights and labels
        load, one forward pass runs): readers see the old or the new name, never a mix, and
        never a version that would fail the server or its next restart."""
        try:
            self.open(name).validate()
        except Exception as exc:  # a torch.load or forward-pass error is as fatal as a gap
            raise RegistryError(f"version {name!r} cannot be served: {exc}") from exc
        previous = self.current_name()
        tmp = self.root / f".{CURRENT}.{os.getpid()}.tmp"
        tmp.write_text(name + "\n")
        os.replace(tmp, self.root / CURRENT)
        entry = {"time": time.time(), "from": previous, "to": name, "reason": reason}
        with (self.root / HISTORY).open("a") as f:
            f.write(json.dumps(entry) + "\n")

    def history(self) -> list[dict[str, Any]]:
        path = self.root / HISTORY
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def rollback(self) -> str:
        """Return to the version served before the current one; repeated rollbacks keep
        walking back (the history is replayed as a stack, a rollback popping it)."""
        served: list[str] = []
        for entry in self.history():
            if entry["reason"] == "rollback" and served:
                served.pop()
            else:
                served.append(entry["to"])
        if len(served) < 2 or served[-1] != self.current_name():
            raise RegistryError(f"registry {self.root} has no earlier version to roll back to")
        self.switch(served[-2], reason="rollback")
        return served[-2]

    def describe(self) -> list[dict[str, Any]]:
        """Every version with its metadata, newest name last, marking the current one."""
        current = self.current_name()
        described = []
        for name in self.version_names():
            try:
                metadata = ModelDir.open(self.versions_dir / name).metadata
            except ModelDirError as exc:
                metadata = {"error": str(exc)}
            described.append({"version": name, "current": name == current, **metadata})
        return described
