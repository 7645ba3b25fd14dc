"""Registry credentials and bearer tokens, kept out of every log and repr.

The distribution auth flow: a request answered 401 carries
``WWW-Authenticate: Bearer realm=...,service=...,scope=...`` (or ``Basic``).
For Bearer we ask the realm for a token (with basic credentials when we have
some, anonymously otherwise) and retry; for Basic we resend with the
credentials. Tokens are cached per (realm, service, scope) until shortly
before they expire, and dropped on a 401 so a long mount survives expiry.
"""

from __future__ import annotations

import base64
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from lazyfs.errors import AuthError, FormatError

__all__ = [
    "Challenge",
    "Credentials",
    "Secret",
    "TokenCache",
    "default_docker_config",
    "load_docker_credentials",
    "parse_challenges",
]

# Refresh this long before the server's expiry, so a token never dies in flight.
TOKEN_EXPIRY_MARGIN = 10.0
# The distribution token spec says to assume 60 s when expires_in is absent.
DEFAULT_TOKEN_LIFETIME = 60.0


class Secret:
    """A string that never shows itself in ``repr``/``str``/f-strings."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret(<redacted>)"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __bool__(self) -> bool:
        return bool(self._value)


@dataclass(frozen=True)
class Credentials:
    """Username and password for one registry; the password is a :class:`Secret`."""

    username: str
    password: Secret

    def basic_header(self) -> str:
        raw = f"{self.username}:{self.password.reveal()}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")


@dataclass(frozen=True)
class Challenge:
    """One parsed ``WWW-Authenticate`` challenge."""

    scheme: str  # lower case: "bearer" or "basic"
    params: dict[str, str] = field(default_factory=dict)

    @property
    def realm(self) -> str | None:
        return self.params.get("realm")


_SCHEME_RE = re.compile(r"\s*,?\s*([A-Za-z][A-Za-z0-9_-]*)")
_PARAM_RE = re.compile(r'\s*([A-Za-z0-9_.-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))\s*,?')


def parse_challenges(header: str) -> list[Challenge]:
    """Parse a ``WWW-Authenticate`` value into challenges (quoted values may hold commas)."""
    out: list[Challenge] = []
    pos = 0
    n = len(header)
    while pos < n:
        m = _SCHEME_RE.match(header, pos)
        if not m:
            break
        scheme = m.group(1).lower()
        pos = m.end()
        params: dict[str, str] = {}
        while pos < n:
            pm = _PARAM_RE.match(header, pos)
            if not pm:
                break
            value = pm.group(2) if pm.group(2) is not None else pm.group(3)
            params[pm.group(1).lower()] = re.sub(r"\\(.)", r"\1", value)
            pos = pm.end()
        out.append(Challenge(scheme, params))
    return out


def default_docker_config() -> Path:
    """``$DOCKER_CONFIG/config.json``, else ``~/.docker/config.json`` (docker's lookup)."""
    base = os.environ.get("DOCKER_CONFIG")
    if base:
        return Path(base) / "config.json"
    return Path.home() / ".docker" / "config.json"


def _config_key_host(key: str) -> str:
    """Docker config keys may be URLs (``https://index.docker.io/v1/``); keep the host."""
    key = key.strip()
    if "://" in key:
        key = key.split("://", 1)[1]
    return key.split("/", 1)[0].lower()


def load_docker_credentials(
    path: str | os.PathLike[str] | None, registry: str
) -> Credentials | None:
    """Credentials for ``registry`` from a docker ``config.json``, or None.

    Reads the ``auths`` section only (base64 ``auth`` or ``username``/
    ``password``); credential helpers are not run. A missing file is normal;
    a malformed one is an error that names the file, never its content.
    """
    cfg_path = Path(path) if path is not None else default_docker_config()
    try:
        text = cfg_path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise AuthError(f"{cfg_path}: cannot read docker config: {exc.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        raise FormatError(f"{cfg_path}: docker config is not valid JSON") from None
    auths = data.get("auths") if isinstance(data, dict) else None
    if not isinstance(auths, dict):
        return None
    wanted = {registry.lower()}
    if registry in ("docker.io", "registry-1.docker.io"):
        wanted |= {"docker.io", "index.docker.io", "registry-1.docker.io"}
    for key, entry in auths.items():
        if _config_key_host(key) not in wanted or not isinstance(entry, dict):
            continue
        if isinstance(entry.get("auth"), str) and entry["auth"]:
            try:
                decoded = base64.b64decode(entry["auth"], validate=True).decode()
            except (ValueError, UnicodeDecodeError):
                raise FormatError(
                    f"{cfg_path}: 'auth' for {key} is not base64 of user:password"
                ) from None
            user, sep, password = decoded.partition(":")
            if not sep:
                raise FormatError(
                    f"{cfg_path}: 'auth' for {key} has no ':' between user and password"
                )
            return Credentials(user, Secret(password))
        if isinstance(entry.get("username"), str) and isinstance(entry.get("password"), str):
            return Credentials(entry["username"], Secret(entry["password"]))
    return None


@dataclass
class _Token:
    value: Secret
    expires_at: float


class TokenCache:
    """Bearer tokens keyed by (realm, service, scope), forgotten before they expire."""

    def __init__(self) -> None:
        self._tokens: dict[tuple[str, str, str], _Token] = {}

    def get(self, key: tuple[str, str, str]) -> Secret | None:
        tok = self._tokens.get(key)
        if tok is None:
            return None
        if time.monotonic() >= tok.expires_at:
            del self._tokens[key]
            return None
        return tok.value

    def put(self, key: tuple[str, str, str], value: str, expires_in: float | None) -> Secret:
        lifetime = expires_in if expires_in and expires_in > 0 else DEFAULT_TOKEN_LIFETIME
        margin = min(TOKEN_EXPIRY_MARGIN, lifetime / 4)
        secret = Secret(value)
        self._tokens[key] = _Token(secret, time.monotonic() + lifetime - margin)
        return secret

    def drop(self, key: tuple[str, str, str]) -> None:
        self._tokens.pop(key, None)

    def __repr__(self) -> str:
        return f"TokenCache({len(self._tokens)} tokens)"
