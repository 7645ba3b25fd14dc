"""``lazyerofs cache ls|du|gc|clear`` through the real CLI entry point."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from cache import ChunkCache
from cache._entry import HEADER_SIZE
from lazyfs.cli import main

MiB = 1 << 20


def fill(root: Path, count: int, size: int = MiB) -> list[bytes]:
    keys = []
    with ChunkCache(root) as c:
        for i in range(count):
            data = bytes([i]) * size
            key = hashlib.sha512(data).digest()
            assert c.put(key, data)
            keys.append(key)
    return keys


def test_ls_lists_entries_and_a_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keys = fill(tmp_path, 3)
    assert main(["cache", "ls", "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for key in keys:
        assert key.hex()[:32] in out
    assert f"3 entries, 3.0 MiB in {tmp_path}" in out


def test_ls_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keys = fill(tmp_path, 2)
    assert main(["cache", "--cache-dir", str(tmp_path), "ls", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["key_hex"] for r in rows} == {k.hex() for k in keys}
    assert all(r["size"] == MiB and r["atime"] > 0 for r in rows)


def test_du_summary_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fill(tmp_path, 12, 4 * MiB)
    assert main(["cache", "du", "--cache-dir", str(tmp_path)]) == 0
    assert "12 entries, 48.0 MiB of 10.0 GiB" in capsys.readouterr().out
    assert main(["cache", "du", "--cache-dir", str(tmp_path), "--cache-size", "1GiB", "--json"]) == 0
    usage = json.loads(capsys.readouterr().out)
    assert usage == {
        "cache_dir": str(tmp_path),
        "entries": 12,
        "bytes": 12 * (4 * MiB + HEADER_SIZE),
        "max_bytes": 1 << 30,
    }


def test_gc_enforces_the_given_budget(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fill(tmp_path, 10)
    assert main(["cache", "gc", "--cache-dir", str(tmp_path), "--cache-size", "4MiB"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("freed 7.0 MiB;")
    assert "3 entries, 3.0 MiB of 4.0 MiB" in out
    with ChunkCache(tmp_path, memory_bytes=0) as c:
        assert c.statistics().disk_bytes <= 4 * MiB


def test_gc_verify_drops_damaged(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keys = fill(tmp_path, 2)
    name = keys[0].hex()
    with open(tmp_path / "chunks" / name[:2] / name, "r+b") as f:
        f.seek(HEADER_SIZE + 10)
        f.write(b"\x99")
    assert main(["cache", "gc", "--verify", "--cache-dir", str(tmp_path)]) == 0
    assert "1 damaged removed; 1 entry, 1.0 MiB of 10.0 GiB" in capsys.readouterr().out


def test_clear_removes_all(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fill(tmp_path, 4)
    assert main(["cache", "clear", "--cache-dir", str(tmp_path)]) == 0
    assert "removed 4 entries, 4.0 MiB" in capsys.readouterr().out
    assert main(["cache", "du", "--cache-dir", str(tmp_path)]) == 0
    assert "0 entries, 0 B of 10.0 GiB" in capsys.readouterr().out


def test_missing_cache_dir_is_empty_and_not_created(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope"
    for sub in ("ls", "du", "gc", "clear"):
        assert main(["cache", sub, "--cache-dir", str(missing)]) == 0
    assert not missing.exists()
    out = capsys.readouterr().out
    assert "0 entries, 0 B" in out and "no cache at" in out


def test_default_dir_comes_from_the_environment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LAZYEROFS_CACHE_DIR", str(tmp_path))
    fill(tmp_path, 1)
    assert main(["cache", "du"]) == 0
    assert "1 entry, 1.0 MiB of 10.0 GiB" in capsys.readouterr().out


def test_bare_cache_prints_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["cache"]) == 2
    assert "ls" in capsys.readouterr().err


def test_bad_size_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["cache", "gc", "--cache-dir", str(tmp_path), "--cache-size", "lots"])
    assert exc.value.code == 2
    assert "--cache-size" in capsys.readouterr().err
