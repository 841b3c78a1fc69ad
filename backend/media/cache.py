"""A bounded on-disk cache of fetched images, safe for several backends sharing it.

Entries are named by a hash of their URI and appear atomically (a finished temporary file
renamed into place), so a reader sees a whole image or none. Eviction, least recently used
first, runs under an exclusive file lock and tolerates files another process removed
meanwhile. Temporary files left by a killed process are removed at start and, while they
exist, counted against the size bound.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
STALE_TEMP_SECONDS = 3600.0


class DiskCache:
    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.remove_orphans()

    def _path(self, uri: str) -> Path:
        return self.root / hashlib.sha256(uri.encode()).hexdigest()

    def get(self, uri: str) -> bytes | None:
        path = self._path(uri)
        try:
            data = path.read_bytes()
            os.utime(path)  # recently used
        except FileNotFoundError:  # never cached, or evicted by another process
            return None
        return data

    def adopt(self, uri: str, finished: Path) -> bytes:
        """Move a finished download (a file in this cache's folder) in as `uri`'s entry and
        return its bytes; nothing is stored when it alone exceeds the bound."""
        data = finished.read_bytes()
        if len(data) <= self.max_bytes:
            os.replace(finished, self._path(uri))
            self._evict()
        return data

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.root / LOCK_FILE, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _evict(self) -> None:
        with self._locked():
            entries = []
            for path in self.root.iterdir():
                try:
                    stat = path.stat()
                except FileNotFoundError:
                    continue
                if path.name != LOCK_FILE and path.is_file():
                    entries.append((stat.st_mtime, stat.st_size, path))
            total = sum(size for _, size, _ in entries)
            for _, size, path in sorted(entries):
                if total <= self.max_bytes:
                    break
                if not path.name.endswith(".tmp"):  # a download in progress is counted, kept
                    path.unlink(missing_ok=True)
                    total -= size

    def remove_orphans(self) -> int:
        """Delete temporary files whose process is gone (or that are over an hour old)."""
        removed = 0
        with self._locked():
            for path in self.root.glob(".*.tmp"):
                if _orphaned(path):
                    path.unlink(missing_ok=True)
                    removed += 1
        if removed:
            log.info("image cache %s: removed %d temporary file(s) left by a kill",
                     self.root, removed)
        return removed


def _orphaned(path: Path) -> bool:
    """Temporary files are named `.<pid>.<random>.tmp` by their writer."""
    pid = path.name.split(".")[1]
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return False
    if age > STALE_TEMP_SECONDS:
        return True
    if not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
