"""The pipeline that makes ``convert`` fast: a bounded piece pipe between the
decompressor and the tar stager (order kept, errors carried across, memory
bounded, no deadlock when either side stops), the zlib gunzip that replaced
GzipFile, layers converted as a pipeline (results in order, the first error
raised as itself, at most two layers staged at once), and the work directory
marked so ext4 spreads the staging trees."""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import io
import os
import random
import struct
import threading
import time
import zlib
from pathlib import Path

import httpx
import pytest
import trio
from test_convert import entry, make_tar

from lazyfs.errors import FormatError, IntegrityError
from lazyfs.format import encode_image
from lazyfs.oci import RegistryClient, RegistryOptions, parse_reference
from lazyfs.produce import convert, unpack
from lazyfs.produce.unpack import PiecePipe, PipeClosed, PipeReader

# ------------------------------------------------------------------ the piece pipe


def _pieces(n: int, seed: int = 1) -> list[bytes]:
    rnd = random.Random(seed)
    return [rnd.randbytes(rnd.randint(1, 70_000)) for _ in range(n)]


def test_pipe_delivers_every_piece_in_order_across_threads():
    pipe = PiecePipe(max_bytes=100_000)
    pieces = _pieces(300)

    def write() -> None:
        for p in pieces:
            pipe.put(p)
        pipe.close()

    t = threading.Thread(target=write)
    t.start()
    got = PipeReader(pipe).read()
    t.join(5)
    assert got == b"".join(pieces)


def test_pipe_holds_at_most_its_bound_while_the_reader_is_slow():
    pipe = PiecePipe(max_bytes=200_000)
    pieces = _pieces(200, seed=2)

    def write() -> None:
        for p in pieces:
            pipe.put(p)
        pipe.close()

    t = threading.Thread(target=write)
    t.start()
    out = []
    while piece := pipe.get():
        out.append(piece)
        time.sleep(0.001)  # slower than the writer: the writer must wait
    t.join(5)
    assert b"".join(out) == b"".join(pieces)
    # One piece may go past the bound only into an empty pipe (no deadlock on a big piece).
    assert pipe.peak <= 200_000 + 70_000


def test_writer_error_reaches_the_reader_after_the_pieces_before_it():
    pipe = PiecePipe()
    pipe.put(b"abc")
    boom = FormatError("layer x: cannot decompress: broken")
    pipe.close(boom)
    assert pipe.get() == b"abc"
    with pytest.raises(PipeClosed) as info:
        pipe.get()
    assert info.value.__cause__ is boom


def test_a_reader_that_stops_releases_a_writer_blocked_on_a_full_pipe():
    pipe = PiecePipe(max_bytes=10)
    pipe.put(b"0123456789")
    raised: list[BaseException] = []

    def write() -> None:
        try:
            pipe.put(b"more")  # blocks: the pipe is full
        except PipeClosed as exc:
            raised.append(exc)

    t = threading.Thread(target=write)
    t.start()
    time.sleep(0.05)
    assert t.is_alive()
    pipe.abandon()
    t.join(5)
    assert not t.is_alive() and raised


# ------------------------------------------------------------------ gunzip


class _Source:
    """next_piece() over fixed pieces, as the network side hands them over."""

    def __init__(self, data: bytes, piece: int) -> None:
        self._pieces = [data[i : i + piece] for i in range(0, len(data), piece)]

    def next_piece(self) -> bytes:
        return self._pieces.pop(0) if self._pieces else b""


def _gunzip(data: bytes, piece: int = 777) -> list[bytes]:
    out: list[bytes] = []
    unpack._gunzip(_Source(data, piece), out.append)  # type: ignore[arg-type]
    return out


def test_gunzip_reads_several_members_and_zero_padding_like_gzip():
    a, b = os.urandom(100_000), b"x" * 300_000
    data = gzip.compress(a, mtime=0) + b"\0" * 1000 + gzip.compress(b, mtime=0) + b"\0" * 7
    for piece in (1, 777, 1 << 20):
        assert b"".join(_gunzip(data, piece)) == a + b
    # What the GzipFile it replaced reads from the same bytes.
    assert gzip.GzipFile(fileobj=io.BytesIO(data)).read() == a + b


def test_gunzip_refuses_trailing_garbage_a_bad_crc_and_a_cut_stream():
    good = gzip.compress(b"hello" * 1000, mtime=0)
    with pytest.raises(OSError, match="Not a gzipped file"):
        _gunzip(good + b"garbage")
    bad_crc = good[:-8] + bytes([good[-8] ^ 1]) + good[-7:]
    with pytest.raises(zlib.error):
        _gunzip(bad_crc)
    with pytest.raises(EOFError):
        _gunzip(good[:-5])


def test_gunzip_never_hands_out_more_than_4_mib_at_once():
    bomb = gzip.compress(b"\0" * (64 << 20), mtime=0)  # 64 KiB that inflate to 64 MiB
    out = _gunzip(bomb, piece=1 << 20)
    assert sum(map(len, out)) == 64 << 20
    assert max(map(len, out)) <= 4 << 20


# ------------------------------------------------------------------ stage_layer


def _transport(blob: bytes) -> httpx.MockTransport:
    async def body():
        for i in range(0, len(blob), 50_000):
            yield blob[i : i + 50_000]

    return httpx.MockTransport(lambda request: httpx.Response(200, content=body()))


async def _stage(blob: bytes, root: Path, *, digest: str | None = None) -> tuple[int, int]:
    ref = parse_reference("127.0.0.1:5000/x/y:v1")
    desc = {
        "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
        "digest": digest or "sha256:" + hashlib.sha256(blob).hexdigest(),
        "size": len(blob),
    }
    async with RegistryClient(RegistryOptions(retries=0), transport=_transport(blob)) as client:
        return await unpack.stage_layer(
            client, ref, desc, str(root), "layer", 1 << 30, lambda *a: None
        )


def _big_tar() -> bytes:
    rnd = random.Random(3)
    return make_tar([entry(f"d{i % 7}/f{i}", data=rnd.randbytes(rnd.randint(0, 300_000))) for i in range(60)])


async def test_stage_layer_stages_a_gzip_layer_through_the_three_stages(tmp_path: Path):
    tar = _big_tar()
    tar_bytes, entries = await _stage(gzip.compress(tar, mtime=0), tmp_path)
    assert (tar_bytes, entries) == (len(tar), 60)
    assert (tmp_path / "d3" / "f3").stat().st_size > 0


async def test_corrupt_gzip_is_a_format_error_naming_decompression(tmp_path: Path):
    blob = bytearray(gzip.compress(_big_tar(), mtime=0))
    blob[len(blob) // 2] ^= 0xFF
    with pytest.raises(FormatError, match="cannot decompress"):
        await _stage(bytes(blob), tmp_path)


async def test_a_digest_mismatch_wins_over_the_decompression_error_it_causes(tmp_path: Path):
    blob = gzip.compress(_big_tar(), mtime=0)
    wrong = "sha256:" + hashlib.sha256(b"other").hexdigest()
    with pytest.raises(IntegrityError, match="content hashes to"):
        await _stage(blob, tmp_path, digest=wrong)


async def test_a_stager_error_stops_the_decompressor_without_hanging(tmp_path: Path):
    # A bad entry early, then lots of data: the decompressor must not block on the full pipe.
    tar = make_tar([entry("../escape", data=b"x"), *[entry(f"f{i}", data=os.urandom(1 << 20)) for i in range(40)]])
    with trio.fail_after(30), pytest.raises(FormatError, match="climbs out"):
        await _stage(gzip.compress(tar, mtime=0, compresslevel=1), tmp_path)


# ------------------------------------------------------------------ layers as a pipeline


def _fake_layers(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, *, fail_finish: int | None = None):
    """_stage_layer/_finish_layer replaced by fakes that record what overlaps."""
    state = {"staged_now": 0, "most_staged": 0, "events": []}

    async def stage(client, src, desc, work, what, options, progress):
        state["staged_now"] += 1
        state["most_staged"] = max(state["most_staged"], state["staged_now"])
        state["events"].append(("stage", desc["i"]))
        await trio.sleep(0.01)
        return convert._Staged(desc, "t", what, str(tmp_path / f"s{desc['i']}"), 1, 1, 0.0, 0.0)

    async def finish(client, dst, layer, work, options, progress):
        state["events"].append(("finish", layer.desc["i"]))
        await trio.sleep(0.05 * (3 - layer.desc["i"] % 3))  # finishes take different times
        state["staged_now"] -= 1
        state["events"].append(("done", layer.desc["i"]))
        if layer.desc["i"] == fail_finish:
            raise FormatError(f"layer {layer.desc['i']}: mkfs failed")
        return f"report{layer.desc['i']}", {"digest": layer.desc["i"]}

    monkeypatch.setattr(convert, "_stage_layer", stage)
    monkeypatch.setattr(convert, "_finish_layer", finish)
    return state


async def _run_layers(n: int) -> list:
    layers = [{"i": i} for i in range(n)]
    return await convert._convert_layers(
        None, None, None, layers, [f"l{i}" for i in range(n)], "", convert.ConvertOptions(),
        lambda *a: None,
    )  # type: ignore[arg-type]


async def test_layers_overlap_but_results_keep_the_manifest_order(monkeypatch, tmp_path):
    state = _fake_layers(monkeypatch, tmp_path)
    results = await _run_layers(5)
    assert [d["digest"] for _, d in results] == [0, 1, 2, 3, 4]
    # Layer 1 was staged while layer 0 was being finished: the stages overlapped...
    events = state["events"]
    assert events.index(("finish", 0)) < events.index(("done", 0))
    assert events.index(("stage", 1)) < events.index(("done", 0)) < events.index(("finish", 1))
    # ...and never more than two layers were on disk at once.
    assert state["most_staged"] <= 2


async def test_a_failing_layer_raises_its_own_error_not_a_group(monkeypatch, tmp_path):
    _fake_layers(monkeypatch, tmp_path, fail_finish=1)
    with pytest.raises(FormatError, match="layer 1: mkfs failed"):
        await _run_layers(4)


# ------------------------------------------------------------------ the rest


def test_work_directory_is_marked_so_ext4_spreads_the_staging_trees(tmp_path: Path):
    work = tmp_path / "work"
    work.mkdir()
    convert._spread_inodes(str(work))
    fd = os.open(work, os.O_RDONLY | os.O_DIRECTORY)
    try:
        flags = struct.unpack("l", fcntl.ioctl(fd, 0x80086601, struct.pack("l", 0)))[0]
    except OSError:
        pytest.skip("this file system has no inode flags")
    finally:
        os.close(fd)
    assert flags & 0x00020000  # FS_TOPDIR_FL


def test_encoding_without_fsync_writes_the_same_blob(tmp_path: Path):
    image = tmp_path / "img"
    image.write_bytes(os.urandom(300_000) + b"\0" * 500_000)
    a = encode_image(image, tmp_path / "a", chunk_size=65536)
    b = encode_image(image, tmp_path / "b", chunk_size=65536, fsync=False)
    assert a == b
    assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes()
