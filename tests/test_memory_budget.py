"""One memory budget per mount (issue 13, item 2): the memory LRU, chunk
tables and bytes in flight share it, reads wait for room rather than grow
memory, and the user sets it (``--memory-budget``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio
from support.blobtools import make_blob
from test_layer import MemorySource

from cache import ChunkCache
from lazyfs.cli import build_parser
from lazyfs.errors import FormatError
from lazyfs.fetch import FetchContext, ReadSettings, SeekableFile, open_layer
from lazyfs.fetch.context import (
    DEFAULT_DECODE_BUDGET,
    DEFAULT_MEMORY_BUDGET,
    MIN_IN_FLIGHT,
    MemoryBudget,
    memory_cache_share,
)
from lazyfs.format import seekable

MIB = 1 << 20


class CountingSource(MemorySource):
    """Counts how many requests are in flight at once."""

    def __init__(self, data: bytes, *, delay: float) -> None:
        super().__init__(data, delay=delay)
        self.now = self.peak = 0

    async def read(self, offset: int, length: int) -> bytes:
        self.now += 1
        self.peak = max(self.peak, self.now)
        try:
            return await super().read(offset, length)
        finally:
            self.now -= 1


def test_default_budget_is_well_under_200_mb_and_split_three_ways() -> None:
    assert DEFAULT_MEMORY_BUDGET <= 128 * MIB
    assert ReadSettings().memory_budget == DEFAULT_MEMORY_BUDGET
    lru = memory_cache_share(DEFAULT_MEMORY_BUDGET)
    budget = MemoryBudget(DEFAULT_MEMORY_BUDGET, cache_bytes=lru)
    # LRU + the most tables + the most in flight never exceed the budget.
    assert lru + budget.tables.limit + MIN_IN_FLIGHT <= DEFAULT_MEMORY_BUDGET
    assert lru + budget.in_flight.limit <= DEFAULT_MEMORY_BUDGET
    assert budget.in_flight.limit <= DEFAULT_DECODE_BUDGET


def test_chunk_tables_take_their_share_from_bytes_in_flight_and_are_refused_past_the_budget() -> None:
    frame, desc = _table(100_000)  # 7.2 MB parsed
    table = seekable.read_chunk_table(frame, desc)
    budget = MemoryBudget(32 * MIB, cache_bytes=8 * MIB)
    before = budget.in_flight.limit
    budget.tables.charge("layer 0", table)
    assert budget.in_flight.limit == before - table.nbytes
    budget.tables.charge("layer 1", table)
    with pytest.raises(FormatError, match=r"layer 2: .*--memory-budget"):
        budget.tables.charge("layer 2", table)
    assert budget.in_flight.limit >= MIN_IN_FLIGHT


def test_memory_cache_that_leaves_no_room_in_flight_is_refused() -> None:
    assert memory_cache_share(64 * MIB, 16 * MIB) == 16 * MIB
    with pytest.raises(ValueError, match="does not fit a memory budget"):
        memory_cache_share(32 * MIB, 30 * MIB)


def test_mount_cli_sets_the_memory_budget() -> None:
    args = build_parser().parse_args(["mount", "--memory-budget", "48MiB", "ref", "/mnt"])
    assert args.memory_budget == 48 * MIB
    assert build_parser().parse_args(["mount", "ref", "/mnt"]).memory_budget == DEFAULT_MEMORY_BUDGET
    with pytest.raises(ValueError, match="memory budget"):
        ReadSettings(memory_budget=MIB)


async def test_readers_wait_for_room_in_flight_rather_than_exceed_the_budget(tmp_path: Path) -> None:
    chunk = 2 * MIB
    raw = os.urandom(12 * chunk)  # incompressible: each run holds ~2 x chunk in flight
    blob = make_blob(raw, chunk)
    desc = seekable.parse_descriptor(blob.descriptor)
    table = seekable.read_chunk_table(blob.data[blob.table_offset :], desc)
    source = CountingSource(blob.data, delay=0.05)
    context = FetchContext()
    with ChunkCache(tmp_path / "cache", memory_bytes=4 * MIB) as cache:
        # 16 MiB budget, 4 MiB of it the LRU: 12 MiB in flight = 3 runs at once.
        settings = ReadSettings(memory_budget=16 * MIB, stream_ahead=0)
        layer = SeekableFile("t", desc, table, context.counted(source), cache, settings, context)
        budget = context.decode_budget
        assert budget.limit == 12 * MIB
        results: dict[int, bytes] = {}

        async def read(i: int) -> None:
            results[i] = await layer.read(i * chunk + 100, 1000)

        async with trio.open_nursery() as nursery:
            layer.start(nursery)
            for i in range(12):
                nursery.start_soon(read, i)
    assert all(results[i] == raw[i * chunk + 100 : i * chunk + 1100] for i in range(12))
    assert budget.peak <= budget.limit
    assert source.peak <= 3, f"{source.peak} runs were in flight at once"
    assert budget.waits > 0 and budget.used == 0


async def test_sequential_window_only_takes_free_room_and_never_exceeds_the_budget(tmp_path: Path) -> None:
    chunk = MIB
    raw = os.urandom(40 * chunk)
    blob = make_blob(raw, chunk)
    desc = seekable.parse_descriptor(blob.descriptor)
    table = seekable.read_chunk_table(blob.data[blob.table_offset :], desc)
    source = CountingSource(blob.data, delay=0.01)
    context = FetchContext()
    with ChunkCache(tmp_path / "cache", memory_bytes=4 * MIB) as cache:
        settings = ReadSettings(memory_budget=16 * MIB)  # 12 MiB in flight, 32 MiB window asked
        layer = SeekableFile("t", desc, table, context.counted(source), cache, settings, context)
        out = bytearray()
        async with trio.open_nursery() as nursery:
            layer.start(nursery)
            for off in range(0, len(raw), 256 << 10):
                out += await layer.read(off, 256 << 10)
    assert out == raw
    budget = context.decode_budget
    assert budget.peak <= budget.limit == 12 * MIB
    assert layer.stats.frames_fetched == 40  # each frame once


async def test_open_layer_charges_tables_against_the_configured_budget(tmp_path: Path) -> None:
    blob = make_blob(os.urandom(300_000), 10_000)
    context = FetchContext()
    with ChunkCache(tmp_path / "cache", memory_bytes=8 * MIB) as cache:
        opened = await open_layer(0, blob.descriptor, MemorySource(blob.data), cache, ReadSettings(memory_budget=32 * MIB), context)
    assert opened is not None
    stats = context.memory.statistics()
    assert stats["limit"] == 32 * MIB and stats["cache"] == 8 * MIB and stats["tables"] > 0
    assert context.decode_budget.limit == 32 * MIB - 8 * MIB - stats["tables"]


def _table(count: int) -> tuple[bytes, seekable.LayerDescriptor]:
    from test_security_verify import synthetic_table

    return synthetic_table(count)
