"""One remote layer as a random-access file of verified bytes.

``await layer.read(offset, size)`` returns exactly the bytes of the layer's
virtual file, fetching, verifying and caching only the frames that cover the
range. Everything that turns fetched bytes into servable bytes goes through
:func:`lazyfs.format.seekable.decode_frame` (seekable layers),
:meth:`lazyfs.format.verity.HashTree.verify_blocks` (the dm-verity tail) or the
whole-blob digest check of :class:`PlainLayer` (plain layers).

Concurrency: reads of the same cold frame share one flight. The first reader
to miss becomes the leader, fetches a run of adjacent missing frames in one
range request, verifies and caches them, and hands the bytes to everyone
waiting on them. Hashing, decompression and cache I/O run in worker threads
(both zstd and hashlib release the GIL) under a capacity limiter, so the trio
loop keeps serving other reads meanwhile.

Memory a hostile blob controls is bounded per process (one trio run, one
mount): decoded frames being decompressed and persisted at once stay under
:data:`DEFAULT_DECODE_BUDGET` bytes (:class:`DecodeBudget`), and parsed chunk
tables under :data:`MAX_MOUNT_TABLE_BYTES` (:func:`charge_table`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from lazyfs.errors import FetchError, FormatError, IntegrityError, LazyErofsError
from lazyfs.format import seekable

__all__ = [
    "DEFAULT_DECODE_BUDGET",
    "DEFAULT_MERGE_BYTES",
    "DEFAULT_READ_TIMEOUT",
    "MAX_MOUNT_TABLE_BYTES",
    "BlobSource",
    "DecodeBudget",
    "Demand",
    "LayerStats",
    "LinkEstimate",
    "PlainLayer",
    "SeekableLayer",
    "charge_table",
    "decode_budget",
]

log = logging.getLogger(__name__)

DEFAULT_READ_TIMEOUT = 60.0
# Adjacent missing frames are fetched in one range request up to this many
# compressed bytes: fewer round trips without one read waiting on a huge body.
DEFAULT_MERGE_BYTES = 8 << 20
# Background prefetch requests stay this small (compressed bytes, at least
# one frame) so they never hold the link long against an on-demand read.
PREFETCH_BATCH_BYTES = 1 << 20
# With --fetch-ahead auto, never more than this per miss.
AUTO_FETCH_AHEAD_CAP = 4 << 20
# Decoded bytes being decompressed or persisted at once, all layers of a
# mount together: 16 frames of the 4 MiB default, 2 of the 32 MiB maximum.
DEFAULT_DECODE_BUDGET = 64 << 20
# Parsed chunk tables of one mount together (each is also capped at
# seekable.MAX_TABLE_SIZE): a manifest of many huge tables is refused.
MAX_MOUNT_TABLE_BYTES = 128 << 20
# A plain layer's blob is fetched (and hashed) this many bytes per request.
PLAIN_PIECE_BYTES = 8 << 20


class BlobSource(Protocol):
    """What a layer needs from the network: exact byte ranges of one blob."""

    size: int

    async def read(self, offset: int, length: int) -> bytes: ...


class FrameCache(Protocol):
    """The part of :class:`cache.ChunkCache` a layer uses (sync, thread-safe)."""

    def get(self, key: bytes, size: int) -> bytes | None: ...

    def get_nowait(self, key: bytes, size: int) -> bytes | None: ...

    def put(self, key: bytes, data: bytes) -> bool: ...

    def contains(self, key: bytes, size: int) -> bool: ...


@dataclass
class LayerStats:
    """Counters of one layer; the daemon sums them for ``lazyerofs stats``."""

    bytes_fetched: int = 0
    requests: int = 0
    frames_fetched: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    verify_failures: int = 0
    read_errors: int = 0
    fetched_frames: set[int] = field(default_factory=set)


class Demand:
    """Counts on-demand reads in progress across all layers of a mount, so
    background prefetch can step aside while a reader is waiting."""

    def __init__(self) -> None:
        self.active = 0
        self._idle = trio.Event()
        self._idle.set()

    def begin(self) -> None:
        if self.active == 0:
            self._idle = trio.Event()
        self.active += 1

    def end(self) -> None:
        self.active -= 1
        if self.active == 0:
            self._idle.set()

    async def wait_idle(self) -> None:
        while self.active:
            await self._idle.wait()


class LinkEstimate:
    """What the network between us and the registry looks like, learnt from
    our own requests: round-trip time (the fastest request seen: small
    requests are nearly all latency) and bandwidth (a moving average over
    large requests). Their product, the bandwidth-delay product, is how many
    bytes one round trip is worth: fetching that much extra costs about one
    round trip of transfer, and saves a whole round trip when it is used.
    """

    LARGE = 128 << 10  # requests at least this big measure bandwidth

    def __init__(self) -> None:
        self.rtt: float | None = None
        self.bandwidth: float | None = None  # bytes per second

    def observe(self, nbytes: int, seconds: float) -> None:
        self.rtt = seconds if self.rtt is None else min(self.rtt, seconds)
        if nbytes >= self.LARGE:
            transfer = max(seconds - self.rtt, 1e-4)
            sample = nbytes / transfer
            self.bandwidth = sample if self.bandwidth is None else 0.7 * self.bandwidth + 0.3 * sample

    def bdp(self) -> int:
        """Bytes in flight over one round trip; 0 until both are known."""
        if self.rtt is None or self.bandwidth is None:
            return 0
        return int(self.rtt * self.bandwidth)


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


_DECODE_BUDGET: trio.lowlevel.RunVar[DecodeBudget] = trio.lowlevel.RunVar("lazyerofs_decode_budget")
_TABLE_BYTES: trio.lowlevel.RunVar[int] = trio.lowlevel.RunVar("lazyerofs_table_bytes", default=0)


def decode_budget() -> DecodeBudget:
    """The decode budget shared by every layer in this trio run (one mount)."""
    try:
        return _DECODE_BUDGET.get()
    except LookupError:
        budget = DecodeBudget()
        _DECODE_BUDGET.set(budget)
        return budget


def charge_table(name: str, table: seekable.ChunkTable, *, limit: int = MAX_MOUNT_TABLE_BYTES) -> None:
    """Count ``table``'s memory against this trio run's (one mount's) budget
    for chunk tables, or raise FormatError naming the layer."""
    total = _TABLE_BYTES.get() + table.nbytes
    if total > limit:
        raise FormatError(
            f"{name}: chunk table of {table.frame_count} frames ({table.nbytes} bytes) would bring this "
            f"mount's chunk tables to {total} bytes, over the limit of {limit}"
        )
    _TABLE_BYTES.set(total)


class _Flight:
    """One in-progress fetch of a frame; waiters block on ``done``."""

    __slots__ = ("data", "done", "error")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.data: bytes | None = None
        self.error: BaseException | None = None


class SeekableLayer:
    """A seekable EROFS layer: the raw image, optionally followed by its
    materialized dm-verity tail (zero pad + verity payload).

    Whether frames are checked is decided here, per layer, from the table
    alone: a table with SHA-512 entries gets every frame hashed, whatever the
    caller asked for. ``verified`` (the whole chain holds: a ``chunk_digest``
    vouched for the table and the table has checksums) is derived too; the
    argument can only ask for less trust, never more.
    """

    def __init__(
        self,
        name: str,
        desc: seekable.LayerDescriptor,
        table: seekable.ChunkTable,
        source: BlobSource,
        cache: FrameCache,
        *,
        limiter: trio.CapacityLimiter,
        read_timeout: float = DEFAULT_READ_TIMEOUT,
        merge_bytes: int = DEFAULT_MERGE_BYTES,
        verified: bool = True,
        verity: Any = None,
        demand: Demand | None = None,
        fetch_ahead: int = 0,
        link: LinkEstimate | None = None,
        budget: DecodeBudget | None = None,
    ) -> None:
        self.name = name
        self.desc = desc
        self.table = table
        self.source = source
        self.cache = cache
        self.limiter = limiter
        self.read_timeout = read_timeout
        self.merge_bytes = merge_bytes
        chain = desc.chunk_digest is not None and table.hash_algo == seekable.HASH_SHA512
        if verified and not chain:
            raise IntegrityError(f"{name}: the chain of trust cannot be established for this layer")
        self.verified = chain
        self.verity = verity  # lazyfs.fetch.verity_tail.VerityTail or None
        self.demand = demand or Demand()
        # fetch_ahead < 0 means "auto": one bandwidth-delay product, capped.
        self.fetch_ahead = fetch_ahead
        self.link = link or LinkEstimate()
        self._budget = budget
        self.stats = LayerStats()
        self._flights: dict[int, _Flight] = {}
        self._nursery: trio.Nursery | None = None
        # Frames known to be in the cache: a shortcut for the miss decision
        # only; the cache stays the source of truth.
        self._present: set[int] = set()
        # Unverified layers key frames by blob digest and index, so their
        # frames never meet a verified layer's in the cache. Keys are made on
        # demand: a list of a million 64-byte keys would cost ~100 MB.
        self._salt = hashlib.sha512(b"lazyerofs-unverified\0" + desc.digest.encode()).digest()

    def _key(self, i: int) -> bytes:
        if self.verified:
            return self.table.checksums[i]
        return hashlib.sha512(self._salt + i.to_bytes(8, "little")).digest()

    # -- sizes -------------------------------------------------------------------

    @property
    def image_size(self) -> int:
        return self.table.uncompressed_size

    @property
    def size(self) -> int:
        """Size of the virtual file (image, or image + verity tail)."""
        return self.verity.end if self.verity is not None else self.image_size

    @property
    def frames_present(self) -> int:
        return len(self._present)

    # -- reads -------------------------------------------------------------------

    async def read(self, offset: int, size: int) -> bytes:
        """Bytes ``[offset, offset+size)`` of the virtual file, clamped at EOF.

        Raises FetchError or IntegrityError (after one refetch) if the bytes
        cannot be had and verified within ``read_timeout``.
        """
        end = min(offset + size, self.size)
        if offset >= end:
            return b""
        self.demand.begin()
        try:
            with trio.fail_after(self.read_timeout):
                parts: list[bytes] = []
                if offset < self.image_size:
                    parts.append(await self._read_image(offset, min(end, self.image_size)))
                if end > self.image_size:
                    assert self.verity is not None
                    parts.append(await self.verity.read(max(offset, self.image_size), end))
        except trio.TooSlowError as exc:
            self.stats.read_errors += 1
            raise FetchError(
                f"{self.name}: read of {end - offset} bytes at {offset} timed out after {self.read_timeout:g}s"
            ) from exc
        except LazyErofsError:
            self.stats.read_errors += 1
            raise
        finally:
            self.demand.end()
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def prefetch(self) -> int:
        """Fetch every frame not yet cached, in order, pausing whenever an
        on-demand read is in progress (so prefetch never takes the bandwidth a
        waiting reader needs). Returns the number of frames fetched."""
        before = self.stats.frames_fetched
        i = 0
        count = self.table.frame_count
        while i < count:
            if i in self._present or await trio.to_thread.run_sync(
                self.cache.contains, self._key(i), self.table.raw_length(i), limiter=self.limiter
            ):
                self._present.add(i)
                i += 1
                continue
            # Small batches: an on-demand read waits at most for one of them.
            j = i
            while j + 1 < count and j + 1 not in self._present and self._span_bytes(i, j + 1) <= PREFETCH_BATCH_BYTES:
                j += 1
            await self.demand.wait_idle()
            try:
                with trio.fail_after(self.read_timeout):
                    await self._frames(range(i, j + 1))
            except (LazyErofsError, trio.TooSlowError) as exc:
                log.warning("%s: prefetch of frames %d-%d failed: %s", self.name, i, j, exc)
            i = j + 1
        return self.stats.frames_fetched - before

    async def _read_image(self, offset: int, end: int) -> bytes:
        frames = self.table.frames_for(offset, end - offset)
        datas = await self._frames(frames)
        cs = self.table.chunk_size
        first = frames.start
        if len(datas) == 1:
            base = first * cs
            return datas[0][offset - base : end - base]
        out = bytearray()
        for i, data in zip(frames, datas, strict=True):
            base = i * cs
            out += data[max(offset - base, 0) : min(end - base, len(data))]
        return bytes(out)

    async def _frames(self, frames: range) -> list[bytes]:
        """Data of each frame in ``frames``, from cache or one shared fetch."""
        results: dict[int, bytes] = {}
        flights: dict[int, _Flight] = {}
        mine: list[int] = []
        for i in frames:
            flight = self._flights.get(i)
            if flight is None:
                data = await self._cache_get(i)
                if data is not None:
                    results[i] = data
                    continue
                flight = self._flights.get(i)  # someone started it while we looked
            if flight is None:
                # No await between this check and the insert: exactly one leader.
                flight = self._flights[i] = _Flight()
                mine.append(i)
            flights[i] = flight
        if mine and self._ahead_bytes():
            mine += await self._claim_ahead(mine[-1])
        if mine:
            await self._fetch_runs(mine)
        for i, flight in flights.items():
            await flight.done.wait()
            if flight.error is not None:
                raise flight.error
            assert flight.data is not None
            results[i] = flight.data
        return [results[i] for i in frames]

    def _ahead_bytes(self) -> int:
        if self.fetch_ahead >= 0:
            return self.fetch_ahead
        return min(self.link.bdp(), AUTO_FETCH_AHEAD_CAP)

    async def _claim_ahead(self, last: int) -> list[int]:
        """Claim up to ``fetch_ahead`` raw bytes of missing frames after
        ``last``: they ride in the same request, so a reader that moves on to
        its neighbours (files packed next to each other) pays no round trip."""
        candidates: list[int] = []
        ahead = 0
        i = last + 1
        limit = self._ahead_bytes()
        while (
            i < self.table.frame_count
            and ahead + self.table.raw_length(i) <= limit
            and i not in self._flights
            and i not in self._present
        ):
            candidates.append(i)
            ahead += self.table.raw_length(i)
            i += 1
        if not candidates:
            return []
        key, table, cache = self._key, self.table, self.cache
        cached = await trio.to_thread.run_sync(
            lambda: {k for k in candidates if cache.contains(key(k), table.raw_length(k))}, limiter=self.limiter
        )
        claimed = []
        for k in candidates:
            # Re-check after the await: another task may have claimed it.
            if k in cached or k in self._flights or k in self._present:
                self._present.update(cached)
                break
            self._flights[k] = _Flight()
            claimed.append(k)
        return claimed

    async def _cache_get(self, i: int) -> bytes | None:
        key, size = self._key(i), self.table.raw_length(i)
        # Hot frames are in the memory LRU: no thread hop for those.
        data = self.cache.get_nowait(key, size)
        if data is not None:
            self.stats.cache_hits += 1
            return data
        data = await trio.to_thread.run_sync(self.cache.get, key, size, limiter=self.limiter)
        if data is None and i in self._present:
            # Fetched by another task while we waited for a thread: look again.
            data = await trio.to_thread.run_sync(self.cache.get, key, size, limiter=self.limiter)
            if data is None:
                self._present.discard(i)  # evicted
        if data is None:
            self.stats.cache_misses += 1
        else:
            self.stats.cache_hits += 1
            self._present.add(i)
        return data

    async def _fetch_runs(self, mine: list[int]) -> None:
        """Fetch the frames this task leads as runs of adjacent frames, one
        request per run (capped at ``merge_bytes``).

        With a background nursery (the daemon gives one) the fetches outlive
        the reader that started them: a reader that times out stops waiting,
        but the frames still land in the cache for the next one.
        """
        runs: list[list[int]] = []
        for i in mine:
            if runs and runs[-1][-1] == i - 1 and self._span_bytes(runs[-1][0], i) <= self.merge_bytes:
                runs[-1].append(i)
            else:
                runs.append([i])
        if self._nursery is not None:
            for run in runs:
                self._nursery.start_soon(self._lead, run)
            return
        async with trio.open_nursery() as nursery:
            for run in runs:
                nursery.start_soon(self._lead, run)

    def start(self, nursery: trio.Nursery) -> None:
        """Run fetches in ``nursery`` from now on (see :meth:`_fetch_runs`)."""
        self._nursery = nursery

    def _span_bytes(self, first: int, last: int) -> int:
        return self.table.span(last)[1] - self.table.span(first)[0]

    async def _lead(self, run: list[int]) -> None:
        """Fetch one run in one request, then settle each frame's flight in
        parallel; always settles every flight, even on cancellation."""
        flights = [self._flights[i] for i in run]
        try:
            start = self.table.span(run[0])[0]
            blob = await self._fetch(start, self.table.span(run[-1])[1] - start)
            async with trio.open_nursery() as nursery:
                for i, flight in zip(run, flights, strict=True):
                    s, e = self.table.span(i)
                    nursery.start_soon(self._settle, i, flight, blob[s - start : e - start])
        except BaseException as exc:
            if isinstance(exc, LazyErofsError):
                error: BaseException = exc
            elif isinstance(exc, trio.Cancelled):
                error = FetchError(f"{self.name}: fetch of frames {run[0]}-{run[-1]} was abandoned")
            else:
                error = FetchError(f"{self.name}: fetch failed: {exc!r}")
            for i, flight in zip(run, flights, strict=True):
                if not flight.done.is_set():
                    flight.error = error
                    flight.done.set()
                if self._flights.get(i) is flight:
                    del self._flights[i]
            if not isinstance(exc, LazyErofsError):
                raise

    async def _settle(self, i: int, flight: _Flight, compressed: bytes) -> None:
        """Verify and decompress frame ``i``, hand it to its readers, then
        persist it. The one place fetched bytes become servable. The frame's
        decoded size is held against the decode budget from decompression
        until it is persisted."""
        budget = self._budget or decode_budget()
        async with budget.hold(self.table.raw_length(i)):
            await self._settle_held(i, flight, compressed)

    async def _settle_held(self, i: int, flight: _Flight, compressed: bytes) -> None:
        try:
            try:
                raw = await self._decode(i, compressed)
            except IntegrityError as first_error:
                # A bad frame may be a transport accident: refetch once.
                self.stats.verify_failures += 1
                log.warning("%s; refetching frame %d once", first_error, i)
                s, e = self.table.span(i)
                try:
                    raw = await self._decode(i, await self._fetch(s, e - s))
                except IntegrityError:
                    self.stats.verify_failures += 1
                    raise
        except LazyErofsError as exc:
            log.error("%s", exc)
            flight.error = exc
            flight.done.set()
            if self._flights.get(i) is flight:
                del self._flights[i]
            return
        flight.data = raw
        self._present.add(i)
        flight.done.set()
        try:
            # Readers are already served from the flight; they keep finding it
            # until the cache holds the frame.
            await trio.to_thread.run_sync(self.cache.put, self._key(i), raw, limiter=self.limiter)
        finally:
            if self._flights.get(i) is flight:
                del self._flights[i]

    async def _fetch(self, offset: int, length: int) -> bytes:
        self.stats.requests += 1
        started = trio.current_time()
        data = await self.source.read(offset, length)
        self.link.observe(len(data), trio.current_time() - started)
        self.stats.bytes_fetched += len(data)
        return data

    async def _decode(self, i: int, compressed: bytes) -> bytes:
        raw = await trio.to_thread.run_sync(
            functools.partial(seekable.decode_frame, self.table, i, compressed, name=self.name),
            limiter=self.limiter,
        )
        self.stats.frames_fetched += 1
        self.stats.fetched_frames.add(i)
        return raw


class PlainLayer:
    """A plain (uncompressed) EROFS layer, served only once its whole blob
    has matched the descriptor's digest.

    This media type has no per-range checksum: the one thing that vouches
    for its bytes is the blob digest in the manifest, and a digest can only
    be checked over the whole blob. So the first read starts one fetch of
    the whole blob, in :data:`PLAIN_PIECE_BYTES` requests hashed as they
    arrive and written to an unlinked 0600 spool file (in ``spool_dir``, the
    cache directory, so a large layer lands on disk rather than in RAM);
    every read waits until the digest has matched and is then served from
    the spool. A mismatch fails every read of the layer (EIO) for the life of
    the mount, without refetching.

    Why this and not the alternatives: refusing plain layers would make a
    valid image unusable; serving range reads unverified breaks the promise
    that no unverified byte reaches a reader; keeping verified pieces in the
    chunk cache would let one evicted piece force a whole-blob refetch with
    a different lifetime than its siblings. The price is one whole-blob
    download before the first byte, and that much temporary disk.

    Progress survives a failed or timed-out attempt (only whole pieces are
    kept), so a later read resumes rather than restarts. With a background
    nursery (:meth:`start`) the fetch outlives the reader that started it;
    without one, it runs in the reader's task, bounded by its timeout.
    """

    verity = None
    verified = True  # nothing is served before the digest matched

    def __init__(
        self,
        name: str,
        desc: seekable.LayerDescriptor,
        source: BlobSource,
        *,
        read_timeout: float = DEFAULT_READ_TIMEOUT,
        spool_dir: str | os.PathLike[str] | None = None,
        piece_bytes: int = PLAIN_PIECE_BYTES,
    ) -> None:
        self.name = name
        self.desc = desc
        self.source = source
        self.read_timeout = read_timeout
        self.spool_dir = os.fspath(spool_dir) if spool_dir is not None else None
        self.piece_bytes = piece_bytes
        self.stats = LayerStats()
        algo = desc.digest.split(":", 1)[0]
        self._hash = hashlib.new(algo)
        self._done = 0  # blob bytes fetched, hashed and spooled so far
        self._spool: Any = None  # an unlinked temporary file
        self._ready = trio.Event()  # set once the digest matched
        self._failed: IntegrityError | None = None  # sticky: the blob is bad
        self._attempt: trio.Event | None = None  # set when the running attempt ends
        self._last_error: LazyErofsError | None = None
        self._nursery: trio.Nursery | None = None

    @property
    def size(self) -> int:
        return self.desc.size

    image_size = size

    @property
    def frames_present(self) -> int:
        return 0

    def start(self, nursery: trio.Nursery) -> None:
        """Run the whole-blob fetch in ``nursery`` from now on."""
        self._nursery = nursery

    def close(self) -> None:
        if self._spool is not None:
            self._spool.close()
            self._spool = None

    async def read(self, offset: int, size: int) -> bytes:
        end = min(offset + size, self.size)
        if offset >= end:
            return b""
        try:
            with trio.fail_after(self.read_timeout):
                await self._verified()
                spool = self._spool
                assert spool is not None
                data = await trio.to_thread.run_sync(os.pread, spool.fileno(), end - offset, offset)
        except trio.TooSlowError as exc:
            self.stats.read_errors += 1
            raise FetchError(
                f"{self.name}: plain layer not verified within {self.read_timeout:g}s "
                f"({self._done} of {self.size} blob bytes fetched and hashed so far; "
                "no byte is served before the whole blob matches its digest)"
            ) from exc
        except LazyErofsError:
            self.stats.read_errors += 1
            raise
        if len(data) != end - offset:
            self.stats.read_errors += 1
            raise FetchError(f"{self.name}: short read of the verified spool at {offset}")
        return data

    async def _verified(self) -> None:
        """Return once the whole blob matched its digest; raise if it did not."""
        while not self._ready.is_set():
            if self._failed is not None:
                raise self._failed
            if self._attempt is None:
                self._attempt = trio.Event()
                if self._nursery is not None:
                    self._nursery.start_soon(self._fetch_all)
                else:
                    await self._fetch_all()  # ends the attempt, even on error
            if self._attempt is not None:
                await self._attempt.wait()
            # An attempt abandoned by its reader leaves no error: try again.
            if not self._ready.is_set() and self._failed is None and self._last_error is not None:
                raise self._last_error

    async def _fetch_all(self) -> None:
        """One attempt at the rest of the blob; always ends the attempt."""
        attempt = self._attempt
        assert attempt is not None
        self._last_error = None
        try:
            await self._fetch_rest()
        except IntegrityError as exc:
            self._failed = exc
            self.stats.verify_failures += 1
            log.error("%s", exc)
            self.close()
        except LazyErofsError as exc:
            self._last_error = exc
            log.warning("%s", exc)
        except trio.Cancelled:
            log.info("%s: fetch of the plain blob paused at byte %d", self.name, self._done)
            raise
        except OSError as exc:
            self._last_error = FetchError(f"{self.name}: cannot spool the plain blob: {exc}")
            log.warning("%s", self._last_error)
        finally:
            self._attempt = None
            attempt.set()

    async def _fetch_rest(self) -> None:
        if self._spool is None:
            self._spool = await trio.to_thread.run_sync(self._open_spool)
        while self._done < self.size:
            length = min(self.piece_bytes, self.size - self._done)
            try:
                with trio.fail_after(self.read_timeout):
                    self.stats.requests += 1
                    piece = await self.source.read(self._done, length)
            except trio.TooSlowError as exc:
                raise FetchError(
                    f"{self.name}: {length} bytes at {self._done} of the plain blob not fetched "
                    f"within {self.read_timeout:g}s"
                ) from exc
            self.stats.bytes_fetched += len(piece)
            if len(piece) != length:
                raise FetchError(f"{self.name}: got {len(piece)} of {length} bytes at {self._done}")
            await trio.to_thread.run_sync(self._absorb, piece)
        actual = f"{self._hash.name}:{self._hash.hexdigest()}"
        if actual != self.desc.digest:
            raise IntegrityError(
                f"{self.name}: plain blob digest {actual[:23]}... does not match the descriptor's "
                f"{self.desc.digest[:23]}...; nothing of this layer is served"
            )
        self._ready.set()
        log.info("%s: plain blob of %d bytes matched its digest", self.name, self.size)

    def _open_spool(self) -> Any:
        # TemporaryFile: O_TMPFILE where it can (no name ever), else created
        # 0600 and unlinked at once.
        return tempfile.TemporaryFile(dir=self.spool_dir, prefix=".lazyerofs-plain-")

    def _absorb(self, piece: bytes) -> None:
        """Spool and hash one piece; progress moves only once both are done."""
        written = os.pwrite(self._spool.fileno(), piece, self._done)
        if written != len(piece):
            raise OSError(f"short write to the spool ({written} of {len(piece)} bytes)")
        self._hash.update(piece)
        self._done += len(piece)
