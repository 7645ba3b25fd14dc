"""Cold sequential reads are pipelined (issue 13, item 3): a reader seen
going forward gets the frames ahead of it fetched in parallel range
requests, verified and decoded on worker threads at the same time; a random
reader gets only what it reads; cached frames ahead of a sequential reader
are read into the page cache. The decision is the policy's (ReadPattern,
FetchPolicy.stream_window), the mechanism the frame store's."""

from __future__ import annotations

import os
import random
import threading
import time
from pathlib import Path

import pytest
import trio
from support.blobtools import make_blob
from test_memory_budget import CountingSource

from cache import ChunkCache
from lazyfs.fetch import FetchContext, FetchPolicy, ReadSettings, SeekableFile
from lazyfs.fetch.policy import SEQUENTIAL_AFTER, ReadPattern
from lazyfs.format import seekable

KIB = 1 << 10
MIB = 1 << 20


def make(tmp_path: Path, raw: bytes, chunk: int, *, delay: float, **settings) -> tuple[SeekableFile, CountingSource]:
    blob = make_blob(raw, chunk)
    desc = seekable.parse_descriptor(blob.descriptor)
    table = seekable.read_chunk_table(blob.data[blob.table_offset :], desc)
    source = CountingSource(blob.data, delay=delay)
    context = FetchContext()
    cache = ChunkCache(tmp_path / "cache", memory_bytes=0)
    layer = SeekableFile("t", desc, table, context.counted(source), cache, ReadSettings(**settings), context)
    return layer, source


async def read_sequentially(layer: SeekableFile, size: int, step: int, *, pause: float = 0.0) -> bytes:
    out = bytearray()
    async with trio.open_nursery() as nursery:
        layer.start(nursery)
        for off in range(0, size, step):
            out += await layer.read(off, step)
            await trio.sleep(pause)
    return bytes(out)


def test_reads_going_forward_form_one_sequential_stream_even_slightly_out_of_order() -> None:
    pattern = ReadPattern()
    policy = FetchPolicy()
    step = 128 * KIB
    offsets = list(range(0, 4 * MIB, step))
    # The kernel's readahead requests arrive a little shuffled.
    for k in range(0, len(offsets), 4):
        offsets[k : k + 4] = reversed(offsets[k : k + 4])
    streams = {id(pattern.observe(off, off + step, policy.stream_slack(None, 4 * MIB))) for off in offsets}  # type: ignore[arg-type]
    assert len(streams) == 1
    assert policy.is_sequential(pattern.streams[0])


def test_random_reads_never_count_as_sequential() -> None:
    pattern = ReadPattern()
    policy = FetchPolicy()
    rnd = random.Random(3)
    for _ in range(20_000):
        off = rnd.randrange(0, 4 << 30) & ~4095
        stream = pattern.observe(off, off + 4096, policy.stream_slack(None, 4 * MIB))  # type: ignore[arg-type]
        assert not policy.is_sequential(stream)


async def test_sequential_cold_reader_gets_frames_ahead_in_parallel_requests(tmp_path: Path) -> None:
    chunk = 256 * KIB
    raw = os.urandom(32 * chunk)
    # One frame a request: with the default 4 MiB requests a window of this
    # small file is one or two requests, and >= 4 at once was down to timing.
    layer, source = make(tmp_path, raw, chunk, delay=0.05, merge_bytes=chunk)
    assert await read_sequentially(layer, len(raw), 128 * KIB) == raw
    assert source.peak >= 4, f"at most {source.peak} requests were in flight"
    assert layer.stats.frames_fetched == 32  # every frame once, none twice
    assert len(layer.stats.fetched_frames) == 32


async def test_without_sequential_detection_frames_go_out_one_at_a_time(tmp_path: Path) -> None:
    # The same read as above with the stream window off: the old behaviour.
    chunk = 256 * KIB
    raw = os.urandom(16 * chunk)
    layer, source = make(tmp_path, raw, chunk, delay=0.01, stream_ahead=0)
    assert await read_sequentially(layer, len(raw), 128 * KIB) == raw
    assert source.peak == 1


async def test_frames_ahead_are_verified_and_decoded_on_worker_threads_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    chunk = 512 * KIB
    raw = os.urandom(24 * chunk)
    now = peak = 0
    lock = threading.Lock()
    real = seekable.decode_frame

    def slow_decode(*args, **kw):  # runs in worker threads
        nonlocal now, peak
        with lock:
            now += 1
            peak = max(peak, now)
        try:
            time.sleep(0.02)
            return real(*args, **kw)
        finally:
            with lock:
                now -= 1

    monkeypatch.setattr(seekable, "decode_frame", slow_decode)
    layer, _ = make(tmp_path, raw, chunk, delay=0.0)
    assert await read_sequentially(layer, len(raw), 256 * KIB) == raw
    assert peak >= 2, "frames were decoded one at a time"


async def test_random_reader_fetches_only_the_frames_it_reads(tmp_path: Path) -> None:
    chunk = 64 * KIB
    raw = os.urandom(256 * chunk)
    layer, source = make(tmp_path, raw, chunk, delay=0.0)
    rnd = random.Random(5)
    touched = set()
    async with trio.open_nursery() as nursery:
        layer.start(nursery)
        for _ in range(60):
            off = rnd.randrange(0, len(raw) - 4096)
            touched.update(range(off // chunk, (off + 4095) // chunk + 1))
            assert await layer.read(off, 4096) == raw[off : off + 4096]
    assert layer.stats.fetched_frames == touched
    assert len(source.requests) <= len(touched)


async def test_sequential_reader_of_cached_frames_has_the_frames_ahead_read_into_the_page_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    chunk = 256 * KIB
    raw = os.urandom(32 * chunk)
    layer, _ = make(tmp_path, raw, chunk, delay=0.0)
    await read_sequentially(layer, len(raw), 256 * KIB)  # fill the cache
    fresh, _ = make(tmp_path, raw, chunk, delay=0.0)
    advised: list[bytes] = []
    real = ChunkCache.advise

    def spy(self: ChunkCache, key: bytes, size: int) -> bool:
        advised.append(key)
        return real(self, key, size)

    monkeypatch.setattr(ChunkCache, "advise", spy)
    # A reader that takes its time (a real one has work to do): the window
    # is arranged before it gets there.
    assert await read_sequentially(fresh, len(raw), 128 * KIB, pause=0.005) == raw
    assert fresh.stats.frames_fetched == 0
    first_ahead = (SEQUENTIAL_AFTER + 128 * KIB) // chunk
    assert {fresh.store.key(i) for i in range(first_ahead + 1, 32)} <= set(advised)
