"""Helpers for tests that run real servers: model directories, ports, readiness."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import httpx

from backend.local_label_studio import wait_for
from backend.serving.server import free_port, serve_in_thread

from .conftest import fixture_dir, fixture_weights

__all__ = [
    "ANIMAL_CONFIG", "FlakyProxy", "free_port", "make_model_dir", "serve_in_thread", "wait_for"
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


class FlakyProxy:
    """A real HTTP reverse proxy in front of Label Studio that answers 503 to the first
    `failures` requests whose path contains `fail_path`: an outage, on demand."""

    def __init__(self, upstream: str, fail_path: str, failures: int) -> None:
        import http.server

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

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FlakyProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
