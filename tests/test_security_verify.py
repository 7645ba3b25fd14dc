"""Verification policy and memory a hostile blob controls (issue 10), unit level.

* plain EROFS layers: nothing is served before the whole blob matched its digest;
* ``--insecure-skip-verify`` never turns off the checks of a layer whose chain holds;
* a frame header declaring a huge content size is refused before allocation;
* chunk sizes, decoded bytes in flight and chunk-table memory are bounded.

The end-to-end counterparts (real registry, FUSE) are in test_security_verify_e2e.py.
"""

from __future__ import annotations

import hashlib
import json
import random
import struct
import tracemalloc
from pathlib import Path

import pytest
import trio
import zstandard
from support.blobtools import make_blob
from support.mount import lazyerofs

from cache import ChunkCache
from lazyfs import fetch
from lazyfs.errors import FetchError, FormatError, IntegrityError
from lazyfs.fetch import FetchContext, PlainFile, ReadSettings, SeekableFile, open_layer
from lazyfs.format import seekable

PLAIN = "application/vnd.erofs.layer.v1"


class MemorySource:
    """A blob in memory; can alter its bytes, stall reads, and counts requests."""

    def __init__(self, data: bytes, *, stall_at: int | None = None) -> None:
        self.data = data
        self.size = len(data)
        self.requests: list[tuple[int, int]] = []
        self.stall_at = stall_at  # a read starting here hangs (once)

    async def read(self, offset: int, length: int) -> bytes:
        self.requests.append((offset, length))
        if self.stall_at is not None and offset == self.stall_at:
            self.stall_at = None
            await trio.sleep_forever()
        await trio.sleep(0)
        return self.data[offset : offset + length]


def plain_file(source: MemorySource, *, read_timeout: float = fetch.DEFAULT_READ_TIMEOUT, **kw) -> PlainFile:
    counted = FetchContext().counted(source)
    return PlainFile("p", plain_desc(RAW), counted, ReadSettings(read_timeout=read_timeout), **kw)


def plain_desc(data: bytes) -> seekable.LayerDescriptor:
    return seekable.parse_descriptor(
        {"mediaType": PLAIN, "digest": "sha256:" + hashlib.sha256(data).hexdigest(), "size": len(data)}
    )


RAW = random.Random(3).randbytes(300_000)


# --- plain layers ------------------------------------------------------------------------


async def test_plain_layer_serves_exact_bytes_only_after_fetching_the_whole_blob(tmp_path: Path):
    source = MemorySource(RAW)
    plain = plain_file(source)
    assert await plain.read(1000, 50) == RAW[1000:1050]
    # The first read waited for every byte of the blob, not just its range.
    assert sum(length for _, length in source.requests) == len(RAW)
    assert await plain.read(250_000, 100_000) == RAW[250_000:]
    assert sum(length for _, length in source.requests) == len(RAW)  # fetched once
    assert plain.verified is True


async def test_altered_plain_blob_is_never_served(tmp_path: Path):
    altered = bytearray(RAW)
    altered[123_456] ^= 0xFF
    source = MemorySource(bytes(altered))
    plain = plain_file(source)
    for offset in (0, 1000, 123_456):  # before, and at, the altered byte
        with pytest.raises(IntegrityError, match="does not match"):
            await plain.read(offset, 10)
    # The mismatch sticks: no refetch of the whole blob per read.
    assert sum(length for _, length in source.requests) == len(RAW)
    assert plain.stats.verify_failures == 1


async def test_plain_fetch_resumes_after_a_stall_instead_of_restarting(tmp_path: Path):
    piece = 64 << 10
    source = MemorySource(RAW, stall_at=2 * piece)
    plain = plain_file(source, spool_dir=tmp_path, piece_bytes=piece, read_timeout=0.5)
    with pytest.raises(FetchError, match="not"):
        await plain.read(0, 10)
    assert await plain.read(0, 10) == RAW[:10]
    starts = [offset for offset, _ in source.requests]
    assert starts.count(0) == 1 and starts.count(piece) == 1  # kept pieces are not refetched


async def test_plain_fetch_in_a_background_nursery_outlives_a_timed_out_reader(tmp_path: Path):
    class Slow(MemorySource):
        async def read(self, offset: int, length: int) -> bytes:
            await trio.sleep(0.1)
            return await super().read(offset, length)

    source = Slow(RAW)
    plain = plain_file(source, spool_dir=tmp_path, piece_bytes=64 << 10, read_timeout=0.15)
    async with trio.open_nursery() as nursery:
        plain.start(nursery)
        with pytest.raises(FetchError, match="not verified within"):
            await plain.read(0, 10)
        await trio.sleep(0.6)  # the fetch went on without a reader
        assert await plain.read(5, 10) == RAW[5:15]
    assert len(source.requests) == 5


async def test_open_layer_serves_plain_layers_verified_even_with_insecure_skip_verify(tmp_path: Path):
    altered = bytearray(RAW)
    altered[0] ^= 1
    desc = {"mediaType": PLAIN, "digest": "sha256:" + hashlib.sha256(RAW).hexdigest(), "size": len(RAW)}
    with ChunkCache(tmp_path / "cache") as cache:
        for insecure in (False, True):
            settings = ReadSettings(insecure_skip_verify=insecure)
            opened = await open_layer(0, desc, MemorySource(bytes(altered)), cache, settings, FetchContext())
            assert opened is not None
            plain, _ = opened
            with pytest.raises(IntegrityError):
                await plain.read(0, 4096)


def test_verify_checks_a_plain_blobs_digest(tmp_path: Path):
    blob = tmp_path / "plain.blob"
    blob.write_bytes(RAW)
    Path(str(blob) + ".json").write_text(
        json.dumps({"mediaType": PLAIN, "digest": "sha256:" + hashlib.sha256(RAW).hexdigest(), "size": len(RAW)})
    )
    good = lazyerofs("verify", str(blob))
    assert "OK" in good.stdout and "blob digest checked" in good.stdout
    altered = bytearray(RAW)
    altered[-1] ^= 0xFF
    blob.write_bytes(bytes(altered))
    bad = lazyerofs("verify", str(blob), check=False)
    assert bad.returncode == 1
    assert "digest" in bad.stderr and "does not match" in bad.stderr


# --- --insecure-skip-verify is decided per layer --------------------------------------------


def swapped_frames_blob() -> tuple[seekable.LayerDescriptor, seekable.ChunkTable, bytes, bytes]:
    """A fully checksummed blob of incompressible frames (all the same
    length), and the same blob with frames 1 and 2 swapped: each still
    decompresses to a right-sized frame, only the SHA-512 tells them apart."""
    chunk = 4096
    raw = random.Random(5).randbytes(8 * chunk)
    blob = make_blob(raw, chunk)
    desc = seekable.parse_descriptor(blob.descriptor)
    assert desc.table_offset is not None
    table = seekable.read_chunk_table(blob.data[desc.table_offset :], desc)
    (s1, e1), (s2, e2) = table.span(1), table.span(2)
    assert e1 - s1 == e2 - s2
    data = bytearray(blob.data)
    data[s1:e1], data[s2:e2] = blob.data[s2:e2], blob.data[s1:e1]
    return desc, table, raw, bytes(data)


async def test_unverified_flag_does_not_turn_off_frame_checks_of_a_checksummed_layer(tmp_path: Path):
    desc, table, raw, swapped = swapped_frames_blob()
    with ChunkCache(tmp_path / "cache") as cache:
        context = FetchContext()
        settings = ReadSettings(insecure_skip_verify=True)
        lay = SeekableFile("t", desc, table, context.counted(MemorySource(swapped)), cache, settings, context)
        assert lay.verified is True  # the chain holds, whatever the caller asked for
        with pytest.raises(IntegrityError, match="SHA-512"):
            await lay.read(4096 + 10, 10)
        assert await lay.read(0, 4096) == raw[:4096]


async def test_insecure_skip_verify_checks_a_full_chain_layer_and_passes_only_chainless_ones(tmp_path: Path):
    desc, _table, _raw, swapped = swapped_frames_blob()
    settings = ReadSettings(insecure_skip_verify=True)
    with ChunkCache(tmp_path / "cache") as cache:
        opened = await open_layer(0, desc.to_dict(), MemorySource(swapped), cache, settings, FetchContext())
        assert opened is not None
        lay, _ = opened
        assert lay.verified is True
        with pytest.raises(IntegrityError):
            await lay.read(2 * 4096, 10)
    # The flag still lets through a layer whose chain cannot be established.
    raw = RAW[:50_000]
    blob = make_blob(raw, 4096)
    del blob.descriptor["annotations"][seekable.ANNOTATION_CHUNK_DIGEST]
    with ChunkCache(tmp_path / "cache") as cache:
        opened = await open_layer(0, blob.descriptor, MemorySource(blob.data), cache, settings, FetchContext())
        assert opened is not None
        lay, _ = opened
        assert lay.verified is False
        assert await lay.read(0, len(raw)) == raw


# --- memory: frame headers, chunk size, decoded bytes in flight --------------------------


def frame_declaring(size: int) -> bytes:
    """A frame of ``size`` zeros whose header declares that size, made without
    holding ``size`` bytes."""
    obj = zstandard.ZstdCompressor(level=1, write_content_size=True).compressobj(size=size)
    zeros = bytes(1 << 20)
    parts = [obj.compress(zeros) for _ in range(size >> 20)]
    parts.append(obj.flush())
    return b"".join(parts)


def test_frame_declaring_a_huge_content_size_is_refused_before_allocating():
    chunk = 1 << 20
    bomb = frame_declaring(256 << 20)
    assert zstandard.frame_content_size(bomb) == 256 << 20
    blob = make_blob(bytes(chunk), chunk, frames=[bomb])
    desc = seekable.parse_descriptor(blob.descriptor)
    assert desc.table_offset is not None
    table = seekable.read_chunk_table(blob.data[desc.table_offset :], desc)
    span = blob.data[slice(*table.span(0))]
    tracemalloc.start()
    try:
        with pytest.raises(IntegrityError, match="declares 268435456"):
            seekable.decode_frame(table, 0, span)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"decode_frame allocated {peak} bytes for a refused frame"
    # A frame declaring exactly the expected size still decodes.
    raw = RAW[:10_000]
    frame = zstandard.ZstdCompressor(write_content_size=True).compress(raw)
    blob = make_blob(raw, len(raw), frames=[frame])
    desc = seekable.parse_descriptor(blob.descriptor)
    assert desc.table_offset is not None
    table = seekable.read_chunk_table(blob.data[desc.table_offset :], desc)
    assert seekable.decode_frame(table, 0, frame) == raw


def test_chunk_size_over_32_mib_is_refused():
    assert seekable.MAX_CHUNK_SIZE == 32 << 20
    ok = make_blob(b"x" * 100, 32 << 20)
    desc = seekable.parse_descriptor(ok.descriptor)
    assert seekable.read_chunk_table(ok.data[ok.table_offset :], desc).chunk_size == 32 << 20
    big = make_blob(b"x" * 100, 64 << 20)
    desc = seekable.parse_descriptor(big.descriptor)
    with pytest.raises(FormatError, match="chunk_size 67108864 exceeds the limit"):
        seekable.read_chunk_table(big.data[big.table_offset :], desc)


async def test_decoded_frames_in_flight_stay_within_the_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    chunk = 16 << 10
    raw = RAW[: 16 * chunk]
    blob = make_blob(raw, chunk)
    desc = seekable.parse_descriptor(blob.descriptor)
    table = seekable.read_chunk_table(blob.data[blob.table_offset :], desc)
    now = peak = 0
    real = seekable.decode_frame

    def slow_decode(*args, **kw):  # runs in worker threads
        nonlocal now, peak
        now += 1
        peak = max(peak, now)
        try:
            import time

            time.sleep(0.05)
            return real(*args, **kw)
        finally:
            now -= 1

    monkeypatch.setattr(seekable, "decode_frame", slow_decode)
    budget = fetch.DecodeBudget(2 * chunk)
    context = FetchContext(limiter=trio.CapacityLimiter(8), decode_budget=budget)
    with ChunkCache(tmp_path / "cache", memory_bytes=0) as cache:
        source = context.counted(MemorySource(blob.data))
        lay = SeekableFile("t", desc, table, source, cache, ReadSettings(), context)
        results: dict[int, bytes] = {}

        async def read(i: int) -> None:
            results[i] = await lay.read(i * chunk, chunk)

        async with trio.open_nursery() as nursery:
            for i in range(8):
                nursery.start_soon(read, i)
    assert b"".join(results[i] for i in range(8)) == raw[: 8 * chunk]
    assert peak <= 2, f"{peak} frames were decoded at once"
    assert budget.peak <= 2 * chunk and budget.used == 0


async def test_four_reads_of_max_size_frames_hold_at_most_the_default_budget(tmp_path: Path):
    # The case, at the new chunk cap: four readers of four 32 MiB
    # frames of zeros. Without a budget all four decode at once (128 MiB).
    chunk = seekable.MAX_CHUNK_SIZE
    frame = frame_declaring(chunk)
    blob = make_blob(b"", chunk, frames=[frame] * 4, declared_size=4 * chunk)
    desc = seekable.parse_descriptor(blob.descriptor)
    table = seekable.read_chunk_table(blob.data[blob.table_offset :], desc)
    context = FetchContext()  # the daemon's defaults
    budget = context.decode_budget
    assert budget.limit == fetch.DEFAULT_DECODE_BUDGET <= 128 << 20
    with ChunkCache(tmp_path / "cache", memory_bytes=0) as cache:
        source = context.counted(MemorySource(blob.data))
        lay = SeekableFile("t", desc, table, source, cache, ReadSettings(), context)

        async def read(i: int) -> None:
            assert await lay.read(i * chunk + 7, 3) == bytes(3)

        async with trio.open_nursery() as nursery:
            for i in range(4):
                nursery.start_soon(read, i)
    assert budget.peak <= fetch.DEFAULT_DECODE_BUDGET
    assert budget.peak // chunk <= 2


# --- memory: chunk tables ---------------------------------------------------------------------


def synthetic_table(count: int, *, hash_algo: int = 1) -> tuple[bytes, seekable.LayerDescriptor]:
    """A valid table frame of ``count`` entries (checksums are random: only parsed)."""
    hash_size = 64 if hash_algo else 0
    entry = struct.Struct("<Q")
    rnd = random.Random(count)
    table_offset = count * 16
    parts = [struct.pack("<IIQIBH", seekable.TABLE_MAGIC, 1, count * 4096, 4096, hash_algo, 0)]
    sums = rnd.randbytes(count * hash_size)
    for i in range(count):
        parts.append(entry.pack(i * 16))
        parts.append(sums[i * hash_size : (i + 1) * hash_size])
    payload = b"".join(parts)
    frame = struct.pack("<II", 0x184D2A50, len(payload)) + payload
    desc = seekable.parse_descriptor(
        {
            "mediaType": seekable.MEDIA_TYPE_SEEKABLE,
            "digest": "sha256:" + "0" * 64,
            "size": table_offset + len(frame),
            "annotations": {
                seekable.ANNOTATION_TABLE_OFFSET: str(table_offset),
                seekable.ANNOTATION_CHUNK_DIGEST: "sha512:" + hashlib.sha512(payload).hexdigest(),
            },
        }
    )
    return frame, desc


def test_parsed_chunk_table_costs_about_its_payload_size():
    count = 200_000
    frame, desc = synthetic_table(count)
    payload = len(frame) - 8
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        table = seekable.read_chunk_table(frame, desc)
        after, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    kept = after - before
    # The old tuples of ints and bytes cost ~2x the payload (141 B per entry).
    assert kept < 1.1 * payload, f"a {payload}-byte table keeps {kept} bytes"
    assert peak - before < 2.2 * payload, f"parsing a {payload}-byte table peaked at {peak - before} bytes"
    # and it still reads like the tuples it replaced
    assert table.frame_count == count
    assert table.offsets[5] == 80 and table.span(count - 1) == ((count - 1) * 16, desc.table_offset)
    pos = 8 + 23 + 7 * 72 + 8
    assert table.checksums[7] == frame[pos : pos + 64] and len(table.checksums[7]) == 64
    assert table.checksums[-1] == frame[-64:]


def test_table_without_checksums_parses_compactly_too():
    frame, desc = synthetic_table(1000, hash_algo=0)
    table = seekable.read_chunk_table(frame, desc, verify=False)
    assert list(table.offsets) == [i * 16 for i in range(1000)]
    assert len(table.checksums) == 0 and table.nbytes == 8000


def test_chunk_table_over_64_mib_is_refused_naming_the_layer():
    assert seekable.MAX_TABLE_SIZE == 64 << 20
    payload_size = (64 << 20) + 72
    head = struct.pack("<II", 0x184D2A50, payload_size) + struct.pack(
        "<IIQIBH", seekable.TABLE_MAGIC, 1, 1, 1, 1, 0
    )
    with pytest.raises(FormatError, match=r"layer 3: chunk table .* exceeds the chunk-table limit"):
        seekable.parse_chunk_table(
            head, table_offset=1 << 30, blob_size=(1 << 30) + 8 + payload_size, expected_digest=None, name="layer 3"
        )


async def test_chunk_tables_of_one_mount_are_capped_together(tmp_path: Path):
    frame, desc = synthetic_table(50_000)
    table = seekable.read_chunk_table(frame, desc)
    tables = fetch.TableBudget(3 * table.nbytes)
    for i in range(3):
        tables.charge(f"layer {i}", table)
    with pytest.raises(FormatError, match=r"layer 3: chunk table .* over the limit"):
        tables.charge("layer 3", table)
    assert fetch.MAX_MOUNT_TABLE_BYTES <= 256 << 20
    assert FetchContext().tables.limit == fetch.MAX_MOUNT_TABLE_BYTES

