"""The one exception tree of lazyerofs.

    LazyErofsError
    ├── FormatError        a blob, table, descriptor or reference is malformed
    ├── IntegrityError     bytes do not match the digest that vouches for them
    ├── RegistryError      the registry said no
    │   ├── AuthError      credentials missing or refused
    │   └── NotFoundError  manifest, blob or tag does not exist
    ├── FetchError         transport failed (after retries) or timed out
    └── MountError         a FUSE, EROFS, loop or overlay mount failed

Lower-layer errors (httpx, zstandard, OSError) are translated at the edge of
the module that sees them and chained with ``raise ... from``.
"""

from __future__ import annotations

__all__ = [
    "AuthError",
    "FetchError",
    "FormatError",
    "IntegrityError",
    "LazyErofsError",
    "MountError",
    "NotFoundError",
    "RegistryError",
]


class LazyErofsError(Exception):
    """Base of every error lazyerofs raises on purpose."""


class FormatError(LazyErofsError):
    """Input does not follow the format it claims (blob, table, descriptor, reference)."""


class IntegrityError(LazyErofsError):
    """Bytes failed the chain of trust: a digest or length did not match."""


class RegistryError(LazyErofsError):
    """The registry answered, but not with what was asked for."""


class AuthError(RegistryError):
    """Authentication is missing or was refused."""


class NotFoundError(RegistryError):
    """The manifest, blob or tag does not exist."""


class FetchError(LazyErofsError):
    """The transport failed after retries, or a deadline passed."""


class MountError(LazyErofsError):
    """A kernel or FUSE mount could not be set up or torn down."""
