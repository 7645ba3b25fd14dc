"""Where a layer's bytes come from, and the one place they are counted.

:class:`BlobSource` is all a layer needs from the network: exact byte ranges
of one blob (a registry's :class:`lazyfs.oci.RemoteBlob`, or a
:class:`FileSource` for a blob on disk). :class:`CountingSource` wraps one for
a layer: every byte fetched for it (chunk table, frames, plain-layer pieces,
the dm-verity tail) passes through its ``read``, which counts requests and
bytes in the layer's :class:`LayerStats` and feeds the mount's
:class:`~lazyfs.fetch.policy.LinkEstimate`.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, TypeVar

import trio

from lazyfs.errors import FetchError
from lazyfs.fetch.policy import LinkEstimate

if TYPE_CHECKING:
    from lazyfs.oci.blob import BlobSpec

T = TypeVar("T")

__all__ = ["BlobSource", "CountingSource", "FileSource", "LayerStats"]


class BlobSource(Protocol):
    """What a layer needs from the network: exact byte ranges of one blob."""

    @property
    def size(self) -> int: ...

    async def read(self, offset: int, length: int) -> bytes: ...


@dataclass
class LayerStats:
    """Counters of one layer; the daemon sums them for ``lazyerofs stats``."""

    bytes_fetched: int = 0
    requests: int = 0
    frames_fetched: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    verify_failures: int = 0
    read_errors: int = 0
    fetched_frames: set[int] = field(default_factory=set)


class CountingSource:
    """A layer's view of its blob: every request through here is counted
    (``stats.requests``, ``stats.bytes_fetched``) and timed into ``link``."""

    def __init__(self, source: BlobSource, stats: LayerStats, link: LinkEstimate) -> None:
        self.source = source
        self.stats = stats
        self.link = link

    @property
    def size(self) -> int:
        return self.source.size

    def remote(self) -> BlobSpec | None:
        """The blob as a fetch worker opens it (:mod:`lazyfs.fetch.offload`),
        or None when it is not a registry blob (a file, a test double)."""
        spec = getattr(self.source, "spec", None)
        return spec() if callable(spec) else None

    async def counted(self, fetch: Callable[[], Awaitable[tuple[int, int, T]]]) -> T:
        """Count and time a fetch done elsewhere (a fetch worker): ``fetch``
        returns (requests, bytes received, its result)."""
        started = self.link.begin()
        nbytes = 0
        try:
            requests, nbytes, result = await fetch()
        finally:
            self.link.end(started, nbytes)
        self.stats.requests += requests
        self.stats.bytes_fetched += nbytes
        return result

    async def read(self, offset: int, length: int) -> bytes:
        self.stats.requests += 1
        # Timed together with the mount's other requests: they share the link.
        started = self.link.begin()
        nbytes = 0
        try:
            data = await self.source.read(offset, length)
            nbytes = len(data)
        finally:
            self.link.end(started, nbytes)
        self.stats.bytes_fetched += nbytes
        return data


class FileSource:
    """Exact byte ranges of a local blob file, read in a worker thread (for
    tests, air-gapped use and ``lazyerofs verify`` of a blob on disk)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        self.size = os.fstat(self._fd).st_size

    async def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or offset + length > self.size:
            raise FetchError(f"{self.path}: range {offset}+{length} is outside the {self.size}-byte blob")
        data = await trio.to_thread.run_sync(os.pread, self._fd, length, offset)
        if len(data) != length:
            raise FetchError(f"{self.path}: short read at {offset} ({len(data)} of {length} bytes)")
        return data

    def close(self) -> None:
        os.close(self._fd)
