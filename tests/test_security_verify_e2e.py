"""Verification policy end to end (issue 10): a real registry, real FUSE.

Blobs are altered in the registry's storage after the push, as a hostile
registry or a corrupted store would serve them: the manifest still vouches
for the original digest.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from support.blobtools import make_blob
from support.mount import Mounter, lazyerofs
from support.registry import layer_descriptor, push_descriptors

from lazyfs.format import seekable

pytestmark = pytest.mark.e2e

RAW = random.Random(11).randbytes(1 << 20)  # only bytes are read: no EROFS needed
EIO = 5


def push(registry, name: str, layers: list[tuple[bytes, dict]]) -> str:
    return push_descriptors(registry, name, layers)


def read_at(path: Path, offset: int, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)


def assert_eio(path: Path, offset: int) -> None:
    with pytest.raises(OSError) as err:
        read_at(path, offset, 10)
    assert err.value.errno == EIO


def test_intact_plain_layer_reads_exactly_and_verifies(mounter: Mounter, registry):
    ref = push(registry, "plain-good", [(RAW, layer_descriptor(RAW))])
    m = mounter(ref)
    assert read_at(m.layer(0), 500_000, 100) == RAW[500_000:500_100]
    assert m.layer(0).read_bytes() == RAW
    assert m.stats()["layers"][0]["verified"] is True
    proc = lazyerofs("verify", ref)
    assert "OK" in proc.stdout and "blob digest checked" in proc.stdout


def test_altered_plain_blob_is_never_served_and_verify_fails(mounter: Mounter, registry):
    desc = layer_descriptor(RAW)
    ref = push(registry, "plain-bad", [(RAW, desc)])
    stored = Path(registry.blob_path(str(desc["digest"])))
    data = bytearray(stored.read_bytes())
    data[700_000] ^= 0xFF
    stored.write_bytes(bytes(data))

    m = mounter(ref)
    for offset in (0, 4096, 700_000):  # far from the altered byte, and on it
        assert_eio(m.layer(0), offset)
    stats = m.stats()
    assert stats["verify_failures"] >= 1 and stats["read_errors"] >= 3
    proc = lazyerofs("verify", ref, check=False)
    assert proc.returncode == 1
    assert "does not match" in proc.stderr and str(desc["digest"]) in proc.stderr


def test_insecure_skip_verify_still_gives_eio_for_a_swapped_frame_of_a_checksummed_layer(mounter: Mounter, registry):
    chunk = 64 << 10
    raw = random.Random(12).randbytes(16 * chunk)  # incompressible: every frame the same length
    blob = make_blob(raw, chunk)
    ref = push(registry, "swapped", [(blob.data, blob.descriptor)])
    desc = seekable.parse_descriptor(blob.descriptor)
    table = seekable.read_chunk_table(blob.data[blob.table_offset :], desc)
    (s1, e1), (s2, e2) = table.span(1), table.span(2)
    assert e1 - s1 == e2 - s2
    data = bytearray(blob.data)
    data[s1:e1], data[s2:e2] = blob.data[s2:e2], blob.data[s1:e1]
    Path(registry.blob_path(desc.digest)).write_bytes(bytes(data))

    m = mounter(ref, "--insecure-skip-verify")
    assert_eio(m.layer(0), chunk + 100)
    assert_eio(m.layer(0), 2 * chunk + 100)
    assert read_at(m.layer(0), 5 * chunk, chunk) == raw[5 * chunk : 6 * chunk]
    stats = m.stats()
    assert stats["layers"][0]["verified"] is True
    assert stats["verify_failures"] >= 2
