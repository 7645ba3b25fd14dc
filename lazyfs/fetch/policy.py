"""What to fetch, how much, and in what order: the fetch policy.

Everything here decides; nothing here fetches. :class:`FetchPolicy` is the
only place that chooses which missing frames go out together (runs merged up
to ``merge_bytes``), how many frames past a miss ride along (fetch-ahead: a
fixed byte count, or ``"auto"``: one measured bandwidth-delay product), when
a reader is sequential and how far ahead of it to keep frames fetched (or,
when cached, read into the page cache), in requests of what size, and how
background prefetch walks a layer (order, batch size, stepping aside for
on-demand reads). The mechanism (:mod:`lazyfs.fetch.frames`,
:mod:`lazyfs.fetch.files`) asks it. :class:`Demand`, :class:`LinkEstimate`
and :class:`ReadPattern` are the live facts the policy decides from.

Sequential readers: the kernel reads a file through FUSE in requests of
128 KiB to 1 MiB, several at once and slightly out of order. Fetching one
frame per miss then costs a round trip, a hash and a decompression per frame
in series, with one core busy. Once a reader is seen going forward
(:class:`ReadPattern`), the frames ahead of it, up to ``stream_ahead`` bytes,
are fetched as separate, parallel range requests whose frames are verified
and decoded on worker threads, so the network, SHA-512 and zstd overlap
(bounded by the memory budget, which speculative fetches never wait for).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import trio

__all__ = [
    "AUTO_FETCH_AHEAD_CAP",
    "BACKGROUND_RUN_MAX",
    "BACKGROUND_RUN_MIN",
    "DEFAULT_MERGE_BYTES",
    "DEFAULT_STREAM_AHEAD",
    "PREFETCH_BATCH_BYTES",
    "SEQUENTIAL_AFTER",
    "STREAM_REQUEST_BYTES",
    "Demand",
    "FetchAhead",
    "FetchPolicy",
    "FrameLayout",
    "LinkEstimate",
    "ReadPattern",
    "Stream",
]

# Adjacent missing frames are fetched in one range request up to this many
# compressed bytes: fewer round trips without one read waiting on a huge body.
DEFAULT_MERGE_BYTES = 8 << 20
# Background prefetch requests stay this small (compressed bytes, at least
# one frame) so they never hold the link long against an on-demand read.
PREFETCH_BATCH_BYTES = 1 << 20
# With fetch-ahead "auto", never more than this per miss.
AUTO_FETCH_AHEAD_CAP = 4 << 20
# Raw bytes kept fetched ahead of a sequential reader, at most (the memory
# budget may allow less): enough to keep two cores decoding while the next
# requests are on the wire.
DEFAULT_STREAM_AHEAD = 32 << 20
# Compressed bytes per request ahead of a sequential reader: one frame of
# the default size, so frames arrive, verify and decode in parallel.
STREAM_REQUEST_BYTES = 4 << 20
# Bytes a stream must have read, in order, before it counts as sequential.
# A random reader never gets there (each read is its own stream).
SEQUENTIAL_AFTER = 1 << 20
# A read continues a stream if it starts within this many bytes of where the
# stream got to (either way: the kernel's readahead requests arrive out of
# order), or within two frames, whichever is more.
STREAM_SLACK = 8 << 20
# Streams remembered per layer (most recent first).
STREAM_SLOTS = 16

# Background requests (profile replay, fetch of the rest): compressed bytes
# per request, about a quarter of the bandwidth-delay product within these
# bounds (at least one frame): large enough that a round trip a request is
# cheap, small enough that an on-demand read queued behind one waits little.
BACKGROUND_RUN_MIN = 512 << 10
BACKGROUND_RUN_MAX = 4 << 20

# Raw bytes to fetch past a miss, or "auto" (one bandwidth-delay product).
FetchAhead = int | Literal["auto"]


class FrameLayout(Protocol):
    """Where a layer's frames sit (a :class:`lazyfs.format.seekable.ChunkTable`)."""

    @property
    def frame_count(self) -> int: ...

    def span(self, i: int) -> tuple[int, int]: ...

    def raw_length(self, i: int) -> int: ...


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
    requests are nearly all latency) and bandwidth. Their product, the
    bandwidth-delay product, is how many bytes one round trip is worth:
    fetching that much extra costs about one round trip of transfer, and
    saves a whole round trip when it is used; and it is how many bytes must
    be in flight to keep the link full.

    Bandwidth is the link's, not one request's: requests that run together
    share the link, so each one alone sees a fraction of it (dividing a
    request's bytes by its time under load is what made ``--fetch-ahead
    auto`` shrink exactly when the link was busy). Requests announced with
    :meth:`begin` / :meth:`end` are measured together: bytes delivered over
    the last ``window`` of time in which at least one was in flight, and the
    estimate is the highest such rate of the last :data:`RATE_MEMORY`
    seconds (a busy link shows its capacity; an idle one says nothing).
    :meth:`observe` alone (one request, nothing else known) falls back to
    that request's own rate.
    """

    LARGE = 128 << 10  # requests at least this big measure bandwidth
    PLATEAU_ROUNDS = 3  # rounds without 25% growth: the link is full
    RATE_MEMORY = 10.0  # seconds a delivery-rate sample counts for the maximum
    MIN_WINDOW = 0.1  # seconds of busy link a delivery-rate sample spans, at least

    def __init__(self, clock: Callable[[], float] | None = None) -> None:
        self.rtt: float | None = None
        self.bandwidth: float | None = None  # bytes per second
        self.in_flight = 0
        self._clock = clock
        self._busy_since: float | None = None
        self._done: deque[tuple[float, int]] = deque()  # (time, bytes) of requests finished this busy period
        self._rates: deque[tuple[float, float]] = deque()  # (time, bytes/s) delivery-rate samples
        self._single: float | None = None  # per-request rate (EWMA): the fallback
        # Filling: the estimate still grows (by a quarter a round trip, in
        # the last PLATEAU_ROUNDS): whoever fills the link should keep
        # probing it with more in flight than the estimate asks for.
        self._round_at: float | None = None
        self._round_rate = 0.0
        self._plateau = 0

    def _now(self) -> float:
        return self._clock() if self._clock is not None else trio.current_time()

    def begin(self) -> float:
        """A request goes out; returns its start time for :meth:`end`."""
        now = self._now()
        if self.in_flight == 0:
            self._busy_since = now
            self._done.clear()
        self.in_flight += 1
        return now

    def end(self, started: float, nbytes: int) -> None:
        """The request :meth:`begin` returned ``started`` for has delivered ``nbytes`` (0: failed)."""
        now = self._now()
        self.in_flight = max(self.in_flight - 1, 0)
        if nbytes:
            self._sample_rtt(now - started)
            self._single_rate(nbytes, now - started)
            self._aggregate(now, nbytes)
        if self.in_flight == 0:
            self._busy_since = None

    def observe(self, nbytes: int, seconds: float) -> None:
        """One request, timed alone (nothing known of others in flight)."""
        self._sample_rtt(seconds)
        self._single_rate(nbytes, seconds)
        self._update()

    def _sample_rtt(self, seconds: float) -> None:
        self.rtt = seconds if self.rtt is None else min(self.rtt, seconds)

    def _single_rate(self, nbytes: int, seconds: float) -> None:
        if nbytes >= self.LARGE and self.rtt is not None:
            transfer = max(seconds - self.rtt, 1e-4)
            sample = nbytes / transfer
            self._single = sample if self._single is None else 0.7 * self._single + 0.3 * sample

    def _aggregate(self, now: float, nbytes: int) -> None:
        done = self._done
        done.append((now, nbytes))
        window = max(self.MIN_WINDOW, 4 * (self.rtt or 0.0))
        while done and done[0][0] <= now - window:
            done.popleft()
        since = self._busy_since if self._busy_since is not None else now
        span = now - max(since, now - window)
        if span >= self.MIN_WINDOW / 2:
            self._rates.append((now, sum(n for _t, n in done) / span))
        while self._rates and self._rates[0][0] < now - self.RATE_MEMORY:
            self._rates.popleft()
        self._update()
        # One round per round trip (at least MIN_WINDOW): did the estimate grow?
        if self._round_at is None:
            self._round_at = now
        elif now - self._round_at >= max(self.rtt or 0.0, self.MIN_WINDOW):
            rate = self.bandwidth or 0.0
            self._plateau = 0 if rate >= 1.25 * self._round_rate else self._plateau + 1
            self._round_rate = max(rate, self._round_rate)
            self._round_at = now

    @property
    def filling(self) -> bool:
        """True until the bandwidth estimate stopped growing for a few round
        trips: the link may be faster than measured so far."""
        return self._plateau < self.PLATEAU_ROUNDS

    def _update(self) -> None:
        # Requests measured together say more than one alone.
        self.bandwidth = max((r for _t, r in self._rates), default=self._single)

    def bdp(self) -> int:
        """Bytes in flight over one round trip; 0 until both are known."""
        if self.rtt is None or self.bandwidth is None:
            return 0
        return int(self.rtt * self.bandwidth)


class Stream:
    """One reader's progress through a layer, as far as reads show it."""

    __slots__ = ("ahead_until", "busy", "loaded_until", "pos", "streamed")

    def __init__(self, pos: int, streamed: int) -> None:
        self.pos = pos  # image offset the furthest read of this stream ended at
        self.streamed = streamed  # bytes read in order so far
        self.ahead_until = 0  # frames below this are arranged (fetched, in flight or advised)
        self.loaded_until = 0  # cached frames below this were loaded into memory for it
        self.busy = False  # an arrangement of its window is running


class ReadPattern:
    """Where the recent reads of one layer went: a few streams, most recent
    first. A read near where a stream got to continues it; any other starts
    a new one (pushing out the oldest)."""

    def __init__(self, slots: int = STREAM_SLOTS) -> None:
        self.slots = slots
        self.streams: list[Stream] = []

    def observe(self, offset: int, end: int, slack: int) -> Stream:
        streams = self.streams
        for k, s in enumerate(streams):
            if s.pos - slack <= offset <= s.pos + slack:
                s.streamed += end - offset
                if end > s.pos:
                    s.pos = end
                if k:
                    del streams[k]
                    streams.insert(0, s)
                return s
        s = Stream(end, end - offset)
        streams.insert(0, s)
        del streams[self.slots :]
        return s


def check_fetch_ahead(value: object) -> FetchAhead:
    """``value`` if it is a valid fetch-ahead setting, else ValueError."""
    if value == "auto":
        return "auto"
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"fetch-ahead must be a byte count >= 0 or 'auto', not {value!r}")
    return value


@dataclass(frozen=True)
class FetchPolicy:
    """The decisions of one layer's fetching (the default, sequential policy).

    Args:
        merge_bytes: adjacent missing frames go out as one request up to this
            many compressed bytes (a run always holds at least one frame).
        fetch_ahead: raw bytes of following missing frames to claim on a miss,
            or ``"auto"``: the link's bandwidth-delay product, capped at
            ``auto_cap``.
        prefetch_batch_bytes: compressed bytes per background request.
        stream_ahead: raw bytes to keep arranged ahead of a sequential
            reader (0: no sequential detection).
        stream_request_bytes: compressed bytes per request ahead of one.
    """

    merge_bytes: int = DEFAULT_MERGE_BYTES
    fetch_ahead: FetchAhead = 0
    prefetch_batch_bytes: int = PREFETCH_BATCH_BYTES
    auto_cap: int = AUTO_FETCH_AHEAD_CAP
    stream_ahead: int = DEFAULT_STREAM_AHEAD
    stream_request_bytes: int = STREAM_REQUEST_BYTES

    def __post_init__(self) -> None:
        check_fetch_ahead(self.fetch_ahead)

    # -- on-demand ---------------------------------------------------------------

    def runs(self, frames: Sequence[int], layout: FrameLayout, *, limit: int | None = None) -> list[list[int]]:
        """Group ``frames`` (ascending) into runs of adjacent frames, one
        request each, each at most ``merge_bytes`` (or ``limit``) compressed."""
        limit = self.merge_bytes if limit is None else limit
        runs: list[list[int]] = []
        for i in frames:
            if runs and runs[-1][-1] == i - 1 and _span_bytes(layout, runs[-1][0], i) <= limit:
                runs[-1].append(i)
            else:
                runs.append([i])
        return runs

    def ahead_bytes(self, link: LinkEstimate) -> int:
        """Raw bytes to fetch past a miss (0: none)."""
        if self.fetch_ahead == "auto":
            return min(link.bdp(), self.auto_cap)
        return self.fetch_ahead

    def ahead(self, last: int, layout: FrameLayout, link: LinkEstimate, free: Callable[[int], bool]) -> list[int]:
        """Frames after ``last`` to fetch in the same request: the following
        frames that are ``free`` (neither cached as far as we know nor in
        flight), as long as they fit whole in :meth:`ahead_bytes`. A reader
        that moves on to its neighbours (files packed next to each other)
        then pays no round trip."""
        limit = self.ahead_bytes(link)
        out: list[int] = []
        ahead = 0
        i = last + 1
        while i < layout.frame_count and ahead + layout.raw_length(i) <= limit and free(i):
            out.append(i)
            ahead += layout.raw_length(i)
            i += 1
        return out

    # -- sequential readers ----------------------------------------------------------

    def stream_slack(self, layout: FrameLayout, chunk_size: int) -> int:
        """How far from a stream's position a read may start and still continue it."""
        return max(STREAM_SLACK, 2 * chunk_size)

    def is_sequential(self, stream: Stream) -> bool:
        return self.stream_ahead > 0 and stream.streamed >= SEQUENTIAL_AFTER

    def stream_window(
        self, stream: Stream, layout: FrameLayout, chunk_size: int, expected: Collection[int] = ()
    ) -> range:
        """Frames to arrange ahead of a sequential ``stream`` that are not yet:
        those after the one it is reading, up to a window that grows with
        what the stream has read (like the kernel's readahead), capped at
        ``stream_ahead`` bytes. ``expected``: the frames a replayed startup
        profile lists for this layer (the window then ends where they do)."""
        ahead = min(self.stream_ahead, max(2 * chunk_size, stream.streamed))
        current = max(stream.pos - 1, 0) // chunk_size
        first = max(current + 1, stream.ahead_until)
        last = min((stream.pos + ahead - 1) // chunk_size, layout.frame_count - 1)
        window = range(first, max(first, last + 1))
        if expected and current in expected:
            # A startup profile lists what this start reads, and its replay
            # fetches those frames anyway: while the reader is inside them,
            # guessing past them only spends the link (an optimized image's
            # hot part is read in order and ends where the profile does).
            # A reader that leaves the profile gets the usual window.
            stop = next((k for k in window if k not in expected), window.stop)
            window = range(first, stop)
        return window

    def stream_memory_window(self, stream: Stream, layout: FrameLayout, chunk_size: int, memory_bytes: int) -> range:
        """Cached frames just ahead of a sequential ``stream`` to load whole
        into the memory LRU (one large read each, where the reader's own
        requests would be many small ones): as many as half the LRU holds,
        so they are still there when the reader arrives."""
        n = memory_bytes // 2 // max(chunk_size, 1)
        current = max(stream.pos - 1, 0) // chunk_size
        first = max(current + 1, stream.loaded_until)
        return range(first, max(first, min(current + 1 + n, layout.frame_count)))

    def stream_runs(self, frames: Sequence[int], layout: FrameLayout) -> list[list[int]]:
        """Frames fetched ahead of a sequential reader, grouped into requests
        small enough to run in parallel (one frame of the default size)."""
        return self.runs(frames, layout, limit=min(self.merge_bytes, self.stream_request_bytes))

    # -- background ----------------------------------------------------------------

    def prefetch_order(self, layout: FrameLayout) -> Iterable[int]:
        """Frames in the order background prefetch visits them: bottom up."""
        return range(layout.frame_count)

    def prefetch_batch(self, first: int, layout: FrameLayout, missing: Callable[[int], bool]) -> range:
        """Frames to prefetch in one request starting at missing frame
        ``first``: small batches, so an on-demand read waits at most for one."""
        j = first
        while (
            j + 1 < layout.frame_count
            and missing(j + 1)
            and _span_bytes(layout, first, j + 1) <= self.prefetch_batch_bytes
        ):
            j += 1
        return range(first, j + 1)

    def background_run_bytes(self, link: LinkEstimate) -> int:
        """Compressed bytes per background request (a run holds at least one frame)."""
        return min(max(link.bdp() // 4, BACKGROUND_RUN_MIN), BACKGROUND_RUN_MAX)

    def background_window(self, link: LinkEstimate, run_bytes: int, *, demand_waiting: bool) -> int | None:
        """Compressed bytes background requests may have in flight, or None
        while the link is not measured yet (the caller starts with a few
        requests, which measure it).

        To fill the link, one bandwidth-delay product must be in flight
        (requests waiting out their round trip) plus a request being
        transferred; a quarter more lets the estimate grow when the link
        turns out faster than measured. While an on-demand read waits for a
        frame nobody is fetching, only the bandwidth-delay product and half a
        request: then at most about that much is ahead of it in the link's
        queue. While the
        estimate still grows (:attr:`LinkEstimate.filling`, the first few
        round trips), twice the bandwidth-delay product: what is in flight
        bounds what can be measured, so only more in flight finds the
        link's real speed.
        """
        bdp = link.bdp()
        if not bdp:
            return None
        if link.filling:
            # Still learning how fast the link is: twice what it has shown,
            # so the next measurement can show more.
            return 2 * bdp + 2 * run_bytes
        if demand_waiting:
            return bdp + run_bytes // 2
        return bdp + bdp // 4 + run_bytes

    async def before_prefetch(self, demand: Demand) -> None:
        """Wait before a background request: on-demand reads go first."""
        await demand.wait_idle()


def _span_bytes(layout: FrameLayout, first: int, last: int) -> int:
    return layout.span(last)[1] - layout.span(first)[0]
