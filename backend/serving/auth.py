"""Who may call the backend, and where it may listen.

A backend holds a GPU, the project's files and a Label Studio token, so it listens on
loopback unless basic auth protects it (or the operator explicitly says otherwise), and
training or reading job logs always needs credentials. Credentials are compared in constant
time as bytes, so any header (non-ASCII, malformed base64, no colon) is a plain 401, and the
backend's own secret never reaches a child process.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass

USER_ENV, PASS_ENV = "BASIC_AUTH_USER", "BASIC_AUTH_PASS"
SECRET_ENV = (USER_ENV, PASS_ENV)  # never inherited by training jobs


class BindRefused(ValueError):
    """Listening beyond loopback without authentication."""


@dataclass(frozen=True)
class BasicAuth:
    user: bytes
    password: bytes

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> BasicAuth | None:
        user, password = env.get(USER_ENV), env.get(PASS_ENV)
        if not user or not password:
            return None
        return cls(user.encode(), password.encode())

    def accepts(self, header: str | None) -> bool:
        """True for an `Authorization: Basic ...` header carrying exactly these credentials."""
        given = _credentials(header)
        if given is None:
            return False
        user, password = given
        return secrets.compare_digest(user, self.user) & secrets.compare_digest(
            password, self.password
        )

    def __repr__(self) -> str:  # never print the secret
        return "BasicAuth(user=***, password=***)"


def _credentials(header: str | None) -> tuple[bytes, bytes] | None:
    if not header:
        return None
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip().encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error, ValueError):
        return None
    user, colon, password = decoded.partition(b":")
    return (user, password) if colon else None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name other than localhost may resolve to anything


def check_bind(host: str, auth: BasicAuth | None, insecure_no_auth: bool) -> None:
    """Refuse to listen beyond loopback with nothing guarding /predict, /setup and /versions."""
    if is_loopback(host) or auth is not None or insecure_no_auth:
        return
    raise BindRefused(
        f"--host {host} would let anyone who reaches the port use the model, read images "
        f"through it and see job logs. Set {USER_ENV} and {PASS_ENV} (and the same user and "
        "password under 'Use basic auth' in Label Studio's model connection), put it behind "
        "a reverse proxy that authenticates, or pass --insecure-no-auth on a network you trust"
    )


def child_environment(env: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The environment for a child process, without the backend's own credentials."""
    return {k: v for k, v in env.items() if k not in SECRET_ENV}
