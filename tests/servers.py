"""Helpers for tests that run real servers: model directories, ports, readiness."""

from __future__ import annotations

import http.server
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import httpx

from backend.labelstudio.local import stop_process, wait_for
from backend.ports import free_port
from backend.serving.server import serve_in_thread

from .conftest import REPO, fixture_dir, fixture_weights

__all__ = [
    "ANIMAL_CONFIG", "BackendProcess", "FlakyProxy", "ImageHost", "backend_process", "free_port",
    "make_model_dir", "serve_in_thread", "wait_for",
]

LABELS = ["Elephant", "zebra", "BIRD"]

# The model's classes reach these labels three ways: same name, other case, predicted_values.
ANIMAL_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <RectangleLabels name="label" toName="image">
    <Label value="Elephant"/><Label value="Zebra"/><Label value="Avian" predicted_values="bird"/>
  </RectangleLabels>
</View>"""


def make_model_dir(
    dest: Path, fixture: str = "faster_rcnn_R_50_FPN_1x", version: str | None = None
) -> Path:
    """A model directory from a detectron2 fixture, with class names."""
    dest.mkdir(parents=True)
    src = fixture_dir(fixture)
    shutil.copy(src / "config.yaml", dest / "config.yaml")
    shutil.copy(fixture_weights(fixture), dest / "model_final.pth")
    (dest / "labels.txt").write_text("\n".join(LABELS) + "\n")
    if version:
        (dest / "model.json").write_text(f'{{"version": "{version}"}}\n')
    return dest


class LoopbackServer:
    """A real HTTP server on 127.0.0.1, served from a thread while the `with` block runs."""

    def __init__(self, handler: type[http.server.BaseHTTPRequestHandler]) -> None:
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


class FlakyProxy(LoopbackServer):
    """A real HTTP reverse proxy in front of Label Studio that answers 503 to the first
    `failures` requests whose path contains `fail_path`: an outage, on demand."""

    def __init__(self, upstream: str, fail_path: str, failures: int) -> None:
        self.upstream, self.fail_path, self.failures = upstream, fail_path, failures
        self.refused = 0
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                if proxy.fail_path in self.path and proxy.refused < proxy.failures:
                    proxy.refused += 1
                    self.send_response(503)
                    self.send_header("content-length", "0")
                    self.end_headers()
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                r = httpx.request(self.command, proxy.upstream + self.path, headers=headers,
                                  content=body, timeout=60)
                self.send_response(r.status_code)
                for key, value in r.headers.items():
                    if key.lower() not in ("content-length", "transfer-encoding",
                                           "content-encoding", "connection"):
                        self.send_header(key, value)
                self.send_header("content-length", str(len(r.content)))
                self.end_headers()
                self.wfile.write(r.content)

            do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _forward

            def log_message(self, *args) -> None:
                pass

        super().__init__(Handler)


@dataclass
class BackendProcess:
    url: str
    log: Path
    process: subprocess.Popen

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def backend_process(
    args: list[str],
    log: Path,
    env: dict[str, str] | None = None,
    timeout: float = 120,
    verbose: bool = False,
) -> Iterator[BackendProcess]:
    """`tridentloop serve ARGS` as a real process on a free loopback port."""
    port = free_port()
    out = log.open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "backend.cli", *(["-v"] if verbose else []), "serve",
         "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", *args],
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(url + "/health", timeout=timeout)
        yield BackendProcess(url, log, process)
    finally:
        if process.poll() is None:
            stop_process(process)
        out.close()


class ImageHost(LoopbackServer):
    """A real HTTP server on loopback with the routes the media tests need: an image, a
    text file, a large non-image, a redirect, a URL that never answers; it records the
    headers each request carried."""

    def __init__(self, image: bytes) -> None:
        from urllib.parse import parse_qs, urlsplit

        self.image = image
        self.seen: list[tuple[str, dict[str, str]]] = []
        self.stop = threading.Event()
        host = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                host.seen.append((self.path, dict(self.headers.items())))
                route = urlsplit(self.path)
                if route.path == "/hang":
                    host.stop.wait(300)
                    return
                if route.path == "/redirect":
                    self.send_response(302)
                    self.send_header("location", parse_qs(route.query)["to"][0])
                    self.send_header("content-length", "0")
                    self.end_headers()
                    return
                if route.path == "/big":
                    size = int(parse_qs(route.query)["mb"][0]) * 1024**2
                    self.send_response(200)
                    self.send_header("content-length", str(size))
                    self.end_headers()
                    chunk = b"x" * (1 << 20)
                    for _ in range(size >> 20):
                        try:
                            self.wfile.write(chunk)
                        except OSError:
                            return
                    return
                body = host.image if route.path.endswith(".png") else b"just some text"
                self.send_response(200 if route.path != "/missing.png" else 404)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        super().__init__(Handler)
        self.server.daemon_threads = True  # a /hang request must not hold up the close

    def __exit__(self, *exc) -> None:
        self.stop.set()
        super().__exit__(*exc)


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout:.0f} s")
        time.sleep(0.2)
