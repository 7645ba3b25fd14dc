"""Verified frames of one seekable layer: the fetch mechanism.

:meth:`FrameStore.frames` returns the decoded bytes of a range of frames,
from the cache or from one shared fetch. Reads of the same cold frame share
one flight: the first reader to miss becomes its leader, the policy groups
the leader's frames into runs (one range request each) and may add frames
ahead; each fetched frame is verified and decompressed by
:func:`lazyfs.format.seekable.decode_frame` (refetched once if that fails),
handed to everyone waiting on it, and only then put in the cache. Hashing,
decompression and cache I/O run in worker threads under the mount's limiter,
and decoded frames in flight are held against the mount's decode budget.

Nothing here decides what to fetch beyond what was asked: that is
:class:`~lazyfs.fetch.policy.FetchPolicy`'s job.
"""

from __future__ import annotations

import functools
import hashlib
import logging

import trio

from lazyfs.errors import FetchError, IntegrityError, LazyErofsError
from lazyfs.fetch.context import FetchContext, FrameCache
from lazyfs.fetch.policy import FetchPolicy
from lazyfs.fetch.source import CountingSource
from lazyfs.format import seekable

__all__ = ["FrameStore"]

log = logging.getLogger(__name__)


class _Flight:
    """One in-progress fetch of a frame; waiters block on ``done``."""

    __slots__ = ("data", "done", "error")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.data: bytes | None = None
        self.error: BaseException | None = None


class FrameStore:
    """Single flight, verify-then-serve and caching for one layer's frames.

    ``verified`` picks the cache keys: a verified layer keys frames by their
    SHA-512 from the table (content addressed, shared across layers); an
    unverified one by a hash of its blob digest and the frame index, so its
    frames never meet a verified layer's in the cache.
    """

    def __init__(
        self,
        name: str,
        desc: seekable.LayerDescriptor,
        table: seekable.ChunkTable,
        source: CountingSource,
        cache: FrameCache,
        policy: FetchPolicy,
        context: FetchContext,
        *,
        verified: bool,
    ) -> None:
        self.name = name
        self.table = table
        self.source = source
        self.stats = source.stats
        self.cache = cache
        self.policy = policy
        self.context = context
        self.limiter = context.limiter
        self.verified = verified
        self._flights: dict[int, _Flight] = {}
        self._nursery: trio.Nursery | None = None
        # Frames known to be in the cache: a shortcut for the miss decision
        # only; the cache stays the source of truth.
        self._present: set[int] = set()
        # Frames fetched, in first-fetch order (a dict keeps insertion order).
        self._touched: dict[int, None] = {}
        # Keys of unverified frames are made on demand: a list of a million
        # 64-byte keys would cost ~100 MB.
        self._salt = hashlib.sha512(b"lazyerofs-unverified\0" + desc.digest.encode()).digest()

    def key(self, i: int) -> bytes:
        if self.verified:
            return self.table.checksums[i]
        return hashlib.sha512(self._salt + i.to_bytes(8, "little")).digest()

    def start(self, nursery: trio.Nursery) -> None:
        """Run fetches in ``nursery`` from now on: they then outlive the
        reader that started them (a reader that times out stops waiting, but
        the frames still land in the cache for the next one)."""
        self._nursery = nursery

    @property
    def frames_present(self) -> int:
        return len(self._present)

    def known_present(self, i: int) -> bool:
        return i in self._present

    def touched(self) -> list[tuple[int, int, int]]:
        """(frame, blob start, blob end) of every frame fetched, in first-fetch order."""
        return [(i, *self.table.span(i)) for i in self._touched]

    async def is_cached(self, i: int) -> bool:
        """True if frame ``i`` is in the cache (asks the cache if unsure)."""
        if i in self._present:
            return True
        if await trio.to_thread.run_sync(
            self.cache.contains, self.key(i), self.table.raw_length(i), limiter=self.limiter
        ):
            self._present.add(i)
            return True
        return False

    # -- reads -------------------------------------------------------------------

    async def frames(self, frames: range) -> list[bytes]:
        """Data of each frame in ``frames``, from cache or one shared fetch.

        Raises FetchError or IntegrityError (after one refetch) for a frame
        that cannot be had.
        """
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
        if mine:
            mine += await self._claim_ahead(mine[-1])
            await self._fetch_runs(mine)
        for i, flight in flights.items():
            await flight.done.wait()
            if flight.error is not None:
                raise flight.error
            assert flight.data is not None
            results[i] = flight.data
        return [results[i] for i in frames]

    async def _claim_ahead(self, last: int) -> list[int]:
        """Claim the frames the policy wants fetched along with a miss, up to
        the first one found in the cache."""
        if not self.policy.ahead_bytes(self.context.link):
            return []
        candidates = self.policy.ahead(
            last, self.table, self.context.link, lambda k: k not in self._flights and k not in self._present
        )
        if not candidates:
            return []
        key, table, cache = self.key, self.table, self.cache
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
        key, size = self.key(i), self.table.raw_length(i)
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
        """Fetch the frames this task leads, one request per run the policy
        makes; in the background nursery if there is one (:meth:`start`)."""
        runs = self.policy.runs(mine, self.table)
        if self._nursery is not None:
            for run in runs:
                self._nursery.start_soon(self._lead, run)
            return
        async with trio.open_nursery() as nursery:
            for run in runs:
                nursery.start_soon(self._lead, run)

    async def _lead(self, run: list[int]) -> None:
        """Fetch one run in one request, then settle each frame's flight in
        parallel; always settles every flight, even on cancellation."""
        flights = [self._flights[i] for i in run]
        try:
            start = self.table.span(run[0])[0]
            blob = await self.source.read(start, self.table.span(run[-1])[1] - start)
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
        async with self.context.decode_budget.hold(self.table.raw_length(i)):
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
                    raw = await self._decode(i, await self.source.read(s, e - s))
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
            await trio.to_thread.run_sync(self.cache.put, self.key(i), raw, limiter=self.limiter)
        finally:
            if self._flights.get(i) is flight:
                del self._flights[i]

    async def _decode(self, i: int, compressed: bytes) -> bytes:
        # Looked up at call time (module-style) so tests can wrap it.
        raw = await trio.to_thread.run_sync(
            functools.partial(seekable.decode_frame, self.table, i, compressed, name=self.name),
            limiter=self.limiter,
        )
        self.stats.frames_fetched += 1
        self.stats.fetched_frames.add(i)
        self._touched.setdefault(i)
        return raw
