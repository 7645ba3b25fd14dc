"""Blob sources that are not a registry: a local file (for tests, air-gapped
use and ``lazyerofs verify`` of a blob on disk)."""

from __future__ import annotations

import os

import trio

from lazyfs.errors import FetchError

__all__ = ["FileSource"]


class FileSource:
    """Exact byte ranges of a local blob file, read in a worker thread."""

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
