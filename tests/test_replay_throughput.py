"""Profile replay fills the link (issue 12, item 1): the link is measured as
a whole (not one request's share of it), the replay keeps its
bandwidth-delay product in flight, an on-demand read goes first, a reader
that is ahead of the replay pulls it along, and the frame store offers a
background priority that yields memory to readers."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing
from support.blobtools import make_blob
from test_memory_budget import CountingSource

from cache import ChunkCache
from lazyfs.fetch import FetchContext, FetchPolicy, LinkEstimate, ReadSettings, SeekableFile
from lazyfs.fetch.context import DecodeBudget
from lazyfs.fetch.profile import DemandReads, Profile, ProfileLayer, ProfileReplay, ReplayTarget
from lazyfs.format import seekable

D1 = "sha256:" + "1" * 64
MB = 1_000_000


class Table:
    def __init__(self, n: int, *, compressed: int = 100_000) -> None:
        self.frame_count = n
        self.compressed = compressed

    def span(self, i: int) -> tuple[int, int]:
        return i * self.compressed, (i + 1) * self.compressed


class Store:
    """A frame store whose every request takes ``delay`` seconds."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.present: set[int] = set()
        self.requests: list[range] = []
        self.active = 0
        self.peak = 0

    def known_present(self, i: int) -> bool:
        return i in self.present

    async def is_cached(self, i: int) -> bool:
        await trio.lowlevel.checkpoint()
        return i in self.present

    async def frames(self, frames: range) -> list[bytes]:
        self.requests.append(frames)
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            await trio.sleep(self.delay)
            self.present.update(frames)
            return [b""] * len(frames)
        finally:
            self.active -= 1


def measured_link(rtt: float, bandwidth: float) -> LinkEstimate:
    """A link whose estimate has settled at ``rtt`` and ``bandwidth`` (bytes/s)."""
    link = LinkEstimate()
    link.rtt, link.bandwidth = rtt, bandwidth
    link._plateau = LinkEstimate.PLATEAU_ROUNDS  # done probing
    return link


def scattered(n: int) -> Profile:
    """``n`` frames with no neighbours in the recording: one request each."""
    frames = tuple(range(0, 2 * n, 2))
    return Profile((ProfileLayer(D1, frames, tuple(range(n))),))


def run(main) -> None:
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_link_estimate_measures_the_whole_link_when_requests_share_it():
    now = [0.0]
    link = LinkEstimate(clock=lambda: now[0])
    t = link.begin()
    now[0] = 0.125
    link.end(t, 4_000)  # a small request: the round trip
    # Eight 1 MB requests at once over an 8 MB/s link: the first is done
    # after 0.125 s of transfer, the last after 1 s. Each alone saw a
    # fraction of the link; together they show all of it.
    starts = [link.begin() for _ in range(8)]
    for k, t in enumerate(starts, 1):
        now[0] = 0.25 + 0.125 * k
        link.end(t, MB)
    assert link.bandwidth == pytest.approx(8 * MB, rel=0.1)
    assert link.bdp() == pytest.approx(1 * MB, rel=0.1)
    # --fetch-ahead auto asks the same estimate.
    assert FetchPolicy(fetch_ahead="auto").ahead_bytes(link) == pytest.approx(1 * MB, rel=0.1)


def test_replay_keeps_the_bandwidth_delay_product_in_flight_once_the_link_is_measured():
    # 0.1 s round trip at 10 MB/s: 1 MB in flight, 100 KB requests: ten and
    # more at once (it used to stay at the four it started with).
    store = Store(delay=0.2)
    link = measured_link(0.1, 10 * MB)
    replay = ProfileReplay(scattered(100), [ReplayTarget(D1, Table(200), store)], DemandReadsIdle(), link)

    async def main() -> None:
        await replay.run()

    run(main)
    window = FetchPolicy().background_window(link, replay.run_bytes(), demand_waiting=False)
    assert window is not None and window >= link.bdp()
    assert store.peak >= link.bdp() // 100_000
    assert replay.peak_bytes_in_flight <= window + 100_000
    assert len(store.requests) == 100


def test_replay_still_probes_with_more_in_flight_while_the_estimate_grows():
    link = measured_link(0.1, 10 * MB)
    link._plateau = 0  # still filling
    policy = FetchPolicy()
    run_bytes = policy.background_run_bytes(link)
    assert policy.background_window(link, run_bytes, demand_waiting=True) >= 2 * link.bdp()


class DemandReadsIdle:
    """A Demand with no reader."""

    active = 0

    async def wait_idle(self) -> None:
        await trio.lowlevel.checkpoint()


def test_an_on_demand_read_waiting_on_the_link_cuts_the_replay_to_the_bandwidth_delay_product():
    store = Store(delay=0.2)
    link = measured_link(0.1, 10 * MB)
    reads = DemandReads()
    replay = ProfileReplay(scattered(300), [ReplayTarget(D1, Table(1000), store)], DemandReadsIdle(), link, reads=reads)
    policy = FetchPolicy()
    seen: dict[str, int] = {}

    async def main() -> None:
        async with trio.open_nursery() as n:
            n.start_soon(replay.run)
            await trio.sleep(1.05)  # between two batches of completions
            seen["free"] = replay.bytes_in_flight
            token = reads.begin(0, range(999, 1000))  # a frame nobody fetches
            await trio.sleep(1.0)
            seen["waiting"] = replay.bytes_in_flight
            reads.end(token)
            await trio.sleep(1.0)
            seen["after"] = replay.bytes_in_flight

    run(main)
    run_bytes = replay.run_bytes()
    waiting = policy.background_window(link, run_bytes, demand_waiting=True)
    free = policy.background_window(link, run_bytes, demand_waiting=False)
    assert waiting is not None and free is not None and waiting < free
    # At most about one request more than the round trip needs is ahead of the read.
    assert seen["waiting"] <= waiting + 100_000
    assert seen["waiting"] < seen["free"]
    assert seen["after"] > seen["waiting"]


def test_a_reader_ahead_of_the_replay_pulls_it_along_and_skipped_frames_come_later():
    store = Store(delay=0.5)
    reads = DemandReads()
    replay = ProfileReplay(
        scattered(50), [ReplayTarget(D1, Table(100), store)], DemandReadsIdle(), LinkEstimate(), reads=reads, max_requests=1
    )

    async def main() -> None:
        async with trio.open_nursery() as n:
            n.start_soon(replay.run)
            await trio.sleep(0.7)  # frames 0 and 2 requested
            token = reads.begin(0, range(60, 61))  # the workload is at recorded frame 60 already
            await trio.sleep(0.01)
            store.present.add(60)  # its own fetch got it
            reads.end(token)

    run(main)
    starts = [r[0] for r in store.requests]
    assert starts[:3] == [0, 2, 62]  # jumped to just after where the reader was
    assert sorted(starts) == [f for f in range(0, 100, 2) if f != 60]  # the skipped ones too, later
    assert replay.counts.resyncs == 1


async def test_background_reservations_leave_a_quarter_of_the_budget_to_readers():
    budget = DecodeBudget(100)
    first = await budget.reserve(60)
    assert budget.try_reserve(1) is not None and budget.release(1) is None
    got: list[str] = []

    async def background() -> None:
        n = await budget.reserve(20, background=True)  # 60 + 20 would leave less than 25 free
        got.append("background")
        budget.release(n)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(background)
        await trio.testing.wait_all_tasks_blocked()
        assert got == []
        reader = await budget.reserve(30)  # a reader is not held back
        got.append("reader")
        budget.release(reader)
        budget.release(first)
    assert got == ["reader", "background"]


async def test_frame_store_says_which_frames_are_in_flight_and_fetches_in_the_background_without_fetch_ahead(
    tmp_path: Path,
):
    raw = bytes(range(256)) * 4096  # 1 MiB
    blob = make_blob(raw, 64 << 10)
    desc = seekable.parse_descriptor(blob.descriptor)
    table = seekable.read_chunk_table(blob.data[blob.table_offset :], desc)
    source = CountingSource(blob.data, delay=0.05)
    context = FetchContext()
    cache = ChunkCache(tmp_path / "cache", memory_bytes=0)
    layer = SeekableFile("t", desc, table, context.counted(source), cache, ReadSettings(fetch_ahead=256 << 10), context)
    store = layer.store
    seen: list[bool] = []

    async def fetch() -> None:
        await store.frames(range(2, 3), priority="background")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(fetch)
        await trio.sleep(0.01)
        seen.append(store.in_flight(2))
        seen.append(store.in_flight(3))  # background: nothing fetched ahead
    assert seen == [True, False]
    assert not store.in_flight(2) and store.known_present(2)
    assert store.stats.frames_fetched == 1
