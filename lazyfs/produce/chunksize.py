"""Chunk size by measurement: what ``--chunk-size auto`` picks, and why.

Small frames fetch fewer bytes a start does not need; large frames need fewer
requests (each paying a round trip) and a smaller chunk table. Which wins
depends on the image, on what a start reads of it and on the link, so the
size is measured rather than guessed. The model, kept simple on purpose:

* **Candidates**: frame sizes 64 KiB, 128 KiB, ... 4 MiB (powers of two).
* **What a start reads** ("touched" byte ranges of the raw image):

  - with a profile, the ranges it recorded: its frames times its own frame
    size (after a profile-guided layout, where those bytes now lie). A
    profile recorded in frames of F bytes cannot tell candidates below F
    apart from F itself: they are judged on whole F-sized ranges;
  - without one, a stated default: the superblock, the shared xattrs and
    every directory (its inode and blocks: path lookups walk them), found
    by parsing the image and rounded out to whole blocks as the kernel
    reads them, plus :data:`DEFAULT_DATA_FRACTION` (10%) of everything else
    (file inodes and data), as reads of :data:`DEFAULT_READ_BYTES`
    (128 KiB, one kernel readahead window) spread evenly through it. Not
    "all metadata": mkfs.erofs 1.5 interleaves file inodes with data, so
    they lie all over a plain image while a start looks up only some.
    Real starts read clustered rather than evenly, so where frames are
    large this default overstates what they fetch.

* **Per candidate** the image is cut and compressed exactly as
  :func:`lazyfs.format.encode_image` does it (same zstd parameters and
  level), but only the frames covering touched ranges, in threads. Then::

      fetched  = compressed size of those frames + the chunk table
                 (23 + N * 72 bytes, which every mount reads)
      requests = number of those frames (one request per frame missed, as a
                 demand read does; the merging of adjacent frames that a
                 profile replay does is not modelled)
      seconds  = fetched * 8 / bandwidth
               + requests * RTT / parallelism     (parallelism: 4 in flight)
               + requests * FRAME_OVERHEAD_S + decoded bytes / DECODE_BYTES_PER_S

* **Pick** the smallest estimate; candidates within :data:`TIE_TOLERANCE`
  (1%) of it are a tie, and a tie goes to the larger frame (smaller table,
  fewer frames to track).
* **Bound**: a candidate whose chunk table would exceed
  :data:`DEFAULT_TABLE_BUDGET` (a quarter of the reader's
  :data:`~lazyfs.format.seekable.MAX_TABLE_SIZE`) is not eligible.

Everything is a function of the image bytes, the touched ranges, the level
and the link, so the same inputs always give the same choice (and, through
the encoder, the same blob).
"""

from __future__ import annotations

import argparse
import bisect
import concurrent.futures
import contextlib
import math
import mmap
import os
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from lazyfs.errors import FormatError
from lazyfs.format.seekable import _ENTRY_OFFSET, _HEADER, _SKIP_HEADER, MAX_TABLE_SIZE
from lazyfs.units import format_size, parse_size

__all__ = [
    "AUTO",
    "CANDIDATES",
    "DEFAULT_LINK",
    "Candidate",
    "ChunkChoice",
    "Link",
    "choose_chunk_size",
    "default_touched",
    "parse_chunk_size",
    "parse_link",
    "profile_basis",
    "table_lines",
]

AUTO = "auto"
CANDIDATES = tuple((64 << 10) << i for i in range(7))  # 64 KiB .. 4 MiB
DEFAULT_PARALLELISM = 4  # requests in flight the estimate assumes
DEFAULT_DATA_FRACTION = 0.10  # of the file data, read by a start without a profile
DEFAULT_READ_BYTES = 128 << 10  # one read of that default: a readahead window
# Per frame fetched, besides the network: request bookkeeping, a thread hop
# and a cache file; then SHA-512, decompression and the cache write per byte.
FRAME_OVERHEAD_S = 0.0005
DECODE_BYTES_PER_S = 500e6
TIE_TOLERANCE = 0.01
DEFAULT_TABLE_BUDGET = MAX_TABLE_SIZE // 4
_ENTRY_BYTES = _ENTRY_OFFSET.size + 64  # offset + SHA-512, as the encoder writes


@dataclass(frozen=True)
class Link:
    """The link the estimate plans for."""

    rtt_ms: float = 20.0
    mbit: float = 100.0
    parallelism: int = DEFAULT_PARALLELISM

    def __str__(self) -> str:
        return f"{self.rtt_ms:g} ms/{self.mbit:g} Mbit/s, {self.parallelism} requests in flight"


DEFAULT_LINK = Link()


def parse_link(text: str) -> Link:
    """``"RTT_MS/MBIT"`` (e.g. ``"20/100"``) -> :class:`Link`; for ``--link``.

    Raises:
        argparse.ArgumentTypeError: not two numbers, RTT < 0 or bandwidth <= 0.
    """
    parts = text.split("/")
    try:
        if len(parts) != 2:
            raise ValueError
        rtt, mbit = float(parts[0]), float(parts[1])
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not RTT_MS/MBIT, e.g. 20/100") from None
    if not (math.isfinite(rtt) and math.isfinite(mbit)) or rtt < 0 or mbit <= 0:
        raise argparse.ArgumentTypeError(
            f"{text!r}: the RTT must be >= 0 ms and the bandwidth > 0 Mbit/s"
        )
    return Link(rtt, mbit)


def parse_chunk_size(text: str) -> int | str:
    """A size (``"1MiB"``) or ``"auto"``; for ``--chunk-size``."""
    if text.strip().lower() == AUTO:
        return AUTO
    return parse_size(text)


@dataclass(frozen=True)
class Candidate:
    """One frame size, estimated."""

    chunk_size: int
    frames: int  # frames of the whole image
    touched_frames: int  # frames covering touched ranges: the requests
    fetched_bytes: int  # their compressed size
    table_bytes: int  # the chunk table's skippable frame
    seconds: float
    eligible: bool = True  # False: the table is over the budget

    def to_json(self) -> dict[str, Any]:
        return {
            "chunk_size": self.chunk_size,
            "frames": self.frames,
            "touched_frames": self.touched_frames,
            "fetched_bytes": self.fetched_bytes,
            "table_bytes": self.table_bytes,
            "seconds": round(self.seconds, 4),
            "eligible": self.eligible,
        }


@dataclass(frozen=True)
class ChunkChoice:
    """What :func:`choose_chunk_size` picked, with everything behind it."""

    chunk_size: int
    link: Link
    image_size: int
    touched_bytes: int  # raw bytes of the touched ranges
    basis: str  # where the touched ranges came from, in words
    candidates: tuple[Candidate, ...]

    @property
    def chosen(self) -> Candidate:
        return next(c for c in self.candidates if c.chunk_size == self.chunk_size)

    def why(self) -> str:
        """One line: the size, its estimate and the numbers behind it, the
        estimates of its neighbours, and what the start was assumed to read."""
        best = self.chosen
        i = self.candidates.index(best)
        others = [
            f"{format_size(c.chunk_size)} {c.seconds:.2f} s"
            + ("" if c.eligible else " (table too big)")
            for c in (
                self.candidates[i - 1] if i else None,
                self.candidates[i + 1] if i + 1 < len(self.candidates) else None,
            )
            if c is not None
        ]
        return (
            f"chunk size auto: {format_size(best.chunk_size)}: est. {best.seconds:.2f} s to fetch "
            f"what a start reads ({best.touched_frames} frames, {format_size(best.fetched_bytes)} "
            f"+ {format_size(best.table_bytes)} chunk table) on {self.link}"
            + (f"; {', '.join(others)}" if others else "")
            + f"; reads: {self.basis}"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "chunk_size": self.chunk_size,
            "why": self.why(),
            "link": {
                "rtt_ms": self.link.rtt_ms,
                "mbit": self.link.mbit,
                "parallelism": self.link.parallelism,
            },
            "image_size": self.image_size,
            "touched_bytes": self.touched_bytes,
            "basis": self.basis,
            "candidates": [c.to_json() for c in self.candidates],
        }

    def table_lines(self) -> list[str]:
        return table_lines(self.to_json())


def table_lines(choice: dict[str, Any]) -> list[str]:
    """The candidates of a :meth:`ChunkChoice.to_json` as a small text table
    (the chosen one starred): for ``--verbose``."""
    out = [
        f"  {'chunk':>10} {'frames':>8} {'touched':>8} {'fetched':>11} {'table':>11} {'est. s':>8}"
    ]
    for c in choice["candidates"]:
        mark = "*" if c["chunk_size"] == choice["chunk_size"] else " "
        note = "" if c["eligible"] else "  table over budget"
        out.append(
            f"{mark} {format_size(c['chunk_size']):>10} {c['frames']:>8} {c['touched_frames']:>8} "
            f"{format_size(c['fetched_bytes']):>11} {format_size(c['table_bytes']):>11} {c['seconds']:>8.2f}{note}"
        )
    return out


# ------------------------------------------------------------ touched ranges


def _merge(ranges: Iterable[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    """Sorted, clipped to [0, size), overlapping and adjacent ranges joined."""
    out: list[tuple[int, int]] = []
    for s, e in sorted((max(0, s), min(size, e)) for s, e in ranges):
        if e <= s:
            continue
        if out and s <= out[-1][1]:
            if e > out[-1][1]:
                out[-1] = (out[-1][0], e)
        else:
            out.append((s, e))
    return out


def _directory_ranges(image_path: str | os.PathLike[str]) -> tuple[list[tuple[int, int]], int]:
    """(ranges of the superblock, shared xattrs and every directory's inode
    and blocks, rounded out to whole blocks; the block size) of an
    uncompressed EROFS image, parsed through a read-only mapping (a big image
    is not read into memory)."""
    from lazyfs.produce.layout import ErofsImage

    with open(image_path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise FormatError(f"{os.fspath(image_path)}: empty image")
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    view = memoryview(mm)
    image = None
    try:
        image = ErofsImage(view, name=os.fspath(image_path))
        B = image.block
        meta: list[tuple[int, int]] = [(0, image.sb_end)]
        for inode in image.inodes.values():
            if inode.is_dir:
                meta.append((inode.offset, inode.offset + len(inode.head) + len(inode.tail)))
                meta.append((inode.blkaddr * B, (inode.blkaddr + inode.nblocks) * B))
        span = image.shared_xattr_span()
        if span:
            meta.append((image.xattr_blkaddr * B, image.xattr_blkaddr * B + span))
        return [(s // B * B, -(-e // B) * B) for s, e in meta], B
    finally:
        if image is not None:
            image.data.release()
        view.release()
        with contextlib.suppress(BufferError):
            mm.close()


def default_touched(
    image_path: str | os.PathLike[str],
    *,
    fraction: float = DEFAULT_DATA_FRACTION,
    read_bytes: int = DEFAULT_READ_BYTES,
) -> tuple[list[tuple[int, int]], str]:
    """The touched ranges assumed without a profile (see the module), and
    that assumption in words for the why-line."""
    size = os.path.getsize(image_path)
    try:
        meta, _block = _directory_ranges(image_path)
        meta_what = "directories"
    except FormatError:
        # Not an image the parser walks (compressed EROFS, say): the first
        # block stands in for the metadata.
        meta, meta_what = [(0, min(size, 4096))], "first block (directories not parsed)"
    meta = _merge(meta, size)
    # The rest: everything between the directory ranges.
    rest, at = [], 0
    for s, e in meta:
        if s > at:
            rest.append((at, s))
        at = e
    if at < size:
        rest.append((at, size))
    rest_total = sum(e - s for s, e in rest)
    runs: list[tuple[int, int]] = []
    if rest_total and fraction > 0:
        count = max(1, math.ceil(fraction * rest_total / read_bytes))
        step = rest_total / count
        starts, cum = [], 0
        for s, e in rest:
            starts.append(cum)
            cum += e - s
        for k in range(count):
            # the k-th read, centred in its step, in "rest" coordinates
            lo = int(k * step + max(0.0, step - read_bytes) / 2)
            hi = min(rest_total, lo + read_bytes)
            i = bisect.bisect_right(starts, lo) - 1
            while lo < hi:
                s, e = rest[i]
                pos = s + lo - starts[i]
                take = min(hi - lo, e - pos)
                runs.append((pos, pos + take))
                lo += take
                i += 1
    meta_bytes = sum(e - s for s, e in meta)
    run_bytes = sum(e - s for s, e in _merge(runs, size))
    basis = (
        f"no profile, assumed the {meta_what} ({format_size(meta_bytes)}) + {fraction:.0%} of the other "
        f"{format_size(rest_total)} as {format_size(read_bytes)} reads spread evenly ({format_size(run_bytes)})"
    )
    return _merge(meta + runs, size), basis


# ------------------------------------------------------------ the estimate


def _frames_covering(ranges: Sequence[tuple[int, int]], chunk: int) -> list[int]:
    frames: set[int] = set()
    for s, e in ranges:
        frames.update(range(s // chunk, (e - 1) // chunk + 1))
    return sorted(frames)


def _table_bytes(frames: int) -> int:
    return _SKIP_HEADER.size + _HEADER.size + frames * _ENTRY_BYTES


def choose_chunk_size(
    image_path: str | os.PathLike[str],
    *,
    touched: Sequence[tuple[int, int]] | None = None,
    basis: str | None = None,
    link: Link = DEFAULT_LINK,
    level: int = 3,
    workers: int | None = None,
    candidates: Sequence[int] = CANDIDATES,
    table_budget: int = DEFAULT_TABLE_BUDGET,
) -> ChunkChoice:
    """Pick the frame size for the raw EROFS image at ``image_path`` (see the module).

    Args:
        touched: byte ranges of the image a start reads (from a profile);
            None or empty: the default of :func:`default_touched`.
        basis: those ranges' origin in words, for the why-line.
        level: the zstd level the blob will be encoded at.
        table_budget: the largest chunk table (skippable frame included) a
            candidate may need.

    Raises:
        FormatError: no candidate's chunk table fits ``table_budget``.
    """
    import zstandard  # only here: the CLI parsers import this module

    size = os.path.getsize(image_path)
    ranges = _merge(touched or (), size)
    if ranges:
        basis = basis or f"{len(ranges)} given ranges"
    else:
        ranges, basis = default_touched(image_path)
    touched_bytes = sum(e - s for s, e in ranges)
    sizes = sorted(set(candidates))
    needed = {c: _frames_covering(ranges, c) for c in sizes}
    local = threading.local()

    def compressed(fd: int, chunk: int, i: int) -> int:
        if not hasattr(local, "cctx"):  # the encoder's parameters, so the sizes are the blob's
            local.cctx = zstandard.ZstdCompressor(
                level=level, write_checksum=True, write_content_size=True
            )
        return len(local.cctx.compress(os.pread(fd, chunk, i * chunk)))

    workers = workers or min(4, os.cpu_count() or 1)
    fetched: dict[int, int] = {}
    fd = os.open(image_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            for c in sizes:
                if _table_bytes(-(-size // c)) > table_budget:
                    continue  # not eligible: no need to measure it
                fetched[c] = sum(pool.map(lambda i, c=c: compressed(fd, c, i), needed[c]))
    finally:
        os.close(fd)
    bandwidth = link.mbit * 1e6 / 8  # bytes per second
    out: list[Candidate] = []
    for c in sizes:
        n = -(-size // c)
        requests = len(needed[c])
        table = _table_bytes(n)
        got = fetched.get(c, 0)
        decoded = sum(min(c, size - i * c) for i in needed[c])  # the last frame may be short
        seconds = (
            (got + table) / bandwidth
            + requests * link.rtt_ms / 1000 / link.parallelism
            + requests * FRAME_OVERHEAD_S
            + decoded / DECODE_BYTES_PER_S
        )
        out.append(Candidate(c, n, requests, got, table, seconds, c in fetched))
    eligible = [c for c in out if c.eligible]
    if not eligible:
        raise FormatError(
            f"{os.fspath(image_path)}: {format_size(size)} is too large for --chunk-size auto "
            f"(even {format_size(sizes[-1])} frames need a chunk table over {format_size(table_budget)}); "
            "give --chunk-size"
        )
    best = min(c.seconds for c in eligible)
    pick = max(c.chunk_size for c in eligible if c.seconds <= best * (1 + TIE_TOLERANCE))
    return ChunkChoice(pick, link, size, touched_bytes, basis, tuple(out))


def profile_basis(ranges: Sequence[tuple[int, int]], what: str = "profile") -> str:
    """The why-line's words for touched ranges that came from a profile."""
    merged = _merge(ranges, 1 << 62)
    return f"{what}, {format_size(sum(e - s for s, e in merged))} in {len(merged)} ranges"
