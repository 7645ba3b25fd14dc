"""Cached frames are read by range (issue 13, item 1): a small read of a
cached frame reads those bytes from disk, never the whole frame; the at-rest
check stays an option (and then checks the whole entry); damaged entries are
still caught; evicted entries are not held open."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from support.blobtools import make_blob
from test_layer import MemorySource

from cache import ChunkCache
from cache import _entry as entry_mod
from cache._entry import HEADER_SIZE
from lazyfs.fetch import FetchContext, ReadSettings, SeekableFile
from lazyfs.format import seekable

FRAME = 1 << 20


def key_of(data: bytes) -> bytes:
    return hashlib.sha512(b"frame:" + data).digest()


def entry_path(root: Path, key: bytes) -> Path:
    name = key.hex()
    return root / "chunks" / name[:2] / name


@pytest.fixture
def preads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Lengths of every data read the cache makes from an entry."""
    lengths: list[int] = []
    real = os.pread

    def spy(fd: int, n: int, off: int) -> bytes:
        lengths.append(n)
        return real(fd, n, off)

    monkeypatch.setattr(entry_mod.os, "pread", spy)
    return lengths


def test_range_read_reads_only_the_bytes_asked_for(tmp_path: Path, preads: list[int]) -> None:
    data = os.urandom(FRAME)
    key = key_of(data)
    with ChunkCache(tmp_path, memory_bytes=0) as c:
        c.put(key, data)
        preads.clear()
        assert c.read(key, FRAME, 12_288, 4096) == data[12_288:16_384]
        assert c.read(key, FRAME, 500_000, 100) == data[500_000:500_100]
        # The header once (when the entry is opened), then the two ranges.
        assert max(preads) <= 4096, preads
        assert sum(preads) <= HEADER_SIZE + 4096 + 100
        s = c.statistics()
        assert s.range_reads == 2 and s.disk_hits == 2


def test_range_read_of_a_missing_or_damaged_entry_is_a_miss(tmp_path: Path) -> None:
    data = os.urandom(64 << 10)
    key = key_of(data)
    with ChunkCache(tmp_path, memory_bytes=0) as c:
        assert c.read(key, len(data), 0, 10) is None
        c.put(key, data)
        path = entry_path(tmp_path, key)
        with open(path, "r+b") as f:
            f.truncate(HEADER_SIZE + 100)
        assert c.read(key, len(data), 0, 10) is None
        assert not path.exists()
        assert c.statistics().damaged == 1
        with pytest.raises(ValueError, match="outside"):
            c.read(key, len(data), len(data) - 5, 10)


@pytest.mark.parametrize("verify", [False, True], ids=["trusted-once-written", "verify-at-rest"])
def test_verify_at_rest_checks_the_whole_entry_on_a_range_read(tmp_path: Path, verify: bool) -> None:
    data = os.urandom(FRAME)
    key = key_of(data)
    with ChunkCache(tmp_path, memory_bytes=0) as c:
        c.put(key, data)
    # Bit rot far from the bytes about to be read.
    path = entry_path(tmp_path, key)
    with open(path, "r+b") as f:
        f.seek(HEADER_SIZE + FRAME - 1)
        f.write(bytes([data[-1] ^ 0xFF]))
    with ChunkCache(tmp_path, memory_bytes=0, verify_at_rest=verify) as c:
        got = c.read(key, FRAME, 0, 4096)
    if verify:
        assert got is None and not path.exists()  # caught, removed, refetched by the caller
    else:
        assert got == data[:4096]  # verified when written; the range is all that is read


def test_read_nowait_never_opens_or_blocks_and_serves_open_entries_from_the_page_cache(tmp_path: Path) -> None:
    data = os.urandom(256 << 10)
    key = key_of(data)
    with ChunkCache(tmp_path, memory_bytes=0) as c:
        c.put(key, data)
    with ChunkCache(tmp_path, memory_bytes=0) as c:
        # On disk but not open yet: the caller must take the blocking path.
        assert c.read_nowait(key, len(data), 0, 4096) is None
        assert c.statistics().open_entries == 0
        assert c.read(key, len(data), 0, 4096) == data[:4096]  # opens it
        # Now open and in the page cache (just written and read): no blocking needed.
        assert c.read_nowait(key, len(data), 8192, 4096) == data[8192:12_288]


def test_advise_opens_cached_entries_and_reports_missing_ones(tmp_path: Path) -> None:
    data = os.urandom(128 << 10)
    key = key_of(data)
    with ChunkCache(tmp_path, memory_bytes=0) as c:
        c.put(key, data)
        assert c.advise(key, len(data)) is True
        assert c.advise(key_of(b"absent"), 10) is False
        assert c.statistics().open_entries == 1


def test_evicted_entries_are_not_held_open(tmp_path: Path) -> None:
    size = 100_000
    with ChunkCache(tmp_path, max_bytes=int((HEADER_SIZE + size) * 3.5), memory_bytes=0) as c:
        chunks = [os.urandom(size) for _ in range(3)]
        for d in chunks:
            c.put(key_of(d), d)
            assert c.read(key_of(d), size, 0, 10) == d[:10]
        assert c.statistics().open_entries == 3
        extra = os.urandom(size)
        c.put(key_of(extra), extra)  # over budget: one entry evicted
        assert c.statistics().evictions == 1
        assert c.statistics().open_entries == 0


def test_open_entries_stay_within_their_limit(tmp_path: Path) -> None:
    with ChunkCache(tmp_path, memory_bytes=0, open_entries=2) as c:
        chunks = [os.urandom(1000) for _ in range(5)]
        for d in chunks:
            c.put(key_of(d), d)
            assert c.read(key_of(d), 1000, 10, 20) == d[10:30]
        assert c.statistics().open_entries == 2


async def test_small_read_of_a_cached_frame_never_loads_the_whole_frame(tmp_path: Path, preads: list[int]) -> None:
    raw = os.urandom(4 * FRAME)
    blob = make_blob(raw, FRAME)
    desc = seekable.parse_descriptor(blob.descriptor)
    table = seekable.read_chunk_table(blob.data[blob.table_offset :], desc)

    def layer(cache: ChunkCache) -> SeekableFile:
        context = FetchContext()
        return SeekableFile("t", desc, table, context.counted(MemorySource(blob.data)), cache, ReadSettings(), context)

    with ChunkCache(tmp_path / "cache", memory_bytes=0) as cache:
        await layer(cache).read(0, len(raw))  # fill the cache
    with ChunkCache(tmp_path / "cache", memory_bytes=0) as cache:
        warm = layer(cache)
        preads.clear()
        for off in (5, FRAME + 4096, 3 * FRAME + 77_777):
            assert await warm.read(off, 4096) == raw[off : off + 4096]
        assert warm.stats.frames_fetched == 0
        assert max(preads) <= 4096, f"a 4 KiB read loaded {max(preads)} bytes from the cache"
