"""lazyerofs: lazily fetched, verified seekable EROFS layers over FUSE."""

from lazyfs.errors import (
    AuthError,
    FetchError,
    FormatError,
    IntegrityError,
    LazyErofsError,
    MountError,
    NotFoundError,
    RegistryError,
)

__version__ = "0.1.0"

__all__ = [
    "AuthError",
    "FetchError",
    "FormatError",
    "IntegrityError",
    "LazyErofsError",
    "MountError",
    "NotFoundError",
    "RegistryError",
    "__version__",
]
