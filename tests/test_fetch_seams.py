"""The seams of lazyfs.fetch (issue 11): the daemon's background-nursery mode,
one counting point for every fetched byte (chunk table, frames, dm-verity
tail), a refetch for a bad verity block, the Layer protocol both layer kinds
satisfy, and fetch-ahead "auto" as a real value.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import trio
from support.blobtools import make_blob
from test_layer import RAW, MemorySource, make_layer

from cache import ChunkCache
from lazyfs.errors import FetchError
from lazyfs.fetch import FetchContext, Layer, ReadSettings, SeekableFile, open_layer, prefetch_all
from lazyfs.format import seekable
from lazyfs.format.encode import encode_image
from lazyfs.produce.mkfs import make_erofs

PLAIN = "application/vnd.erofs.layer.v1"


async def test_started_layer_fetch_outlives_a_reader_that_timed_out(tmp_path: Path):
    # The daemon's mode: fetches run in its nursery, not in the reader's task.
    layer, source = make_layer(tmp_path, RAW, 10_000, delay=0.3, read_timeout=0.1)
    async with trio.open_nursery() as nursery:
        layer.start(nursery)
        with pytest.raises(FetchError, match="timed out"):
            await layer.read(25_000, 10)
        await trio.sleep(0.5)  # the fetch went on without its reader
        assert layer.frames_present == 1
        assert await layer.read(25_000, 10) == RAW[25_000:25_010]
    assert len(source.requests) == 1  # served from what the abandoned fetch brought
    assert layer.stats.frames_fetched == 1


async def test_unstarted_layer_fetch_ends_with_its_reader(tmp_path: Path):
    # Without a nursery the fetch is the reader's: abandoned with it, then redone.
    layer, source = make_layer(tmp_path, RAW, 10_000, delay=0.3, read_timeout=0.1)
    with pytest.raises(FetchError, match="timed out"):
        await layer.read(25_000, 10)
    assert layer.frames_present == 0
    source.delay = 0
    assert await layer.read(25_000, 10) == RAW[25_000:25_010]
    assert len(source.requests) == 2


async def test_touched_lists_fetched_frames_in_first_fetch_order_with_their_spans(tmp_path: Path):
    layer, _ = make_layer(tmp_path, RAW, 10_000)
    await layer.read(55_000, 10)
    await layer.read(25_000, 10)
    await layer.read(55_000, 10)  # cached: not fetched again
    assert layer.touched() == [(5, *layer.table.span(5)), (2, *layer.table.span(2))]


def test_fetch_ahead_is_a_byte_count_or_auto_never_minus_one():
    assert ReadSettings(fetch_ahead="auto").policy().fetch_ahead == "auto"
    assert ReadSettings(fetch_ahead=1 << 20).policy().ahead_bytes(FetchContext().link) == 1 << 20
    for bad in (-1, "fast", True):
        with pytest.raises(ValueError, match="fetch-ahead"):
            ReadSettings(fetch_ahead=bad)  # type: ignore[arg-type]


async def test_chunk_table_fetch_is_counted_and_teaches_the_link_its_round_trip(tmp_path: Path):
    blob = make_blob(RAW, 10_000)
    context = FetchContext()
    with ChunkCache(tmp_path / "cache") as cache:
        opened = await open_layer(0, blob.descriptor, MemorySource(blob.data), cache, ReadSettings(), context)
    assert opened is not None
    desc = seekable.parse_descriptor(blob.descriptor)
    assert opened.layer.stats.requests == 1
    assert opened.layer.stats.bytes_fetched == seekable.table_read_size(desc)
    assert context.link.rtt is not None


@pytest.fixture
def verity_blob(tmp_path: Path) -> tuple[bytes, dict]:
    src = tmp_path / "src"
    src.mkdir()
    (src / "data").write_bytes(os.urandom(600_000))
    make_erofs(src, tmp_path / "img")
    result = encode_image(tmp_path / "img", tmp_path / "blob", chunk_size=128 << 10, dm_verity=True)
    return (tmp_path / "blob").read_bytes(), result.descriptor


async def open_verity_layer(tmp_path: Path, blob: bytes, descriptor: dict) -> tuple[Layer, MemorySource, FetchContext]:
    source = MemorySource(blob)
    context = FetchContext()
    cache = ChunkCache(tmp_path / "cache")
    opened = await open_layer(0, descriptor, source, cache, ReadSettings(), context)
    assert opened is not None and opened.sidecar is not None
    return opened.layer, source, context


async def test_verity_tail_bytes_are_counted_in_the_layer_stats(tmp_path: Path, verity_blob):
    blob, descriptor = verity_blob
    layer, source, _ = await open_verity_layer(tmp_path, blob, descriptor)
    opened_with = len(source.requests)  # chunk table + verity superblock
    await layer.read(layer.size - 4096, 4096)  # the last tree block and its path to the root
    assert len(source.requests) > opened_with
    assert layer.stats.requests == len(source.requests)
    assert layer.stats.bytes_fetched == sum(n for _, n in source.requests)
    assert layer.stats.frames_fetched == 0  # none of it was image frames


async def test_verity_block_corrupted_in_transit_is_refetched_once_and_served(tmp_path: Path, verity_blob):
    blob, descriptor = verity_blob
    layer, source, _ = await open_verity_layer(tmp_path, blob, descriptor)
    assert isinstance(layer, SeekableFile) and layer.verity is not None
    desc = seekable.parse_descriptor(descriptor)
    assert desc.verity_offset is not None
    payload_end = desc.verity_offset + 8 + layer.verity.tree.payload_size
    source.corrupt_next = 1
    first = len(source.requests)
    assert await layer.read(layer.size - 4096, 4096) == blob[payload_end - 4096 : payload_end]
    fetched = source.requests[first:]
    assert len(fetched) == 2 * len(set(fetched))  # each run twice: once bad, once good
    assert layer.stats.verify_failures == 1
    assert layer.stats.read_errors == 0


async def test_layers_of_both_kinds_are_driven_through_the_protocol_alone(tmp_path: Path):
    plain_raw = RAW[:50_000]
    plain_desc = {"mediaType": PLAIN, "digest": "sha256:" + hashlib.sha256(plain_raw).hexdigest(), "size": len(plain_raw)}
    blob = make_blob(RAW, 10_000)
    context = FetchContext()
    settings = ReadSettings()
    with ChunkCache(tmp_path / "cache") as cache:
        plain = await open_layer(0, plain_desc, MemorySource(plain_raw), cache, settings, context)
        framed = await open_layer(1, blob.descriptor, MemorySource(blob.data), cache, settings, context)
        assert plain is not None and framed is not None
        layers: list[Layer] = [plain.layer, framed.layer]
        async with trio.open_nursery() as nursery:
            for layer in layers:
                layer.start(nursery)
            await prefetch_all(layers)
            assert await layers[0].read(0, len(plain_raw)) == plain_raw
            assert await layers[1].read(0, len(RAW)) == RAW
    assert [(lay.frames_total, lay.frames_present) for lay in layers] == [(0, 0), (20, 20)]
    assert layers[0].touched() == [] and len(layers[1].touched()) == 20
    assert [lay.size for lay in layers] == [len(plain_raw), len(RAW)]
    assert all(lay.verified for lay in layers)
