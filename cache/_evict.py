"""Scanning the directory and evicting from it (stateless; the cache holds
the locks and the counters).

Recency lives in each entry's atime, so a scan is the whole truth about what
is on disk and what was used last, shared by every process for free. One
scan at a time runs across processes (the cache holds an flock on ``lock``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import time
from collections.abc import Callable
from typing import NamedTuple

from cache._dirs import DIR_FLAGS, PATH_FLAGS
from cache._entry import HEADER_SIZE, is_hex_name

__all__ = [
    "LOW_WATER",
    "RESCAN_DIVISOR",
    "STALE_TMP_SECONDS",
    "CacheEntry",
    "Eviction",
    "Scanned",
    "evict_oldest",
    "listing",
    "remove_stale_tmp",
    "scan",
    "unlink_entry",
]

log = logging.getLogger(__name__)

# Eviction frees down to this share of the budget, so it runs in batches
# rather than on every put once the cache is full.
LOW_WATER = 0.9
# A process rescans after writing this share of the budget, so entries added
# by other processes sharing the directory count against the budget too.
RESCAN_DIVISOR = 8
# Temp files older than this belong to a writer that died mid-put.
STALE_TMP_SECONDS = 600.0


# Clock skew between processes sharing a cache is not a jump.
_FUTURE_SLACK_NS = 60 * 10**9


class Scanned(NamedTuple):
    atime_ns: int
    disk_size: int
    sub: str  # the chunks/ subdirectory it was found in
    name: str


class CacheEntry(NamedTuple):
    """One entry as ``cache ls`` shows it: data size (header excluded), last use."""

    key_hex: str
    size: int
    atime: float


class Eviction(NamedTuple):
    """What one pass left on disk and what it removed."""

    total: int
    entries: int
    freed: int
    evicted: int


def scan(chunks: int, on_link: Callable[[str], None]) -> list[Scanned]:
    """Every regular file with an entry's name under ``chunks/xx/``.

    A fan-out directory that is a symbolic link is reported to ``on_link``
    (its name) and skipped, never followed.
    """
    found: list[Scanned] = []
    # A fresh open of the directory for each listing: descriptors shared
    # with another thread's scandir would share its read position.
    try:
        top = os.open(".", DIR_FLAGS, dir_fd=chunks)
    except OSError:
        return found
    try:
        with os.scandir(top) as it:
            subs = [(e.name, e.is_symlink()) for e in it if len(e.name) == 2 and is_hex_name(e.name)]
    finally:
        os.close(top)
    for sub, is_link in subs:
        if is_link:
            on_link(sub)
            continue
        try:
            fd = os.open(sub, DIR_FLAGS, dir_fd=chunks)
        except OSError:
            continue  # a plain file, or gone meanwhile
        try:
            with os.scandir(fd) as it:
                for e in it:
                    if not is_hex_name(e.name):
                        continue
                    try:
                        st = e.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    if stat.S_ISREG(st.st_mode):
                        found.append(Scanned(st.st_atime_ns, st.st_size, sub, e.name))
        except FileNotFoundError:
            continue
        finally:
            os.close(fd)
    return found


def listing(scanned: list[Scanned]) -> list[CacheEntry]:
    """``scanned`` as :class:`CacheEntry`, most recently used first."""
    found = [CacheEntry(s.name, max(s.disk_size - HEADER_SIZE, 0), s.atime_ns / 1e9) for s in scanned]
    found.sort(key=lambda e: e.atime, reverse=True)
    return found


def unlink_entry(chunks: int, s: Scanned) -> None:
    sub = os.open(s.sub, PATH_FLAGS, dir_fd=chunks)
    try:
        os.unlink(s.name, dir_fd=sub)
    finally:
        os.close(sub)


def evict_oldest(chunks: int, scanned: list[Scanned], budget: int, *, display: str) -> Eviction:
    """Over ``budget``, remove the least recently used entries until the
    total is at :data:`LOW_WATER` of it (headroom, so the next puts do not
    each trigger a scan). Sorts ``scanned`` in place."""
    total = sum(s.disk_size for s in scanned)
    entries = len(scanned)
    freed = evicted = 0
    if total > budget:
        target = int(budget * LOW_WATER)
        # Oldest atime first. An atime in the future is a use from before the
        # wall clock went back: older than any use since, so it goes first
        # (else a jump back would make every new entry the first evicted).
        now = time.time_ns() + _FUTURE_SLACK_NS
        scanned.sort(key=lambda s: (s.atime_ns <= now, s.atime_ns))
        for s in scanned:
            if total <= target:
                break
            try:
                unlink_entry(chunks, s)
            except FileNotFoundError:
                pass  # removed by someone else meanwhile
            except OSError as exc:
                log.warning("chunk cache %s: cannot evict: %s", display, exc.strerror or exc)
                break
            else:
                freed += s.disk_size
                evicted += 1
            total -= s.disk_size
            entries -= 1
    return Eviction(total, entries, freed, evicted)


def remove_stale_tmp(tmp_dir: int, age: float = STALE_TMP_SECONDS) -> None:
    """Remove temp files of writers that died mid-put (older than ``age``)."""
    cutoff = time.time() - age
    try:
        fd = os.open(".", DIR_FLAGS, dir_fd=tmp_dir)
    except OSError:
        return
    try:
        with os.scandir(fd) as it:
            for e in it:
                with contextlib.suppress(OSError):
                    if e.stat(follow_symlinks=False).st_mtime < cutoff:
                        os.unlink(e.name, dir_fd=fd)  # a link goes, its target stays
    finally:
        os.close(fd)
