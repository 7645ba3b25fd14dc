"""The chunk store: decompressed frames on disk, keyed by the frame's digest.

On-disk layout under ``root``::

    chunks/ab/ab12...ef   one entry per key, named by the key in hex, fanned
                          out by its first two hex digits (256 directories)
    tmp/                  entries being written; renamed into chunks/ when whole
    lock                  flock(2) target: one eviction scan at a time, across
                          every process sharing the directory

An entry is a 48-byte header (magic, format version, data length, SHA-256 of
key + data) followed by the data. The directory itself is the truth: there is
no index to drift out of step, so a crash, a restart or a second daemon never
needs a repair step.

Recency lives in each entry's atime, set explicitly with ``utime`` on a disk
hit (reads use O_NOATIME so the mount's atime policy stays out of it). It is
shared by every process for free, survives restarts, needs no lock, and costs
at most one syscall per entry per second on a path that already opened the
file. Memory hits do not touch the disk: their keys are remembered and their
atime is refreshed in one batch before the next eviction scan.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import secrets
import stat
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from cachetools import LRUCache

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MEMORY_BYTES",
    "HEADER_SIZE",
    "CacheEntry",
    "CacheStatistics",
    "ChunkCache",
]

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 10 << 30
DEFAULT_MEMORY_BYTES = 256 << 20

_MAGIC = b"LZEC"
_VERSION = 1
# magic, version, 3 pad bytes, data length, sha256(key + data)
_HEADER = struct.Struct("<4sB3xQ32s")
HEADER_SIZE = _HEADER.size

# Eviction frees down to this share of the budget, so it runs in batches
# rather than on every put once the cache is full.
_LOW_WATER = 0.9
# A process rescans after writing this share of the budget, so entries added
# by other processes sharing the directory count against the budget too.
_RESCAN_DIVISOR = 8
# Temp files older than this belong to a writer that died mid-put.
_STALE_TMP_SECONDS = 600.0
# Memory-hit keys waiting for their atime refresh; flushed past this many.
_TOUCH_BATCH = 1024
# A disk hit refreshes an atime older than this: LRU at one-second grain is
# plenty for eviction, and a chunk read many times a second dirties its inode
# (a journal write on ext4) once, not on every read.
_TOUCH_GRANULARITY_NS = 1_000_000_000
_MAX_KEY_BYTES = 64
# Recency is ours to set: keep the kernel's relatime from adding its own
# atime writes (and coarse timestamps) on reads.
_READ_FLAGS = os.O_RDONLY | os.O_CLOEXEC | getattr(os, "O_NOATIME", 0)


@dataclass(frozen=True)
class CacheStatistics:
    """Counters of one :class:`ChunkCache` since it was opened.

    ``disk_bytes``/``disk_entries`` are the directory as of the last scan
    plus this process's own writes since; other processes' writes show up at
    the next scan.
    """

    hits: int
    misses: int
    memory_hits: int
    disk_hits: int
    puts: int
    write_failures: int
    damaged: int
    evictions: int
    disk_bytes: int
    disk_entries: int
    memory_bytes: int
    max_bytes: int


class CacheEntry(NamedTuple):
    """One entry as ``cache ls`` shows it: data size (header excluded), last use."""

    key_hex: str
    size: int
    atime: float


class _Scanned(NamedTuple):
    atime_ns: int
    disk_size: int
    path: str
    name: str


def _digest(key: bytes, data: bytes) -> bytes:
    # SHA-256 rather than BLAKE2: with SHA-NI it is twice as fast here. The
    # key is hashed in so an entry cannot pass as another key's data.
    h = hashlib.sha256(key)
    h.update(data)
    return h.digest()


def _is_hex_name(name: str) -> bool:
    if not name or len(name) % 2 or len(name) > 2 * _MAX_KEY_BYTES:
        return False
    try:
        bytes.fromhex(name)
    except ValueError:
        return False
    return True


def _pread_all(fd: int, size: int, offset: int) -> bytes:
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


class ChunkCache:
    """Decompressed chunks on local disk, with a byte-bounded memory LRU in front.

    Synchronous and thread-safe: the daemon calls it from worker threads.
    Several processes may share one ``root``; writes are atomic renames and
    evictions are serialised by an flock, so readers never see half an entry
    and concurrent writers of one key leave one good entry.

    Args:
        root: the cache directory; created if missing.
        max_bytes: disk budget, headers included. Eviction (oldest atime
            first) starts when a put goes over it.
        memory_bytes: budget of the in-memory LRU; 0 turns it off.
        verify_at_rest: re-hash every entry read from disk against the digest
            stored at write time; a mismatch is treated as damage (removed,
            reported as a miss) so the caller refetches.
        fsync: fsync each entry before it is renamed into place. Off by
            default: a torn entry after a power cut fails the size check (or
            the digest check) and is refetched, which is cheaper than an fsync
            per chunk.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        memory_bytes: int = DEFAULT_MEMORY_BYTES,
        verify_at_rest: bool = False,
        fsync: bool = False,
    ) -> None:
        if max_bytes < 0 or memory_bytes < 0:
            raise ValueError("cache budgets must not be negative")
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.memory_limit = memory_bytes
        self.verify_at_rest = verify_at_rest
        self.fsync = fsync
        self._chunks = os.path.join(self.root, "chunks")
        self._tmp = os.path.join(self.root, "tmp")
        os.makedirs(self._chunks, exist_ok=True)
        os.makedirs(self._tmp, exist_ok=True)
        self._lock_fd = _open_lock(os.path.join(self.root, "lock"))
        self._mem: LRUCache[bytes, bytes] | None = (
            LRUCache(maxsize=memory_bytes, getsizeof=len) if memory_bytes > 0 else None
        )
        # _lock guards the memory LRU and the counters (never held over I/O);
        # _gc_lock keeps this process's threads to one scan at a time (flock
        # alone would also do it, but would block them inside the kernel).
        self._lock = threading.Lock()
        self._gc_lock = threading.Lock()
        self._touched: set[bytes] = set()
        self._warned: set[int] = set()
        self._hits = self._misses = self._memory_hits = self._disk_hits = 0
        self._puts = self._write_failures = self._damaged = self._evictions = 0
        self._disk_bytes = self._disk_entries = self._written_since_scan = 0
        # The first scan learns the size of what earlier runs left and
        # applies this run's budget to it.
        self.gc()

    # -- context manager ---------------------------------------------------------

    def __enter__(self) -> ChunkCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ChunkCache({str(self.root)!r}, max_bytes={self.max_bytes})"

    # -- the hot path ------------------------------------------------------------

    def get(self, key: bytes, size: int) -> bytes | None:
        """The data stored under ``key``, or None on a miss.

        ``size`` is the expected length; an entry of another length, or one
        failing the at-rest check, is damaged: it is removed, counted, and
        reported as a miss so the caller refetches. A memory hit does no I/O.
        """
        data = self.get_nowait(key, size)
        if data is not None:
            return data
        if len(self._touched) > _TOUCH_BATCH:
            self._flush_touched()  # this call does disk I/O anyway
        data = self._read_entry(key, size)
        with self._lock:
            if data is None:
                self._misses += 1
                return None
            self._hits += 1
            self._disk_hits += 1
            self._remember(key, data)
        return data

    def get_nowait(self, key: bytes, size: int) -> bytes | None:
        """The data under ``key`` if it is in the memory LRU, else None.

        Never touches the disk, so an async caller can try it on its event
        loop before paying for a worker thread. A None here is not a miss:
        the entry may still be on disk (call :meth:`get`).
        """
        _check_key(key)
        mem = self._mem
        if mem is None:
            return None
        with self._lock:
            data = mem.get(key)
            if data is not None and len(data) == size:
                self._hits += 1
                self._memory_hits += 1
                self._touched.add(key)
                return data
        return None

    def put(self, key: bytes, data: bytes) -> bool:
        """Store ``data`` under ``key``; True once it is persisted on disk.

        The data always enters the memory LRU. When the disk refuses it (full,
        read-only, over quota, ...) this logs one warning per kind of error,
        returns False and keeps serving from memory: a cache must never turn a
        full disk into a failed read.
        """
        _check_key(key)
        if not isinstance(data, bytes):
            data = bytes(data)
        with self._lock:
            self._puts += 1
            self._remember(key, data)
        entry_size = HEADER_SIZE + len(data)
        if entry_size > self.max_bytes:
            log.debug("chunk of %d bytes exceeds the cache budget; kept in memory only", len(data))
            return False
        path = self._path(key)
        with contextlib.suppress(OSError):
            if os.stat(path).st_size == entry_size:
                # Another daemon (or an earlier put) got there first.
                _touch(path)
                return True
        try:
            self._write_entry(key, data, path)
        except OSError as exc:
            self._write_failed(exc)
            return False
        with self._lock:
            self._disk_bytes += entry_size
            self._disk_entries += 1
            self._written_since_scan += entry_size
            over = self._disk_bytes > self.max_bytes or (
                self._written_since_scan > self.max_bytes // _RESCAN_DIVISOR
            )
        if over:
            try:
                self._maybe_gc()
            except OSError as exc:
                log.warning("chunk cache %s: eviction failed: %s", self.root, exc)
        return True

    def contains(self, key: bytes, size: int) -> bool:
        """Whether ``get(key, size)`` would likely hit: memory or one stat.

        Reads no data and leaves the disk recency alone (a look is not a use);
        a memory entry does move up in the memory LRU.
        """
        _check_key(key)
        mem = self._mem
        if mem is not None:
            with self._lock:
                data = mem.get(key)
            if data is not None and len(data) == size:
                return True
        try:
            return os.stat(self._path(key)).st_size == HEADER_SIZE + size
        except OSError:
            return False

    # -- housekeeping ------------------------------------------------------------

    def statistics(self) -> CacheStatistics:
        with self._lock:
            return CacheStatistics(
                hits=self._hits,
                misses=self._misses,
                memory_hits=self._memory_hits,
                disk_hits=self._disk_hits,
                puts=self._puts,
                write_failures=self._write_failures,
                damaged=self._damaged,
                evictions=self._evictions,
                disk_bytes=self._disk_bytes,
                disk_entries=self._disk_entries,
                memory_bytes=int(self._mem.currsize) if self._mem is not None else 0,
                max_bytes=self.max_bytes,
            )

    def entries(self) -> list[CacheEntry]:
        """Every entry on disk, most recently used first."""
        found = [
            CacheEntry(s.name, max(s.disk_size - HEADER_SIZE, 0), s.atime_ns / 1e9)
            for s in self._scan()
        ]
        found.sort(key=lambda e: e.atime, reverse=True)
        return found

    def gc(self, max_bytes: int | None = None) -> int:
        """Enforce the budget now; returns the bytes freed.

        Over budget, the least recently used entries go until the total is at
        90% of it (headroom, so the next puts do not each trigger a scan).
        Also removes temp files of writers that died. ``max_bytes`` overrides
        the budget for this one call (``lazyerofs cache gc --cache-size``).
        """
        budget = self.max_bytes if max_bytes is None else max_bytes
        with self._gc_lock:
            return self._collect(budget)

    def _maybe_gc(self) -> None:
        """After a put: scan unless a gc finished while this thread waited."""
        with self._gc_lock:
            with self._lock:
                due = self._disk_bytes > self.max_bytes or (
                    self._written_since_scan > self.max_bytes // _RESCAN_DIVISOR
                )
            if due and self._lock_fd >= 0:
                self._collect(self.max_bytes)

    def _collect(self, budget: int) -> int:
        # Caller holds _gc_lock; the flock keeps other processes' scans out,
        # so two daemons never both evict down to the low-water mark.
        with self._flocked():
            self._flush_touched()
            scanned = self._scan()
            total = sum(s.disk_size for s in scanned)
            entries = len(scanned)
            freed = evicted = 0
            if total > budget:
                target = int(budget * _LOW_WATER)
                scanned.sort()  # oldest atime first
                for s in scanned:
                    if total <= target:
                        break
                    try:
                        os.unlink(s.path)
                    except FileNotFoundError:
                        pass  # removed by someone else meanwhile
                    except OSError as exc:
                        log.warning("chunk cache %s: cannot evict: %s", self.root, exc.strerror or exc)
                        break
                    else:
                        freed += s.disk_size
                        evicted += 1
                    total -= s.disk_size
                    entries -= 1
            self._remove_stale_tmp(_STALE_TMP_SECONDS)
            with self._lock:
                self._disk_bytes = total
                self._disk_entries = entries
                self._written_since_scan = 0
                self._evictions += evicted
        if evicted:
            log.debug("chunk cache %s: evicted %d entries, %d bytes", self.root, evicted, freed)
        return freed

    def clear(self) -> int:
        """Remove every entry (disk and memory); returns the bytes freed on disk."""
        with self._lock:
            if self._mem is not None:
                self._mem.clear()
            self._touched.clear()
        freed = 0
        with self._gc_lock, self._flocked():
            for s in self._scan():
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(s.path)
                    freed += s.disk_size
            self._remove_stale_tmp(_STALE_TMP_SECONDS)
            with self._lock:
                self._disk_bytes = self._disk_entries = self._written_since_scan = 0
        return freed

    def verify(self) -> int:
        """Read back every entry and check its digest; returns how many were
        damaged (and removed). For ``lazyerofs cache gc --verify``."""
        damaged = 0
        for s in self._scan():
            key = bytes.fromhex(s.name)
            # Shorter than a header: size 0 makes it fail the size check.
            size = max(s.disk_size - HEADER_SIZE, 0)
            if self._read_entry(key, size, verify=True, touch=False) is None:
                damaged += 1
        return damaged

    def close(self) -> None:
        """Flush pending recency updates and release the lock file. Idempotent."""
        with contextlib.suppress(OSError):
            self._flush_touched()
        with self._lock:
            if self._mem is not None:
                self._mem.clear()
            fd, self._lock_fd = self._lock_fd, -1
        if fd >= 0:
            os.close(fd)

    # -- internals ---------------------------------------------------------------

    def _path(self, key: bytes) -> str:
        name = key.hex()
        return f"{self._chunks}/{name[:2]}/{name}"

    def _remember(self, key: bytes, data: bytes) -> None:
        # Caller holds self._lock.
        mem = self._mem
        if mem is not None and len(data) <= mem.maxsize:
            mem[key] = data

    def _read_entry(self, key: bytes, size: int, *, verify: bool | None = None, touch: bool = True) -> bytes | None:
        path = self._path(key)
        try:
            try:
                fd = os.open(path, _READ_FLAGS)
            except PermissionError:
                # O_NOATIME needs the file's owner (or CAP_FOWNER); an entry
                # written by another user's daemon is read without it.
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.debug("chunk cache: cannot open %s: %s", path, exc)
            return None
        try:
            st = os.fstat(fd)
            if st.st_size != HEADER_SIZE + size:
                reason = f"size {st.st_size}, expected {HEADER_SIZE + size}"
            else:
                head = os.pread(fd, HEADER_SIZE, 0)
                # Reading the whole entry now makes a concurrent eviction
                # harmless: an unlinked file stays readable through our fd.
                data = _pread_all(fd, size, HEADER_SIZE)
                magic, version, length, digest = _HEADER.unpack(head)
                if magic != _MAGIC or version != _VERSION or length != size or len(data) != size:
                    reason = "bad header"
                elif (self.verify_at_rest if verify is None else verify) and _digest(key, data) != digest:
                    reason = "digest mismatch"
                else:
                    if touch and time.time_ns() - st.st_atime_ns >= _TOUCH_GRANULARITY_NS:
                        with contextlib.suppress(OSError):
                            _touch(fd)
                    return data
        except (OSError, struct.error) as exc:
            reason = f"read error: {exc}"
            st = None
        finally:
            os.close(fd)
        self._discard(path, st, reason)
        return None

    def _discard(self, path: str, st: os.stat_result | None, reason: str) -> None:
        log.warning("chunk cache: damaged entry %s (%s): removed", os.path.basename(path), reason)
        with self._lock:
            self._damaged += 1
        try:
            now = os.stat(path)
        except OSError:
            return
        # Only remove what we judged: another process may have just renamed a
        # good entry over the damaged one.
        if st is None or (now.st_ino, now.st_dev) == (st.st_ino, st.st_dev):
            with contextlib.suppress(OSError):
                os.unlink(path)
            with self._lock:
                self._disk_bytes = max(self._disk_bytes - now.st_size, 0)
                self._disk_entries = max(self._disk_entries - 1, 0)

    def _write_entry(self, key: bytes, data: bytes, path: str) -> None:
        header = _HEADER.pack(_MAGIC, _VERSION, len(data), _digest(key, data))
        tmp = f"{self._tmp}/{key.hex()}.{os.getpid()}.{secrets.token_hex(4)}"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        try:
            fd = os.open(tmp, flags, 0o644)
        except FileNotFoundError:
            os.makedirs(self._tmp, exist_ok=True)  # the directory was wiped under us
            fd = os.open(tmp, flags, 0o644)
        try:
            try:
                _write_all(fd, [header, data])
                _touch(fd)
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            try:
                os.rename(tmp, path)
            except FileNotFoundError:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                os.rename(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def _write_failed(self, exc: OSError) -> None:
        code = exc.errno or 0
        with self._lock:
            self._write_failures += 1
            first = code not in self._warned
            self._warned.add(code)
        if first:
            hint = " (disk full)" if code in (errno.ENOSPC, errno.EDQUOT) else ""
            log.warning(
                "chunk cache %s: cannot store chunks%s: %s; serving from memory, will keep trying",
                self.root,
                hint,
                exc.strerror or exc,
            )
        else:
            log.debug("chunk cache %s: write failed again: %s", self.root, exc)

    def _flush_touched(self) -> None:
        with self._lock:
            touched, self._touched = self._touched, set()
        for key in touched:
            with contextlib.suppress(OSError):
                _touch(self._path(key))

    @contextlib.contextmanager
    def _flocked(self) -> Iterator[None]:
        fd = self._lock_fd
        if fd < 0:
            raise ValueError("chunk cache is closed")
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    def _scan(self) -> list[_Scanned]:
        found: list[_Scanned] = []
        try:
            subdirs = list(os.scandir(self._chunks))
        except FileNotFoundError:
            return found
        for sub in subdirs:
            if len(sub.name) != 2 or not sub.is_dir(follow_symlinks=False):
                continue
            try:
                with os.scandir(sub.path) as it:
                    for e in it:
                        if not _is_hex_name(e.name):
                            continue
                        try:
                            st = e.stat(follow_symlinks=False)
                        except FileNotFoundError:
                            continue
                        if stat.S_ISREG(st.st_mode):
                            found.append(_Scanned(st.st_atime_ns, st.st_size, e.path, e.name))
            except FileNotFoundError:
                continue
        return found

    def _remove_stale_tmp(self, age: float) -> None:
        cutoff = time.time() - age
        try:
            with os.scandir(self._tmp) as it:
                for e in it:
                    with contextlib.suppress(OSError):
                        if e.stat(follow_symlinks=False).st_mtime < cutoff:
                            os.unlink(e.path)
        except FileNotFoundError:
            pass


def _open_lock(path: str) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        # A read-only cache (a pre-seeded image, a full remount) still serves
        # hits; flock works on a read-only descriptor on local filesystems.
        if exc.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)


def _touch(target: str | int) -> None:
    # An explicit clock reading: utime(NULL) would take the kernel's coarse
    # (jiffy) clock, and entries used milliseconds apart would tie.
    now = time.time_ns()
    os.utime(target, ns=(now, now))


def _check_key(key: bytes) -> None:
    if not isinstance(key, bytes) or not 0 < len(key) <= _MAX_KEY_BYTES:
        raise ValueError(f"cache key must be 1..{_MAX_KEY_BYTES} raw bytes (a digest), got {key!r:.40}")
