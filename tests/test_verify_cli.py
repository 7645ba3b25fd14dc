"""``lazyerofs verify`` on local blobs (the registry path is in test_verity_e2e.py)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from support.mount import lazyerofs

from lazyfs.format import seekable


@pytest.fixture
def verity_blob(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    (src / "bin").write_bytes(os.urandom(900_000))
    (src / "txt").write_text("x" * 300_000)
    blob = tmp_path / "layer.blob"
    lazyerofs("build", str(src), "-o", str(blob), "--chunk-size", "64KiB", "--dm-verity")
    return blob


def rewrite(blob: Path, offset: int) -> None:
    """Flip one byte and make the descriptor vouch for the new blob digest,
    so only the inner checks (frame, tree) can catch it."""
    data = bytearray(blob.read_bytes())
    data[offset] ^= 0xFF
    blob.write_bytes(bytes(data))
    desc_path = Path(str(blob) + ".json")
    desc = json.loads(desc_path.read_text())
    desc["digest"] = "sha256:" + hashlib.sha256(bytes(data)).hexdigest()
    desc_path.write_text(json.dumps(desc))


def test_verify_passes_a_good_verity_blob(verity_blob: Path):
    proc = lazyerofs("verify", str(verity_blob))
    assert "OK" in proc.stdout and "dm-verity tree checked" in proc.stdout


def test_verify_reports_each_bad_frame(verity_blob: Path):
    desc = seekable.parse_descriptor(json.loads(Path(str(verity_blob) + ".json").read_text()))
    assert desc.table_offset is not None
    table = seekable.read_chunk_table(verity_blob.read_bytes()[desc.table_offset :], desc)
    for k in (1, 4):
        s, e = table.span(k)
        rewrite(verity_blob, (s + e) // 2)
    proc = lazyerofs("verify", str(verity_blob), "--json", check=False)
    assert proc.returncode == 1
    report = json.loads(proc.stdout)
    assert report[0]["bad_frames"] == [1, 4]
    assert "frame 1" in proc.stderr and "frame 4" in proc.stderr


def test_verify_reports_a_tampered_hash_tree(verity_blob: Path):
    desc = seekable.parse_descriptor(json.loads(Path(str(verity_blob) + ".json").read_text()))
    assert desc.verity_offset is not None
    rewrite(verity_blob, desc.verity_offset + 8 + 4096 + 5)
    proc = lazyerofs("verify", str(verity_blob), check=False)
    assert proc.returncode == 1
    assert "dm-verity" in proc.stderr
