"""Registry credentials: a secret that never shows itself, and docker's config.json.

Only the ``auths`` section of the docker config is read; credential helpers
are not run. Nothing here does I/O on the network.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass
from pathlib import Path

from lazyfs.errors import AuthError, FormatError

__all__ = ["Credentials", "Secret", "default_docker_config", "load_docker_credentials"]


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
        text = cfg_path.read_bytes()  # json.loads decodes: bad UTF-8 is a ValueError there
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise AuthError(f"{cfg_path}: cannot read docker config: {exc.strerror}") from None
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):  # not JSON, not UTF-8, or nested past the stack
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
            try:  # JSON may spell a lone surrogate ("\\ud800"), which no header can carry
                f"{entry['username']}:{entry['password']}".encode()
            except UnicodeEncodeError:
                raise FormatError(f"{cfg_path}: username or password for {key} is not valid Unicode") from None
            return Credentials(entry["username"], Secret(entry["password"]))
    return None
