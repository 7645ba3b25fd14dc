"""Chunk tables kept by their chunk_digest: a second mount of an image fetches
none, and a damaged or planted copy is refused and fetched again."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest
from support.mount import Mounter, lazyerofs
from test_mount_e2e import build_image

from lazyfs.errors import FormatError
from lazyfs.fetch import TableStore

DIGEST = "sha512:" + hashlib.sha512(b"payload").hexdigest()


# --- the store ---------------------------------------------------------------------


def test_a_stored_table_is_read_back_from_a_private_file_named_by_its_digest(tmp_path: Path):
    store = TableStore(tmp_path)
    assert store.get(DIGEST) is None
    assert store.put(DIGEST, b"table bytes")
    assert store.get(DIGEST) == b"table bytes"
    path = tmp_path / "tables" / DIGEST.split(":", 1)[1]
    assert store.path(DIGEST) == path
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left behind


@pytest.mark.parametrize("bad", ["sha256:" + "a" * 64, "sha512:../../etc/passwd", "sha512:" + "A" * 128])
def test_a_key_that_is_not_a_sha512_digest_never_becomes_a_path(tmp_path: Path, bad: str):
    store = TableStore(tmp_path)
    with pytest.raises(FormatError):
        store.put(bad, b"x")
    with pytest.raises(FormatError):
        store.get(bad)


def test_a_symlink_planted_as_a_table_is_not_followed(tmp_path: Path):
    store = TableStore(tmp_path)
    store.put(DIGEST, b"real")
    target = tmp_path / "elsewhere"
    target.write_bytes(b"planted")
    store.path(DIGEST).unlink()
    store.path(DIGEST).symlink_to(target)
    assert store.get(DIGEST) is None
    assert store.put(DIGEST, b"real")  # replaces the link, never writes through it
    assert target.read_bytes() == b"planted"
    assert store.get(DIGEST) == b"real"


def test_a_tables_dir_others_can_write_is_not_used(tmp_path: Path):
    (tmp_path / "tables").mkdir(mode=0o777)
    os.chmod(tmp_path / "tables", 0o777)
    store = TableStore(tmp_path)
    assert not store.put(DIGEST, b"x")
    assert store.get(DIGEST) is None


# --- end to end ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def image(module_registry, tmp_path_factory):
    return build_image(module_registry, tmp_path_factory.mktemp("img"), "tables")


def test_a_second_mount_with_the_same_cache_fetches_no_chunk_table(mounter: Mounter, image, tmp_path: Path):
    cache = tmp_path / "shared-cache"
    first = mounter(image.ref, cache_dir=cache)
    assert first.stats()["chunk_tables"] == {"fetched": 3, "cached": 0}
    lazyerofs("umount", str(first.dir))

    second = mounter(image.ref, "--no-prefetch", cache_dir=cache)  # nothing fetched in the background
    stats = second.stats()
    assert stats["chunk_tables"] == {"fetched": 0, "cached": 3}
    assert stats["requests"] == 0  # nothing fetched before the first read
    for i, raw in enumerate(image.raws):
        assert second.layer(i).read_bytes() == raw


def test_a_tampered_stored_table_is_refused_and_fetched_again(mounter: Mounter, image, tmp_path: Path):
    cache = tmp_path / "shared-cache"
    first = mounter(image.ref, cache_dir=cache)
    lazyerofs("umount", str(first.dir))
    digest = image.descriptors[1]["annotations"]["dev.containerd.erofs.zstd.chunk_digest"]
    stored = cache / "tables" / digest.split(":", 1)[1]
    good = stored.read_bytes()
    tampered = bytearray(good)
    tampered[-1] ^= 0x01  # the last checksum byte: the header still parses
    stored.write_bytes(bytes(tampered))

    second = mounter(image.ref, "--no-prefetch", cache_dir=cache)  # nothing fetched in the background
    stats = second.stats()
    assert stats["chunk_tables"] == {"fetched": 1, "cached": 2}
    assert stats["layers"][1]["requests"] == 1  # the table, from the registry
    assert "refused" in second.stderr  # said once, as a warning, not an error
    assert stored.read_bytes() == good  # replaced by the verified copy
    for i, raw in enumerate(image.raws):
        assert second.layer(i).read_bytes() == raw


def test_cache_clear_removes_stored_tables_and_follows_no_link(tmp_path: Path):
    from cache import ChunkCache

    root = tmp_path / "cache"
    ChunkCache(root).close()  # a real cache directory, 0700
    store = TableStore(root)
    assert store.put(DIGEST, b"table bytes")
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    os.symlink(victim, root / "tables" / "link")
    cache = ChunkCache(root)
    try:
        assert cache.clear() >= len(b"table bytes")
    finally:
        cache.close()
    assert store.get(DIGEST) is None
    assert victim.read_text() == "keep me"
    # The cache root stays private with a tables/ dir in it.
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
