"""The chunk cache against a real directory (and a real tiny tmpfs for ENOSPC)."""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import cache
from cache import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MEMORY_BYTES,
    CacheStatistics,
    ChunkCache,
    default_cache_dir,
    format_size,
    parse_size,
)
from cache._entry import HEADER_SIZE


def key_of(data: bytes) -> bytes:
    """A stand-in for the frame digest: any 64 bytes unique to the chunk."""
    return hashlib.sha512(b"frame:" + data).digest()


def chunk(i: int, size: int = 4096) -> bytes:
    return (i.to_bytes(4, "little") * (size // 4 + 1))[:size]


def entry_path(root: Path, key: bytes) -> Path:
    name = key.hex()
    return root / "chunks" / name[:2] / name


def disk_usage(root: Path) -> int:
    return sum(p.stat().st_size for p in (root / "chunks").rglob("*") if p.is_file())


# -- basics ----------------------------------------------------------------------


def test_public_surface_is_explicit() -> None:
    assert set(cache.__all__) >= {
        "ChunkCache",
        "CacheStatistics",
        "parse_size",
        "format_size",
        "default_cache_dir",
        "DEFAULT_MAX_BYTES",
        "DEFAULT_MEMORY_BYTES",
    }
    assert DEFAULT_MAX_BYTES == 10 << 30
    assert DEFAULT_MEMORY_BYTES == 32 << 20  # hot frames only: cached frames are read by range


def test_round_trip_from_memory_then_from_disk(tmp_path: Path) -> None:
    data = chunk(1, 100_000)
    key = key_of(data)
    with ChunkCache(tmp_path) as c:
        assert c.get(key, len(data)) is None
        assert c.put(key, data) is True
        assert c.get(key, len(data)) == data
        assert c.contains(key, len(data))
        s = c.statistics()
        assert isinstance(s, CacheStatistics)
        assert (s.hits, s.memory_hits, s.disk_hits, s.misses, s.puts) == (1, 1, 0, 1, 1)
        assert s.disk_entries == 1 and s.disk_bytes == HEADER_SIZE + len(data)
    with ChunkCache(tmp_path, memory_bytes=0) as c:
        assert c.get(key, len(data)) == data
        assert c.statistics().disk_hits == 1


def test_empty_chunk_round_trips(tmp_path: Path) -> None:
    with ChunkCache(tmp_path, memory_bytes=0) as c:
        assert c.put(key_of(b""), b"")
        assert c.get(key_of(b""), 0) == b""


def test_wrong_key_type_or_length_is_refused(tmp_path: Path) -> None:
    with ChunkCache(tmp_path) as c:
        for bad in (b"", b"x" * 65, "ab" * 32):
            with pytest.raises(ValueError):
                c.get(bad, 1)  # type: ignore[arg-type]


def test_memory_hit_does_not_touch_the_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = chunk(2)
    key = key_of(data)
    with ChunkCache(tmp_path) as c:
        c.put(key, data)

        def no_disk(*args: object, **kwargs: object) -> None:
            raise AssertionError("memory hit went to disk")

        for name in ("open", "stat", "utime", "pread", "fstat"):
            monkeypatch.setattr(f"cache._store.os.{name}", no_disk)
        assert c.get(key, len(data)) == data
        monkeypatch.undo()


def test_survives_reopen(tmp_path: Path) -> None:
    chunks = [chunk(i, 10_000 + i) for i in range(5)]
    with ChunkCache(tmp_path) as c:
        for data in chunks:
            assert c.put(key_of(data), data)
    with ChunkCache(tmp_path, memory_bytes=0) as c:
        s = c.statistics()
        assert s.disk_entries == 5
        assert s.disk_bytes == sum(HEADER_SIZE + len(d) for d in chunks)
        assert {e.key_hex for e in c.entries()} == {key_of(d).hex() for d in chunks}
        assert {e.size for e in c.entries()} == {len(d) for d in chunks}
        for data in chunks:
            assert c.contains(key_of(data), len(data))
            assert c.get(key_of(data), len(data)) == data


def test_reopen_with_smaller_budget_evicts_at_once(tmp_path: Path) -> None:
    with ChunkCache(tmp_path) as c:
        for i in range(10):
            c.put(key_of(chunk(i)), chunk(i))
    budget = 4 * (HEADER_SIZE + 4096)
    with ChunkCache(tmp_path, max_bytes=budget) as c:
        assert disk_usage(tmp_path) <= budget
        assert c.statistics().disk_bytes == disk_usage(tmp_path)


# -- damage ----------------------------------------------------------------------


def test_truncated_entry_is_removed_reported_as_miss_then_replaced(tmp_path: Path) -> None:
    data = chunk(3, 50_000)
    key = key_of(data)
    with ChunkCache(tmp_path) as c:
        c.put(key, data)
    path = entry_path(tmp_path, key)
    os.truncate(path, HEADER_SIZE + 1000)  # a torn write after a power cut
    with ChunkCache(tmp_path, memory_bytes=0) as c:
        assert not c.contains(key, len(data))
        assert c.get(key, len(data)) is None
        s = c.statistics()
        assert (s.damaged, s.misses) == (1, 1)
        assert not path.exists()
        assert c.put(key, data)
        assert c.get(key, len(data)) == data


def test_entry_of_another_size_is_damaged(tmp_path: Path) -> None:
    data = chunk(4)
    key = key_of(data)
    with ChunkCache(tmp_path, memory_bytes=0) as c:
        c.put(key, data)
        assert c.get(key, len(data) + 1) is None
        assert c.statistics().damaged == 1
        assert not entry_path(tmp_path, key).exists()


def test_corrupted_entry_is_caught_by_verify_at_rest_removed_then_replaced(tmp_path: Path) -> None:
    data = chunk(5, 65536)
    key = key_of(data)
    with ChunkCache(tmp_path) as c:
        c.put(key, data)
    path = entry_path(tmp_path, key)
    with open(path, "r+b") as f:  # bit rot in the data, size unchanged
        f.seek(HEADER_SIZE + 30000)
        byte = f.read(1)
        f.seek(HEADER_SIZE + 30000)
        f.write(bytes([byte[0] ^ 0x40]))
    with ChunkCache(tmp_path, memory_bytes=0, verify_at_rest=True) as c:
        assert c.get(key, len(data)) is None
        assert c.statistics().damaged == 1
        assert not path.exists()
        assert c.put(key, data)
        assert c.get(key, len(data)) == data
        assert c.statistics().damaged == 1


def test_entry_renamed_to_another_key_fails_verify_at_rest(tmp_path: Path) -> None:
    a, b = chunk(6), chunk(7)
    with ChunkCache(tmp_path) as c:
        c.put(key_of(a), a)
    wrong = entry_path(tmp_path, key_of(b))
    wrong.parent.mkdir(parents=True, exist_ok=True)
    os.rename(entry_path(tmp_path, key_of(a)), wrong)
    with ChunkCache(tmp_path, memory_bytes=0, verify_at_rest=True) as c:
        assert c.get(key_of(b), len(b)) is None
        assert c.statistics().damaged == 1


def test_verify_sweep_removes_damaged_entries(tmp_path: Path) -> None:
    with ChunkCache(tmp_path, memory_bytes=0) as c:
        for i in range(4):
            c.put(key_of(chunk(i)), chunk(i))
        with open(entry_path(tmp_path, key_of(chunk(2))), "r+b") as f:
            f.seek(HEADER_SIZE)
            f.write(b"\xff\xff")
        assert c.verify() == 1
        assert len(c.entries()) == 3


# -- budget and LRU --------------------------------------------------------------


def test_size_budget_holds_under_churn(tmp_path: Path) -> None:
    budget = 64 * 1024
    with ChunkCache(tmp_path, max_bytes=budget, memory_bytes=16 * 1024) as c:
        for i in range(400):
            data = chunk(i, 1000 + (i * 7919) % 9000)
            assert c.put(key_of(data), data)
            assert disk_usage(tmp_path) <= budget
            if i % 3 == 0:
                old = chunk(i // 2, 1000 + ((i // 2) * 7919) % 9000)
                got = c.get(key_of(old), len(old))
                assert got is None or got == old
        s = c.statistics()
        assert s.evictions > 0
        assert s.disk_bytes == disk_usage(tmp_path)
        assert s.memory_bytes <= 16 * 1024


@pytest.mark.parametrize("memory_bytes", [0, 1 << 20], ids=["disk-hit", "memory-hit"])
def test_eviction_order_is_lru_and_get_refreshes(
    tmp_path: Path, memory_bytes: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A get (from disk, or from memory via the batched atime refresh) makes
    an entry the youngest, so the next eviction takes the one after it."""
    # Disk hits refresh recency at one-second grain; this test runs faster.
    monkeypatch.setattr("cache._entry.TOUCH_GRANULARITY_NS", 0)
    size = 10_000
    entry = HEADER_SIZE + size
    # 3 entries fit, a 4th pushes over; eviction frees down to 90%: one goes.
    budget = int(entry * 3.5)
    a, b, c_, d = (chunk(i, size) for i in range(4))
    with ChunkCache(tmp_path, max_bytes=budget, memory_bytes=memory_bytes) as c:
        for data in (a, b, c_):
            c.put(key_of(data), data)
        assert c.get(key_of(a), size) == a
        c.put(key_of(d), d)
        present = {e.key_hex for e in c.entries()}
        assert present == {key_of(x).hex() for x in (a, c_, d)}
        assert c.statistics().evictions == 1
        # And ls order is most recent first.
        atimes = [e.atime for e in c.entries()]
        assert atimes == sorted(atimes, reverse=True)


def test_entries_used_before_the_clock_went_back_are_evicted_before_new_ones(tmp_path: Path) -> None:
    """An atime in the future was set before the wall clock jumped back: it
    is older than any use since, so a put after the jump does not evict the
    entries written after it first."""
    size = 10_000
    budget = int((HEADER_SIZE + size) * 3.5)
    a, b, c_, d = (chunk(i, size) for i in range(4))
    with ChunkCache(tmp_path, max_bytes=budget, memory_bytes=0) as c:
        c.put(key_of(a), a)
        future = time.time_ns() + 86400 * 10**9  # stamped before a one-day jump back
        name = key_of(a).hex()
        os.utime(tmp_path / "chunks" / name[:2] / name, ns=(future, future))
        for data in (b, c_, d):
            c.put(key_of(data), data)
        assert {e.key_hex for e in c.entries()} == {key_of(x).hex() for x in (b, c_, d)}


def test_a_writer_that_does_not_evict_leaves_eviction_to_the_cache_that_counts_its_writes(tmp_path: Path) -> None:
    """A fetch worker writes with evict=False; the daemon's cache counts the
    entries (count_written), evicts down to budget and stops reading the
    evicted entries through descriptors it kept open."""
    size = 10_000
    budget = int((HEADER_SIZE + size) * 3.5)
    blocks = [chunk(i, size) for i in range(5)]
    with ChunkCache(tmp_path, max_bytes=budget, memory_bytes=0) as owner, ChunkCache(
        tmp_path, max_bytes=budget, memory_bytes=0, evict=False
    ) as writer:
        for data in blocks:
            assert writer.put(key_of(data), data)
        assert len(writer.entries()) == 5  # the writer never evicts
        for data in blocks:  # each now held open by the owner
            assert owner.read(key_of(data), size, 0, 10) == data[:10]
        for data in blocks:
            owner.count_written(len(data))
        kept = {e.key_hex for e in owner.entries()}
        assert sum(e.size + HEADER_SIZE for e in owner.entries()) <= budget
        evicted = [data for data in blocks if key_of(data).hex() not in kept]
        assert evicted
        for data in evicted:  # gone, not served from a descriptor kept open
            assert owner.read(key_of(data), size, 0, 10) is None


def test_stale_temp_files_of_dead_writers_are_removed(tmp_path: Path) -> None:
    with ChunkCache(tmp_path) as c:
        stale = tmp_path / "tmp" / "dead.123.abcd"
        fresh = tmp_path / "tmp" / "alive.456.ef01"
        stale.write_bytes(b"x" * 100)
        fresh.write_bytes(b"y")
        os.utime(stale, (1, 1))
        c.gc()
        assert not stale.exists() and fresh.exists()


def test_clear_removes_everything(tmp_path: Path) -> None:
    with ChunkCache(tmp_path) as c:
        for i in range(5):
            c.put(key_of(chunk(i)), chunk(i))
        assert c.clear() == 5 * (HEADER_SIZE + 4096)
        assert c.entries() == []
        assert c.get(key_of(chunk(0)), 4096) is None  # memory is cleared too
        s = c.statistics()
        assert (s.disk_entries, s.disk_bytes, s.memory_bytes) == (0, 0, 0)


# -- concurrency -----------------------------------------------------------------


def _writer(root: str, chunks: list[bytes], start: threading.Barrier) -> None:
    with ChunkCache(root, memory_bytes=0) as c:
        start.wait()
        for data in chunks:
            assert c.put(key_of(data), data)
            got = c.get(key_of(data), len(data))
            assert got is None or got == data


def test_concurrent_writers_of_one_key_from_processes_leave_one_good_entry(tmp_path: Path) -> None:
    """Six daemons race to store the same 20 chunks in the same order: each
    key ends as one whole, verifiable entry and no temp file is left."""
    chunks = [os.urandom(256 * 1024) for _ in range(20)]
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(6)
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), chunks, barrier)) for _ in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * 6
    files = sorted(p for p in (tmp_path / "chunks").rglob("*") if p.is_file())
    assert files == sorted(entry_path(tmp_path, key_of(d)) for d in chunks)
    assert list((tmp_path / "tmp").iterdir()) == []
    with ChunkCache(tmp_path, memory_bytes=0, verify_at_rest=True) as c:
        for data in chunks:
            assert c.get(key_of(data), len(data)) == data
        assert c.statistics().damaged == 0


def test_threads_share_one_cache_under_eviction(tmp_path: Path) -> None:
    """Gets never return wrong bytes while other threads put and evict."""
    chunks = [chunk(i, 2000 + i) for i in range(60)]
    errors: list[BaseException] = []
    with ChunkCache(tmp_path, max_bytes=40_000, memory_bytes=8_000) as c:

        def work(offset: int) -> None:
            try:
                for n in range(300):
                    data = chunks[(n * 7 + offset) % len(chunks)]
                    got = c.get(key_of(data), len(data))
                    if got is None:
                        c.put(key_of(data), data)
                    elif got != data:
                        raise AssertionError("wrong bytes")
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert c.statistics().damaged == 0
        c.gc()
        assert disk_usage(tmp_path) <= 40_000


# -- disk full -------------------------------------------------------------------


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs")
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    # mode=0700: a cache refuses a root others can write (tmpfs defaults to 1777).
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_put_returns_false_serves_from_memory_and_warns_once(
    tiny_tmpfs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    chunks = [chunk(i, 256 * 1024) for i in range(8)]  # 2 MiB into a 1 MiB tmpfs
    caplog.set_level(logging.WARNING, logger="cache")
    with ChunkCache(tiny_tmpfs, memory_bytes=8 << 20) as c:
        results = [c.put(key_of(d), d) for d in chunks]
        assert results[0] is True
        assert False in results
        for data in chunks:
            assert c.get(key_of(data), len(data)) == data
        s = c.statistics()
        assert s.write_failures == results.count(False)
        assert s.disk_entries == results.count(True)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "disk full" in warnings[0].getMessage()
    # No half-written temp files are left to eat the space.
    assert list((tiny_tmpfs / "tmp").iterdir()) == []


def test_read_only_cache_dir_put_returns_false_and_keeps_serving(tiny_tmpfs: Path) -> None:
    data, old = chunk(9), chunk(10)
    with ChunkCache(tiny_tmpfs) as c:
        c.put(key_of(old), old)
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_tmpfs)], check=True)
    with ChunkCache(tiny_tmpfs, memory_bytes=1 << 20) as c:
        assert c.get(key_of(old), len(old)) == old  # hits still work
        assert c.put(key_of(data), data) is False
        assert c.get(key_of(data), len(data)) == data
        assert c.statistics().write_failures == 1


# -- sizes and location ----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10GiB", 10 << 30),
        ("10G", 10 << 30),
        ("10GB", 10 * 10**9),
        ("256MiB", 256 << 20),
        ("4k", 4096),
        ("1.5 MiB", 3 << 19),
        ("4096", 4096),
        ("0", 0),
        ("12b", 12),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "GiB", "-1G", "10 XB", "1e9", "ten"])
def test_parse_size_rejects_garbage(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_size(bad)


def test_format_size() -> None:
    assert format_size(10 << 30) == "10.0 GiB"
    assert format_size(48 << 20) == "48.0 MiB"
    assert format_size(512) == "512 B"
    assert format_size(1536) == "1.5 KiB"


@given(st.integers(min_value=0, max_value=1 << 60))
def test_format_then_parse_is_close(n: int) -> None:
    assert abs(parse_size(format_size(n).replace(" ", "")) - n) <= n * 0.051 + 1


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LAZYEROFS_CACHE_DIR", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("LAZYEROFS_CACHE_DIR")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert default_cache_dir() == Path("/var/cache/lazyerofs")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / ".cache" / "lazyerofs"


def test_disk_hit_refreshes_atime_at_one_second_grain(tmp_path: Path) -> None:
    data = chunk(11)
    key = key_of(data)
    path = entry_path(tmp_path, key)
    with ChunkCache(tmp_path, memory_bytes=0) as c:
        c.put(key, data)
        os.utime(path, (1000, 1000))  # last used long ago
        assert c.get(key, len(data)) == data
        refreshed = path.stat().st_atime
        assert refreshed > 1000
        assert c.get(key, len(data)) == data  # within the grain: no new write
        assert path.stat().st_atime == refreshed


def _churner(root: str, budget: int, seed: int, start: threading.Barrier) -> None:
    with ChunkCache(root, max_bytes=budget, memory_bytes=0) as c:
        start.wait()
        for i in range(150):
            data = chunk(seed * 1000 + i, 4000)
            assert c.put(key_of(data), data)


def test_budget_is_shared_by_processes_on_one_directory(tmp_path: Path) -> None:
    """Each process sees the others' entries at its next rescan (every 1/8
    of the budget written), so the overshoot stays bounded and the next gc
    by anyone brings the directory back under the budget."""
    entry = HEADER_SIZE + 4000
    budget = 40 * entry
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(3)
    procs = [ctx.Process(target=_churner, args=(str(tmp_path), budget, n, barrier)) for n in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * 3
    assert disk_usage(tmp_path) <= budget + 3 * (budget // 8 + entry)
    with ChunkCache(tmp_path, max_bytes=budget) as c:
        assert disk_usage(tmp_path) <= budget
        assert c.statistics().disk_bytes == disk_usage(tmp_path)


def test_get_nowait_serves_memory_hits_and_never_reads_disk(tmp_path):
    c = ChunkCache(tmp_path / "c", memory_bytes=1 << 20)
    key = b"\x01" * 64
    assert c.get_nowait(key, 3) is None
    c.put(key, b"abc")
    assert c.get_nowait(key, 3) == b"abc"
    assert c.get_nowait(key, 4) is None  # wrong size is not a hit
    fresh = ChunkCache(tmp_path / "c", memory_bytes=1 << 20)
    assert fresh.get_nowait(key, 3) is None  # on disk only: not for nowait
    assert fresh.get(key, 3) == b"abc"
    assert fresh.get_nowait(key, 3) == b"abc"


def test_directories_wiped_under_an_open_cache_are_recreated_on_the_next_put(tmp_path: Path) -> None:
    """An ``rm -rf`` of chunks/ and tmp/ next to a running daemon: the cache
    works through directory handles, so it reopens them (private again)."""
    a, b = chunk(11), chunk(12)
    with ChunkCache(tmp_path, memory_bytes=0) as c:
        assert c.put(key_of(a), a)
        shutil.rmtree(tmp_path / "chunks")
        shutil.rmtree(tmp_path / "tmp")
        assert c.get(key_of(a), len(a)) is None
        assert c.put(key_of(b), b)
        assert c.get(key_of(b), len(b)) == b
    assert (tmp_path / "chunks").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "tmp").stat().st_mode & 0o777 == 0o700
    with ChunkCache(tmp_path, memory_bytes=0) as c:
        assert c.get(key_of(b), len(b)) == b
