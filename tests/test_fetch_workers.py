"""Fetch workers (lazyfs.fetch.offload): frames fetched, verified, decoded and
cached in processes of their own, and a mount that outlives them.

The first tests drive a worker's run in-process (the code a forked worker
runs) against a blob on disk and a real chunk cache; the rest mount a real
image from a real registry over FUSE, compare every byte served with the
source image, and kill workers and daemons.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import trio
from support.mount import Mounter, lazyerofs

from cache import ChunkCache
from lazyfs.errors import FetchError, IntegrityError
from lazyfs.fetch import FileSource
from lazyfs.fetch.offload import FrameJob, _carry_out, default_workers
from lazyfs.format import encode_image, seekable
from lazyfs.mount.state import load_state

CHUNK = 64 << 10


def _encoded(tmp: Path, size: int = 5 * CHUNK + 123) -> tuple[bytes, Path, seekable.ChunkTable]:
    raw = os.urandom(size // 2) + bytes(size - size // 2)
    image = tmp / "layer.erofs"
    image.write_bytes(raw)
    blob = tmp / "layer.blob"
    desc = seekable.parse_descriptor(encode_image(image, blob, chunk_size=CHUNK, fsync=False).descriptor)
    assert desc.table_offset is not None
    table = seekable.read_chunk_table(blob.read_bytes()[desc.table_offset : desc.table_end], desc)
    return raw, blob, table


def _jobs(table: seekable.ChunkTable, frames: range) -> list[FrameJob]:
    return [FrameJob(i, table.span(i), table.raw_length(i), table.checksums[i], table.checksums[i]) for i in frames]


class _Flaky:
    """A blob whose first ``bad`` reads come back with one byte flipped."""

    def __init__(self, inner: FileSource, bad: int) -> None:
        self.inner, self.bad, self.reads = inner, bad, 0

    async def read(self, offset: int, length: int) -> bytes:
        self.reads += 1
        data = bytearray(await self.inner.read(offset, length))
        if self.reads <= self.bad:
            data[len(data) // 2] ^= 0xFF
        return bytes(data)


def _run(blob, cache, table, frames: range):
    start = table.span(frames[0])[0]
    length = table.span(frames[-1])[1] - start
    return trio.run(_carry_out, blob, cache, trio.CapacityLimiter(2), start, length, _jobs(table, frames), "layer 0")


def test_a_run_lands_every_frame_verified_in_the_cache(tmp_path: Path):
    raw, blob, table = _encoded(tmp_path)
    with ChunkCache(tmp_path / "cache", memory_bytes=0) as cache:
        out = _run(FileSource(blob), cache, table, range(table.frame_count))
        assert [f.error for f in out.frames] == [None] * table.frame_count
        assert all(f.persisted and f.data is None for f in out.frames)  # bytes stay in the cache
        assert out.requests == 1 and out.nbytes == table.span(table.frame_count - 1)[1]
        served = b"".join(cache.get(table.checksums[i], table.raw_length(i)) or b"" for i in range(table.frame_count))
        assert served == raw


def test_a_frame_damaged_once_in_transit_is_refetched_and_served(tmp_path: Path):
    raw, blob, table = _encoded(tmp_path)
    with ChunkCache(tmp_path / "cache", memory_bytes=0) as cache:
        out = _run(_Flaky(FileSource(blob), bad=1), cache, table, range(1, 2))
        assert out.frames[0].error is None and out.verify_failures == 1 and out.requests == 2
        assert cache.get(table.checksums[1], CHUNK) == raw[CHUNK : 2 * CHUNK]


def test_a_frame_that_stays_damaged_is_an_integrity_error_and_never_cached(tmp_path: Path):
    _raw, blob, table = _encoded(tmp_path)
    with ChunkCache(tmp_path / "cache", memory_bytes=0) as cache:
        out = _run(_Flaky(FileSource(blob), bad=2), cache, table, range(2, 3))
        assert out.verify_failures == 2
        assert isinstance(out.frames[0].exception(), IntegrityError)
        assert "SHA-512 mismatch" in str(out.frames[0].exception())
        assert not cache.contains(table.checksums[2], CHUNK)


def test_a_failed_request_fails_each_frame_of_the_run_with_its_reason(tmp_path: Path):
    _raw, _blob, table = _encoded(tmp_path)

    class Down:
        async def read(self, offset: int, length: int) -> bytes:
            raise FetchError("registry: HTTP 503")

    with ChunkCache(tmp_path / "cache", memory_bytes=0) as cache:
        out = _run(Down(), cache, table, range(0, 3))
        assert [str(f.exception()) for f in out.frames] == ["registry: HTTP 503"] * 3
        assert all(isinstance(f.exception(), FetchError) for f in out.frames)


def test_one_worker_by_default_where_there_is_a_second_cpu():
    assert default_workers() == (1 if len(os.sched_getaffinity(0)) >= 2 else 0)


# -- end to end ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def big_image(module_registry, tmp_path_factory) -> tuple[str, bytes]:
    """One layer of ~12 MiB of mixed data at 256 KiB frames."""
    from lazyfs.produce.mkfs import make_erofs

    tmp = tmp_path_factory.mktemp("workers")
    tree = tmp / "tree"
    tree.mkdir()
    rng_data = os.urandom(6 << 20)
    (tree / "random.bin").write_bytes(rng_data)
    (tree / "text.txt").write_bytes(b"".join(b"line %d of a text file\n" % i for i in range(250_000)))
    image = tmp / "layer.erofs"
    make_erofs(tree, image)
    ref = f"{module_registry.host}/test/workers:v1"
    lazyerofs("push", "--chunk-size", "256KiB", str(image), ref)
    return ref, image.read_bytes()


def _worker_pids(stats: dict) -> list[int]:
    return list(stats.get("fetch_workers", {}).get("pids", []))


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_a_mount_with_a_worker_serves_every_byte_the_worker_fetched(mounter: Mounter, big_image):
    ref, raw = big_image
    m = mounter(ref, "--fetch-workers", "1", "--no-prefetch", "--no-profile")
    served = m.layer(0).read_bytes()
    assert served == raw
    stats = m.stats()
    workers = stats["fetch_workers"]
    assert workers["workers"] == 1 and workers["alive"] == 1 and workers["fallbacks"] == 0
    assert workers["runs"] >= 1
    layer = stats["layers"][0]
    assert layer["frames_present"] == layer["frames_total"]
    assert layer["frames_fetched"] == layer["frames_total"]
    # Counted at one place as before: every frame's compressed bytes, once.
    assert layer["bytes_fetched"] >= layer["blob_size"] * 0.9
    # The worker is a process of its own, child of the daemon.
    (pid,) = _worker_pids(stats)
    assert Path(f"/proc/{pid}/comm").read_text().strip() == "lazyerofs-fetch"


def test_no_workers_asked_means_every_fetch_in_the_daemon(mounter: Mounter, big_image):
    ref, raw = big_image
    m = mounter(ref, "--fetch-workers", "0", "--no-prefetch", "--no-profile")
    assert m.layer(0).read_bytes() == raw
    assert "fetch_workers" not in m.stats()


def test_a_killed_worker_leaves_the_mount_serving_exact_bytes(mounter: Mounter, big_image):
    ref, raw = big_image
    m = mounter(ref, "--fetch-workers", "1", "--no-prefetch", "--no-profile")
    (pid,) = _worker_pids(m.stats())
    with m.layer(0).open("rb") as f:
        first = f.read(1 << 20)
        os.kill(pid, signal.SIGKILL)
        rest = f.read()
    assert first + rest == raw
    stats = m.stats()
    assert stats["fetch_workers"]["alive"] == 0
    assert stats["layers"][0]["frames_present"] == stats["layers"][0]["frames_total"]
    # Reaped: no zombie left behind by the daemon.
    deadline = time.monotonic() + 5
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{pid}").exists()


def test_workers_die_with_a_killed_daemon(mounter: Mounter, big_image):
    ref, _raw = big_image
    m = mounter(ref, "--fetch-workers", "2", "--no-prefetch", "--no-profile")
    pids = _worker_pids(m.stats())
    assert len(pids) == 2
    state = load_state(str(m.dir))
    assert state is not None
    os.kill(int(state["pid"]), signal.SIGKILL)
    deadline = time.monotonic() + 5
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(p) for p in pids)
    lazyerofs("umount", str(m.dir), check=False)

