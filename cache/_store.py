"""The chunk store: decompressed frames on disk, keyed by the frame's digest.

On-disk layout under ``root`` (directories 0700, files 0600: a private
image's bytes are nobody else's business)::

    chunks/ab/ab12...ef   one entry per key, named by the key in hex, fanned
                          out by its first two hex digits (256 directories)
    tmp/                  entries being written; renamed into chunks/ when whole
    lock                  flock(2) target: one eviction scan at a time, across
                          every process sharing the directory

An entry is a 48-byte header (magic, format version, data length, SHA-256 of
key + data) followed by the data. The directory itself is the truth: there is
no index to drift out of step, so a crash, a restart or a second daemon never
needs a repair step.

Because the directory is the truth, it must be ours. The root, ``chunks/`` and
``tmp/`` must be owned by the effective user and writable by nobody else, or
the cache refuses to open (:class:`CacheError`): whoever can write there can
plant entries, and an entry's own digest cannot tell a forgery from the real
thing. Below the root everything goes through directory descriptors opened
with ``O_NOFOLLOW`` (``openat``, ``renameat``, ``unlinkat``, ``fstatat``), so a
symbolic link planted anywhere inside is never followed: an entry that is a
link is damage, a ``chunks/xx`` that is a link is skipped, a ``tmp`` that is a
link is refused, and nothing outside the root is read, written or removed.

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
    "CacheError",
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

_DIR_MODE = 0o700
_FILE_MODE = 0o600
# What a cache root holds; a root holding anything else is someone's
# directory that was pointed at, and its mode is not ours to change.
_CACHE_NAMES = frozenset({"chunks", "tmp", "lock"})
# Never through a symlink: O_DIRECTORY|O_NOFOLLOW fails on one (ENOTDIR).
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# A handle good only for *at() calls: cheaper than a readable open, and all
# the hot path needs of chunks/xx.
_PATH_FLAGS = getattr(os, "O_PATH", os.O_RDONLY) | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# Recency is ours to set: keep the kernel's relatime from adding its own
# atime writes (and coarse timestamps) on reads. O_NOFOLLOW: an entry that is
# a link is damage, never followed; O_NONBLOCK: a FIFO in its place cannot
# hang the reader (no effect on regular files).
_READ_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
_NOATIME = getattr(os, "O_NOATIME", 0)
_WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW


class CacheError(Exception):
    """The cache directory cannot be used, or cannot be trusted.

    Raised when opening a cache whose root (or ``chunks/``, ``tmp/``, ``lock``)
    cannot be created or opened, is not a directory, is a symbolic link, is
    owned by another user, or is writable by group or others. The message
    names the path and the reason; callers show it as it is.
    """


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
    sub: str  # the chunks/ subdirectory it was found in
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
    Several processes of the same user may share one ``root``; writes are
    atomic renames and evictions are serialised by an flock, so readers never
    see half an entry and concurrent writers of one key leave one good entry.

    The directory is trusted, not checked: ``root``, ``chunks/`` and ``tmp/``
    must belong to the effective user and be writable by no one else, or the
    constructor raises :class:`CacheError`. A root readable by others is
    tightened to 0700 (logged) when it holds nothing but the cache; new
    directories are made 0700 and entries 0600. No symbolic link inside the
    root is ever followed.

    Args:
        root: the cache directory; created (0700) if missing.
        max_bytes: disk budget, headers included. Eviction (oldest atime
            first) starts when a put goes over it.
        memory_bytes: budget of the in-memory LRU; 0 turns it off.
        verify_at_rest: re-hash every entry read from disk against the
            SHA-256 of key + data stored in that entry's own header at write
            time; a mismatch is treated as damage (removed, reported as a
            miss) so the caller refetches. This catches corruption (bit rot,
            torn or misdirected writes, an entry renamed to another key), NOT
            forgery: whoever can write the directory can write a matching
            header too. Entries hold decompressed data, so the frame's SHA-512
            (over the compressed bytes) cannot be re-checked here; protection
            against a hostile writer is the directory's ownership and mode,
            which the constructor enforces.
        fsync: fsync each entry before it is renamed into place. Off by
            default: a torn entry after a power cut fails the size check (or
            the digest check) and is refetched, which is cheaper than an fsync
            per chunk.

    Raises:
        CacheError: ``root`` cannot be created or opened, or is not safe to
            trust (see above).
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
        self._root_fd = self._chunks_fd = self._tmp_fd = self._lock_fd = -1
        # Directory handles replaced after tmp/ or chunks/ vanished under us;
        # kept open until close() so a thread still using one never sees its
        # number reused for another file.
        self._retired: list[int] = []
        try:
            self._root_fd = _open_root(str(self.root))
            # listdir on a dup of the fd: nothing here follows a link.
            foreign = set(os.listdir(self._root_fd)) - _CACHE_NAMES
            _check_trusted(self._root_fd, str(self.root), tighten=not foreign)
            if foreign and os.fstat(self._root_fd).st_mode & 0o077:
                log.info(
                    "chunk cache %s also holds other files: its mode is left alone (chunks/ and tmp/ are 0700)",
                    self.root,
                )
            self._chunks_fd = _open_dir(self._root_fd, "chunks", f"{self.root}/chunks")
            self._tmp_fd = _open_dir(self._root_fd, "tmp", f"{self.root}/tmp")
            self._lock_fd = _open_lock(self._root_fd, f"{self.root}/lock")
        except BaseException:
            self._release_fds()
            raise
        self._mem: LRUCache[bytes, bytes] | None = (
            LRUCache(maxsize=memory_bytes, getsizeof=len) if memory_bytes > 0 else None
        )
        # _lock guards the memory LRU, the counters and the directory handles
        # (never held over I/O); _gc_lock keeps this process's threads to one
        # scan at a time (flock alone would also do it, but would block them
        # inside the kernel).
        self._lock = threading.Lock()
        self._gc_lock = threading.Lock()
        self._touched: set[bytes] = set()
        self._warned: set[int] = set()
        self._warned_paths: set[str] = set()
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

    def __del__(self) -> None:
        # A cache dropped without close() must not leak its directory handles.
        with contextlib.suppress(Exception):  # at interpreter shutdown, nothing to protect
            self._release_fds()

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
        name = key.hex()
        sub = self._sub(name[:2])
        if sub is not None:
            try:
                st = os.stat(name, dir_fd=sub, follow_symlinks=False)
                if stat.S_ISREG(st.st_mode) and st.st_size == entry_size:
                    # Another daemon (or an earlier put) got there first.
                    with contextlib.suppress(OSError):
                        _touch_at(sub, name)
                    return True
            except OSError:
                pass
            finally:
                os.close(sub)
        try:
            self._write_entry(key, data)
        except (OSError, CacheError) as exc:
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
        name = key.hex()
        sub = self._sub(name[:2])
        if sub is None:
            return False
        try:
            st = os.stat(name, dir_fd=sub, follow_symlinks=False)
        except OSError:
            return False
        finally:
            os.close(sub)
        return stat.S_ISREG(st.st_mode) and st.st_size == HEADER_SIZE + size

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
                        self._unlink_entry(s)
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
                    self._unlink_entry(s)
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
            if not s.name.startswith(s.sub):
                # Filed under the wrong fan-out directory: no lookup finds it.
                self._note_damage(s.name, "in the wrong directory")
                with contextlib.suppress(OSError):
                    self._unlink_entry(s)
                damaged += 1
                continue
            key = bytes.fromhex(s.name)
            # Shorter than a header: size 0 makes it fail the size check.
            size = max(s.disk_size - HEADER_SIZE, 0)
            if self._read_entry(key, size, verify=True, touch=False) is None:
                damaged += 1
        return damaged

    def close(self) -> None:
        """Flush pending recency updates and release the directory. Idempotent.

        Call it once no other thread uses the cache: afterwards every get is
        a miss and every put a write failure.
        """
        with contextlib.suppress(OSError):
            self._flush_touched()
        with self._lock:
            if self._mem is not None:
                self._mem.clear()
            self._release_fds()

    # -- internals ---------------------------------------------------------------

    def _release_fds(self) -> None:
        fds = [getattr(self, a, -1) for a in ("_lock_fd", "_chunks_fd", "_tmp_fd", "_root_fd")]
        fds += getattr(self, "_retired", [])
        self._lock_fd = self._chunks_fd = self._tmp_fd = self._root_fd = -1
        self._retired = []
        for fd in fds:
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)

    def _remember(self, key: bytes, data: bytes) -> None:
        # Caller holds self._lock.
        mem = self._mem
        if mem is not None and len(data) <= mem.maxsize:
            mem[key] = data

    def _sub(self, prefix: str) -> int | None:
        """A handle on ``chunks/<prefix>`` for *at() calls, or None when it
        does not exist, is not a real directory, or the cache is closed."""
        try:
            return os.open(prefix, _PATH_FLAGS, dir_fd=self._chunks_fd)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno in (errno.ENOTDIR, errno.ELOOP):
                self._warn_path(f"{self.root}/chunks/{prefix}", "is not a directory (a symbolic link?): ignored")
            else:
                log.debug("chunk cache %s: cannot open chunks/%s: %s", self.root, prefix, exc)
            return None

    def _make_sub(self, prefix: str) -> int:
        """Like :meth:`_sub`, creating the directory (0700) when missing."""
        chunks = self._chunks_fd
        try:
            return os.open(prefix, _PATH_FLAGS, dir_fd=chunks)
        except FileNotFoundError:
            pass
        except OSError as exc:
            if exc.errno in (errno.ENOTDIR, errno.ELOOP):
                self._warn_path(f"{self.root}/chunks/{prefix}", "is not a directory (a symbolic link?): not writing into it")
            raise
        with contextlib.suppress(FileExistsError):
            os.mkdir(prefix, _DIR_MODE, dir_fd=chunks)
        return os.open(prefix, _PATH_FLAGS, dir_fd=chunks)

    def _read_entry(self, key: bytes, size: int, *, verify: bool | None = None, touch: bool = True) -> bytes | None:
        name = key.hex()
        sub = self._sub(name[:2])
        if sub is None:
            return None
        try:
            return self._read_at(sub, name, key, size, verify, touch)
        finally:
            os.close(sub)

    def _read_at(
        self, sub: int, name: str, key: bytes, size: int, verify: bool | None, touch: bool
    ) -> bytes | None:
        try:
            try:
                fd = os.open(name, _READ_FLAGS | _NOATIME, dir_fd=sub)
            except PermissionError:
                # O_NOATIME needs the file's owner (or CAP_FOWNER): an entry
                # root left in our directory is read without it.
                fd = os.open(name, _READ_FLAGS, dir_fd=sub)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                log.debug("chunk cache: cannot open %s: %s", name, exc)
                return None
            # A symbolic link where an entry belongs: never followed, removed.
            try:
                link = os.stat(name, dir_fd=sub, follow_symlinks=False)
            except OSError:
                return None
            self._discard(sub, name, link, "a symbolic link, not followed")
            return None
        st: os.stat_result | None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                reason = "not a regular file"
            elif st.st_size != HEADER_SIZE + size:
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
        self._discard(sub, name, st, reason)
        return None

    def _note_damage(self, name: str, reason: str) -> None:
        log.warning("chunk cache: damaged entry %s (%s): removed", name, reason)
        with self._lock:
            self._damaged += 1

    def _discard(self, sub: int, name: str, st: os.stat_result | None, reason: str) -> None:
        self._note_damage(name, reason)
        try:
            now = os.stat(name, dir_fd=sub, follow_symlinks=False)
        except OSError:
            return
        # Only remove what we judged: another process may have just renamed a
        # good entry over the damaged one.
        if st is None or (now.st_ino, now.st_dev) == (st.st_ino, st.st_dev):
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=sub)
            if stat.S_ISREG(now.st_mode):  # scans count regular files only
                with self._lock:
                    self._disk_bytes = max(self._disk_bytes - now.st_size, 0)
                    self._disk_entries = max(self._disk_entries - 1, 0)

    def _write_entry(self, key: bytes, data: bytes) -> None:
        buffers = [_HEADER.pack(_MAGIC, _VERSION, len(data), _digest(key, data)), data]
        name = key.hex()
        try:
            self._write_at(name, buffers)
        except FileNotFoundError:
            # tmp/ or chunks/ was removed under us (an rm -rf of the cache):
            # open them afresh, once.
            self._reopen_dirs()
            self._write_at(name, buffers)

    def _write_at(self, name: str, buffers: list[bytes]) -> None:
        tmp_dir = self._tmp_fd
        tmp = f"{name}.{os.getpid()}.{secrets.token_hex(4)}"
        fd = os.open(tmp, _WRITE_FLAGS, _FILE_MODE, dir_fd=tmp_dir)
        try:
            try:
                _write_all(fd, buffers)
                _touch(fd)
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            sub = self._make_sub(name[:2])
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

    def _reopen_dirs(self) -> None:
        chunks = _open_dir(self._root_fd, "chunks", f"{self.root}/chunks")
        try:
            tmp = _open_dir(self._root_fd, "tmp", f"{self.root}/tmp")
        except BaseException:
            os.close(chunks)
            raise
        with self._lock:
            if self._root_fd < 0:  # closed meanwhile
                os.close(chunks)
                os.close(tmp)
                return
            self._retired += [self._chunks_fd, self._tmp_fd]
            self._chunks_fd, self._tmp_fd = chunks, tmp

    def _unlink_entry(self, s: _Scanned) -> None:
        sub = os.open(s.sub, _PATH_FLAGS, dir_fd=self._chunks_fd)
        try:
            os.unlink(s.name, dir_fd=sub)
        finally:
            os.close(sub)

    def _write_failed(self, exc: OSError | CacheError) -> None:
        code = getattr(exc, "errno", None) or 0
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
                getattr(exc, "strerror", None) or exc,
            )
        else:
            log.debug("chunk cache %s: write failed again: %s", self.root, exc)

    def _warn_path(self, path: str, what: str) -> None:
        with self._lock:
            first = path not in self._warned_paths
            self._warned_paths.add(path)
        if first:
            log.warning("chunk cache: %s %s", path, what)

    def _flush_touched(self) -> None:
        with self._lock:
            touched, self._touched = self._touched, set()
        for key in touched:
            name = key.hex()
            sub = self._sub(name[:2])
            if sub is None:
                continue
            with contextlib.suppress(OSError):
                _touch_at(sub, name)
            os.close(sub)

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
        chunks = self._chunks_fd
        # A fresh open of the directory for each listing: descriptors shared
        # with another thread's scandir would share its read position.
        try:
            top = os.open(".", _DIR_FLAGS, dir_fd=chunks)
        except OSError:
            return found
        try:
            with os.scandir(top) as it:
                subs = [(e.name, e.is_symlink()) for e in it if len(e.name) == 2 and _is_hex_name(e.name)]
        finally:
            os.close(top)
        for sub, is_link in subs:
            if is_link:
                self._warn_path(f"{self.root}/chunks/{sub}", "is a symbolic link: ignored, not followed")
                continue
            try:
                fd = os.open(sub, _DIR_FLAGS, dir_fd=chunks)
            except OSError:
                continue  # a plain file, or gone meanwhile
            try:
                with os.scandir(fd) as it:
                    for e in it:
                        if not _is_hex_name(e.name):
                            continue
                        try:
                            st = e.stat(follow_symlinks=False)
                        except FileNotFoundError:
                            continue
                        if stat.S_ISREG(st.st_mode):
                            found.append(_Scanned(st.st_atime_ns, st.st_size, sub, e.name))
            except FileNotFoundError:
                continue
            finally:
                os.close(fd)
        return found

    def _remove_stale_tmp(self, age: float) -> None:
        cutoff = time.time() - age
        try:
            fd = os.open(".", _DIR_FLAGS, dir_fd=self._tmp_fd)
        except OSError:
            return
        try:
            with os.scandir(fd) as it:
                for e in it:
                    with contextlib.suppress(OSError):
                        if e.stat(follow_symlinks=False).st_mtime < cutoff:
                            os.unlink(e.name, dir_fd=fd)  # a link goes, its target stays
        finally:
            os.close(fd)


def _refusal(path: str, exc: OSError) -> CacheError:
    """Turn a failed open of a cache directory into one clear sentence."""
    if exc.errno in (errno.ENOTDIR, errno.ELOOP):
        try:
            is_link = stat.S_ISLNK(os.lstat(path).st_mode)
        except OSError:
            is_link = False
        if is_link:
            why = "is a symbolic link; refusing to follow it (give the real directory)"
        else:
            why = "is not a directory"
    else:
        why = f"cannot be opened: {exc.strerror or exc}"
    return CacheError(f"cache directory {path} {why}")


def _open_root(root: str) -> int:
    try:
        return os.open(root, _DIR_FLAGS)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise _refusal(root, exc) from exc
    try:
        # Intermediate directories get the usual mode; the cache itself 0700.
        os.makedirs(root, mode=_DIR_MODE, exist_ok=True)
    except OSError as exc:
        raise CacheError(f"cache directory {root} cannot be created: {exc.strerror or exc}") from exc
    try:
        return os.open(root, _DIR_FLAGS)
    except OSError as exc:
        raise _refusal(root, exc) from exc


def _open_dir(parent: int, name: str, display: str) -> int:
    """Open (creating 0700 if missing) directory ``name`` under ``parent``,
    never through a link, and check it is ours alone."""
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
    except FileNotFoundError:
        try:
            os.mkdir(name, _DIR_MODE, dir_fd=parent)
        except FileExistsError:
            pass  # another process made it meanwhile
        except OSError as exc:
            raise CacheError(f"cache directory {display} cannot be created: {exc.strerror or exc}") from exc
        try:
            fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
        except OSError as exc:
            raise _refusal(display, exc) from exc
    except OSError as exc:
        raise _refusal(display, exc) from exc
    try:
        _check_trusted(fd, display, tighten=True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_trusted(fd: int, display: str, *, tighten: bool) -> None:
    """Refuse a directory someone else could write; make ours private."""
    st = os.fstat(fd)
    euid = os.geteuid()
    if st.st_uid != euid:
        raise CacheError(
            f"cache directory {display} is owned by uid {st.st_uid}, not by this user (uid {euid}); "
            "refusing to trust entries someone else could have written"
        )
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o022:
        who = {0o020: "its group", 0o002: "others", 0o022: "its group and others"}[mode & 0o022]
        raise CacheError(
            f"cache directory {display} is writable by {who} (mode {mode:04o}), who could plant entries; "
            "refusing it (check its contents, then chmod 0700 it, or use another directory)"
        )
    if mode & 0o077 and tighten:
        try:
            os.fchmod(fd, _DIR_MODE)
        except OSError as exc:
            log.warning(
                "chunk cache: %s has mode %04o (other users can read cached chunks) and cannot be tightened: %s",
                display,
                mode,
                exc.strerror or exc,
            )
        else:
            log.warning(
                "chunk cache: tightened %s from mode %04o to 0700 so other users cannot read cached chunks",
                display,
                mode,
            )


def _open_lock(root: int, display: str) -> int:
    # O_NONBLOCK: a FIFO or device in its place must not hang the open
    # (flock's blocking is its own, unaffected).
    base = os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
    try:
        try:
            fd = os.open("lock", os.O_RDWR | os.O_CREAT | base, _FILE_MODE, dir_fd=root)
        except OSError as exc:
            # A read-only cache (a pre-seeded image, a full remount) still
            # serves hits; flock works on a read-only descriptor on local
            # filesystems.
            if exc.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise
            fd = os.open("lock", os.O_RDONLY | base, dir_fd=root)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise CacheError(f"cache lock file {display} is a symbolic link; refusing to follow it") from exc
        raise CacheError(f"cache lock file {display} cannot be opened: {exc.strerror or exc}") from exc
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CacheError(f"cache lock file {display} is not a regular file")
    return fd


def _touch(target: int) -> None:
    # An explicit clock reading: utime(NULL) would take the kernel's coarse
    # (jiffy) clock, and entries used milliseconds apart would tie.
    now = time.time_ns()
    os.utime(target, ns=(now, now))


def _touch_at(sub: int, name: str) -> None:
    now = time.time_ns()
    os.utime(name, dir_fd=sub, follow_symlinks=False, ns=(now, now))


def _check_key(key: bytes) -> None:
    if not isinstance(key, bytes) or not 0 < len(key) <= _MAX_KEY_BYTES:
        raise ValueError(f"cache key must be 1..{_MAX_KEY_BYTES} raw bytes (a digest), got {key!r:.40}")
