"""Real servers for tests: our backend under uvicorn in a thread, on a free loopback port."""

from __future__ import annotations

import shutil
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import uvicorn

from backend.labelstudio.app import Backend, create_app

from .conftest import fixture_dir

LABELS = ["Elephant", "zebra", "BIRD"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_model_dir(
    dest: Path, fixture: str = "faster_rcnn_R_50_FPN_1x", version: str | None = None
) -> Path:
    """A model directory from a detectron2 fixture, with class names."""
    dest.mkdir(parents=True)
    src = fixture_dir(fixture)
    shutil.copy(src / "config.yaml", dest / "config.yaml")
    shutil.copy(src / "model_final.pth", dest / "model_final.pth")
    (dest / "labels.txt").write_text("\n".join(LABELS) + "\n")
    if version:
        (dest / "model.json").write_text(f'{{"version": "{version}"}}\n')
    return dest


@contextmanager
def serve_backend(backend: Backend):
    """Yield the base URL of a live server; stop it afterwards."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(backend), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("backend did not start")
        time.sleep(0.05)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def wait_for(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not come up within {timeout:.0f} s")
