"""One layer blob, streamed from the registry into a staging tree.

Three stages run at once, joined by bounded queues, so memory stays a few
MiB whatever the layer's size and the two cores both work:

* the network (a trio task: :meth:`RemoteBlob.stream`, digest checked as the
  bytes pass, the last piece held back until it matches);
* decompression (a worker thread: gzip or zstd by magic; zlib and zstd
  drop the GIL while they inflate, so this overlaps the staging);
* the tar staging (a worker thread:
  :func:`~lazyfs.produce.tarstage.stage_tar`).
"""

from __future__ import annotations

import collections
import io
import threading
import zlib
from collections.abc import Callable
from typing import Any

import trio
import zstandard

from lazyfs.errors import FormatError
from lazyfs.oci import Reference, RegistryClient
from lazyfs.produce.tarstage import stage_tar

__all__ = ["PiecePipe", "PipeClosed", "ProgressFn", "stage_layer"]

try:  # optional: ISA-L inflates gzip about twice as fast as zlib, same checks
    from isal import isal_zlib as _inflate
except ImportError:
    _inflate = zlib

# (what, stage, done, total): stage is "unpack" (compressed bytes received),
# "encode" (image bytes encoded) or "push"; called from worker threads too.
ProgressFn = Callable[[str, str, int, int], None]

_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_PIECE = 1 << 20
# zstd's default decoder limit (window log 27): a frame may not make us hold more.
_MAX_ZSTD_WINDOW = 1 << 27
# Decompressed bytes in flight between the decompressor and the stager.
_PIPE_BYTES = 16 << 20


class PipeClosed(Exception):
    """The other end of a :class:`PiecePipe` gave up (its own error is reported)."""


class PiecePipe:
    """A bounded FIFO of byte pieces from one producer thread to one consumer thread.

    ``put`` blocks while more than ``max_bytes`` are queued (one piece may
    exceed it alone, so a big piece cannot deadlock). Either side may
    ``close``: the writer at the end of its data (or with an error the
    reader then gets), the reader when it stops early (the writer's next
    ``put`` raises :class:`PipeClosed` instead of blocking for ever).
    """

    def __init__(self, max_bytes: int = _PIPE_BYTES) -> None:
        self.max_bytes = max_bytes
        self._pieces: collections.deque[bytes] = collections.deque()
        self._queued = 0
        self._done = False  # writer finished
        self._error: BaseException | None = None
        self._abandoned = False  # reader stopped
        self._cond = threading.Condition()
        self.peak = 0  # most bytes ever queued (for tests of the bound)

    def put(self, piece: bytes) -> None:
        if not piece:
            return
        with self._cond:
            while self._queued and self._queued + len(piece) > self.max_bytes and not self._abandoned:
                self._cond.wait()
            if self._abandoned:
                raise PipeClosed("the reader stopped")
            self._pieces.append(piece)
            self._queued += len(piece)
            self.peak = max(self.peak, self._queued)
            self._cond.notify_all()

    def close(self, error: BaseException | None = None) -> None:
        """Writer side: no more pieces; the reader gets ``error`` after the queued ones."""
        with self._cond:
            self._done = True
            self._error = error
            self._cond.notify_all()

    def abandon(self) -> None:
        """Reader side: stop; queued pieces are dropped and the writer is released."""
        with self._cond:
            self._abandoned = True
            self._pieces.clear()
            self._queued = 0
            self._cond.notify_all()

    def get(self) -> bytes:
        """The next piece; b"" at the end. Raises the writer's error after its last piece."""
        with self._cond:
            while not self._pieces and not self._done:
                self._cond.wait()
            if self._pieces:
                piece = self._pieces.popleft()
                self._queued -= len(piece)
                self._cond.notify_all()
                return piece
            if self._error is not None:
                raise PipeClosed("the writer failed") from self._error
            return b""


class PipeReader(io.RawIOBase):
    """The consumer end of a :class:`PiecePipe` as a raw file; counts what it reads."""

    def __init__(self, pipe: PiecePipe) -> None:
        self._pipe = pipe
        self._view = memoryview(b"")
        self._eof = False
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._view:
            if self._eof:
                return 0
            piece = self._pipe.get()
            if not piece:
                self._eof = True
                return 0
            self._view = memoryview(piece)
        n = min(len(buffer), len(self._view))
        buffer[:n] = self._view[:n]
        self._view = self._view[n:]
        self.count += n
        return n


class _ChannelReader:
    """The pieces of a trio memory channel, taken from a worker thread."""

    def __init__(self, receive: trio.MemoryReceiveChannel[bytes], on_bytes: Callable[[int], None]):
        self._receive = receive
        self._on_bytes = on_bytes
        self._eof = False
        self.received = 0

    def next_piece(self) -> bytes:
        """The next piece whole (no copy); b"" at the end."""
        if self._eof:
            return b""
        try:
            piece = trio.from_thread.run(self._receive.receive)
        except (trio.EndOfChannel, trio.ClosedResourceError):
            self._eof = True
            return b""
        self.received += len(piece)
        self._on_bytes(self.received)
        return piece


def _gunzip(src: _Replay, put: Callable[[bytes], None]) -> None:
    """Inflate a gzip stream (several members allowed, as gzip(1) and GzipFile do;
    zero padding after a member is skipped) with zlib, or ISA-L's zlib-compatible
    inflate where installed (about twice as fast); either checks each member's
    CRC and length (ISA-L's errors are raised as zlib.error). Output goes out in
    pieces of at most 4 MiB, so a small piece of input that inflates enormously
    is never held whole."""
    try:
        _gunzip_members(src, put)
    except _inflate.error as exc:
        raise zlib.error(str(exc)) from exc


def _gunzip_members(src: _Replay, put: Callable[[bytes], None]) -> None:
    d = _inflate.decompressobj(wbits=31)
    started = False  # inside a member
    data = b""
    while True:
        if not data:
            data = src.next_piece()
            if not data:
                break
        if not started:
            data = data.lstrip(b"\0")
            if not data:
                continue
            if not data.startswith(_GZIP_MAGIC[: len(data)]):
                raise OSError("Not a gzipped file (trailing data after the last member)")
            started = True
        out = d.decompress(data, 4 << 20)
        put(out)
        data = d.unconsumed_tail
        while data and not d.eof:
            out = d.decompress(data, 4 << 20)
            put(out)
            data = d.unconsumed_tail
        if d.eof:
            put(d.flush())
            data = d.unused_data
            d = _inflate.decompressobj(wbits=31)
            started = False
    if started:
        raise EOFError("Compressed file ended before the end-of-stream marker was reached")


def _decompress(src: _ChannelReader, pipe: PiecePipe) -> None:
    """Worker thread: compressed pieces from the network -> tar pieces into ``pipe``."""
    head = src.next_piece()
    while 0 < len(head) < 4:  # enough to tell the format (pieces are 1 MiB but may be short)
        more = src.next_piece()
        if not more:
            break
        head += more
    if head.startswith(_GZIP_MAGIC):
        replay = _Replay(head, src)
        _gunzip(replay, pipe.put)
        return
    if head[:4] == _ZSTD_MAGIC:
        dctx = zstandard.ZstdDecompressor(max_window_size=_MAX_ZSTD_WINDOW)
        raw = io.BufferedReader(_Replay(head, src), buffer_size=_PIECE)
        reader = dctx.stream_reader(raw, read_across_frames=True)
        while piece := reader.read(_PIECE):
            pipe.put(piece)
        return
    pipe.put(head)  # a plain tar
    while piece := src.next_piece():
        pipe.put(piece)


class _Replay(io.RawIOBase):
    """``first`` again, then the rest of ``src``: the format sniff consumed it."""

    def __init__(self, first: bytes, src: _ChannelReader) -> None:
        self._first = first
        self._src = src

    def readable(self) -> bool:
        return True

    def next_piece(self) -> bytes:
        if self._first:
            piece, self._first = self._first, b""
            return piece
        return self._src.next_piece()

    def readinto(self, buffer: Any) -> int:
        if not self._first:
            self._first = self._src.next_piece()
            if not self._first:
                return 0
        n = min(len(buffer), len(self._first))
        buffer[:n] = self._first[:n]
        self._first = self._first[n:]
        return n


def _decompress_into(
    receive: trio.MemoryReceiveChannel[bytes],
    pipe: PiecePipe,
    what: str,
    on_bytes: Callable[[int], None],
) -> None:
    """Worker thread: the decompressing stage; closes ``pipe`` however it ends."""
    try:
        _decompress(_ChannelReader(receive, on_bytes), pipe)
    except PipeClosed:
        pipe.close()  # the stager stopped; its error is the one to report
        return
    except (OSError, EOFError, zlib.error, zstandard.ZstdError) as exc:
        # gzip/zstd corruption or a stream cut short (the digest error wins, see below).
        error = FormatError(f"{what}: cannot decompress: {exc}")
        pipe.close(error)
        raise error from exc
    except BaseException as exc:
        pipe.close(exc)
        raise
    pipe.close()


def _stage_from(
    pipe: PiecePipe, stage_dir: str, what: str, max_bytes: int,
    consume: Callable[[PiecePipe], tuple[int, int]] | None = None,
) -> tuple[int, int]:  # fmt: skip
    """Worker thread: tar pieces -> staging tree, or into ``consume(pipe)``. (tar bytes, entries)."""
    tar = PipeReader(pipe)
    try:
        if consume is not None:
            return consume(pipe)
        result = stage_tar(
            io.BufferedReader(tar, buffer_size=1 << 16), stage_dir, layer=what,
            max_layer_bytes=max_bytes,
        )  # fmt: skip
    except PipeClosed:
        raise  # the decompressor's error is reported instead
    except BaseException:
        pipe.abandon()
        raise
    return tar.count, result.entries


async def stage_layer(
    client: RegistryClient,
    src: Reference,
    desc: dict[str, Any],
    stage_dir: str,
    what: str,
    max_layer_bytes: int,
    progress: ProgressFn,
    consume: Callable[[PiecePipe], tuple[int, int]] | None = None,
) -> tuple[int, int]:
    """Stream one layer blob into ``stage_dir``; network, decompression and staging
    run at once, a few MiB apart at most. With ``consume``, the tar pieces go to
    ``consume(pipe)`` in a worker thread instead (it returns (tar bytes, entries))."""
    blob = client.blob(src, desc)
    send, receive = trio.open_memory_channel[bytes](4)
    pipe = PiecePipe()
    errors: dict[str, BaseException] = {}
    result = (0, 0)

    async def produce() -> None:
        try:
            async with send:
                await blob.stream(send.send, piece_size=_PIECE)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # a later stage stopped first; its error is the one to report
        except Exception as exc:
            errors["network"] = exc

    def on_bytes(n: int) -> None:
        progress(what, "unpack", n, desc["size"])

    async def decompress() -> None:
        try:
            await trio.to_thread.run_sync(_decompress_into, receive, pipe, what, on_bytes)
        except Exception as exc:
            errors["decompress"] = exc
        finally:
            await receive.aclose()

    async def stage() -> None:
        nonlocal result
        try:
            result = await trio.to_thread.run_sync(
                _stage_from, pipe, stage_dir, what, max_layer_bytes, consume
            )
        except PipeClosed:
            pass  # the decompressor failed: its error is recorded
        except Exception as exc:
            errors["stage"] = exc
        finally:
            pipe.abandon()  # releases the decompressor if we stopped early

    async with trio.open_nursery() as nursery:
        nursery.start_soon(produce)
        nursery.start_soon(decompress)
        nursery.start_soon(stage)
    # Bytes that failed their digest explain any error they caused downstream.
    for key in ("network", "decompress", "stage"):
        if key in errors:
            raise errors[key]
    return result
