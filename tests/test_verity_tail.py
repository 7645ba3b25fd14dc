"""A dm-verity layer served lazily: containerd's materialized single-file layout.

Served from memory through the real SeekableFile + VerityTail, checked with
the userspace ``veritysetup verify``. The FUSE path is in test_verity_e2e.py.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
import trio
from test_layer import MemorySource

from cache import ChunkCache
from lazyfs.errors import FormatError, IntegrityError
from lazyfs.fetch import FetchContext, ReadSettings, SeekableFile, open_verity_tail
from lazyfs.format import seekable
from lazyfs.format.encode import EncodeResult, encode_image
from lazyfs.produce.mkfs import make_erofs


@pytest.fixture
def verity_blob(tmp_path: Path) -> tuple[bytes, bytes, EncodeResult]:
    src = tmp_path / "src"
    src.mkdir()
    (src / "data").write_bytes(os.urandom(1_500_000))
    (src / "text").write_text("verity\n" * 50_000)
    make_erofs(src, tmp_path / "img")
    result = encode_image(tmp_path / "img", tmp_path / "blob", chunk_size=256 << 10, dm_verity=True)
    return (tmp_path / "img").read_bytes(), (tmp_path / "blob").read_bytes(), result


async def open_layer(tmp_path: Path, blob: bytes, descriptor: dict) -> tuple[SeekableFile, bytes, MemorySource]:
    desc = seekable.parse_descriptor(descriptor)
    assert desc.table_offset is not None
    table = seekable.read_chunk_table(blob[desc.table_offset : desc.table_end], desc)
    source = MemorySource(blob)
    context = FetchContext(limiter=trio.CapacityLimiter(2))
    counted = context.counted(source)
    cache = ChunkCache(tmp_path / "cache")
    tail, sidecar = await open_verity_tail("v", desc, table.uncompressed_size, counted)
    layer = SeekableFile("v", desc, table, counted, cache, ReadSettings(), context, verity=tail)
    return layer, sidecar, source


def materialized(raw: bytes, blob: bytes, result: EncodeResult) -> bytes:
    desc = seekable.parse_descriptor(result.descriptor)
    assert desc.verity_offset is not None and result.verity_hash_offset is not None
    _, size = struct.unpack_from("<II", blob, desc.verity_offset)
    payload = blob[desc.verity_offset + 8 : desc.verity_offset + 8 + size]
    return raw + bytes(result.verity_hash_offset - len(raw)) + payload


async def test_layer_file_is_containerds_materialized_layout(tmp_path, verity_blob):
    raw, blob, result = verity_blob
    layer, sidecar, _ = await open_layer(tmp_path, blob, result.descriptor)
    expected = materialized(raw, blob, result)
    assert layer.size == len(expected)
    served = await layer.read(0, layer.size)
    assert served == expected
    meta = json.loads(sidecar)
    assert meta == {"roothash": result.verity_root, "hashoffset": result.verity_hash_offset}


@pytest.mark.skipif(shutil.which("veritysetup") is None, reason="needs veritysetup")
async def test_served_layer_passes_veritysetup_verify(tmp_path, verity_blob):
    _raw, blob, result = verity_blob
    layer, sidecar, _ = await open_layer(tmp_path, blob, result.descriptor)
    out = tmp_path / "layer.erofs"
    out.write_bytes(await layer.read(0, layer.size))
    meta = json.loads(sidecar)
    proc = subprocess.run(
        ["veritysetup", "verify", f"--hash-offset={meta['hashoffset']}", str(out), str(out), meta["roothash"]],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr


async def test_reading_one_tree_block_fetches_its_path_not_the_whole_tree(tmp_path, verity_blob):
    _raw, blob, result = verity_blob
    layer, _, source = await open_layer(tmp_path, blob, result.descriptor)
    assert layer.verity is not None
    tree_bytes = layer.verity.tree.payload_size
    before = sum(n for _, n in source.requests)
    last_block = layer.size - 4096
    await layer.read(last_block, 4096)
    fetched = sum(n for _, n in source.requests) - before
    assert fetched <= 4096 * (layer.verity.tree.levels + 1)
    assert fetched < tree_bytes


async def test_tampered_hash_block_is_refused(tmp_path, verity_blob):
    raw, blob, result = verity_blob
    desc = seekable.parse_descriptor(result.descriptor)
    assert desc.verity_offset is not None
    bad = bytearray(blob)
    # Second hash block of the payload: the first tree block after the superblock.
    bad[desc.verity_offset + 8 + 4096 + 10] ^= 0xFF
    layer, _, _ = await open_layer(tmp_path, bytes(bad), result.descriptor)
    assert result.verity_hash_offset is not None
    with pytest.raises(IntegrityError):
        await layer.read(result.verity_hash_offset + 4096, 100)
    # image bytes are unaffected
    assert await layer.read(0, 4096) == raw[:4096]


async def test_verity_superblock_disagreeing_with_annotation_is_refused(tmp_path, verity_blob):
    _raw, blob, result = verity_blob
    descriptor = json.loads(json.dumps(result.descriptor))
    descriptor["annotations"][seekable.ANNOTATION_VERITY_ROOT] = "sha256:" + "0" * 64
    with pytest.raises(FormatError, match="superblock says sha512, root digest says sha256"):
        await open_layer(tmp_path, blob, descriptor)
