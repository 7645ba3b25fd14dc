"""What to fetch, how much, and in what order: the fetch policy.

Everything here decides; nothing here fetches. :class:`FetchPolicy` is the
only place that chooses which missing frames go out together (runs merged up
to ``merge_bytes``), how many frames past a miss ride along (fetch-ahead: a
fixed byte count, or ``"auto"``: one measured bandwidth-delay product), and
how background prefetch walks a layer (order, batch size, stepping aside for
on-demand reads). The mechanism (:mod:`lazyfs.fetch.frames`,
:mod:`lazyfs.fetch.files`) asks it. :class:`Demand` and :class:`LinkEstimate`
are the live, per-mount facts the policy decides from.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import trio

__all__ = [
    "AUTO_FETCH_AHEAD_CAP",
    "DEFAULT_MERGE_BYTES",
    "PREFETCH_BATCH_BYTES",
    "Demand",
    "FetchAhead",
    "FetchPolicy",
    "FrameLayout",
    "LinkEstimate",
]

# Adjacent missing frames are fetched in one range request up to this many
# compressed bytes: fewer round trips without one read waiting on a huge body.
DEFAULT_MERGE_BYTES = 8 << 20
# Background prefetch requests stay this small (compressed bytes, at least
# one frame) so they never hold the link long against an on-demand read.
PREFETCH_BATCH_BYTES = 1 << 20
# With fetch-ahead "auto", never more than this per miss.
AUTO_FETCH_AHEAD_CAP = 4 << 20

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
    """

    merge_bytes: int = DEFAULT_MERGE_BYTES
    fetch_ahead: FetchAhead = 0
    prefetch_batch_bytes: int = PREFETCH_BATCH_BYTES
    auto_cap: int = AUTO_FETCH_AHEAD_CAP

    def __post_init__(self) -> None:
        check_fetch_ahead(self.fetch_ahead)

    # -- on-demand ---------------------------------------------------------------

    def runs(self, frames: Sequence[int], layout: FrameLayout) -> list[list[int]]:
        """Group ``frames`` (ascending) into runs of adjacent frames, one
        request each, each at most ``merge_bytes`` compressed."""
        runs: list[list[int]] = []
        for i in frames:
            if runs and runs[-1][-1] == i - 1 and _span_bytes(layout, runs[-1][0], i) <= self.merge_bytes:
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
