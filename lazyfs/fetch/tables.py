"""Chunk tables kept on local disk, keyed by their ``chunk_digest``.

A seekable layer's chunk table is fetched on every mount, and it is the one
request each layer makes before the mount is ready. The descriptor pins the
table by digest, so a copy stored under that digest is as good as a fetched
one: it is read back and checked against the digest exactly as a fetched
table is (:func:`lazyfs.format.seekable.read_chunk_table`), and one that
fails the check is discarded and fetched again, never trusted.

Layout: ``<cache dir>/tables/<sha512 hex>``, the bytes read from the blob at
``chunk_table_offset`` (skippable-frame header and payload). The directory
is 0700 and files 0600, written to a temporary name and renamed; everything
below the cache dir is opened with ``O_NOFOLLOW``. Only the cache dir's path
is shared with :mod:`cache`: the chunk cache never sees these files.

Every method is blocking (small files): call them from a worker thread.
A table store never fails a mount: a disk error only costs the fetch.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import stat
from pathlib import Path

from cache import CacheError, open_dir, open_root
from lazyfs.format import MAX_TABLE_SIZE, check_digest

__all__ = ["TABLES_DIR", "TableStore"]

log = logging.getLogger(__name__)

TABLES_DIR = "tables"
_FILE_MODE = 0o600
_OPEN = os.O_CLOEXEC | os.O_NOFOLLOW


class TableStore:
    """Chunk-table bytes under ``<cache_root>/tables``, keyed by ``sha512:<hex>``.

    The cache root is trusted as the chunk cache checked it (ours, writable
    by no one else); the ``tables`` directory in it must be a real directory,
    ours and not writable by group or others, or the store stays unused.
    """

    def __init__(self, cache_root: str | os.PathLike[str]) -> None:
        self.cache_root = Path(cache_root)
        self.root = self.cache_root / TABLES_DIR
        self._refused = False

    def __repr__(self) -> str:
        return f"TableStore({str(self.root)!r})"

    def path(self, digest: str) -> Path:
        return self.root / _name(digest)

    def get(self, digest: str) -> bytes | None:
        """The stored bytes for ``digest``, or None. Not checked here: the
        caller verifies them against ``digest`` like a fetched table."""
        name = _name(digest)
        d = self._dir(create=False)
        if d is None:
            return None
        try:
            try:
                fd = os.open(name, os.O_RDONLY | _OPEN, dir_fd=d)
            except FileNotFoundError:
                return None
            with os.fdopen(fd, "rb") as f:
                st = os.fstat(f.fileno())
                if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_TABLE_SIZE:
                    log.warning("%s: not a stored chunk table (%d bytes); removed", self.root / name, st.st_size)
                    self._unlink(d, name)
                    return None
                return f.read(MAX_TABLE_SIZE + 1)
        except OSError as exc:  # a link (ELOOP), unreadable: as if absent
            log.info("cannot read the stored chunk table %s: %s", self.root / name, exc.strerror)
            return None
        finally:
            os.close(d)

    def put(self, digest: str, data: bytes) -> bool:
        """Store ``data`` (a table that passed its digest check) under
        ``digest``; True once it is on disk."""
        name = _name(digest)
        if len(data) > MAX_TABLE_SIZE:
            return False
        d = self._dir(create=True)
        if d is None:
            return False
        tmp = f".{name[:16]}.{secrets.token_hex(8)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _OPEN, _FILE_MODE, dir_fd=d)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
            os.rename(tmp, name, src_dir_fd=d, dst_dir_fd=d)
            return True
        except OSError as exc:
            log.info("cannot store the chunk table %s: %s", self.root / name, exc.strerror)
            self._unlink(d, tmp)
            return False
        finally:
            os.close(d)

    def discard(self, digest: str) -> None:
        """Remove what is stored for ``digest`` (it failed its check)."""
        d = self._dir(create=False)
        if d is not None:
            try:
                self._unlink(d, _name(digest))
            finally:
                os.close(d)

    def _unlink(self, d: int, name: str) -> None:
        with contextlib.suppress(OSError):
            os.unlink(name, dir_fd=d)

    def _dir(self, *, create: bool) -> int | None:
        """An fd of the tables directory, checked the way the chunk cache
        checks its own (a real directory, ours, 0700), or None."""
        if self._refused or (not create and not os.path.lexists(self.root)):
            return None
        try:
            root = open_root(str(self.cache_root))
            try:
                return open_dir(root, TABLES_DIR, str(self.root))
            finally:
                os.close(root)
        except CacheError as exc:
            self._refuse(str(exc))
            return None

    def _refuse(self, why: str) -> None:
        self._refused = True
        log.warning("chunk table store %s unused: %s", self.root, why)


def _name(digest: str) -> str:
    """The file name of a table: its SHA-512 in hex (checked: it goes in a path)."""
    return check_digest(digest, what="chunk_digest", algorithms=("sha512",)).split(":", 1)[1]
