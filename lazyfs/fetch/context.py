"""Settings of a mount's reads, and the state its layers share.

:class:`ReadSettings` is what the user chose (timeouts, merging, fetch-ahead,
the memory budget, trust); :class:`FetchContext` is what all layers of one
mount share at run time: the worker-thread limiters, on-demand reads in
progress, the link estimate (one network path), the mount's
:class:`MemoryBudget` and the store of verified chunk tables that spares a
mount their fetch (:class:`~lazyfs.fetch.tables.TableStore`, counted in
``tables_fetched`` / ``tables_cached``). :class:`FrameCache` is the part of
:class:`cache.ChunkCache` a layer uses.

The memory budget is one number the user sets (``--memory-budget``) and
three things share it: the chunk cache's memory LRU (its size is carved out
first, :func:`memory_cache_share`), the parsed chunk tables
(:class:`TableBudget`, charged as layers open; a mount whose tables do not fit
is refused) and the bytes in flight: compressed runs being fetched plus their
decoded frames until they are persisted (:class:`DecodeBudget`, whose limit
is whatever the other two leave). Reads wait for room in flight rather than
grow memory; speculative fetches (a sequential reader's window) only take
room that is free.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import trio

from lazyfs.errors import FormatError
from lazyfs.fetch.policy import (
    DEFAULT_MERGE_BYTES,
    DEFAULT_STREAM_AHEAD,
    Demand,
    FetchAhead,
    FetchPolicy,
    LinkEstimate,
    check_fetch_ahead,
)
from lazyfs.fetch.source import BlobSource, CountingSource, LayerStats
from lazyfs.fetch.tables import TableStore
from lazyfs.format import seekable

if TYPE_CHECKING:
    from lazyfs.fetch.offload import FetchWorkers

__all__ = [
    "DEFAULT_DECODE_BUDGET",
    "DEFAULT_IO_THREADS",
    "DEFAULT_MEMORY_BUDGET",
    "DEFAULT_READ_TIMEOUT",
    "DEFAULT_WORKER_THREADS",
    "MAX_MOUNT_TABLE_BYTES",
    "MIN_IN_FLIGHT",
    "MIN_MEMORY_BUDGET",
    "DecodeBudget",
    "FetchContext",
    "FrameCache",
    "MemoryBudget",
    "ReadSettings",
    "TableBudget",
    "limit_allocator_slack",
    "memory_cache_share",
]

log = logging.getLogger(__name__)

DEFAULT_READ_TIMEOUT = 60.0
# What a mount's daemon may hold for data, all layers together: the memory
# LRU, chunk tables and bytes in flight. The interpreter, trio, httpx and
# pyfuse3 come on top (~35 MB), so the daemon stays well under 200 MB.
DEFAULT_MEMORY_BUDGET = 96 << 20
# Below this a mount could not hold one default frame in flight with its
# compressed bytes, its tables and a little LRU.
MIN_MEMORY_BUDGET = 16 << 20
# Bytes in flight never get less than this, whatever the tables take: two
# 4 MiB frames with their compressed bytes (a larger frame runs alone).
MIN_IN_FLIGHT = 8 << 20
# Bytes in flight at most, whatever the budget (and when a context is made
# without one): 16 frames of the 4 MiB default, 2 of the 32 MiB maximum;
# more does not make two cores decode faster.
DEFAULT_DECODE_BUDGET = 64 << 20
# Parsed chunk tables of one mount together (each is also capped at
# seekable.MAX_TABLE_SIZE), whatever the budget: a manifest of many huge
# tables is refused.
MAX_MOUNT_TABLE_BYTES = 128 << 20
# Two cores: a few threads keep both busy hashing and decompressing.
DEFAULT_WORKER_THREADS = 4
# Cache reads mostly wait on the disk, not the CPU: more of them at once
# keep a random reader's queue as deep as its own threads make it.
DEFAULT_IO_THREADS = 16


class FrameCache(Protocol):
    """The part of :class:`cache.ChunkCache` a layer uses (sync, thread-safe)."""

    root: Path  # plain layers spool their blob in here

    def get(self, key: bytes, size: int) -> bytes | None: ...

    def get_nowait(self, key: bytes, size: int) -> bytes | None: ...

    def read(self, key: bytes, size: int, offset: int, length: int) -> bytes | None: ...

    def read_nowait(self, key: bytes, size: int, offset: int, length: int) -> bytes | None: ...

    def advise(self, key: bytes, size: int) -> bool: ...

    def put(self, key: bytes, data: bytes) -> bool: ...

    def count_written(self, size: int) -> None: ...

    def contains(self, key: bytes, size: int) -> bool: ...


def memory_cache_share(budget: int, requested: int | None = None) -> int:
    """Bytes of a memory ``budget`` the chunk cache's memory LRU gets: what
    was ``requested`` (``--memory-cache``), else a quarter of the budget.

    Raises:
        ValueError: ``requested`` leaves less than :data:`MIN_IN_FLIGHT` of
            the budget for reads in flight.
    """
    if requested is None:
        return budget // 4
    if requested < 0 or requested > budget - MIN_IN_FLIGHT:
        raise ValueError(
            f"a memory cache of {requested} bytes does not fit a memory budget of {budget} bytes "
            f"(at least {MIN_IN_FLIGHT} must stay for reads in flight)"
        )
    return requested


def limit_allocator_slack() -> None:
    """Make glibc give freed frame buffers back to the system at once.

    Frames are decoded into multi-megabyte buffers in several threads. By
    default glibc raises its mmap threshold after the first large free, so
    later frames come from per-thread heaps that fragment and never shrink:
    RSS then grows far past what is live. A fixed threshold keeps large
    buffers mmapped (unmapped on free), and two arenas bound the rest.
    No-op off glibc.
    """
    name = ctypes.util.find_library("c")
    if not name:
        return
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    m_mmap_threshold, m_arena_max = -3, -8
    mallopt(m_mmap_threshold, 256 << 10)
    mallopt(m_arena_max, 2)


@dataclass(frozen=True)
class ReadSettings:
    """How a mount reads its layers (the user's choices).

    Args:
        read_timeout: seconds a read may take before it fails with EIO.
        merge_bytes: adjacent missing frames go out as one request up to this
            many compressed bytes.
        fetch_ahead: raw bytes of following frames to fetch on a miss, or
            ``"auto"`` (the measured bandwidth-delay product, capped).
        prefetch: fill every layer in the background after mounting.
        insecure_skip_verify: serve layers whose chain of trust cannot be
            established (it never turns off a check that can be made).
        strict: refuse non-EROFS layers instead of skipping them.
        memory_budget: bytes the mount may hold for data: memory LRU, chunk
            tables and bytes in flight together (see the module docstring).
        stream_ahead: raw bytes to keep fetched (or, when cached, read into
            the page cache) ahead of a reader detected as sequential; 0 turns
            sequential detection off.
    """

    read_timeout: float = DEFAULT_READ_TIMEOUT
    merge_bytes: int = DEFAULT_MERGE_BYTES
    fetch_ahead: FetchAhead = 0
    prefetch: bool = False
    insecure_skip_verify: bool = False
    strict: bool = False
    memory_budget: int = DEFAULT_MEMORY_BUDGET
    stream_ahead: int = DEFAULT_STREAM_AHEAD

    def __post_init__(self) -> None:
        check_fetch_ahead(self.fetch_ahead)
        if not self.read_timeout > 0:
            raise ValueError(f"read timeout must be positive, not {self.read_timeout!r}")
        if self.memory_budget < MIN_MEMORY_BUDGET:
            raise ValueError(f"memory budget must be at least {MIN_MEMORY_BUDGET} bytes, not {self.memory_budget}")
        if self.stream_ahead < 0:
            raise ValueError(f"stream ahead must be a byte count >= 0, not {self.stream_ahead}")

    def policy(self) -> FetchPolicy:
        return FetchPolicy(merge_bytes=self.merge_bytes, fetch_ahead=self.fetch_ahead, stream_ahead=self.stream_ahead)


class DecodeBudget:
    """A byte budget for data in flight: compressed runs being fetched and
    their decoded frames until they are handed to readers and persisted.

    A frame is decompressed whole into memory, so the number of frames in
    flight, times their size, is what a hostile table's chunk size (or a
    sequential reader's window, or 64 readers) would turn into RSS. A fetch
    reserves its whole run (compressed + decoded bytes) before its request
    goes out, in one step, so fetches never hold part of the budget while
    waiting for the rest (no deadlock); a reservation larger than the whole
    budget takes all of it (it still runs, alone). ``limit`` may change while
    the mount runs (chunk tables take their share as layers open).
    """

    def __init__(self, limit: int = DEFAULT_DECODE_BUDGET) -> None:
        if limit <= 0:
            raise ValueError(f"decode budget must be positive, got {limit}")
        self.limit = limit
        self.used = 0
        self.peak = 0
        self.waits = 0  # reservations that had to wait for room
        self._lot = trio.lowlevel.ParkingLot()

    def _size(self, nbytes: int) -> int:
        return min(max(nbytes, 1), self.limit)

    async def reserve(self, nbytes: int, *, background: bool = False) -> int:
        """Wait until ``nbytes`` fit, take them; returns what to :meth:`release`.

        ``background`` (replay, fetch of the rest): wait until they fit with
        a quarter of the budget still free, so on-demand reads arriving
        meanwhile find room at once."""
        n = self._size(nbytes)
        await trio.lowlevel.checkpoint_if_cancelled()
        if not self._fits(n, background):
            self.waits += 1
        while not self._fits(n, background):
            await self._lot.park()
            n = self._size(nbytes)  # the limit may have moved
        self._take(n)
        return n

    def _fits(self, n: int, background: bool) -> bool:
        if background and self.used:
            # Never blocks forever: with nothing in flight, anything goes.
            return self.used + n + self.limit // 4 <= self.limit
        return self.used + n <= self.limit

    def try_reserve(self, nbytes: int) -> int | None:
        """Take ``nbytes`` if they fit now (never waits); None if not. For
        speculative work, which must not crowd out reads."""
        n = self._size(nbytes)
        if self.used + n > self.limit:
            return None
        self._take(n)
        return n

    def release(self, n: int) -> None:
        self.used -= n
        self._lot.unpark_all()

    @property
    def free(self) -> int:
        return max(self.limit - self.used, 0)

    def _take(self, n: int) -> None:
        self.used += n
        self.peak = max(self.peak, self.used)

    @contextlib.asynccontextmanager
    async def hold(self, nbytes: int) -> AsyncIterator[None]:
        n = await self.reserve(nbytes)
        try:
            yield
        finally:
            self.release(n)


class TableBudget:
    """Memory of the parsed chunk tables of one mount, capped together."""

    def __init__(self, limit: int = MAX_MOUNT_TABLE_BYTES, *, on_charge: Callable[[], None] | None = None) -> None:
        self.limit = limit
        self.used = 0
        self._on_charge = on_charge

    def charge(self, name: str, table: seekable.ChunkTable) -> None:
        """Count ``table`` against the budget, or raise FormatError naming the layer."""
        total = self.used + table.nbytes
        if total > self.limit:
            raise FormatError(
                f"{name}: chunk table of {table.frame_count} frames ({table.nbytes} bytes) would bring this "
                f"mount's chunk tables to {total} bytes, over the limit of {self.limit} "
                "(a larger --memory-budget raises it)"
            )
        self.used = total
        if self._on_charge is not None:
            self._on_charge()


class MemoryBudget:
    """One mount's memory budget, split between the memory LRU
    (``cache_bytes``, fixed when the cache is opened), the chunk tables and
    the bytes in flight (the rest, at most :data:`DEFAULT_DECODE_BUDGET`).
    See the module docstring.

    Made without a ``limit`` (a context built by hand), the tables and bytes
    in flight keep their fixed caps until :meth:`configure` applies one.
    """

    def __init__(self, limit: int | None = None, *, cache_bytes: int = 0) -> None:
        self.limit = limit
        self.cache_bytes = cache_bytes
        self.tables = TableBudget(on_charge=self._rebalance)
        self.in_flight = DecodeBudget()
        self._rebalance()

    def configure(self, limit: int, cache_bytes: int) -> None:
        """Apply the user's budget and the LRU's actual size (idempotent)."""
        if (limit, cache_bytes) == (self.limit, self.cache_bytes):
            return
        self.limit, self.cache_bytes = limit, cache_bytes
        self._rebalance()

    def _rebalance(self) -> None:
        if self.limit is None:
            return
        rest = self.limit - self.cache_bytes
        self.tables.limit = max(min(MAX_MOUNT_TABLE_BYTES, rest - MIN_IN_FLIGHT), 0)
        self.in_flight.limit = max(min(rest - self.tables.used, DEFAULT_DECODE_BUDGET), MIN_IN_FLIGHT)
        self.in_flight.release(0)  # wake reservations that fit now

    def statistics(self) -> dict[str, int]:
        return {
            "limit": self.limit or 0,
            "cache": self.cache_bytes,
            "tables": self.tables.used,
            "in_flight": self.in_flight.used,
            "in_flight_limit": self.in_flight.limit,
            "in_flight_peak": self.in_flight.peak,
            "in_flight_waits": self.in_flight.waits,
        }


class FetchContext:
    """What all layers of one mount share. Make one per mount; the defaults
    are the daemon's (the keyword arguments are for tests)."""

    def __init__(
        self,
        *,
        limiter: trio.CapacityLimiter | None = None,
        decode_budget: DecodeBudget | None = None,
        tables: TableBudget | None = None,
        table_store: TableStore | None = None,
        memory: MemoryBudget | None = None,
        io_limiter: trio.CapacityLimiter | None = None,
        offload: FetchWorkers | None = None,
    ) -> None:
        # Hashing, decompression and cache writes run in threads under this.
        self.limiter = limiter or trio.CapacityLimiter(DEFAULT_WORKER_THREADS)
        # Cache reads (mostly waiting on the disk) under this one.
        self.io_limiter = io_limiter or trio.CapacityLimiter(DEFAULT_IO_THREADS)
        self.demand = Demand()
        self.link = LinkEstimate()  # one network path for all layers
        self.memory = memory or MemoryBudget()
        self.decode_budget = decode_budget or self.memory.in_flight
        self.tables = tables or self.memory.tables
        # Chunk tables by chunk_digest on local disk (None: always fetched).
        self.table_store = table_store
        self.tables_fetched = 0
        self.tables_cached = 0
        # The mount's fetch workers (lazyfs.fetch.offload), if it has any.
        self.offload: FetchWorkers | None = offload

    def configure_memory(self, limit: int, cache_bytes: int) -> None:
        """Size the mount's memory budget: the user's ``limit``, of which the
        chunk cache's memory LRU already holds ``cache_bytes``."""
        self.memory.configure(limit, cache_bytes)

    def counted(self, source: BlobSource) -> CountingSource:
        """``source`` as one layer's counted view: fresh stats, this mount's link."""
        return CountingSource(source, LayerStats(), self.link)
