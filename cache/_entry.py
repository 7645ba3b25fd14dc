"""One entry on disk: its header, and reading or writing it through a
directory descriptor.

An entry is a 48-byte header (magic, format version, data length, SHA-256 of
key + data) followed by the data, at ``chunks/ab/ab12...ef`` (the key in hex,
fanned out by its first two hex digits). It is written in ``tmp/`` and renamed
into place when whole, so a reader never sees half an entry.

Nothing here keeps state: the cache decides what a damaged entry costs
(:func:`read_entry` only reports it).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import secrets
import stat
import struct
import time
from collections.abc import Callable
from typing import NamedTuple

from cache._dirs import FILE_MODE

__all__ = [
    "HEADER_SIZE",
    "MAX_KEY_BYTES",
    "TOUCH_GRANULARITY_NS",
    "Damage",
    "check_key",
    "has_entry",
    "is_hex_name",
    "open_entry",
    "pack_entry",
    "pread_all",
    "read_entry",
    "remove_judged",
    "touch",
    "touch_at",
    "write_entry",
]

log = logging.getLogger(__name__)

_MAGIC = b"LZEC"
_VERSION = 1
# magic, version, 3 pad bytes, data length, sha256(key + data)
_HEADER = struct.Struct("<4sB3xQ32s")
HEADER_SIZE = _HEADER.size
MAX_KEY_BYTES = 64

# A disk hit refreshes an atime older than this: LRU at one-second grain is
# plenty for eviction, and a chunk read many times a second dirties its inode
# (a journal write on ext4) once, not on every read.
TOUCH_GRANULARITY_NS = 1_000_000_000

# Recency is ours to set: keep the kernel's relatime from adding its own
# atime writes (and coarse timestamps) on reads. O_NOFOLLOW: an entry that is
# a link is damage, never followed; O_NONBLOCK: a FIFO in its place cannot
# hang the reader (no effect on regular files).
_READ_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
_NOATIME = getattr(os, "O_NOATIME", 0)
_WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW


class Damage(NamedTuple):
    """An entry that must not be served: why, and what was judged (None when
    it could not be stat'ed, so whatever is at the name is removed)."""

    reason: str
    st: os.stat_result | None


def _digest(key: bytes, data: bytes) -> bytes:
    # SHA-256 rather than BLAKE2: with SHA-NI it is twice as fast here. The
    # key is hashed in so an entry cannot pass as another key's data.
    h = hashlib.sha256(key)
    h.update(data)
    return h.digest()


def check_key(key: bytes) -> None:
    if not isinstance(key, bytes) or not 0 < len(key) <= MAX_KEY_BYTES:
        raise ValueError(f"cache key must be 1..{MAX_KEY_BYTES} raw bytes (a digest), got {key!r:.40}")


def is_hex_name(name: str) -> bool:
    """Whether ``name`` could be an entry's (or a fan-out directory's) name."""
    if not name or len(name) % 2 or len(name) > 2 * MAX_KEY_BYTES:
        return False
    try:
        bytes.fromhex(name)
    except ValueError:
        return False
    return True


def pack_entry(key: bytes, data: bytes) -> list[bytes]:
    """The entry for ``key`` as buffers for one ``writev``: header, data."""
    return [_HEADER.pack(_MAGIC, _VERSION, len(data), _digest(key, data)), data]


def touch(target: int) -> None:
    # An explicit clock reading: utime(NULL) would take the kernel's coarse
    # (jiffy) clock, and entries used milliseconds apart would tie.
    now = time.time_ns()
    os.utime(target, ns=(now, now))


def touch_at(sub: int, name: str) -> None:
    now = time.time_ns()
    os.utime(name, dir_fd=sub, follow_symlinks=False, ns=(now, now))


def pread_all(fd: int, size: int, offset: int) -> bytes:
    data = os.pread(fd, size, offset)
    if len(data) == size:
        return data
    parts = [data]
    got = len(data)
    while got < size:
        part = os.pread(fd, size - got, offset + got)
        if not part:
            break  # shorter than its stat said: caller sees the length
        parts.append(part)
        got += len(part)
    return b"".join(parts)


def _write_all(fd: int, buffers: list[bytes]) -> None:
    total = sum(len(b) for b in buffers)
    done = os.writev(fd, buffers)
    if done == total:
        return
    rest = memoryview(b"".join(buffers))[done:]
    while rest:
        n = os.write(fd, rest)
        rest = rest[n:]


def _open(sub: int, name: str) -> int | Damage | None:
    """A read descriptor on entry ``name`` (never through a symbolic link):
    an int, None when absent or unopenable for a passing reason, Damage for a link."""
    try:
        try:
            return os.open(name, _READ_FLAGS | _NOATIME, dir_fd=sub)
        except PermissionError:
            # O_NOATIME needs the file's owner (or CAP_FOWNER): an entry
            # root left in our directory is read without it.
            return os.open(name, _READ_FLAGS, dir_fd=sub)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            log.debug("chunk cache: cannot open %s: %s", name, exc)
            return None
        try:
            link = os.stat(name, dir_fd=sub, follow_symlinks=False)
        except OSError:
            return None
        return Damage("a symbolic link, not followed", link)


def _shape_problem(st: os.stat_result, size: int) -> str | None:
    """Why an entry of ``size`` data bytes with stat ``st`` must go, or None."""
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if st.st_size != HEADER_SIZE + size:
        return f"size {st.st_size}, expected {HEADER_SIZE + size}"
    return None


def read_entry(sub: int, name: str, key: bytes, size: int, *, verify: bool, touch_it: bool) -> bytes | Damage | None:
    """The data of entry ``name`` in directory ``sub``: bytes when good, None
    when absent (or unreadable for a passing reason), :class:`Damage` when
    what is there must go (wrong size, bad header, digest mismatch with
    ``verify``, not a regular file, a symbolic link: never followed)."""
    fd = _open(sub, name)
    if not isinstance(fd, int):
        return fd
    st: os.stat_result | None
    try:
        st = os.fstat(fd)
        reason = _shape_problem(st, size)
        if reason is None:
            head = os.pread(fd, HEADER_SIZE, 0)
            # Reading the whole entry now makes a concurrent eviction
            # harmless: an unlinked file stays readable through our fd.
            data = pread_all(fd, size, HEADER_SIZE)
            magic, version, length, digest = _HEADER.unpack(head)
            if magic != _MAGIC or version != _VERSION or length != size or len(data) != size:
                reason = "bad header"
            elif verify and _digest(key, data) != digest:
                reason = "digest mismatch"
            else:
                if touch_it and time.time_ns() - st.st_atime_ns >= TOUCH_GRANULARITY_NS:
                    with contextlib.suppress(OSError):
                        touch(fd)
                return data
    except (OSError, struct.error) as exc:
        reason = f"read error: {exc}"
        st = None
    finally:
        os.close(fd)
    return Damage(reason, st)


def open_entry(sub: int, name: str, size: int, *, touch_it: bool) -> int | Damage | None:
    """A descriptor on entry ``name`` for range reads of its data (at
    ``HEADER_SIZE + offset``), its size and header checked: an int when good
    (the caller closes it), None when absent, :class:`Damage` when what is
    there must go. The data itself is not read: it was verified when written
    (``verify_at_rest`` readers use :func:`read_entry` instead)."""
    fd = _open(sub, name)
    if not isinstance(fd, int):
        return fd
    st: os.stat_result | None
    try:
        st = os.fstat(fd)
        reason = _shape_problem(st, size)
        if reason is None:
            magic, version, length, _ = _HEADER.unpack(os.pread(fd, HEADER_SIZE, 0))
            if magic != _MAGIC or version != _VERSION or length != size:
                reason = "bad header"
            else:
                if touch_it and time.time_ns() - st.st_atime_ns >= TOUCH_GRANULARITY_NS:
                    with contextlib.suppress(OSError):
                        touch(fd)
                good, fd = fd, -1
                return good
    except (OSError, struct.error) as exc:
        reason = f"read error: {exc}"
        st = None
    finally:
        if fd >= 0:
            os.close(fd)
    return Damage(reason, st)


def write_entry(
    tmp_dir: int, name: str, buffers: list[bytes], *, make_sub: Callable[[str], int], fsync: bool
) -> None:
    """Write an entry in ``tmp_dir``, then rename it to ``name`` in the fan-out
    directory ``make_sub(name[:2])`` opens (and this closes)."""
    tmp = f"{name}.{os.getpid()}.{secrets.token_hex(4)}"
    fd = os.open(tmp, _WRITE_FLAGS, FILE_MODE, dir_fd=tmp_dir)
    try:
        try:
            _write_all(fd, buffers)
            touch(fd)
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        sub = make_sub(name[:2])
        try:
            # renameat replaces whatever is at the name (a link included)
            # without following it.
            os.replace(tmp, name, src_dir_fd=tmp_dir, dst_dir_fd=sub)
        finally:
            os.close(sub)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=tmp_dir)
        raise


def has_entry(sub: int, name: str, size: int) -> bool:
    """Whether an entry of ``size`` data bytes is at ``name``: one stat, no read."""
    try:
        st = os.stat(name, dir_fd=sub, follow_symlinks=False)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_size == HEADER_SIZE + size


def remove_judged(sub: int, name: str, st: os.stat_result | None) -> int | None:
    """Remove the damaged entry at ``name`` if it is still the file judged
    (``st``; None: whatever is there). Returns its size when a regular file
    went (what a scan had counted), else None."""
    try:
        now = os.stat(name, dir_fd=sub, follow_symlinks=False)
    except OSError:
        return None
    # Only remove what we judged: another process may have just renamed a
    # good entry over the damaged one.
    if st is not None and (now.st_ino, now.st_dev) != (st.st_ino, st.st_dev):
        return None
    with contextlib.suppress(OSError):
        os.unlink(name, dir_fd=sub)
    return now.st_size if stat.S_ISREG(now.st_mode) else None  # scans count regular files only
