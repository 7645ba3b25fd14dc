"""What mount does with layers it cannot vouch for or does not understand."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.blobtools import make_blob
from support.mount import Mounter
from support.registry import layer_descriptor, push_descriptors

from lazyfs.mount import kernel as kmount

pytestmark = pytest.mark.e2e

RAW = bytes(range(256)) * 4096  # 1 MiB, not an EROFS image: these tests only read bytes


def push(registry, name: str, layers: list[tuple[bytes, dict]]) -> str:
    return push_descriptors(registry, name, layers)


def test_non_erofs_layer_is_skipped_with_a_warning_or_refused_with_strict(mounter: Mounter, registry, tmp_path: Path):
    seekable_blob = make_blob(RAW, 65536)
    tar = b"not really a tar" * 100
    ref = push(
        registry,
        "mixed",
        [(seekable_blob.data, seekable_blob.descriptor), (tar, layer_descriptor(tar, "application/vnd.oci.image.layer.v1.tar"))],
    )
    m = mounter(ref)
    assert sorted(p.name for p in (m.dir / "layers").iterdir()) == ["0"]
    assert m.layer(0).read_bytes() == RAW
    strict = mounter(ref, "--strict", expect_failure=True)
    assert "application/vnd.oci.image.layer.v1.tar" in strict.stderr and "--strict" in strict.stderr
    assert kmount.find_mount(str(strict.dir)) is None


def test_layer_without_chunk_digest_is_refused_unless_insecure(mounter: Mounter, registry):
    blob = make_blob(RAW, 65536)
    del blob.descriptor["annotations"]["dev.containerd.erofs.zstd.chunk_digest"]
    ref = push(registry, "nodigest", [(blob.data, blob.descriptor)])
    refused = mounter(ref, expect_failure=True)
    assert "chunk_digest" in refused.stderr and "cannot be verified" in refused.stderr
    assert kmount.find_mount(str(refused.dir)) is None
    m = mounter(ref, "--insecure-skip-verify")
    assert "insecure-skip-verify" in m.stderr
    assert m.layer(0).read_bytes() == RAW
    assert m.stats()["layers"][0]["verified"] is False


def test_layer_with_hash_algo_none_is_served_only_when_insecure(mounter: Mounter, registry):
    blob = make_blob(RAW, 65536, hash_algo=0)
    ref = push(registry, "noalgo", [(blob.data, blob.descriptor)])
    refused = mounter(ref, expect_failure=True)
    assert "hash_algo 0" in refused.stderr
    m = mounter(ref, "--insecure-skip-verify")
    assert m.layer(0).read_bytes() == RAW
