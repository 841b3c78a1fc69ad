"""Where training starts (backend/weights.py): a file, another project's model directory or
registry, a URL or a detectron2:// model-zoo name, downloaded once into the cache with its
SHA-256 named; wrong content and unreachable addresses are clear errors. Every "remote"
here is a real HTTP(S) server on 127.0.0.1."""

from __future__ import annotations

import datetime
import functools
import hashlib
import http.server
import os
import ssl
import subprocess
import sys

import pytest
import torch

from backend.registry import Registry
from backend.weights import StartError, cached_path, resolve_start, zoo_url

from .conftest import REPO
from .servers import LoopbackServer, free_port, make_model_dir


@pytest.fixture
def zoo(tmp_path, monkeypatch):
    """A directory of weights laid out as detectron2's model zoo, and an empty cache."""
    root = tmp_path / "zoo"
    (root / "ImageNetPretrained" / "MSRA").mkdir(parents=True)
    weights = root / "ImageNetPretrained" / "MSRA" / "R-50.pkl"
    torch.save({"model": {"conv.weight": torch.arange(6.0)}}, weights)
    monkeypatch.setenv("TRIDENTLOOP_CACHE", str(tmp_path / "cache"))
    return root, hashlib.sha256(weights.read_bytes()).hexdigest()


def _host(root) -> LoopbackServer:
    return LoopbackServer(functools.partial(_Quiet, directory=str(root)))


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def test_a_detectron2_name_resolves_to_the_zoo_and_is_cached_with_its_sha256(zoo,
                                                                           monkeypatch):
    root, sha = zoo
    with _host(root) as server:
        monkeypatch.setenv("TRIDENTLOOP_D2_ZOO_URL", server.url + "/")
        name = "detectron2://ImageNetPretrained/MSRA/R-50.pkl"
        assert zoo_url(name) == f"{server.url}/ImageNetPretrained/MSRA/R-50.pkl"
        start = resolve_start(name)
    assert start.sha256 == sha and start.url == zoo_url(name)
    assert start.weights == cached_path(start.url) and start.weights.is_file()
    assert start.location == start.url  # where a teammate finds the same file
    # the server is gone: the cached copy serves, still checked against a pin
    assert resolve_start(f"{name}#sha256={sha}").weights == start.weights
    with pytest.raises(StartError, match="not the pinned 00ff"):
        resolve_start(f"{name}#sha256=00ff")


def test_the_default_zoo_is_detectron2_s_public_address(monkeypatch):
    monkeypatch.delenv("TRIDENTLOOP_D2_ZOO_URL", raising=False)
    assert zoo_url("detectron2://COCO-Detection/faster_rcnn_R_50_FPN_1x/137257794/"
                   "model_final_b275ba.pkl") == (
        "https://dl.fbaipublicfiles.com/detectron2/COCO-Detection/faster_rcnn_R_50_FPN_1x/"
        "137257794/model_final_b275ba.pkl")


def _self_signed(tmp_path):
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


def test_an_https_url_downloads_over_verified_tls(zoo, tmp_path):
    """In a process of its own, as a user runs it: TLS settings are read once per process."""
    root, sha = zoo
    cert, key = _self_signed(tmp_path)
    server = _host(root)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.server.socket = context.wrap_socket(server.server.socket, server_side=True)
    url = server.url.replace("http://", "https://") + "/ImageNetPretrained/MSRA/R-50.pkl"
    env = {**os.environ, "SSL_CERT_FILE": str(cert),  # trust only our loopback server
           "PYTHONPATH": str(REPO)}
    code = ("import sys; from backend.weights import resolve_start; "
            "print(resolve_start(sys.argv[1]).sha256)")
    with server:
        done = subprocess.run([sys.executable, "-c", code, url], env=env, capture_output=True,
                              text=True, timeout=120)
        untrusted = subprocess.run(  # another URL: the first one's download is cached
            [sys.executable, "-c", code, url + "?again"],
            env={**env, "SSL_CERT_FILE": str(tmp_path / "key.pem")},
            capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == sha
    assert untrusted.returncode != 0 and "cannot download" in untrusted.stderr
    assert "certificate" in untrusted.stderr.lower()


def test_an_unreachable_url_names_itself_and_where_to_place_the_file(zoo):
    url = f"http://127.0.0.1:{free_port()}/R-50.pkl"
    with pytest.raises(StartError) as err:
        resolve_start(url)
    assert url in str(err.value) and str(cached_path(url)) in str(err.value)
    assert not cached_path(url).exists()  # nothing half-written is left to be trusted


def test_another_project_s_model_directory_or_registry_brings_its_labels(tmp_path):
    model = make_model_dir(tmp_path / "last-season")
    assert resolve_start(str(model)).labels == ["Elephant", "zebra", "BIRD"]
    registry = Registry(tmp_path / "registry")
    registry.switch(registry.add(model))
    start = resolve_start(str(tmp_path / "registry"))
    assert start.sha256 == hashlib.sha256((model / "model_final.pth").read_bytes()).hexdigest()
    with pytest.raises(StartError, match="does not exist"):
        resolve_start(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(StartError, match="neither a model directory nor a registry"):
        resolve_start(str(tmp_path / "empty"))
