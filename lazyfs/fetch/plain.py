"""A plain (uncompressed) EROFS layer, served only once its whole blob has
matched the descriptor's digest (:class:`PlainFile`, a
:class:`~lazyfs.fetch.files.Layer`)."""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from typing import IO

import trio

from lazyfs.errors import FetchError, IntegrityError, LazyErofsError
from lazyfs.fetch.context import ReadSettings
from lazyfs.fetch.source import CountingSource
from lazyfs.format import seekable

__all__ = ["PLAIN_PIECE_BYTES", "PlainFile"]

log = logging.getLogger(__name__)

# A plain layer's blob is fetched (and hashed) this many bytes per request.
PLAIN_PIECE_BYTES = 8 << 20


class PlainFile:
    """A plain EROFS layer, served only once its whole blob has matched the
    descriptor's digest.

    This media type has no per-range checksum: the one thing that vouches
    for its bytes is the blob digest in the manifest, and a digest can only
    be checked over the whole blob. So the first read starts one fetch of
    the whole blob, in :data:`PLAIN_PIECE_BYTES` requests hashed as they
    arrive and written to an unlinked 0600 spool file (in ``spool_dir``, the
    cache directory, so a large layer lands on disk rather than in RAM);
    every read waits until the digest has matched and is then served from
    the spool. A mismatch fails every read of the layer (EIO) for the life of
    the mount, without refetching.

    Why this and not the alternatives: refusing plain layers would make a
    valid image unusable; serving range reads unverified breaks the promise
    that no unverified byte reaches a reader; keeping verified pieces in the
    chunk cache would let one evicted piece force a whole-blob refetch with
    a different lifetime than its siblings. The price is one whole-blob
    download before the first byte, and that much temporary disk.

    Progress survives a failed or timed-out attempt (only whole pieces are
    kept), so a later read resumes rather than restarts. With a background
    nursery (:meth:`start`) the fetch outlives the reader that started it;
    without one, it runs in the reader's task, bounded by its timeout.
    """

    verified = True  # nothing is served before the digest matched

    def __init__(
        self,
        name: str,
        desc: seekable.LayerDescriptor,
        source: CountingSource,
        settings: ReadSettings,
        *,
        spool_dir: str | os.PathLike[str] | None = None,
        piece_bytes: int = PLAIN_PIECE_BYTES,
    ) -> None:
        self.name = name
        self.desc = desc
        self.source = source
        self.read_timeout = settings.read_timeout
        self.spool_dir = os.fspath(spool_dir) if spool_dir is not None else None
        self.piece_bytes = piece_bytes
        self.stats = source.stats
        algo = desc.digest.split(":", 1)[0]
        self._hash = hashlib.new(algo)
        self._done = 0  # blob bytes fetched, hashed and spooled so far
        self._spool: IO[bytes] | None = None  # an unlinked temporary file
        self._ready = trio.Event()  # set once the digest matched
        self._failed: IntegrityError | None = None  # sticky: the blob is bad
        self._attempt: trio.Event | None = None  # set when the running attempt ends
        self._last_error: LazyErofsError | None = None
        self._nursery: trio.Nursery | None = None

    @property
    def size(self) -> int:
        return self.desc.size

    @property
    def frames_total(self) -> int:
        return 0

    @property
    def frames_present(self) -> int:
        return 0

    def start(self, nursery: trio.Nursery) -> None:
        """Run the whole-blob fetch in ``nursery`` from now on."""
        self._nursery = nursery

    async def prefetch(self) -> int:
        return 0  # the blob is fetched whole on the first read

    def touched(self) -> list[tuple[int, int, int]]:
        return []  # no frames

    def close(self) -> None:
        if self._spool is not None:
            self._spool.close()
            self._spool = None

    async def read(self, offset: int, size: int) -> bytes:
        end = min(offset + size, self.size)
        if offset >= end:
            return b""
        try:
            with trio.fail_after(self.read_timeout):
                await self._verified()
                spool = self._spool
                assert spool is not None
                data = await trio.to_thread.run_sync(os.pread, spool.fileno(), end - offset, offset)
        except trio.TooSlowError as exc:
            self.stats.read_errors += 1
            raise FetchError(
                f"{self.name}: plain layer not verified within {self.read_timeout:g}s "
                f"({self._done} of {self.size} blob bytes fetched and hashed so far; "
                "no byte is served before the whole blob matches its digest)"
            ) from exc
        except LazyErofsError:
            self.stats.read_errors += 1
            raise
        if len(data) != end - offset:
            self.stats.read_errors += 1
            raise FetchError(f"{self.name}: short read of the verified spool at {offset}")
        return data

    async def _verified(self) -> None:
        """Return once the whole blob matched its digest; raise if it did not."""
        while not self._ready.is_set():
            if self._failed is not None:
                raise self._failed
            if self._attempt is None:
                self._attempt = trio.Event()
                if self._nursery is not None:
                    self._nursery.start_soon(self._fetch_all)
                else:
                    await self._fetch_all()  # ends the attempt, even on error
            if self._attempt is not None:
                await self._attempt.wait()
            # An attempt abandoned by its reader leaves no error: try again.
            if not self._ready.is_set() and self._failed is None and self._last_error is not None:
                raise self._last_error

    async def _fetch_all(self) -> None:
        """One attempt at the rest of the blob; always ends the attempt."""
        attempt = self._attempt
        assert attempt is not None
        self._last_error = None
        try:
            await self._fetch_rest()
        except IntegrityError as exc:
            self._failed = exc
            self.stats.verify_failures += 1
            log.error("%s", exc)
            self.close()
        except LazyErofsError as exc:
            self._last_error = exc
            log.warning("%s", exc)
        except trio.Cancelled:
            log.info("%s: fetch of the plain blob paused at byte %d", self.name, self._done)
            raise
        except OSError as exc:
            self._last_error = FetchError(f"{self.name}: cannot spool the plain blob: {exc}")
            log.warning("%s", self._last_error)
        finally:
            self._attempt = None
            attempt.set()

    async def _fetch_rest(self) -> None:
        if self._spool is None:
            self._spool = await trio.to_thread.run_sync(self._open_spool)
        while self._done < self.size:
            length = min(self.piece_bytes, self.size - self._done)
            try:
                with trio.fail_after(self.read_timeout):
                    piece = await self.source.read(self._done, length)
            except trio.TooSlowError as exc:
                raise FetchError(
                    f"{self.name}: {length} bytes at {self._done} of the plain blob not fetched "
                    f"within {self.read_timeout:g}s"
                ) from exc
            if len(piece) != length:
                raise FetchError(f"{self.name}: got {len(piece)} of {length} bytes at {self._done}")
            await trio.to_thread.run_sync(self._absorb, piece)
        actual = f"{self._hash.name}:{self._hash.hexdigest()}"
        if actual != self.desc.digest:
            raise IntegrityError(
                f"{self.name}: plain blob digest {actual[:23]}... does not match the descriptor's "
                f"{self.desc.digest[:23]}...; nothing of this layer is served"
            )
        self._ready.set()
        log.info("%s: plain blob of %d bytes matched its digest", self.name, self.size)

    def _open_spool(self) -> IO[bytes]:
        # TemporaryFile: O_TMPFILE where it can (no name ever), else created
        # 0600 and unlinked at once.
        return tempfile.TemporaryFile(dir=self.spool_dir, prefix=".lazyerofs-plain-")

    def _absorb(self, piece: bytes) -> None:
        """Spool and hash one piece; progress moves only once both are done."""
        assert self._spool is not None
        written = os.pwrite(self._spool.fileno(), piece, self._done)
        if written != len(piece):
            raise OSError(f"short write to the spool ({written} of {len(piece)} bytes)")
        self._hash.update(piece)
        self._done += len(piece)
