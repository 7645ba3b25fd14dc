"""``lazyerofs build`` and ``lazyerofs inspect`` on local files."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from support.mount import lazyerofs

from lazyfs.format import seekable


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    src = tmp_path / "tree"
    (src / "bin").mkdir(parents=True)
    (src / "bin" / "prog").write_bytes(os.urandom(700_000))
    (src / "README").write_text("read me\n" * 10_000)
    return src


def test_build_from_directory_writes_blob_and_descriptor_that_zstd_decodes(tmp_path: Path, tree: Path):
    blob = tmp_path / "layer.blob"
    proc = lazyerofs("build", str(tree), "-o", str(blob), "--chunk-size", "128KiB")
    assert "wrote" in proc.stdout
    desc = json.loads((tmp_path / "layer.blob.json").read_text())
    assert desc["mediaType"] == seekable.MEDIA_TYPE_SEEKABLE
    assert desc["size"] == blob.stat().st_size
    parsed = seekable.parse_descriptor(desc)
    assert parsed.chunk_digest is not None
    raw = subprocess.run(["zstd", "-d", "-c", str(blob)], capture_output=True, check=True).stdout
    assert raw[1024:1028] == bytes.fromhex("e2e1f5e0")  # EROFS superblock magic


def test_build_refuses_a_file_that_is_not_an_erofs_image(tmp_path: Path):
    bogus = tmp_path / "bogus.img"
    bogus.write_bytes(b"\0" * 8192)
    proc = lazyerofs("build", str(bogus), "-o", str(tmp_path / "x.blob"), check=False)
    assert proc.returncode == 1
    assert "not a raw EROFS image" in proc.stderr


def test_inspect_passes_a_good_blob_and_reports_its_table(tmp_path: Path, tree: Path):
    blob = tmp_path / "layer.blob"
    lazyerofs("build", str(tree), "-o", str(blob), "--chunk-size", "64KiB")
    text = lazyerofs("inspect", str(blob), "--frames").stdout
    assert "chunk size   64.0 KiB" in text
    report = json.loads(lazyerofs("inspect", str(blob), "--json").stdout)
    assert report["errors"] == []
    assert report["frame_count"] == len(report["frames"]) == -(-report["uncompressed_size"] // 65536)
    assert text.count("\n") > report["frame_count"]


def test_inspect_fails_on_a_tampered_frame_and_names_it(tmp_path: Path, tree: Path):
    blob = tmp_path / "layer.blob"
    lazyerofs("build", str(tree), "-o", str(blob), "--chunk-size", "64KiB")
    desc = json.loads((tmp_path / "layer.blob.json").read_text())
    data = bytearray(blob.read_bytes())
    data[100] ^= 1  # inside frame 0
    blob.write_bytes(bytes(data))
    # The blob digest no longer matches: inspect says so first.
    proc = lazyerofs("inspect", str(blob), check=False)
    assert proc.returncode == 1
    assert "blob digest" in proc.stderr
    # With a descriptor that vouches for the new bytes, the frame check fires.
    import hashlib

    desc["digest"] = "sha256:" + hashlib.sha256(bytes(data)).hexdigest()
    (tmp_path / "layer.blob.json").write_text(json.dumps(desc))
    proc = lazyerofs("inspect", str(blob), check=False)
    assert proc.returncode == 1
    assert "frame 0" in proc.stderr and "SHA-512 mismatch" in proc.stderr


def test_inspect_without_descriptor_says_where_it_looked(tmp_path: Path, tree: Path):
    blob = tmp_path / "layer.blob"
    lazyerofs("build", str(tree), "-o", str(blob))
    (tmp_path / "layer.blob.json").unlink()
    proc = lazyerofs("inspect", str(blob), check=False)
    assert proc.returncode == 1
    assert "layer.blob.json: descriptor not found" in proc.stderr
