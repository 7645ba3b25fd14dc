"""One layer blob, streamed from the registry into a staging tree.

The network side (a trio task: :meth:`RemoteBlob.stream`, digest checked as the
bytes pass, the last piece held back until it matches) and the unpacking side
(a worker thread: gzip or zstd by magic, then
:func:`~lazyfs.produce.tarstage.stage_tar`) run at once, joined by a memory
channel of a few 1 MiB pieces: memory stays bounded whatever the layer's size.
"""

from __future__ import annotations

import gzip
import io
from collections.abc import Callable
from typing import Any, BinaryIO

import trio
import zstandard

from lazyfs.errors import FormatError, LazyErofsError
from lazyfs.oci import Reference, RegistryClient
from lazyfs.produce.tarstage import stage_tar

__all__ = ["ProgressFn", "stage_layer"]

# (what, stage, done, total): stage is "unpack" (compressed bytes received),
# "encode" (image bytes encoded) or "push"; called from worker threads too.
ProgressFn = Callable[[str, str, int, int], None]

_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_PIECE = 1 << 20
# zstd's default decoder limit (window log 27): a frame may not make us hold more.
_MAX_ZSTD_WINDOW = 1 << 27


class _ChannelReader(io.RawIOBase):
    """The pieces of a trio memory channel as a file, read from a worker thread."""

    def __init__(self, receive: trio.MemoryReceiveChannel[bytes], on_bytes: Callable[[int], None]):
        self._receive = receive
        self._on_bytes = on_bytes
        self._view = memoryview(b"")
        self._eof = False
        self.received = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._view:
            if self._eof:
                return 0
            try:
                piece = trio.from_thread.run(self._receive.receive)
            except (trio.EndOfChannel, trio.ClosedResourceError):
                self._eof = True
                return 0
            self._view = memoryview(piece)
            self.received += len(piece)
            self._on_bytes(self.received)
        n = min(len(buffer), len(self._view))
        buffer[:n] = self._view[:n]
        self._view = self._view[n:]
        return n


class _Counted(io.RawIOBase):
    """Counts what is read through it (the uncompressed tar)."""

    def __init__(self, inner: BinaryIO) -> None:
        self._inner = inner
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._inner.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        self.count += n
        return n


def _decompressed(raw: io.BufferedReader, what: str) -> BinaryIO:
    """``raw``'s tar, by its magic (registries and tools mislabel media types)."""
    head = raw.peek(4)[:4]
    if head.startswith(_GZIP_MAGIC):
        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    if head == _ZSTD_MAGIC:
        dctx = zstandard.ZstdDecompressor(max_window_size=_MAX_ZSTD_WINDOW)
        return dctx.stream_reader(raw, read_across_frames=True)  # type: ignore[return-value]
    return raw  # type: ignore[return-value]


def _stage_from(
    receive: trio.MemoryReceiveChannel[bytes],
    stage_dir: str,
    what: str,
    max_bytes: int,
    on_bytes: Callable[[int], None],
) -> tuple[int, int]:
    """Worker thread: channel -> decompressor -> staging tree. (tar bytes, entries)."""
    raw = io.BufferedReader(_ChannelReader(receive, on_bytes), buffer_size=_PIECE)
    try:
        inner = _decompressed(raw, what)
        tar = _Counted(inner)
        result = stage_tar(
            io.BufferedReader(tar, buffer_size=1 << 16), stage_dir, layer=what,
            max_layer_bytes=max_bytes,
        )  # fmt: skip
        while raw.read(_PIECE):  # the rest (a checked stream ends in its check)
            pass
    except (OSError, EOFError, zstandard.ZstdError) as exc:
        # gzip/zstd corruption or a stream cut short (the digest error wins, see below).
        raise FormatError(f"{what}: cannot decompress: {exc}") from exc
    return tar.count, result.entries


async def stage_layer(
    client: RegistryClient,
    src: Reference,
    desc: dict[str, Any],
    stage_dir: str,
    what: str,
    max_layer_bytes: int,
    progress: ProgressFn,
) -> tuple[int, int]:
    """Stream one layer blob into ``stage_dir``; the network side and the unpacking
    side run at once, a few MiB apart at most."""
    blob = client.blob(src, desc)
    send, receive = trio.open_memory_channel[bytes](4)
    producer_error: list[BaseException] = []

    async def produce() -> None:
        try:
            async with send:
                await blob.stream(send.send, piece_size=_PIECE)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the unpacking side stopped first; its error is the one to report
        except Exception as exc:
            producer_error.append(exc)

    def on_bytes(n: int) -> None:
        progress(what, "unpack", n, desc["size"])

    consumer_error: BaseException | None = None
    result = (0, 0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(produce)
        try:
            result = await trio.to_thread.run_sync(
                _stage_from, receive, stage_dir, what, max_layer_bytes, on_bytes
            )
        except LazyErofsError as exc:
            consumer_error = exc
        finally:
            await receive.aclose()
    # Bytes that failed their digest explain any unpacking error they caused.
    if producer_error:
        raise producer_error[0]
    if consumer_error is not None:
        raise consumer_error
    return result
