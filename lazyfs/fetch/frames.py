"""Verified frames of one seekable layer: the fetch mechanism.

:meth:`FrameStore.read` returns image bytes, reading from a cached frame
only the bytes asked for (a memory hit, or one ``pread`` of the cache entry,
on the event loop when the page cache has it); :meth:`FrameStore.frames`
returns whole frames. Reads of the same cold frame share one flight: the
first reader to miss becomes its leader, the policy groups the leader's
frames into runs (one range request each) and may add frames ahead; each
fetched frame is verified and decompressed by
:func:`lazyfs.format.seekable.decode_frame` (refetched once if that fails),
handed to everyone waiting on it, and only then put in the cache. Hashing,
decompression and cache writes run in worker threads under the mount's
limiter (cache reads under its I/O limiter), and every run is reserved,
compressed and decoded bytes together, against the mount's budget of bytes
in flight before its request goes out.

Nothing here decides what to fetch beyond what was asked: that is
:class:`~lazyfs.fetch.policy.FetchPolicy`'s job, including when a reader is
sequential and which frames to arrange ahead of it; this only carries it out
(:meth:`FrameStore._arrange`).
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Iterable
from typing import Literal

import trio

from lazyfs.errors import FetchError, IntegrityError, LazyErofsError
from lazyfs.fetch.context import FetchContext, FrameCache
from lazyfs.fetch.offload import FetchWorkers, FrameJob, RunOutcome, WorkerGone
from lazyfs.fetch.policy import FetchPolicy, ReadPattern, Stream
from lazyfs.fetch.source import CountingSource
from lazyfs.format import seekable

__all__ = ["FrameStore", "Priority"]

# Who waits for a fetch: a reader ("demand"), or nobody yet ("background":
# replay, fetch of the rest), which yields memory to readers.
Priority = Literal["demand", "background"]

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
        self.io_limiter = getattr(context, "io_limiter", context.limiter)
        self.verified = verified
        self.pattern = ReadPattern()
        self._flights: dict[int, _Flight] = {}
        # Whole-frame loads from the cache for sequential readers: one per frame.
        self._loads: dict[int, _Flight] = {}
        self._nursery: trio.Nursery | None = None
        # Frames known to be in the cache: a shortcut for the miss decision
        # only; the cache stays the source of truth.
        self._present: set[int] = set()
        # Frames a replayed startup profile lists for this layer (expect()).
        self._expected: frozenset[int] = frozenset()
        # Frames fetched, in first-fetch order (a dict keeps insertion order).
        self._touched: dict[int, None] = {}
        # Keys of unverified frames are made on demand: a list of a million
        # 64-byte keys would cost ~100 MB.
        self._salt = hashlib.sha512(b"lazyerofs-unverified\0" + desc.digest.encode()).digest()
        # Fetch workers carry out this layer's runs when the mount has them
        # and the blob is a registry's (:mod:`lazyfs.fetch.offload`).
        self._remote = source.remote() if getattr(context, "offload", None) is not None else None

    def key(self, i: int) -> bytes:
        if self.verified:
            return self.table.checksums[i]
        return hashlib.sha512(self._salt + i.to_bytes(8, "little")).digest()

    def expect(self, frames: Iterable[int]) -> None:
        """Frames a startup profile says the start reads (its replay fetches
        them): sequential readers inside them are not fetched ahead past them."""
        self._expected = frozenset(frames)

    def start(self, nursery: trio.Nursery) -> None:
        """Run fetches in ``nursery`` from now on: they then outlive the
        reader that started them (a reader that times out stops waiting, but
        the frames still land in the cache for the next one). Fetch workers
        get ready for this layer's registry meanwhile."""
        self._nursery = nursery
        workers = getattr(self.context, "offload", None)
        if workers is not None and self._remote is not None:
            nursery.start_soon(workers.warm_up, self._remote)

    @property
    def frames_present(self) -> int:
        return len(self._present)

    def refresh_present(self) -> int:
        """Blocking (run it in a worker thread): ask the cache about every
        frame not known to be there; returns how many frames are present."""
        for i in range(self.table.frame_count):
            if i not in self._present and self.cache.contains(self.key(i), self.table.raw_length(i)):
                self._present.add(i)
        return len(self._present)

    def known_present(self, i: int) -> bool:
        return i in self._present

    def in_flight(self, i: int) -> bool:
        """True while frame ``i`` is being fetched (by anyone): a read of it
        waits for that fetch, it does not start another."""
        return i in self._flights

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

    async def read(self, offset: int, end: int) -> bytes:
        """Image bytes ``[offset, end)`` (inside the image): from a cached
        frame only those bytes, else from one shared fetch. A reader seen
        going forward gets the frames ahead of it arranged (the policy says
        which). Raises FetchError or IntegrityError as :meth:`frames` does.
        """
        table = self.table
        cs = table.chunk_size
        sequential = False
        if self.policy.stream_ahead:
            stream = self.pattern.observe(offset, end, self.policy.stream_slack(table, cs))
            sequential = self.policy.is_sequential(stream)
            if sequential and not stream.busy:
                await self._arrange(stream)
        frames = table.frames_for(offset, end - offset)
        wants = [(i, max(offset - i * cs, 0), min(end - i * cs, table.raw_length(i))) for i in frames]
        # A sequential reader will read all of each frame: load it whole, once.
        parts = await self._get(wants, whole=sequential)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def frames(self, frames: range, *, priority: Priority = "demand") -> list[bytes]:
        """Data of each frame in ``frames``, from cache or one shared fetch.

        ``priority="background"`` (profile replay, fetch of the rest): the
        fetch takes room in the memory budget only while a quarter of it
        stays free for on-demand reads, and fetches nothing ahead.

        Raises FetchError or IntegrityError (after one refetch) for a frame
        that cannot be had.
        """
        return await self._get([(i, 0, self.table.raw_length(i)) for i in frames], priority=priority)

    async def fill(self, frames: range, *, priority: Priority = "demand") -> None:
        """:meth:`frames` for a caller that only wants them in the cache (the
        profile replay, the fetch of the rest): nothing is read back."""
        await self._get([(i, 0, self.table.raw_length(i)) for i in frames], priority=priority, keep=False)

    async def _get(
        self,
        wants: list[tuple[int, int, int]],
        *,
        whole: bool = False,
        priority: Priority = "demand",
        keep: bool = True,
    ) -> list[bytes]:
        """Bytes ``[lo, hi)`` of each frame ``i`` of ``wants`` (ascending);
        ``whole``: a cached frame is loaded whole (into the memory LRU);
        ``keep=False``: only make sure they are cached, return nothing."""
        results: dict[int, bytes] = {}
        waits: list[tuple[int, int, int, _Flight]] = []
        mine: list[int] = []
        for i, lo, hi in wants:
            flight = self._flights.get(i)
            if flight is None and not keep and i in self._present:
                continue
            if flight is None:
                data = await self._cached(i, lo, hi, whole=whole) if keep else await self._probe(i)
                if data is not None:
                    results[i] = data
                    continue
                flight = self._flights.get(i)  # someone started it while we looked
            if flight is None:
                # No await between this check and the insert: exactly one leader.
                flight = self._flights[i] = _Flight()
                mine.append(i)
            waits.append((i, lo, hi, flight))
        if mine:
            background = priority == "background"
            if not background:
                mine += await self._claim_ahead(mine[-1])
            await self._fetch_runs(self.policy.runs(mine, self.table), background=background)
        for i, lo, hi, flight in waits:
            await flight.done.wait()
            if flight.error is not None:
                raise flight.error
            data = flight.data
            if data is None:
                if not keep:
                    continue
                # A fetch worker put it straight into the cache.
                results[i] = await self._landed(i, lo, hi, whole=whole, priority=priority)
                continue
            results[i] = data if lo == 0 and hi == len(data) else data[lo:hi]
        return [results[i] for i, _lo, _hi in wants] if keep else []

    async def _landed(self, i: int, lo: int, hi: int, *, whole: bool, priority: Priority) -> bytes:
        """Bytes ``[lo, hi)`` of frame ``i``, which a fetch worker has just
        written to the cache; fetched again if it was evicted since."""
        # Not a cache hit: the frame was fetched for this read.
        data = await self._cached(i, lo, hi, whole=whole, count=False)
        if data is None:
            self._present.discard(i)
            log.info("%s: frame %d left the cache as soon as it landed; fetching it again", self.name, i)
            (data,) = await self._get([(i, lo, hi)], whole=whole, priority=priority)
        return data

    async def _probe(self, i: int) -> bytes | None:
        """For :meth:`fill`: b"" if frame ``i`` is cached (not read), else None."""
        return b"" if await self.is_cached(i) else None

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
            lambda: {k for k in candidates if cache.contains(key(k), table.raw_length(k))}, limiter=self.io_limiter
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

    async def _cached(self, i: int, lo: int, hi: int, *, whole: bool = False, count: bool = True) -> bytes | None:
        """Bytes ``[lo, hi)`` of frame ``i`` from the cache, or None on a miss.
        Only those bytes are read from disk, unless ``whole`` (a sequential
        reader): then the frame is loaded whole, once for all its readers.
        ``count``: the outcome counts as a cache hit or miss."""
        key, size = self.key(i), self.table.raw_length(i)
        cache = self.cache
        # Hot bytes (memory, or an open entry in the page cache): no thread hop.
        data = cache.read_nowait(key, size, lo, hi - lo)
        if data is None and whole:
            frame = await self._load_whole(i)
            if frame is not None:
                data = frame if lo == 0 and hi == len(frame) else frame[lo:hi]
        if data is None:
            data = await trio.to_thread.run_sync(cache.read, key, size, lo, hi - lo, limiter=self.io_limiter)
            if data is None and i in self._present and i not in self._flights:
                # Fetched by another task while we waited for a thread: look again.
                data = await trio.to_thread.run_sync(cache.read, key, size, lo, hi - lo, limiter=self.io_limiter)
                if data is None:
                    self._present.discard(i)  # evicted
        if data is not None:
            self._present.add(i)
        if count:
            if data is None:
                self.stats.cache_misses += 1
            else:
                self.stats.cache_hits += 1
        return data

    async def _load_whole(self, i: int) -> bytes | None:
        """Frame ``i`` loaded whole from the cache (and so into its memory
        LRU) by one thread, whoever else wants it meanwhile; None on a miss."""
        load = self._loads.get(i)
        if load is not None:
            await load.done.wait()
            return load.data
        load = self._loads[i] = _Flight()
        try:
            load.data = await trio.to_thread.run_sync(
                self.cache.get, self.key(i), self.table.raw_length(i), limiter=self.io_limiter
            )
        finally:
            load.done.set()
            del self._loads[i]
        return load.data

    # -- sequential readers --------------------------------------------------------

    async def _arrange(self, stream: Stream) -> None:
        """Arrange the policy's window ahead of a sequential ``stream``: cached
        frames are read into the page cache, missing ones fetched in parallel
        requests (only with room in the budget: a speculative fetch never
        waits for it). In the background nursery when there is one."""
        cs = self.table.chunk_size
        window = self.policy.stream_window(stream, self.table, cs, self._expected)
        near = self.policy.stream_memory_window(stream, self.table, cs, getattr(self.cache, "memory_limit", 0))
        if not window and not near:
            return
        stream.busy = True
        if self._nursery is not None:
            self._nursery.start_soon(self._arrange_window, stream, window, near)
        else:
            await self._arrange_window(stream, window, near)

    async def _arrange_window(self, stream: Stream, window: range, near: range = range(0)) -> None:
        try:
            table, cache, key = self.table, self.cache, self.key
            # Cached frames just ahead: whole into memory, each in its own
            # thread (one large read each, shared with readers arriving).
            for k in near:
                if k not in self._flights and k not in self._loads and k in self._present:
                    if self._nursery is not None:
                        self._nursery.start_soon(self._load_whole, k)
                    else:
                        await self._load_whole(k)
            if near:
                stream.loaded_until = max(stream.loaded_until, near.stop)
            look = [k for k in window if k not in self._flights]
            if look:
                # One thread hop for the rest of the window: open the cached
                # entries and start their readahead; learn which are missing.
                present = await trio.to_thread.run_sync(
                    lambda: {k for k in look if cache.advise(key(k), table.raw_length(k))},
                    limiter=self.io_limiter,
                )
                self._present.update(present)
            missing = [k for k in window if k not in self._present and k not in self._flights]
            stop = window.stop
            budget = self.context.decode_budget
            for run in self.policy.stream_runs(missing, table):
                # No await from here to the inserts: nobody else claims them.
                run = [k for k in run if k not in self._flights and k not in self._present]
                if not run:
                    continue
                held = budget.try_reserve(self._run_bytes(run))
                if held is None:
                    stop = run[0]  # no room now: a later read tries again
                    break
                for k in run:
                    self._flights[k] = _Flight()
                await self._fetch_runs([run], held=held)
            stream.ahead_until = max(stream.ahead_until, stop)
        except LazyErofsError as exc:
            log.debug("%s: arranging frames ahead failed: %s", self.name, exc)
        except Exception:
            # Only speculation: a bug here must not take the mount's nursery down.
            log.exception("%s: arranging frames ahead failed unexpectedly", self.name)
        finally:
            stream.busy = False

    # -- fetching ------------------------------------------------------------------

    def _run_bytes(self, run: list[int]) -> int:
        """What a run holds in flight: its compressed span and decoded frames."""
        start = self.table.span(run[0])[0]
        compressed = self.table.span(run[-1])[1] - start
        return compressed + sum(self.table.raw_length(i) for i in run)

    async def _fetch_runs(self, runs: list[list[int]], *, held: int | None = None, background: bool = False) -> None:
        """Fetch runs of frames this task leads, one request each; in the
        background nursery if there is one (:meth:`start`). ``held``: budget
        already reserved for the single run given."""
        if self._nursery is not None:
            for run in runs:
                self._nursery.start_soon(self._lead, run, held, background)
            return
        async with trio.open_nursery() as nursery:
            for run in runs:
                nursery.start_soon(self._lead, run, held, background)

    async def _lead(self, run: list[int], held: int | None = None, background: bool = False) -> None:
        """Fetch one run in one request, then settle each frame's flight in
        parallel; always settles every flight, even on cancellation. The run
        holds its bytes in flight (reserved here if not already) until every
        frame is persisted: reads wait for room rather than grow memory."""
        flights = [self._flights[i] for i in run]
        budget = self.context.decode_budget
        try:
            if held is None:
                held = await budget.reserve(self._run_bytes(run), background=background)
            if await self._offloaded(run, flights):
                return
            start = self.table.span(run[0])[0]
            blob = await self.source.read(start, self.table.span(run[-1])[1] - start)
            view = memoryview(blob)
            async with trio.open_nursery() as nursery:
                for i, flight in zip(run, flights, strict=True):
                    s, e = self.table.span(i)
                    nursery.start_soon(self._settle, i, flight, view[s - start : e - start])
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
                self._forget(i, flight)
            if not isinstance(exc, LazyErofsError):
                raise
        finally:
            if held is not None:
                budget.release(held)

    async def _offloaded(self, run: list[int], flights: list[_Flight]) -> bool:
        """Have a fetch worker carry out ``run`` and settle its flights from
        what it reports; False (nothing settled) when no worker can."""
        workers: FetchWorkers | None = getattr(self.context, "offload", None)
        if workers is None or self._remote is None or not workers.ready_for(self._remote):
            return False
        table = self.table
        jobs = [
            FrameJob(i, table.span(i), table.raw_length(i), seekable.frame_checksum(table, i), self.key(i))
            for i in run
        ]
        start = table.span(run[0])[0]
        length = table.span(run[-1])[1] - start

        async def fetch() -> tuple[int, int, RunOutcome]:
            got = await workers.fetch(self._remote, start, length, jobs, name=self.name)
            return got.requests, got.nbytes, got

        try:
            outcome = await self.source.counted(fetch)
        except WorkerGone:
            return False
        self.stats.verify_failures += outcome.verify_failures
        unpersisted: list[tuple[int, bytes, _Flight]] = []
        for i, flight, frame in zip(run, flights, outcome.frames, strict=True):
            if frame.error is not None:
                flight.error = frame.exception()
                log.error("%s", flight.error)
            else:
                self._count_fetched(i)
                flight.data = frame.data
                self._present.add(i)
                if not frame.persisted and frame.data is not None:
                    # The disk refused it (full?): into memory at least; its
                    # readers find the flight until then.
                    unpersisted.append((i, frame.data, flight))
                    flight.done.set()
                    continue
            flight.done.set()
            self._forget(i, flight)
        written = [table.raw_length(i) for i, frame in zip(run, outcome.frames, strict=True) if frame.persisted]
        if written:
            # Eviction stays with the daemon, which holds entries open.
            cache = self.cache
            await trio.to_thread.run_sync(lambda: [cache.count_written(n) for n in written], limiter=self.io_limiter)
        for i, data, flight in unpersisted:
            try:
                await trio.to_thread.run_sync(self.cache.put, self.key(i), data, limiter=self.limiter)
            finally:
                self._forget(i, flight)
        return True

    async def _settle(self, i: int, flight: _Flight, compressed: bytes | memoryview) -> None:
        """Verify and decompress frame ``i``, hand it to its readers, then
        persist it. The one place fetched bytes become servable."""
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
            self._forget(i, flight)
            return
        flight.data = raw
        self._present.add(i)
        flight.done.set()
        try:
            # Readers are already served from the flight; they keep finding it
            # until the cache holds the frame.
            await trio.to_thread.run_sync(self.cache.put, self.key(i), raw, limiter=self.limiter)
        finally:
            self._forget(i, flight)

    async def _decode(self, i: int, compressed: bytes | memoryview) -> bytes:
        # Looked up at call time (module-style) so tests can wrap it.
        raw = await trio.to_thread.run_sync(
            functools.partial(seekable.decode_frame, self.table, i, compressed, name=self.name),
            limiter=self.limiter,
        )
        self._count_fetched(i)
        return raw

    def _forget(self, i: int, flight: _Flight) -> None:
        """The flight of frame ``i`` is over (unless another replaced it)."""
        if self._flights.get(i) is flight:
            del self._flights[i]

    def _count_fetched(self, i: int) -> None:
        self.stats.frames_fetched += 1
        self.stats.fetched_frames.add(i)
        self._touched.setdefault(i)
