"""Fetch a task's image from where Label Studio says it lives, and nowhere else.

Task data is written by whoever can import tasks, so every URI is checked against an
allow-list before anything is read:
- `/data/upload/...`, `/data/local-files/?d=...` and full URLs on Label Studio's own host:
  GET from LABEL_STUDIO_URL with the API key (a personal access token, refreshed into
  short-lived access tokens, or a legacy token). Without a Label Studio URL, local-files
  paths are read from disk, under `--local-root` only.
- `http(s)://`: public addresses only. The host is resolved once, every address checked
  (loopback, private, link-local, multicast, reserved and unspecified are refused unless
  `--allow-private-urls`), and the connection made to the checked address, so a name that
  re-resolves elsewhere cannot slip through; each redirect is checked the same way, and
  credentials never follow a redirect to another origin.
- `s3://`, `gs://`, `az://`/`azure-blob://`: only when the operator enables the scheme
  (`--allow-cloud`); then through Label Studio's presign endpoint, or fsspec with the
  backend's own credentials when no Label Studio is configured.
- Plain paths and `file://`: under `--local-root` only.
Anything else (other fsspec protocols, chained `a::b` URLs, NUL bytes, unparsable URLs) is a
clear per-task error. Downloads stream to a temporary file under a size cap and a deadline;
only content that opens as an image is cached.
"""

from __future__ import annotations

import base64
import ipaddress
import logging
import os
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, unquote, urljoin, urlsplit

import httpx
from PIL import Image

from .cache import DiskCache

log = logging.getLogger(__name__)

_LS_PREFIXES = ("/data/upload/", "/data/local-files/")
CLOUD_SCHEMES = {"s3": "s3", "gs": "gs", "gcs": "gs", "az": "az", "azure-blob": "az"}
_ACCESS_TOKEN_LIFETIME = 240.0  # s; Label Studio's access tokens last ~5 min
_MAX_URI = 8192


class MediaError(ValueError):
    """An image that could not or may not be fetched, with the URI and the reason."""


@dataclass
class MediaSettings:
    label_studio_url: str | None = None
    api_key: str | None = None
    cache_dir: Path | None = None
    cache_max_bytes: int = 2 * 1024**3
    timeout: float = 30.0
    max_bytes: int = 512 * 1024**2
    local_roots: list[Path] = field(default_factory=list)
    cloud_schemes: frozenset[str] = frozenset()  # of s3, gs, az (canonical names)
    allow_private_urls: bool = False
    max_redirects: int = 5

    def __post_init__(self) -> None:
        unknown = {s for s in self.cloud_schemes if s not in CLOUD_SCHEMES}
        if unknown:
            raise ValueError(f"cloud schemes {sorted(unknown)}: choose from s3, gs, az")
        self.cloud_schemes = frozenset(CLOUD_SCHEMES[s] for s in self.cloud_schemes)


@dataclass(frozen=True)
class _Origin:
    scheme: str
    host: str
    port: int

    @classmethod
    def of(cls, url: str) -> _Origin:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return cls(parts.scheme.lower(), (parts.hostname or "").lower(), port)


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
                self._access = self._refresh()
                self._expires = time.monotonic() + _ACCESS_TOKEN_LIFETIME
            return {"Authorization": f"Bearer {self._access}"}

    def _refresh(self) -> str:
        url = f"{self.base_url}/api/token/refresh/"
        try:
            response = self.client.post(url, json={"refresh": self.api_key})
            if response.status_code == 200:
                return str(response.json()["access"])
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            raise MediaError(f"Label Studio at {self.base_url} did not refresh the API "
                             f"token ({type(exc).__name__})") from exc
        raise MediaError(
            f"Label Studio refused the API key (HTTP {response.status_code} from "
            "/api/token/refresh/)"
        )


class MediaFetcher:
    def __init__(self, settings: MediaSettings) -> None:
        self.settings = settings
        self.client = httpx.Client(timeout=settings.timeout, follow_redirects=False,
                                   trust_env=False)
        ls_url = settings.label_studio_url
        self.ls_origin = _Origin.of(ls_url) if ls_url else None
        self.auth = (
            LabelStudioAuth(ls_url, settings.api_key, self.client)
            if ls_url and settings.api_key
            else None
        )
        self.cache = (
            DiskCache(settings.cache_dir, settings.cache_max_bytes) if settings.cache_dir else None
        )

    def fetch(
        self, uri: object, task_id: int | None = None, deadline: float | None = None
    ) -> bytes:
        """The bytes of an image `uri`, from the cache when seen before; MediaError for any
        URI that is not allowed, unreachable, too large, too slow or not an image.
        `deadline` is a time.monotonic() instant after which the download gives up."""
        if not isinstance(uri, str) or not uri:
            raise MediaError(f"task {task_id}: no image URI in the task data")
        if len(uri) > _MAX_URI or "\x00" in uri:
            raise MediaError(f"task {task_id}: the image URI is malformed (NUL byte or too long)")
        if self.cache is not None and (cached := self.cache.get(uri)) is not None:
            return cached
        with self._download(uri, task_id, deadline) as path:
            _require_image(path, uri)
            if self.cache is not None:
                return self.cache.adopt(uri, path)
            return path.read_bytes()

    @contextmanager
    def _download(self, uri: str, task_id: int | None, deadline: float | None) -> Iterator[Path]:
        """The resource in a temporary file (removed afterwards, unless the cache took it)."""
        fd, name = tempfile.mkstemp(
            prefix=f".{os.getpid()}.", suffix=".tmp",
            dir=self.cache.root if self.cache is not None else None,
        )
        path = Path(name)
        try:
            with os.fdopen(fd, "wb") as out:
                self._route(uri, task_id, deadline, out)
            yield path
        finally:
            path.unlink(missing_ok=True)

    def _route(self, uri: str, task_id: int | None, deadline: float | None, out) -> None:
        try:
            parts = urlsplit(uri)
            scheme = parts.scheme.lower()
            parts.port  # noqa: B018 (raises on a malformed port)
        except ValueError as exc:
            raise MediaError(f"{uri!r}: not a valid URL ({exc})") from exc
        if "::" in uri and scheme not in ("http", "https"):
            raise MediaError(f"{uri}: chained URLs (a::b) are not allowed")
        if uri.startswith(_LS_PREFIXES) or self._on_label_studio(uri):
            return self._from_label_studio(uri, deadline, out)
        if scheme in CLOUD_SCHEMES:
            canonical = CLOUD_SCHEMES[scheme]
            if canonical not in self.settings.cloud_schemes:
                raise MediaError(
                    f"{uri}: {scheme}:// storage is not enabled on this backend "
                    f"(start it with --allow-cloud {canonical})"
                )
            if self.auth is not None and task_id is not None:
                return self._presigned(uri, task_id, deadline, out)
            return self._fsspec(f"{canonical}://{parts.netloc}{parts.path}", deadline, out)
        if scheme in ("http", "https"):
            return self._http_get(uri, {}, deadline, out)
        if scheme == "" or (scheme == "file" and parts.netloc in ("", "localhost")):
            return self._local(unquote(parts.path) if scheme == "file" else uri, out)
        raise MediaError(
            f"{uri}: the URL scheme {scheme!r} is not allowed (allowed: Label Studio files, "
            "http(s), local paths under --local-root, and s3/gs/az with --allow-cloud)"
        )

    def _on_label_studio(self, uri: str) -> bool:
        base = self.settings.label_studio_url
        return bool(base) and uri.startswith(base.rstrip("/") + "/data/")

    def _from_label_studio(self, uri: str, deadline: float | None, out) -> None:
        if self.auth is None:
            if uri.startswith("/data/local-files/"):
                path = parse_qs(urlsplit(uri).query).get("d", [""])[0]
                return self._local(path, out)
            raise MediaError(
                f"{uri}: a Label Studio file; set LABEL_STUDIO_URL and "
                "LABEL_STUDIO_API_KEY so the backend can download it"
            )
        url = uri if uri.startswith("http") else self.auth.base_url + uri
        try:
            self._http_get(url, self.auth.header(), deadline, out)
        except _Unauthorized:
            out.seek(0)
            out.truncate()
            self._http_get(url, self.auth.header(force_refresh=True), deadline, out)

    def _presigned(self, uri: str, task_id: int, deadline: float | None, out) -> None:
        assert self.auth is not None
        encoded = base64.urlsafe_b64encode(uri.encode()).decode()
        url = f"{self.auth.base_url}/tasks/{task_id}/presign/?fileuri={encoded}"
        self._http_get(url, self.auth.header(), deadline, out)

    def _http_get(self, url: str, headers: dict[str, str], deadline: float | None, out) -> None:
        """GET `url` into `out`, following redirects one checked hop at a time."""
        origin = _Origin.of(url)
        for _ in range(self.settings.max_redirects + 1):
            request_url, extra, extensions = self._connect_target(url)
            try:
                with self.client.stream(
                    "GET", request_url, headers={**headers, **extra},
                    extensions=extensions, timeout=self._timeout(url, deadline),
                ) as response:
                    if response.is_redirect:
                        url = urljoin(url, response.headers.get("location", ""))
                        if _Origin.of(url) != origin:
                            headers = {}  # credentials stay with the origin they were for
                        continue
                    if response.status_code == 401:
                        raise _Unauthorized(url)
                    if response.status_code != 200:
                        raise MediaError(f"{_redact(url)}: HTTP {response.status_code}")
                    self._copy_capped(url, response.iter_bytes(1 << 20), deadline, out)
                    return
            except httpx.TimeoutException as exc:
                raise MediaError(f"{_redact(url)}: timed out") from exc
            except httpx.HTTPError as exc:
                raise MediaError(f"{_redact(url)}: {type(exc).__name__}: {exc}") from exc
        raise MediaError(f"{_redact(url)}: more than {self.settings.max_redirects} redirects")

    def _connect_target(self, url: str) -> tuple[str, dict[str, str], dict]:
        """Where to connect for `url`: Label Studio as configured; any other host at an
        address checked to be public, pinned (Host header and TLS name stay the URL's)."""
        parts = urlsplit(url)
        if parts.scheme.lower() not in ("http", "https"):
            raise MediaError(f"{_redact(url)}: a redirect to {parts.scheme}:// is not allowed")
        origin = _Origin.of(url)
        if origin == self.ls_origin or not origin.host:
            return url, {}, {}
        address = self._checked_address(origin)
        pinned = httpx.URL(url).copy_with(host=address)
        host_header = origin.host if parts.port is None else f"{origin.host}:{parts.port}"
        extensions = {"sni_hostname": origin.host} if origin.scheme == "https" else {}
        return str(pinned), {"Host": host_header}, extensions

    def _checked_address(self, origin: _Origin) -> str:
        try:
            infos = socket.getaddrinfo(origin.host, origin.port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            raise MediaError(f"{origin.host}: cannot resolve ({exc})") from exc
        addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
        if not self.settings.allow_private_urls:
            for address in addresses:
                if not _is_public(address):
                    raise MediaError(
                        f"{origin.host} resolves to {address}, a non-public address: refused "
                        "(start the backend with --allow-private-urls to fetch from your "
                        "own network)"
                    )
        return str(addresses[0])

    def _timeout(self, url: str, deadline: float | None) -> float:
        timeout = self.settings.timeout
        if deadline is not None:
            timeout = min(timeout, deadline - time.monotonic())
            if timeout <= 0:
                raise MediaError(f"{_redact(url)}: the request's deadline has passed")
        return timeout

    def _copy_capped(self, name: str, chunks, deadline: float | None, out) -> None:
        written = 0
        for chunk in chunks:
            written += len(chunk)
            if written > self.settings.max_bytes:
                raise MediaError(
                    f"{_redact(name)}: larger than the download limit of "
                    f"{self.settings.max_bytes:,} bytes"
                )
            if deadline is not None and time.monotonic() > deadline:
                raise MediaError(f"{_redact(name)}: not downloaded before the deadline")
            out.write(chunk)

    def _local(self, path: str, out) -> None:
        try:
            resolved = Path(path).expanduser().resolve()
        except (OSError, RuntimeError, ValueError) as exc:
            raise MediaError(f"{path!r}: not a usable path ({exc})") from exc
        roots = [r.resolve() for r in self.settings.local_roots]
        if not any(resolved.is_relative_to(root) for root in roots):
            raise MediaError(
                f"{path}: local files are served only from "
                f"{', '.join(map(str, roots)) or 'no directory (--local-root)'}"
            )
        if not resolved.is_file():
            raise MediaError(f"{path}: file not found")
        with resolved.open("rb") as f:
            self._copy_capped(path, iter(lambda: f.read(1 << 20), b""), None, out)

    def _fsspec(self, url: str, deadline: float | None, out) -> None:
        import fsspec

        try:
            with fsspec.open(url, "rb") as f:
                self._copy_capped(url, iter(lambda: f.read(1 << 20), b""), deadline, out)
        except MediaError:
            raise
        except Exception as exc:  # fsspec backends raise anything from ImportError to botocore's
            raise MediaError(f"{url}: {type(exc).__name__}: {exc}") from exc

    def close(self) -> None:
        self.client.close()


class _Unauthorized(MediaError):
    pass


def _is_public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_global and not address.is_multicast


def _redact(url: str) -> str:
    """A URL fit for a log line: no query string (presigned URLs carry signatures)."""
    parts = urlsplit(url)
    return parts._replace(query="", fragment="").geturl() if parts.query else url


def _require_image(path: Path, uri: str) -> None:
    """Only what opens as an image is decoded or cached."""
    try:
        with Image.open(path):
            return
    except Image.DecompressionBombError:
        return  # an image all the same: load_image refuses it, naming the pixel limit
    except (OSError, ValueError, SyntaxError) as exc:
        raise MediaError(f"{_redact(uri)}: not an image file") from exc
