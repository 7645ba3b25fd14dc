"""Settings of a mount's reads, and the state its layers share.

:class:`ReadSettings` is what the user chose (timeouts, merging, fetch-ahead,
trust); :class:`FetchContext` is what all layers of one mount share at run
time: the worker-thread limiter, on-demand reads in progress, the link
estimate (one network path), and the memory budgets a hostile blob could
otherwise drive up: decoded frames in flight (:class:`DecodeBudget`) and
parsed chunk tables (:class:`TableBudget`), and the store of verified chunk
tables that spares a mount their fetch (:class:`~lazyfs.fetch.tables.TableStore`,
counted in ``tables_fetched`` / ``tables_cached``). :class:`FrameCache` is the part
of :class:`cache.ChunkCache` a layer uses.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import trio

from lazyfs.errors import FormatError
from lazyfs.fetch.policy import (
    DEFAULT_MERGE_BYTES,
    Demand,
    FetchAhead,
    FetchPolicy,
    LinkEstimate,
    check_fetch_ahead,
)
from lazyfs.fetch.source import BlobSource, CountingSource, LayerStats
from lazyfs.fetch.tables import TableStore
from lazyfs.format import seekable

__all__ = [
    "DEFAULT_DECODE_BUDGET",
    "DEFAULT_READ_TIMEOUT",
    "DEFAULT_WORKER_THREADS",
    "MAX_MOUNT_TABLE_BYTES",
    "DecodeBudget",
    "FetchContext",
    "FrameCache",
    "ReadSettings",
    "TableBudget",
]

DEFAULT_READ_TIMEOUT = 60.0
# Decoded bytes being decompressed or persisted at once, all layers of a
# mount together: 16 frames of the 4 MiB default, 2 of the 32 MiB maximum.
DEFAULT_DECODE_BUDGET = 64 << 20
# Parsed chunk tables of one mount together (each is also capped at
# seekable.MAX_TABLE_SIZE): a manifest of many huge tables is refused.
MAX_MOUNT_TABLE_BYTES = 128 << 20
# Two cores: a few threads keep both busy hashing and decompressing.
DEFAULT_WORKER_THREADS = 4


class FrameCache(Protocol):
    """The part of :class:`cache.ChunkCache` a layer uses (sync, thread-safe)."""

    root: Path  # plain layers spool their blob in here

    def get(self, key: bytes, size: int) -> bytes | None: ...

    def get_nowait(self, key: bytes, size: int) -> bytes | None: ...

    def put(self, key: bytes, data: bytes) -> bool: ...

    def contains(self, key: bytes, size: int) -> bool: ...


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
    """

    read_timeout: float = DEFAULT_READ_TIMEOUT
    merge_bytes: int = DEFAULT_MERGE_BYTES
    fetch_ahead: FetchAhead = 0
    prefetch: bool = False
    insecure_skip_verify: bool = False
    strict: bool = False

    def __post_init__(self) -> None:
        check_fetch_ahead(self.fetch_ahead)
        if not self.read_timeout > 0:
            raise ValueError(f"read timeout must be positive, not {self.read_timeout!r}")

    def policy(self) -> FetchPolicy:
        return FetchPolicy(merge_bytes=self.merge_bytes, fetch_ahead=self.fetch_ahead)


class DecodeBudget:
    """A byte budget for decoded frames in flight.

    A frame is decompressed whole into memory, so the number of frames being
    decoded at once, times their size, is what a hostile table's chunk size
    turns into RSS. Each decode holds ``raw_length`` bytes of this budget
    until its frame is handed to readers and persisted; a frame larger than
    the whole budget takes all of it (it still runs, alone).
    """

    def __init__(self, limit: int = DEFAULT_DECODE_BUDGET) -> None:
        if limit <= 0:
            raise ValueError(f"decode budget must be positive, got {limit}")
        self.limit = limit
        self.used = 0
        self.peak = 0
        self._lot = trio.lowlevel.ParkingLot()

    @contextlib.asynccontextmanager
    async def hold(self, nbytes: int) -> AsyncIterator[None]:
        n = min(max(nbytes, 1), self.limit)
        await trio.lowlevel.checkpoint_if_cancelled()
        while self.used + n > self.limit:
            await self._lot.park()
        self.used += n
        self.peak = max(self.peak, self.used)
        try:
            yield
        finally:
            self.used -= n
            self._lot.unpark_all()


class TableBudget:
    """Memory of the parsed chunk tables of one mount, capped together."""

    def __init__(self, limit: int = MAX_MOUNT_TABLE_BYTES) -> None:
        self.limit = limit
        self.used = 0

    def charge(self, name: str, table: seekable.ChunkTable) -> None:
        """Count ``table`` against the budget, or raise FormatError naming the layer."""
        total = self.used + table.nbytes
        if total > self.limit:
            raise FormatError(
                f"{name}: chunk table of {table.frame_count} frames ({table.nbytes} bytes) would bring this "
                f"mount's chunk tables to {total} bytes, over the limit of {self.limit}"
            )
        self.used = total


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
    ) -> None:
        # Hashing, decompression and cache I/O run in threads under this.
        self.limiter = limiter or trio.CapacityLimiter(DEFAULT_WORKER_THREADS)
        self.demand = Demand()
        self.link = LinkEstimate()  # one network path for all layers
        self.decode_budget = decode_budget or DecodeBudget()
        self.tables = tables or TableBudget()
        # Chunk tables by chunk_digest on local disk (None: always fetched).
        self.table_store = table_store
        self.tables_fetched = 0
        self.tables_cached = 0

    def counted(self, source: BlobSource) -> CountingSource:
        """``source`` as one layer's counted view: fresh stats, this mount's link."""
        return CountingSource(source, LayerStats(), self.link)
