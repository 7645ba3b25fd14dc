"""The chunk store: decompressed frames on disk, keyed by the frame's digest.

On-disk layout under ``root`` (directories 0700, files 0600: a private
image's bytes are nobody else's business)::

    chunks/ab/ab12...ef   one entry per key, named by the key in hex, fanned
                          out by its first two hex digits (256 directories)
    tmp/                  entries being written; renamed into chunks/ when whole
    lock                  flock(2) target: one eviction scan at a time, across
                          every process sharing the directory

The directory itself is the truth: there is no index to drift out of step, so
a crash, a restart or a second daemon never needs a repair step. Hence it must
be ours, and nothing inside it is followed if it is a link (``_dirs.py``).
An entry's format and its reading and writing are in ``_entry.py``; scanning
and eviction in ``_evict.py``. This module holds the state: the memory LRU,
the counters, and when to scan.

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
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from cachetools import LRUCache

from cache import _entry, _evict
from cache._dirs import CacheDirs, CacheError
from cache._entry import HEADER_SIZE, Damage, check_key
from cache._evict import CacheEntry
from cache._handles import DEFAULT_OPEN_ENTRIES, Handle, OpenEntries

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MEMORY_BYTES",
    "CacheStatistics",
    "ChunkCache",
]

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 10 << 30
# Hot frames only: cached frames are read by range from disk (the page cache
# does the rest), so a large memory LRU buys little and costs RSS.
DEFAULT_MEMORY_BYTES = 32 << 20
_RWF_NOWAIT = getattr(os, "RWF_NOWAIT", 0)

# Memory-hit keys waiting for their atime refresh; flushed past this many.
_TOUCH_BATCH = 1024


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
    range_reads: int = 0  # hits served by reading only the bytes asked for
    open_entries: int = 0


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
        open_entries: descriptors of recently read entries kept open for
            :meth:`read` (0: open each time).
        evict: False for a writer on behalf of another process of the same
            cache (lazyerofs's fetch workers): it never evicts, the other
            process counts its entries (:meth:`count_written`) and evicts.

    Reading part of an entry (:meth:`read`, :meth:`read_nowait`) reads only
    those bytes: the data was verified before it was put, and its header and
    size are checked when the entry is opened. With ``verify_at_rest`` a
    range read loads and re-hashes the whole entry first (the price of the
    check).

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
        open_entries: int = DEFAULT_OPEN_ENTRIES,
        evict: bool = True,
    ) -> None:
        if max_bytes < 0 or memory_bytes < 0:
            raise ValueError("cache budgets must not be negative")
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.memory_limit = memory_bytes
        self.verify_at_rest = verify_at_rest
        self.fsync = fsync
        self._dirs = CacheDirs(str(self.root))
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
        self._open = OpenEntries(open_entries)
        self._nowait = bool(_RWF_NOWAIT)
        self._range_reads = 0
        self._hits = self._misses = self._memory_hits = self._disk_hits = 0
        self._puts = self._write_failures = self._damaged = self._evictions = 0
        self._disk_bytes = self._disk_entries = self._written_since_scan = 0
        self._evict = evict
        # The first scan learns the size of what earlier runs left and
        # applies this run's budget to it.
        if evict:
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
            self._dirs.release()

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
        check_key(key)
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

    def read(self, key: bytes, size: int, offset: int, length: int) -> bytes | None:
        """Bytes ``[offset, offset+length)`` of the data under ``key`` (of
        ``size`` bytes), or None on a miss. Reads only those bytes from disk
        (one pread on a kept descriptor), never the whole entry, unless
        ``verify_at_rest`` asks for the whole entry to be checked. A damaged
        entry is removed and reported as a miss, as with :meth:`get`.
        """
        _check_range(size, offset, length)
        data = self._memory_slice(key, size, offset, length)
        if data is not None:
            return data
        if self.verify_at_rest:
            whole = self.get(key, size)
            return None if whole is None else _slice(whole, offset, length)
        if len(self._touched) > _TOUCH_BATCH:
            self._flush_touched()
        h = self._handle(key, size)
        if h is None:
            with self._lock:
                self._misses += 1
            return None
        try:
            data = _entry.pread_all(h.fd, length, HEADER_SIZE + offset)
        except OSError as exc:
            data = None
            log.debug("chunk cache: read of %s failed: %s", key.hex(), exc)
        finally:
            self._open.release(h)
        if data is None or len(data) != length:
            # Shrunk under us (another process truncated it?): judge it afresh.
            self._open.drop(key)
            with self._lock:
                self._misses += 1
            return None
        self._count_range_hit(key)
        return data

    def read_nowait(self, key: bytes, size: int, offset: int, length: int) -> bytes | None:
        """Like :meth:`read`, but only if it needs no blocking: a memory hit,
        or an entry already open whose bytes are in the page cache
        (``RWF_NOWAIT``). None is not a miss: call :meth:`read` (in a worker
        thread). Lets an async caller skip a thread hop for hot data."""
        _check_range(size, offset, length)
        data = self._memory_slice(key, size, offset, length)
        if data is not None or self.verify_at_rest or not self._nowait or not length:
            return data
        h = self._open.acquire(key)
        if h is None:
            return None
        buf = bytearray(length)
        try:
            got = os.preadv(h.fd, [buf], HEADER_SIZE + offset, _RWF_NOWAIT)
        except BlockingIOError:
            return None
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                self._nowait = False  # this filesystem or kernel cannot say
            return None
        finally:
            self._open.release(h)
        if got != length:
            return None  # partly in memory: the blocking path reads the rest
        self._count_range_hit(key)
        return buf  # type: ignore[return-value]  # bytes-like; a copy would cost as much as the read

    def advise(self, key: bytes, size: int) -> bool:
        """Start reading the data under ``key`` into the page cache (a reader
        is about to want it); True if the entry is there. Blocking: it opens
        the entry. For sequential readers of cached frames."""
        check_key(key)
        if self._mem is not None:
            with self._lock:
                data = self._mem.get(key)
            if data is not None and len(data) == size:
                return True
        h = self._handle(key, size, touch=False)
        if h is None:
            return False
        try:
            with contextlib.suppress(OSError):
                os.posix_fadvise(h.fd, HEADER_SIZE, size, os.POSIX_FADV_WILLNEED)
        finally:
            self._open.release(h)
        return True

    def set_memory_limit(self, memory_bytes: int) -> None:
        """Resize the memory LRU (its content is dropped); 0 turns it off."""
        if memory_bytes < 0:
            raise ValueError("cache budgets must not be negative")
        with self._lock:
            self.memory_limit = memory_bytes
            self._mem = LRUCache(maxsize=memory_bytes, getsizeof=len) if memory_bytes > 0 else None

    def put(self, key: bytes, data: bytes) -> bool:
        """Store ``data`` under ``key``; True once it is persisted on disk.

        The data always enters the memory LRU. When the disk refuses it (full,
        read-only, over quota, ...) this logs one warning per kind of error,
        returns False and keeps serving from memory: a cache must never turn a
        full disk into a failed read.
        """
        check_key(key)
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
        sub = self._dirs.sub(name[:2])
        if sub is not None:
            try:
                if _entry.has_entry(sub, name, len(data)):
                    # Another daemon (or an earlier put) got there first.
                    with contextlib.suppress(OSError):
                        _entry.touch_at(sub, name)
                    return True
            finally:
                os.close(sub)
        try:
            self._write_entry(key, data)
        except (OSError, CacheError) as exc:
            self._write_failed(exc)
            return False
        self.count_written(len(data))
        return True

    def count_written(self, size: int) -> None:
        """Count an entry of ``size`` data bytes as just written, and evict
        if that brings the disk over budget. :meth:`put` calls it; call it
        for entries another process wrote for this one (a cache opened with
        ``evict=False``), so that eviction, and the dropping of descriptors
        of evicted entries, happens here: a process that keeps entries open
        would otherwise go on reading evicted ones, whose space stays taken
        until it closes them."""
        entry_size = HEADER_SIZE + size
        with self._lock:
            self._disk_bytes += entry_size
            self._disk_entries += 1
            self._written_since_scan += entry_size
            over = self._disk_bytes > self.max_bytes or (
                self._written_since_scan > self.max_bytes // _evict.RESCAN_DIVISOR
            )
        if over and self._evict:
            try:
                self._maybe_gc()
            except OSError as exc:
                log.warning("chunk cache %s: eviction failed: %s", self.root, exc)

    def contains(self, key: bytes, size: int) -> bool:
        """Whether ``get(key, size)`` would likely hit: memory or one stat.

        Reads no data and leaves the disk recency alone (a look is not a use);
        a memory entry does move up in the memory LRU.
        """
        check_key(key)
        mem = self._mem
        if mem is not None:
            with self._lock:
                data = mem.get(key)
            if data is not None and len(data) == size:
                return True
        name = key.hex()
        sub = self._dirs.sub(name[:2])
        if sub is None:
            return False
        try:
            return _entry.has_entry(sub, name, size)
        finally:
            os.close(sub)

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
                range_reads=self._range_reads,
                open_entries=len(self._open),
            )

    def entries(self) -> list[CacheEntry]:
        """Every entry on disk, most recently used first."""
        return _evict.listing(self._scan())

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
                    self._written_since_scan > self.max_bytes // _evict.RESCAN_DIVISOR
                )
            if due and not self._dirs.closed:
                self._collect(self.max_bytes)

    def _collect(self, budget: int) -> int:
        # Caller holds _gc_lock; the flock keeps other processes' scans out,
        # so two daemons never both evict down to the low-water mark.
        with self._dirs.flocked():
            self._flush_touched()
            done = _evict.evict_oldest(self._dirs.chunks, self._scan(), budget, display=str(self.root))
            _evict.remove_stale_tmp(self._dirs.tmp, _evict.STALE_TMP_SECONDS)
            with self._lock:
                self._disk_bytes = done.total
                self._disk_entries = done.entries
                self._written_since_scan = 0
                self._evictions += done.evicted
        if done.evicted:
            # Unlinked entries we hold open would keep their space.
            self._open.drop_all()
            log.debug("chunk cache %s: evicted %d entries, %d bytes", self.root, done.evicted, done.freed)
        return done.freed

    def clear(self) -> int:
        """Remove every entry (disk and memory); returns the bytes freed on disk."""
        with self._lock:
            if self._mem is not None:
                self._mem.clear()
            self._touched.clear()
        self._open.drop_all()
        freed = 0
        with self._gc_lock, self._dirs.flocked():
            for s in self._scan():
                with contextlib.suppress(FileNotFoundError):
                    _evict.unlink_entry(self._dirs.chunks, s)
                    freed += s.disk_size
            _evict.remove_stale_tmp(self._dirs.tmp, _evict.STALE_TMP_SECONDS)
            freed += _clear_side_dir(self._dirs.root, "tables")
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
                    _evict.unlink_entry(self._dirs.chunks, s)
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
        self._open.drop_all()
        with self._lock:
            if self._mem is not None:
                self._mem.clear()
            self._dirs.release()

    # -- internals ---------------------------------------------------------------

    def _memory_slice(self, key: bytes, size: int, offset: int, length: int) -> bytes | None:
        data = self.get_nowait(key, size)
        if data is None:
            return None
        return _slice(data, offset, length)

    def _count_range_hit(self, key: bytes) -> None:
        with self._lock:
            self._hits += 1
            self._disk_hits += 1
            self._range_reads += 1
            # Recency goes to disk in a batch (as for memory hits), not per read.
            self._touched.add(key)

    def _handle(self, key: bytes, size: int, *, touch: bool = True) -> Handle | None:
        """The open, checked entry of ``key`` (in use: release it), or None
        when absent or damaged (then removed)."""
        h = self._open.acquire(key)
        if h is not None:
            return h
        check_key(key)
        name = key.hex()
        sub = self._dirs.sub(name[:2])
        if sub is None:
            return None
        try:
            got = _entry.open_entry(sub, name, size, touch_it=touch)
            if isinstance(got, Damage):
                self._discard(sub, name, got.st, got.reason)
                return None
            if got is None:
                return None
        finally:
            os.close(sub)
        return self._open.add(key, got)

    def _remember(self, key: bytes, data: bytes) -> None:
        # Caller holds self._lock.
        mem = self._mem
        if mem is not None and len(data) <= mem.maxsize:
            mem[key] = data

    def _read_entry(self, key: bytes, size: int, *, verify: bool | None = None, touch: bool = True) -> bytes | None:
        name = key.hex()
        sub = self._dirs.sub(name[:2])
        if sub is None:
            return None
        try:
            verify = self.verify_at_rest if verify is None else verify
            got = _entry.read_entry(sub, name, key, size, verify=verify, touch_it=touch)
            if isinstance(got, Damage):
                self._discard(sub, name, got.st, got.reason)
                return None
            return got
        finally:
            os.close(sub)

    def _note_damage(self, name: str, reason: str) -> None:
        log.warning("chunk cache: damaged entry %s (%s): removed", name, reason)
        with self._lock:
            self._damaged += 1

    def _discard(self, sub: int, name: str, st: os.stat_result | None, reason: str) -> None:
        self._note_damage(name, reason)
        self._open.drop(bytes.fromhex(name))
        removed = _entry.remove_judged(sub, name, st)
        if removed is not None:
            with self._lock:
                self._disk_bytes = max(self._disk_bytes - removed, 0)
                self._disk_entries = max(self._disk_entries - 1, 0)

    def _write_entry(self, key: bytes, data: bytes) -> None:
        buffers = _entry.pack_entry(key, data)
        name = key.hex()
        try:
            _entry.write_entry(self._dirs.tmp, name, buffers, make_sub=self._dirs.make_sub, fsync=self.fsync)
        except FileNotFoundError:
            # tmp/ or chunks/ was removed under us (an rm -rf of the cache):
            # open them afresh, once.
            self._dirs.reopen()
            _entry.write_entry(self._dirs.tmp, name, buffers, make_sub=self._dirs.make_sub, fsync=self.fsync)

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

    def _flush_touched(self) -> None:
        with self._lock:
            touched, self._touched = self._touched, set()
        for key in touched:
            name = key.hex()
            sub = self._dirs.sub(name[:2])
            if sub is None:
                continue
            with contextlib.suppress(OSError):
                _entry.touch_at(sub, name)
            os.close(sub)

    def _scan(self) -> list[_evict.Scanned]:
        return _evict.scan(
            self._dirs.chunks,
            lambda sub: self._dirs.warn_path(f"{self.root}/chunks/{sub}", "is a symbolic link: ignored, not followed"),
        )


def _check_range(size: int, offset: int, length: int) -> None:
    if offset < 0 or length < 0 or offset + length > size:
        raise ValueError(f"range {offset}+{length} is outside an entry of {size} bytes")


def _slice(data: bytes, offset: int, length: int) -> bytes:
    return data if offset == 0 and length == len(data) else data[offset : offset + length]


def _clear_side_dir(root: int, name: str) -> int:
    """Remove the plain files of ``root/name`` (kept there by users of the
    cache directory, such as verified chunk tables), never through a link."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=root)
    except OSError:
        return 0  # absent, or not a real directory: nothing of ours to clear
    freed = 0
    try:
        with os.scandir(fd) as it:
            for entry in it:
                if entry.is_file(follow_symlinks=False):
                    with contextlib.suppress(OSError):
                        size = entry.stat(follow_symlinks=False).st_size
                        os.unlink(entry.name, dir_fd=fd)
                        freed += size
    finally:
        os.close(fd)
    return freed

