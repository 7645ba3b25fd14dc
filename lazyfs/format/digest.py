"""OCI digests, checked before they go anywhere.

Kept apart from the format so the registry path can check digests without
importing zstandard.
"""

from __future__ import annotations

import hashlib
import re

from lazyfs.errors import FormatError, IntegrityError

__all__ = ["check_digest", "verify_bytes"]

_DIGEST_RE = {
    "sha256": re.compile(r"sha256:[0-9a-f]{64}"),
    "sha512": re.compile(r"sha512:[0-9a-f]{128}"),
}


def check_digest(value: object, *, what: str = "digest", algorithms: tuple[str, ...] = ("sha256", "sha512")) -> str:
    """Return ``value`` if it is exactly ``sha256:``+64 or ``sha512:``+128 lowercase hex.

    Digests end up in URLs and cache paths, so nothing else gets through.
    """
    if isinstance(value, str):
        algo = value.split(":", 1)[0]
        if algo in algorithms and _DIGEST_RE[algo].fullmatch(value):
            return value
    allowed = " or ".join(f"{a}:<hex>" for a in algorithms)
    raise FormatError(f"{what} {value!r} is not a valid {allowed} digest")


def verify_bytes(data: bytes | memoryview, digest: str, what: str) -> None:
    """IntegrityError unless ``data`` hashes to ``digest`` (sha256 or sha512)."""
    algo = check_digest(digest, what=f"{what}: digest").split(":", 1)[0]
    got = f"{algo}:{hashlib.new(algo, data).hexdigest()}"
    if got != digest:
        raise IntegrityError(f"{what}: digest mismatch: expected {digest}, got {got}")
