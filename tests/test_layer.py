"""SeekableFile on its own: exact bytes, one flight per frame, verify-then-serve.

The blob is served from memory by a source that counts requests and can be
told to corrupt or stall; the cache is the real chunk cache on disk. The same
behaviours are checked end to end through FUSE and a real registry in
test_mount_e2e.py.
"""

from __future__ import annotations

import random

import pytest
import trio
from support.blobtools import make_blob

from cache import ChunkCache
from lazyfs.errors import FetchError, IntegrityError
from lazyfs.fetch import FetchContext, LinkEstimate, ReadSettings, SeekableFile
from lazyfs.format import seekable


class MemorySource:
    def __init__(self, data: bytes, *, delay: float = 0.0) -> None:
        self.data = data
        self.size = len(data)
        self.delay = delay
        self.requests: list[tuple[int, int]] = []
        self.corrupt_next = 0
        self.stall = False

    async def read(self, offset: int, length: int) -> bytes:
        self.requests.append((offset, length))
        if self.stall:
            await trio.sleep_forever()
        await trio.sleep(self.delay)
        chunk = self.data[offset : offset + length]
        if self.corrupt_next:
            self.corrupt_next -= 1
            chunk = bytes([chunk[0] ^ 0xFF]) + chunk[1:]
        return chunk


def raw_image(size: int) -> bytes:
    rnd = random.Random(7)
    return bytes(rnd.getrandbits(3) for _ in range(size))


def make_layer(
    tmp_path, raw: bytes, chunk_size: int, *, delay: float = 0.0, memory_bytes: int = 0, **settings
) -> tuple[SeekableFile, MemorySource]:
    """A layer over ``raw`` in frames of ``chunk_size``; ``settings`` are ReadSettings fields."""
    blob = make_blob(raw, chunk_size)
    desc = seekable.parse_descriptor(blob.descriptor)
    assert desc.table_offset is not None
    table = seekable.read_chunk_table(blob.data[desc.table_offset :], desc)
    source = MemorySource(blob.data, delay=delay)
    cache = ChunkCache(tmp_path / "cache", memory_bytes=memory_bytes)
    context = FetchContext()
    layer = SeekableFile("test", desc, table, context.counted(source), cache, ReadSettings(**settings), context)
    return layer, source


RAW = raw_image(200_000)


async def test_reads_at_any_offset_return_exact_bytes(tmp_path):
    layer, _ = make_layer(tmp_path, RAW, 7_000)
    rnd = random.Random(1)
    for _ in range(200):
        off = rnd.randrange(0, len(RAW) + 100)
        size = rnd.randrange(0, 30_000)
        assert await layer.read(off, size) == RAW[off : off + size]


async def test_only_covering_frames_are_fetched(tmp_path):
    layer, source = make_layer(tmp_path, RAW, 10_000)
    await layer.read(25_000, 100)
    assert layer.stats.frames_fetched == 1
    assert layer.stats.fetched_frames == {2}
    start, end = layer.table.span(2)
    assert source.requests == [(start, end - start)]


async def test_concurrent_readers_of_a_cold_frame_share_one_fetch(tmp_path):
    layer, source = make_layer(tmp_path, RAW, 50_000, delay=0.05)
    results: dict[int, bytes] = {}

    async def reader(k: int) -> None:
        results[k] = await layer.read(60_000 + k * 100, 1000)

    async with trio.open_nursery() as nursery:
        for k in range(64):
            nursery.start_soon(reader, k)
    assert len(source.requests) == 1
    assert layer.stats.frames_fetched == 1
    for k, data in results.items():
        assert data == RAW[60_000 + k * 100 : 61_000 + k * 100]


async def test_adjacent_missing_frames_go_out_as_one_request(tmp_path):
    layer, source = make_layer(tmp_path, RAW, 10_000)
    assert await layer.read(5_000, 50_000) == RAW[5_000:55_000]
    assert len(source.requests) == 1
    assert layer.stats.frames_fetched == 6


async def test_merge_limit_splits_long_runs(tmp_path):
    layer, source = make_layer(tmp_path, RAW, 10_000, merge_bytes=1)
    assert await layer.read(0, 40_000) == RAW[:40_000]
    assert len(source.requests) == 4


async def test_second_read_is_served_from_cache_without_fetching(tmp_path):
    layer, source = make_layer(tmp_path, RAW, 10_000)
    await layer.read(0, 100_000)
    before = len(source.requests)
    assert await layer.read(0, 100_000) == RAW[:100_000]
    assert len(source.requests) == before
    assert layer.stats.cache_hits >= 10


async def test_corrupted_transfer_is_refetched_once_and_served_correctly(tmp_path):
    layer, source = make_layer(tmp_path, RAW, 10_000)
    source.corrupt_next = 1
    assert await layer.read(30_000, 10) == RAW[30_000:30_010]
    assert layer.stats.verify_failures == 1
    assert len(source.requests) == 2


async def test_frame_bad_twice_fails_and_other_frames_still_serve(tmp_path):
    layer, source = make_layer(tmp_path, RAW, 10_000)
    source.corrupt_next = 2
    with pytest.raises(IntegrityError, match="frame 3"):
        await layer.read(30_000, 10)
    assert layer.stats.verify_failures == 2
    assert layer.stats.read_errors == 1
    assert await layer.read(0, 10) == RAW[:10]
    # and the bad frame itself recovers once the source behaves
    assert await layer.read(30_000, 10) == RAW[30_000:30_010]


async def test_stalled_source_fails_within_the_read_timeout(tmp_path):
    layer, source = make_layer(tmp_path, RAW, 10_000, read_timeout=0.5)
    source.stall = True
    with trio.fail_after(5):
        with pytest.raises(FetchError, match="timed out"):
            await layer.read(0, 10)
    source.stall = False
    assert await layer.read(0, 10) == RAW[:10]


async def test_prefetch_fetches_every_missing_frame_once(tmp_path):
    layer, source = make_layer(tmp_path, RAW, 10_000)
    await layer.read(0, 25_000)  # frames 0-2 on demand
    fetched = await layer.prefetch()
    assert fetched == layer.table.frame_count - 3
    assert layer.frames_present == layer.table.frame_count
    before = len(source.requests)
    assert await layer.read(0, len(RAW)) == RAW
    assert len(source.requests) == before


async def test_prefetch_waits_while_an_on_demand_read_is_in_progress(tmp_path):
    layer, source = make_layer(tmp_path, RAW, 10_000, delay=0.2)
    order: list[str] = []

    async def demand() -> None:
        await layer.read(150_000, 10)
        order.append("demand")

    async def background() -> None:
        await trio.sleep(0.01)  # start while the demand read is in flight
        await layer.prefetch()
        order.append("prefetch")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(demand)
        nursery.start_soon(background)
    assert order == ["demand", "prefetch"]
    # The demand read went out first, alone.
    assert source.requests[0][0] == layer.table.span(15)[0]


async def test_fetch_ahead_brings_following_frames_in_the_same_request(tmp_path):
    layer, source = make_layer(tmp_path, RAW, 10_000, fetch_ahead=30_000)
    assert await layer.read(15_000, 10) == RAW[15_000:15_010]
    assert len(source.requests) == 1
    assert layer.stats.fetched_frames == {1, 2, 3, 4}
    before = len(source.requests)
    assert await layer.read(35_000, 10_000) == RAW[35_000:45_000]
    assert len(source.requests) == before  # served by the frames fetched ahead


async def test_fetch_ahead_skips_frames_already_cached(tmp_path):
    layer, source = make_layer(tmp_path, RAW, 10_000, fetch_ahead=30_000)
    await layer.read(20_000, 10)  # frames 2-5
    layer.store._present.clear()  # forget what we know: only the cache can tell
    source.requests.clear()
    await layer.read(15_000, 10)  # frame 1; 2.. are on disk
    assert source.requests == [(layer.table.span(1)[0], layer.table.span(1)[1] - layer.table.span(1)[0])]


def test_link_estimate_learns_rtt_from_small_and_bandwidth_from_large_requests():
    link = LinkEstimate()
    assert link.bdp() == 0
    link.observe(4_000, 0.080)  # a chunk table: nearly all latency
    assert link.bdp() == 0  # no bandwidth yet
    link.observe(1 << 20, 0.080 + 0.010)  # 1 MiB in 10 ms after the RTT: ~100 MiB/s
    assert link.rtt == pytest.approx(0.080)
    assert link.bdp() == pytest.approx(0.080 * (1 << 20) / 0.010, rel=0.01)


async def test_auto_fetch_ahead_stays_off_on_a_fast_local_link(tmp_path):
    layer, _ = make_layer(tmp_path, RAW, 10_000, fetch_ahead="auto")
    for off in (0, 50_000, 120_000, 180_000):
        await layer.read(off, 10)
    # The source answers instantly: the bandwidth-delay product is ~0.
    assert layer.stats.frames_fetched == 4


async def test_auto_fetch_ahead_grows_with_latency(tmp_path):
    layer, source = make_layer(tmp_path, RAW, 10_000, fetch_ahead="auto", delay=0.05)
    layer.context.link.observe(4_000, 0.05)  # a 50 ms round trip
    layer.context.link.observe(200_000, 0.05 + 0.001)  # 200 KB took 1 ms past it: BDP ~10 MB, capped
    await layer.read(0, 10)
    assert layer.stats.frames_fetched > 1
    assert len(source.requests) == 1
