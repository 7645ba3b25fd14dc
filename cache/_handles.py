"""Descriptors of recently read entries, kept open for range reads.

A small read of a cached frame is one ``pread`` of the bytes asked for; the
open, fstat and header check it would otherwise pay each time are paid once
per entry and kept here (LRU, bounded). Each handle is reference counted so a
descriptor is never closed (and its number reused for another file) while a
thread still reads through it. An entry evicted or found damaged is dropped
from here, so the space of an unlinked file is not held for long.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import OrderedDict

__all__ = ["DEFAULT_OPEN_ENTRIES", "Handle", "OpenEntries"]

# A 2 GiB working set of 4 MiB frames (a random reader reopening entries
# pays a second disk read, for the header), under the usual soft
# RLIMIT_NOFILE of 1024.
DEFAULT_OPEN_ENTRIES = 512


class Handle:
    """One open entry: its descriptor and how many threads are using it."""

    __slots__ = ("fd", "refs", "retired")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.refs = 1
        self.retired = False


class OpenEntries:
    """An LRU of open entry descriptors, at most ``limit`` (0: none kept)."""

    def __init__(self, limit: int = DEFAULT_OPEN_ENTRIES) -> None:
        self.limit = limit
        self._lru: OrderedDict[bytes, Handle] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._lru)

    def acquire(self, key: bytes) -> Handle | None:
        """The open handle of ``key`` (now in use: :meth:`release` it), or None."""
        with self._lock:
            h = self._lru.get(key)
            if h is None:
                return None
            self._lru.move_to_end(key)
            h.refs += 1
            return h

    def add(self, key: bytes, fd: int) -> Handle:
        """Keep ``fd`` as the handle of ``key`` and return it in use. If another
        thread added one meanwhile, that one is returned and ``fd`` closed."""
        with self._lock:
            h = self._lru.get(key)
            if h is not None:
                h.refs += 1
                self._lru.move_to_end(key)
                extra = fd
            else:
                h = self._lru[key] = Handle(fd)
                extra = -1
            retired = []
            while len(self._lru) > max(self.limit, 0):
                _, old = self._lru.popitem(last=False)
                retired.append(old)
                if old is h:
                    break
        if extra >= 0:
            with contextlib.suppress(OSError):
                os.close(extra)
        for old in retired:
            self._retire(old)
        return h

    def release(self, h: Handle) -> None:
        with self._lock:
            h.refs -= 1
            close = h.retired and h.refs == 0
        if close:
            _close(h)

    def drop(self, key: bytes) -> None:
        with self._lock:
            h = self._lru.pop(key, None)
        if h is not None:
            self._retire(h)

    def drop_all(self) -> None:
        with self._lock:
            handles = list(self._lru.values())
            self._lru.clear()
        for h in handles:
            self._retire(h)

    def _retire(self, h: Handle) -> None:
        with self._lock:
            h.retired = True
            close = h.refs == 0
        if close:
            _close(h)


def _close(h: Handle) -> None:
    fd, h.fd = h.fd, -1
    if fd >= 0:
        with contextlib.suppress(OSError):
            os.close(fd)
