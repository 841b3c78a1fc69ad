"""Start a local Label Studio for the demo and the end-to-end tests.

It runs from its own virtualenv (`.venv-ls`, made by `make setup-ls`), with a legacy API
token so scripts can drive it at once, and with the two settings that let it call a backend
on localhost (`ML_BLOCK_LOCAL_IP=false`, `SSRF_PROTECTION_ENABLED=false`).
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from ..ports import free_port

CHECKOUT_BIN = Path(__file__).resolve().parents[2] / ".venv-ls" / "bin" / "label-studio"


@dataclass(frozen=True)
class LocalLabelStudio:
    url: str
    token: str
    log: Path


def label_studio_bin() -> Path:
    """$TRIDENTLOOP_LABEL_STUDIO_BIN, else the checkout's .venv-ls, else `label-studio` on PATH."""
    if os.environ.get("TRIDENTLOOP_LABEL_STUDIO_BIN"):
        return Path(os.environ["TRIDENTLOOP_LABEL_STUDIO_BIN"])
    if CHECKOUT_BIN.exists():
        return CHECKOUT_BIN
    found = shutil.which("label-studio")
    return Path(found) if found else CHECKOUT_BIN


def wait_for(url: str, timeout: float) -> None:
    """Poll until the server answers (any status below 500)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not come up within {timeout:.0f} s")


def stop_process(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextmanager
def local_label_studio(home: Path, timeout: float = 240) -> Iterator[LocalLabelStudio]:
    """A fresh Label Studio on a free loopback port, data under `home`; stopped on exit."""
    binary = label_studio_bin()
    if not binary.exists():
        raise RuntimeError(
            f"Label Studio is not installed at {binary}: run `make setup-ls` "
            "(or set TRIDENTLOOP_LABEL_STUDIO_BIN)"
        )
    home.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(20)
    port = free_port()
    env = {
        **os.environ,
        "HOME": str(home),
        "LABEL_STUDIO_USERNAME": "admin@example.com",
        "LABEL_STUDIO_PASSWORD": secrets.token_urlsafe(12),
        "LABEL_STUDIO_USER_TOKEN": token,
        "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
        "ML_BLOCK_LOCAL_IP": "false",
        "SSRF_PROTECTION_ENABLED": "false",
    }
    log = home / "label-studio.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [
                str(binary),
                "start",
                "--no-browser",
                "--port",
                str(port),
                # --host only names the URL Label Studio writes into tasks; the address it
                # listens on is --internal-host (default 0.0.0.0: every interface).
                "--internal-host",
                "127.0.0.1",
                "--data-dir",
                str(home / "data"),
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=home,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            wait_for(url + "/health", timeout=timeout)
            yield LocalLabelStudio(url, token, log)
        finally:
            stop_process(proc)


def import_image(server: LocalLabelStudio, project: int, name: str, data: bytes) -> None:
    """Upload one image file into a project, as a person dropping it on the import page."""
    import_images(server, project, [(name, data)])


# Django's DATA_UPLOAD_MAX_NUMBER_FILES: Label Studio answers 500 to more files a request
FILES_PER_REQUEST = 100


def import_images(server: LocalLabelStudio, project: int, files: list[tuple[str, bytes]]
                  ) -> None:
    """Upload image files into a project, `FILES_PER_REQUEST` a request: one task each
    (Label Studio reads one file per form field name, so each gets its own)."""
    for start in range(0, len(files), FILES_PER_REQUEST):
        chunk = files[start:start + FILES_PER_REQUEST]
        response = httpx.post(f"{server.url}/api/projects/{project}/import",
                              headers={"Authorization": f"Token {server.token}"},
                              files=[(f"file{i}", (name, data, "image/png"))
                                     for i, (name, data) in enumerate(chunk)],
                              timeout=300)
        response.raise_for_status()
