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

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import trio

__all__ = [
    "AUTO_FETCH_AHEAD_CAP",
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

    def stream_window(self, stream: Stream, layout: FrameLayout, chunk_size: int) -> range:
        """Frames to arrange ahead of a sequential ``stream`` that are not yet:
        those after the one it is reading, up to a window that grows with
        what the stream has read (like the kernel's readahead), capped at
        ``stream_ahead`` bytes."""
        ahead = min(self.stream_ahead, max(2 * chunk_size, stream.streamed))
        current = max(stream.pos - 1, 0) // chunk_size
        first = max(current + 1, stream.ahead_until)
        last = min((stream.pos + ahead - 1) // chunk_size, layout.frame_count - 1)
        return range(first, max(first, last + 1))

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

    async def before_prefetch(self, demand: Demand) -> None:
        """Wait before a background request: on-demand reads go first."""
        await demand.wait_idle()


def _span_bytes(layout: FrameLayout, first: int, last: int) -> int:
    return layout.span(last)[1] - layout.span(first)[0]
