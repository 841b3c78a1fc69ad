"""Files written whole or not at all: whoever reads one (a person's tool, the next DVC
stage, a resumed run) never sees half of it, whatever stops the writer."""

from __future__ import annotations

import hashlib
from pathlib import Path


def write_atomically(path: str | Path, content: str | bytes) -> None:
    """Write beside `path`, then rename over it (atomic on one filesystem)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    if isinstance(content, bytes):
        tmp.write_bytes(content)
    else:
        tmp.write_text(content)
    tmp.replace(path)


def file_sha256(path: str | Path) -> str:
    """A file's SHA-256, read in chunks: lineage names weights exactly, whatever their size."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
