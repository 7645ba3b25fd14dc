"""Image references: ``[registry/]repository[:tag][@digest]``.

Parsed the way docker does, so a reference that works with ``docker pull``
means the same image here: a first path component is a registry only if it
looks like a host (has a ``.`` or a ``:``, or is ``localhost``); otherwise
the image is on Docker Hub, and a one-component name lives under
``library/``. Every part is checked against a strict grammar because all of
them end up in URLs; a digest in particular must be exactly ``sha256:`` + 64
or ``sha512:`` + 128 lowercase hex.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from lazyfs.errors import FormatError
from lazyfs.format.digest import check_digest

__all__ = [
    "DOCKER_HUB",
    "DOCKER_HUB_API",
    "Reference",
    "check_digest",
    "is_loopback_host",
    "parse_reference",
]

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})

# One repository path component, as in the distribution reference grammar.
_COMPONENT_RE = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_HOSTNAME_RE = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)(?:\.(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?))*"
)
_PORT_RE = re.compile(r"[0-9]{1,5}")
MAX_NAME_LENGTH = 255


def _split_host_port(host: str) -> tuple[str, str | None]:
    if host.startswith("["):
        end = host.find("]")
        if end < 0:
            raise FormatError(f"registry host {host!r}: unclosed '['")
        name, rest = host[1:end], host[end + 1 :]
        try:
            ipaddress.IPv6Address(name)
        except ValueError as exc:
            raise FormatError(f"registry host {host!r}: {name!r} is not an IPv6 address") from exc
        if rest and not rest.startswith(":"):
            raise FormatError(f"registry host {host!r}: junk after ']'")
        return name, rest[1:] if rest else None
    name, sep, port = host.partition(":")
    return name, port if sep else None


def _check_host(host: str) -> None:
    name, port = _split_host_port(host)
    if port is not None and not (_PORT_RE.fullmatch(port) and 0 < int(port) < 65536):
        raise FormatError(f"registry host {host!r}: port {port!r} is not a number in 1..65535")
    if not host.startswith("[") and not _HOSTNAME_RE.fullmatch(name):
        raise FormatError(f"registry host {host!r} is not a valid host name")


def is_loopback_host(host: str) -> bool:
    """True for ``localhost``, ``127.x.y.z`` and ``[::1]`` (with or without a port).

    Docker talks plain HTTP to these without being asked; so do we.
    """
    name, _ = _split_host_port(host)
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Reference:
    """A checked image reference. ``tag`` and ``digest`` may both be set (the
    digest wins for fetching); at least one of them always is."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    def __post_init__(self) -> None:
        if self.tag is None and self.digest is None:
            raise FormatError(
                f"{self.registry}/{self.repository}: reference has neither tag nor digest"
            )

    @property
    def api_host(self) -> str:
        """``host[:port]`` to send API requests to (Docker Hub's API lives elsewhere)."""
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    @property
    def name(self) -> str:
        """``registry/repository``, without tag or digest."""
        return f"{self.registry}/{self.repository}"

    @property
    def selector(self) -> str:
        """What goes after ``/manifests/``: the digest if pinned, else the tag."""
        return self.digest or self.tag  # type: ignore[return-value]  # one is set

    def with_digest(self, digest: str) -> Reference:
        return Reference(self.registry, self.repository, self.tag, check_digest(digest))

    def __str__(self) -> str:
        out = self.name
        if self.tag is not None:
            out += f":{self.tag}"
        if self.digest is not None:
            out += f"@{self.digest}"
        return out


def parse_reference(s: str) -> Reference:
    """Parse ``s`` as docker would; FormatError says which part is wrong.

    ``ubuntu`` -> ``docker.io/library/ubuntu:latest``;
    ``localhost:5000/a/b@sha256:...`` keeps the host and has no tag.
    """
    if not isinstance(s, str) or not s:
        raise FormatError("empty image reference")
    if "://" in s:
        raise FormatError(
            f"{s!r}: an image reference has no scheme (drop '{s.split('://')[0]}://')"
        )
    if any(c.isspace() for c in s):
        raise FormatError(f"{s!r}: image reference contains white space")
    rest, at, digest = s.partition("@")
    digest_value = check_digest(digest, what=f"{s!r}: digest") if at else None

    first, slash, remainder = rest.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost" or first.startswith("[")):
        registry, path = first, remainder
        _check_host(registry)
    else:
        registry, path = DOCKER_HUB, rest
    if registry.lower() in _HUB_ALIASES:
        registry = DOCKER_HUB

    last_slash = path.rfind("/")
    colon = path.rfind(":")
    tag: str | None = None
    if colon > last_slash:
        path, tag = path[:colon], path[colon + 1 :]
        if not _TAG_RE.fullmatch(tag):
            raise FormatError(f"{s!r}: tag {tag!r} is not valid (letters, digits, _ . -; max 128)")
    if not path:
        raise FormatError(f"{s!r}: no repository name")
    components = path.split("/")
    for comp in components:
        if not _COMPONENT_RE.fullmatch(comp):
            raise FormatError(
                f"{s!r}: repository component {comp!r} is not valid "
                "(lowercase letters and digits, separated by . _ __ or -)"
            )
    if registry == DOCKER_HUB and len(components) == 1:
        path = f"library/{path}"
    if len(registry) + 1 + len(path) > MAX_NAME_LENGTH:
        raise FormatError(f"{s!r}: name is longer than {MAX_NAME_LENGTH} characters")
    if tag is None and digest_value is None:
        tag = "latest"
    return Reference(registry, path, tag, digest_value)
