"""Fetch a task's image bytes from wherever Label Studio says it lives.

- `/data/upload/...`, `/data/local-files/?d=...` (and full URLs on the Label Studio host):
  GET from LABEL_STUDIO_URL with the API key: a personal access token (a JWT refresh token,
  exchanged for short-lived access tokens) or a legacy token.
- `s3://`, `gs://`, `azure-blob://`: Label Studio's presign endpoint when a Label Studio URL
  is configured, else fsspec with the backend's own credentials.
- `http(s)://`: plain GET. Other fsspec URLs (`memory://`, `gcs://`, ...): fsspec.
- Local paths: only under the configured roots, so task data cannot read arbitrary files.

Downloads have timeouts and a size cap, and land in a bounded on-disk cache.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

import httpx

log = logging.getLogger(__name__)

_LS_PREFIXES = ("/data/upload/", "/data/local-files/")
_BUCKETS = {"s3": "s3", "gs": "gs", "gcs": "gs", "azure-blob": "az", "az": "az"}
_ACCESS_TOKEN_LIFETIME = 240.0  # s; Label Studio's access tokens last ~5 min


class MediaError(ValueError):
    """An image that could not be fetched, with the URI and the reason."""


@dataclass
class MediaSettings:
    label_studio_url: str | None = None
    api_key: str | None = None
    cache_dir: Path | None = None
    cache_max_bytes: int = 2 * 1024**3
    timeout: float = 30.0
    max_bytes: int = 512 * 1024**2
    local_roots: list[Path] = field(default_factory=list)


class LabelStudioAuth:
    """Authorization header for Label Studio's API, refreshing PAT access tokens."""

    def __init__(self, base_url: str, api_key: str, client: httpx.Client) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.client = client
        self.is_pat = api_key.count(".") == 2  # a JWT; legacy tokens are plain hex
        self._access: str | None = None
        self._expires = 0.0
        self._lock = threading.Lock()

    def header(self, force_refresh: bool = False) -> dict[str, str]:
        if not self.is_pat:
            return {"Authorization": f"Token {self.api_key}"}
        with self._lock:
            if force_refresh or self._access is None or time.monotonic() > self._expires:
                response = self.client.post(
                    f"{self.base_url}/api/token/refresh/", json={"refresh": self.api_key}
                )
                if response.status_code != 200:
                    raise MediaError(
                        f"Label Studio refused the API key (HTTP "
                        f"{response.status_code} from /api/token/refresh/)"
                    )
                self._access = response.json()["access"]
                self._expires = time.monotonic() + _ACCESS_TOKEN_LIFETIME
            return {"Authorization": f"Bearer {self._access}"}


class MediaFetcher:
    def __init__(self, settings: MediaSettings) -> None:
        self.settings = settings
        self.client = httpx.Client(timeout=settings.timeout, follow_redirects=True)
        ls_url = settings.label_studio_url
        self.auth = (
            LabelStudioAuth(ls_url, settings.api_key, self.client)
            if ls_url and settings.api_key
            else None
        )
        self.cache = (
            DiskCache(settings.cache_dir, settings.cache_max_bytes) if settings.cache_dir else None
        )

    def fetch(self, uri: str, task_id: int | None = None) -> bytes:
        """The bytes of `uri`, from the cache when seen before."""
        if not isinstance(uri, str) or not uri:
            raise MediaError(f"task {task_id}: no image URI in the task data")
        if self.cache is not None:
            cached = self.cache.get(uri)
            if cached is not None:
                return cached
        data = self._fetch(uri, task_id)
        if self.cache is not None:
            self.cache.put(uri, data)
        return data

    def _fetch(self, uri: str, task_id: int | None) -> bytes:
        parsed = urlparse(uri)
        scheme = parsed.scheme.lower()
        if uri.startswith(_LS_PREFIXES) or self._on_label_studio(uri):
            return self._from_label_studio(uri)
        if scheme in _BUCKETS:
            if self.auth is not None and task_id is not None:
                return self._presigned(uri, task_id)
            return self._fsspec(f"{_BUCKETS[scheme]}://{parsed.netloc}{parsed.path}")
        if scheme in ("http", "https"):
            return self._http_get(uri, headers={})
        if scheme in ("", "file"):
            return self._local(unquote(parsed.path) if scheme == "file" else uri)
        return self._fsspec(uri)

    def _on_label_studio(self, uri: str) -> bool:
        base = self.settings.label_studio_url
        return bool(base) and uri.startswith(base.rstrip("/") + "/data/")

    def _from_label_studio(self, uri: str) -> bytes:
        if self.auth is None:
            if uri.startswith("/data/local-files/"):
                path = parse_qs(urlparse(uri).query).get("d", [""])[0]
                return self._local(path)
            raise MediaError(
                f"{uri}: a Label Studio file; set LABEL_STUDIO_URL and "
                "LABEL_STUDIO_API_KEY so the backend can download it"
            )
        url = uri if uri.startswith("http") else self.auth.base_url + uri
        try:
            return self._http_get(url, headers=self.auth.header())
        except _Unauthorized:
            return self._http_get(url, headers=self.auth.header(force_refresh=True))

    def _presigned(self, uri: str, task_id: int) -> bytes:
        assert self.auth is not None
        encoded = base64.urlsafe_b64encode(uri.encode()).decode()
        url = f"{self.auth.base_url}/tasks/{task_id}/presign/?fileuri={encoded}"
        return self._http_get(url, headers=self.auth.header())

    def _http_get(self, url: str, headers: dict[str, str]) -> bytes:
        try:
            with self.client.stream("GET", url, headers=headers) as response:
                if response.status_code == 401:
                    raise _Unauthorized(url)
                if response.status_code != 200:
                    raise MediaError(f"{url}: HTTP {response.status_code}")
                return self._read_capped(url, response.iter_bytes())
        except httpx.TimeoutException as exc:
            raise MediaError(f"{url}: timed out after {self.settings.timeout:.0f} s") from exc
        except httpx.HTTPError as exc:
            raise MediaError(f"{url}: {exc}") from exc

    def _read_capped(self, name: str, chunks) -> bytes:
        data = bytearray()
        for chunk in chunks:
            data += chunk
            if len(data) > self.settings.max_bytes:
                raise MediaError(
                    f"{name}: larger than the download limit of {self.settings.max_bytes:,} bytes"
                )
        return bytes(data)

    def _local(self, path: str) -> bytes:
        resolved = Path(path).expanduser().resolve()
        roots = [r.resolve() for r in self.settings.local_roots]
        if not any(resolved.is_relative_to(root) for root in roots):
            raise MediaError(
                f"{path}: local files are served only from "
                f"{', '.join(map(str, roots)) or 'no directory (--local-root)'}"
            )
        if not resolved.is_file():
            raise MediaError(f"{path}: file not found")
        if resolved.stat().st_size > self.settings.max_bytes:
            raise MediaError(f"{path}: larger than the limit of {self.settings.max_bytes:,} bytes")
        return resolved.read_bytes()

    def _fsspec(self, url: str) -> bytes:
        import fsspec

        try:
            with fsspec.open(url, "rb") as f:
                return self._read_capped(url, iter(lambda: f.read(1 << 20), b""))
        except MediaError:
            raise
        except (FileNotFoundError, ImportError, ValueError, OSError) as exc:
            raise MediaError(f"{url}: {type(exc).__name__}: {exc}") from exc

    def close(self) -> None:
        self.client.close()


class _Unauthorized(MediaError):
    pass


class DiskCache:
    """Content cache keyed by URI hash; evicts least recently used files beyond a size."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()

    def _path(self, uri: str) -> Path:
        return self.root / hashlib.sha256(uri.encode()).hexdigest()

    def get(self, uri: str) -> bytes | None:
        path = self._path(uri)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        os.utime(path)  # mark as recently used
        return data

    def put(self, uri: str, data: bytes) -> None:
        if len(data) > self.max_bytes:
            return
        path = self._path(uri)
        tmp = path.with_suffix(f".{threading.get_ident()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        self._evict()

    def _evict(self) -> None:
        with self._lock:
            files = [
                (p.stat().st_mtime, p.stat().st_size, p)
                for p in self.root.iterdir()
                if p.is_file() and not p.name.endswith(".tmp")
            ]
            total = sum(size for _, size, _ in files)
            for _, size, path in sorted(files):
                if total <= self.max_bytes:
                    break
                path.unlink(missing_ok=True)
                total -= size
