"""Profile-guided layout of an uncompressed EROFS image.

mkfs.erofs (erofs-utils 1.5) places data in the order it walks the tree and
has no option to change that, so the image is rewritten after mkfs: every
inode, directory block and data block is read, then written again in a new
order, with the block addresses and node ids (directory entries, the
superblock's ``root_nid``) updated to match::

    [superblock + hot inodes][shared xattrs][hot directory blocks]   <- metadata_bytes
    [hot data blocks, in first-touch order]                          <- hot_end
    [cold inodes][cold directory blocks][cold data, in the old order]

"Hot" comes from a startup profile (byte ranges of the old image, in the
order a recorded start first read them) or a plain list of paths; without
any hint every inode and directory counts as hot (metadata first). Hotness
is per block: a file the recorded start read only part of (a shared
library, a locale archive, a partly read .pyc) is written as a chunk-based
inode with one-block chunks, so its read blocks join the hot part, in the
order they were first read, and the rest stays cold. A file read whole, or
not at all, stays one flat extent. Bytes of files, xattrs, modes, owners,
times, link targets and hard links are copied as they are: the served tree
is the same, only where things lie changes. Same image and same hints give
the same bytes.

Facts used (the kernel's ``erofs_fs.h``, ``inode.c``, ``data.c``): the
superblock is 128 bytes at 1024 (+16 bytes per ``sb_extslots``) and its
CRC-32C covers block 0 from byte 1024; an inode lives at
``meta_blkaddr * block + nid * 32`` and is 32 (compact) or 64 (extended)
bytes, followed by its inline xattrs (``12 + 4 * (icount - 1)`` bytes when
``i_xattr_icount`` is set) and, for FLAT_INLINE, the data's tail, which must
not cross a block boundary; ``i_u`` at byte 16 of either form is the start
block of FLAT_PLAIN / FLAT_INLINE data; a directory block holds 12-byte
entries (nid:u64, nameoff:u16, type:u8, reserved) then the names, the first
``nameoff`` giving the entry count. A CHUNK_BASED inode (datalayout 4, incompat
feature CHUNKED_FILE 0x4) has in ``i_u`` a u16 format: chunk size = block <<
(format & 0x1F), bit 0x20 = 8-byte indexes (u16 advise/startblk_hi, u16
device_id, u32 block) instead of a 4-byte block map; the map starts after
the inode and its xattrs, aligned to its entry size, one entry per chunk,
0xFFFFFFFF for a hole. Compressed files are not handled here (lazyerofs
builds none) and are refused by name.
"""

from __future__ import annotations

import bisect
import hashlib
import os
import stat
import struct
import uuid as uuid_mod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from lazyfs.errors import FormatError
from lazyfs.produce.mkfs import EROFS_MAGIC, EROFS_SUPER_OFFSET, _sb_checksum, set_image_uuid

__all__ = [
    "ErofsImage",
    "Hints",
    "LayoutReport",
    "hints_from_paths",
    "hints_from_ranges",
    "relocate_image",
]

# Superblock field offsets, relative to EROFS_SUPER_OFFSET.
_SB_CHECKSUM = 4
_SB_FEATURE_COMPAT = 8
_SB_BLKSZBITS = 12
_SB_EXTSLOTS = 13
_SB_ROOT_NID = 14
_SB_BLOCKS = 36
_SB_META_BLKADDR = 40
_SB_XATTR_BLKADDR = 44
_SB_FEATURE_INCOMPAT = 80
_SB_EXTRA_DEVICES = 86
_SB_SIZE = 128
_FEATURE_COMPAT_SB_CHKSUM = 0x1
_INCOMPAT_ZERO_PADDING = 0x1  # set by mkfs.erofs even for uncompressed images
_INCOMPAT_CHUNKED_FILE = 0x4
# Incompatible features this rewriter understands.
_INCOMPAT_KNOWN = _INCOMPAT_ZERO_PADDING | _INCOMPAT_CHUNKED_FILE

_LAYOUT_FLAT_PLAIN = 0
_LAYOUT_FLAT_INLINE = 2
_LAYOUT_CHUNK_BASED = 4
_LAYOUT_NAMES = {1: "compressed", 3: "compressed (compact)"}
_CHUNK_BLKBITS_MASK = 0x1F
_CHUNK_INDEXES = 0x20
_NULL_ADDR = 0xFFFFFFFF  # a hole in a chunk map
_HOLE = -1  # a hole, in _Inode.blocks
_SLOT = 32  # inode slot size: nid = byte offset / 32
_DIRENT = 12
_I_U = 16  # i_u (raw_blkaddr, or the chunk format) in both inode forms
_MAX_INODES = 1 << 24  # far past any real layer; a hostile image stops here
_MAX_FILE_BLOCKS = 1 << 26  # a sparse chunk-based file larger than this is refused
_INF = float("inf")


@dataclass
class _Inode:
    nid: int
    offset: int  # byte offset in the old image
    head: bytes  # inode + inline xattrs, as stored
    layout: int
    mode: int
    size: int
    blocks: list[int]  # old address of each whole data block in file order (_HOLE: zeros)
    tail: bytes  # FLAT_INLINE: the data's last piece, stored after head
    shared_xattrs: tuple[int, ...]
    path: str
    order: int  # DFS preorder position (the tree's own order)
    map_len: int = 0  # CHUNK_BASED: bytes of its chunk map after head (alignment included)
    children: list[int] = field(default_factory=list)  # nids, directories only
    dirents: list[int] = field(default_factory=list)  # byte positions of nid fields in the dir's data

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def nblocks(self) -> int:
        return len(self.blocks)

    @property
    def blkaddr(self) -> int:
        """First data block (the whole extent's start for a flat file)."""
        return self.blocks[0] if self.blocks else 0


class ErofsImage:
    """An uncompressed EROFS image, parsed: superblock, every inode reachable
    from the root, directory entries. Every offset is checked against the
    image, so a malformed one gives FormatError, never an IndexError."""

    def __init__(self, data: bytes | bytearray | memoryview, *, name: str = "image") -> None:
        self.data = memoryview(data)
        self.name = name
        if len(data) < EROFS_SUPER_OFFSET + _SB_SIZE:
            raise FormatError(f"{name}: too short for an EROFS superblock")
        sb = EROFS_SUPER_OFFSET
        (magic,) = struct.unpack_from("<I", data, sb)
        if magic != EROFS_MAGIC:
            raise FormatError(f"{name}: not an EROFS image (no superblock magic)")
        bits = data[sb + _SB_BLKSZBITS]
        if not 9 <= bits <= 16:
            raise FormatError(f"{name}: block size 2^{bits} is not supported")
        self.blkszbits = bits
        self.block = 1 << bits
        if self.block < EROFS_SUPER_OFFSET + _SB_SIZE:
            raise FormatError(f"{name}: block size {self.block} cannot hold the superblock")
        self.extslots = data[sb + _SB_EXTSLOTS]
        self.sb_end = sb + _SB_SIZE + 16 * self.extslots
        self.root_nid = struct.unpack_from("<H", data, sb + _SB_ROOT_NID)[0]
        self.blocks = struct.unpack_from("<I", data, sb + _SB_BLOCKS)[0]
        self.meta_blkaddr, self.xattr_blkaddr = struct.unpack_from("<II", data, sb + _SB_META_BLKADDR)
        incompat = struct.unpack_from("<I", data, sb + _SB_FEATURE_INCOMPAT)[0]
        if incompat & ~_INCOMPAT_KNOWN:
            raise FormatError(
                f"{name}: EROFS incompatible features {incompat:#x} (compression, devices...) "
                "are not supported by the layout rewriter; build the image uncompressed"
            )
        if struct.unpack_from("<H", data, sb + _SB_EXTRA_DEVICES)[0]:
            raise FormatError(f"{name}: images with extra devices are not supported")
        if self.blocks * self.block > len(data):
            raise FormatError(f"{name}: superblock says {self.blocks} blocks, the image has {len(data) // self.block}")
        self.inodes: dict[int, _Inode] = {}
        self._walk()

    # ------------------------------------------------------------ reading

    def _bytes(self, offset: int, size: int, what: str) -> bytes:
        if offset < 0 or size < 0 or offset + size > len(self.data):
            raise FormatError(f"{self.name}: {what} lies past the end of the image")
        return bytes(self.data[offset : offset + size])

    def _read_inode(self, nid: int, path: str, order: int) -> _Inode:
        offset = self.meta_blkaddr * self.block + nid * _SLOT
        head = self._bytes(offset, 32, f"inode {nid} ({path})")
        i_format, icount, mode = struct.unpack_from("<HHH", head, 0)
        extended = bool(i_format & 1)
        layout = (i_format >> 1) & 0x7
        if extended:
            head = self._bytes(offset, 64, f"inode {nid} ({path})")
            size = struct.unpack_from("<Q", head, 8)[0]
        else:
            size = struct.unpack_from("<I", head, 8)[0]
        blkaddr = struct.unpack_from("<I", head, _I_U)[0]
        xattr_size = 12 + 4 * (icount - 1) if icount else 0
        shared: tuple[int, ...] = ()
        if xattr_size:
            head = self._bytes(offset, len(head) + xattr_size, f"xattrs of {path}")
            count = head[len(head) - xattr_size + 4]
            if 12 + 4 * count > xattr_size:
                raise FormatError(f"{self.name}: {path}: {count} shared xattrs do not fit its xattr area")
            base = len(head) - xattr_size + 12
            shared = struct.unpack_from(f"<{count}I", head, base)
        kind = stat.S_IFMT(mode)
        has_data = kind in (stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK)
        blocks: list[int] = []
        tail, map_len = b"", 0
        if has_data:
            total = -(-size // self.block)
            if layout == _LAYOUT_CHUNK_BASED:
                blocks, map_len = self._chunk_map(offset, head, size, path)
            elif layout not in (_LAYOUT_FLAT_PLAIN, _LAYOUT_FLAT_INLINE):
                raise FormatError(
                    f"{self.name}: {path}: {_LAYOUT_NAMES.get(layout, f'layout {layout}')} data is not "
                    "supported by the layout rewriter; build the image uncompressed"
                )
            else:
                nblocks = total
                if layout == _LAYOUT_FLAT_INLINE and size:
                    nblocks = total - 1
                    tail_len = size - nblocks * self.block
                    tail_at = offset + len(head)
                    if tail_at % self.block + tail_len > self.block:
                        raise FormatError(f"{self.name}: {path}: inline data crosses a block boundary")
                    tail = self._bytes(tail_at, tail_len, f"inline data of {path}")
                if nblocks:
                    if blkaddr + nblocks > self.blocks:
                        raise FormatError(f"{self.name}: data of {path} lies past the image's {self.blocks} blocks")
                    blocks = list(range(blkaddr, blkaddr + nblocks))
        return _Inode(nid, offset, head, layout, mode, size, blocks, tail, shared, path, order, map_len)

    def _chunk_map(self, offset: int, head: bytes, size: int, path: str) -> tuple[list[int], int]:
        """A chunk-based inode's blocks, from its block map or chunk indexes."""
        fmt = struct.unpack_from("<H", head, _I_U)[0]
        if fmt & ~(_CHUNK_BLKBITS_MASK | _CHUNK_INDEXES):
            raise FormatError(f"{self.name}: {path}: chunk format {fmt:#x} is not supported by the layout rewriter")
        chunk_blocks = 1 << (fmt & _CHUNK_BLKBITS_MASK)
        total = -(-size // self.block)
        if total > _MAX_FILE_BLOCKS:
            raise FormatError(f"{self.name}: {path}: {size} bytes is too large a chunk-based file")
        unit = 8 if fmt & _CHUNK_INDEXES else 4
        count = -(-total // chunk_blocks)
        start = offset + len(head)
        at = -(-start // unit) * unit
        raw = self._bytes(at, count * unit, f"chunk map of {path}")
        blocks: list[int] = []
        for i in range(count):
            if unit == 4:
                addr = struct.unpack_from("<I", raw, 4 * i)[0]
            else:
                hi, device, addr = struct.unpack_from("<HHI", raw, 8 * i)
                if addr != _NULL_ADDR and (hi or device):
                    raise FormatError(f"{self.name}: {path}: chunks on another device or past 2^32 blocks")
            n = min(chunk_blocks, total - len(blocks))
            if addr == _NULL_ADDR:
                blocks += [_HOLE] * n
            else:
                if addr + n > self.blocks:
                    raise FormatError(f"{self.name}: data of {path} lies past the image's {self.blocks} blocks")
                blocks += range(addr, addr + n)
        return blocks, at + count * unit - start

    def block_bytes(self, addr: int) -> bytes:
        """One data block (zeros for a hole)."""
        if addr == _HOLE:
            return bytes(self.block)
        return bytes(self.data[addr * self.block : (addr + 1) * self.block])

    def file_data(self, inode: _Inode) -> bytes:
        """The whole content of a regular file, directory or symlink (the
        last block zero-padded, as stored)."""
        blocks = inode.blocks
        if blocks and blocks[-1] - blocks[0] == len(blocks) - 1 and _HOLE not in blocks:  # one extent
            start = blocks[0] * self.block
            return bytes(self.data[start : start + len(blocks) * self.block]) + inode.tail
        return b"".join(self.block_bytes(a) for a in blocks) + inode.tail

    def _walk(self) -> None:
        """Visit every inode from the root, depth first, entries in stored order."""
        root = self._read_inode(self.root_nid, "/", 0)
        if not root.is_dir:
            raise FormatError(f"{self.name}: the root inode is not a directory")
        self.inodes[root.nid] = root
        stack = [root]
        dirs_seen = {root.nid}
        order = 1
        while stack:
            inode = stack.pop()
            data = self.file_data(inode)[: inode.size]
            subdirs: list[_Inode] = []
            for pos, nid, name in self._dirents(inode, data):
                inode.dirents.append(pos)
                if name in (b".", b".."):
                    continue
                child = self.inodes.get(nid)
                path = inode.path.rstrip("/") + "/" + name.decode("utf-8", "surrogateescape")
                if child is None:
                    if len(self.inodes) >= _MAX_INODES:
                        raise FormatError(f"{self.name}: more than {_MAX_INODES} inodes")
                    child = self._read_inode(nid, path, order)
                    order += 1
                    self.inodes[nid] = child
                    if child.is_dir:
                        subdirs.append(child)
                elif child.is_dir:
                    raise FormatError(f"{self.name}: directory {path} is linked twice (a loop)")
                inode.children.append(nid)
            for sub in reversed(subdirs):
                if sub.nid in dirs_seen:
                    raise FormatError(f"{self.name}: directory {sub.path} is linked twice (a loop)")
                dirs_seen.add(sub.nid)
                stack.append(sub)
        # "." and ".." must name directories we know: they are rewritten too.
        for inode in self.inodes.values():
            data = self.file_data(inode)[: inode.size] if inode.is_dir else b""
            for pos in inode.dirents:
                nid = struct.unpack_from("<Q", data, pos)[0]
                if nid not in self.inodes:
                    raise FormatError(f"{self.name}: {inode.path}: an entry names inode {nid}, not in the tree")

    def _dirents(self, inode: _Inode, data: bytes) -> Iterable[tuple[int, int, bytes]]:
        """(position of the nid field in ``data``, nid, name) for each entry."""
        for start in range(0, len(data), self.block):
            blk = data[start : start + self.block]
            if len(blk) < _DIRENT:
                raise FormatError(f"{self.name}: {inode.path}: directory block too short")
            first = struct.unpack_from("<H", blk, 8)[0]
            if first % _DIRENT or not _DIRENT <= first <= len(blk):
                raise FormatError(f"{self.name}: {inode.path}: bad directory block (first name at {first})")
            count = first // _DIRENT
            offs = [struct.unpack_from("<H", blk, i * _DIRENT + 8)[0] for i in range(count)] + [len(blk)]
            for i in range(count):
                lo, hi = offs[i], offs[i + 1]
                if not first <= lo < hi <= len(blk):
                    raise FormatError(f"{self.name}: {inode.path}: bad name offsets in a directory block")
                name = blk[lo:hi]
                if i == count - 1:
                    name = name.split(b"\0", 1)[0]
                if not name or b"/" in name:
                    raise FormatError(f"{self.name}: {inode.path}: bad entry name {name[:40]!r}")
                yield start + i * _DIRENT, struct.unpack_from("<Q", blk, i * _DIRENT)[0], name

    def paths(self) -> dict[str, _Inode]:
        """Every path (hard links: each name) -> its inode."""
        out: dict[str, _Inode] = {"/": self.inodes[self.root_nid]}
        for inode in sorted(self.inodes.values(), key=lambda i: i.order):
            if not inode.is_dir:
                continue
            data = self.file_data(inode)[: inode.size]
            for _pos, nid, name in self._dirents(inode, data):
                if name not in (b".", b".."):
                    out[inode.path.rstrip("/") + "/" + name.decode("utf-8", "surrogateescape")] = self.inodes[nid]
        return out

    def shared_xattr_span(self) -> int:
        """Bytes from the start of the shared xattr area to the end of the last entry used."""
        base = self.xattr_blkaddr * self.block
        end = 0
        for inode in self.inodes.values():
            for xid in inode.shared_xattrs:
                at = base + 4 * xid
                name_len, _index, value_size = struct.unpack("<BBH", self._bytes(at, 4, f"shared xattr {xid}"))
                length = (4 + name_len + value_size + 3) & ~3
                self._bytes(at, length, f"shared xattr {xid}")
                end = max(end, 4 * xid + length)
        return end


# ----------------------------------------------------------------- hints


@dataclass(frozen=True)
class Hints:
    """What a recorded start touched, as ranks (lower: earlier) per old
    image byte range, or per path. Either may be empty."""

    ranges: tuple[tuple[int, int, int], ...] = ()  # (start, end, rank), sorted by start
    paths: tuple[str, ...] = ()
    times_ms: tuple[int, ...] = ()  # per rank of ``ranges``, for the translated profile
    dropped: int = 0  # ranges given that were empty (e.g. frames past the image's end)


def hints_from_ranges(ranges: Sequence[tuple[int, int]], times_ms: Sequence[int] | None = None) -> Hints:
    """Byte ranges of the old image in first-touch order (e.g. a profile's
    frames times its chunk size)."""
    ranked = sorted((s, e, r) for r, (s, e) in enumerate(ranges) if e > s)
    times = tuple(times_ms) if times_ms is not None else (0,) * len(ranges)
    return Hints(ranges=tuple(ranked), times_ms=times, dropped=len(ranges) - len(ranked))


def hints_from_paths(paths: Iterable[str]) -> Hints:
    """Paths in first-use order (one per line in a file); "/" is the root."""
    out: list[str] = []
    for p in paths:
        p = p.strip()
        if p and not p.startswith("#"):
            out.append("/" + p.strip("/") if p != "/" else "/")
    return Hints(paths=tuple(out))


class _RangeRanks:
    def __init__(self, ranges: Sequence[tuple[int, int, int]]) -> None:
        self.ranges = list(ranges)
        self.starts = [r[0] for r in self.ranges]
        # Longest range, so a lookup knows how far left to look.
        self.longest = max((e - s for s, e, _ in self.ranges), default=0)

    def rank(self, start: int, end: int) -> float:
        """Lowest rank of a range overlapping [start, end)."""
        if end <= start or not self.ranges:
            return _INF
        best = _INF
        i = bisect.bisect_left(self.starts, start - self.longest)
        while i < len(self.ranges) and self.ranges[i][0] < end:
            _s, e, r = self.ranges[i]
            if e > start and r < best:
                best = r
            i += 1
        return best


# ----------------------------------------------------------------- writing


@dataclass
class LayoutReport:
    image_size: int
    block_size: int
    inodes: int
    metadata_bytes: int  # end of the hot metadata: superblock, hot inodes, shared xattrs, hot directory blocks
    hot_files: int  # files with hot data blocks (whole or in part)
    hot_bytes: int  # hot data blocks, right after the metadata
    hot_end: int  # byte offset where the hot part (metadata + hot data) ends
    chunked_files: int = 0  # partly hot files, written chunk-based with one-block chunks
    cold_metadata_bytes: int = 0  # inodes and directory blocks laid out after hot_end
    missing_paths: list[str] = field(default_factory=list)
    ignored_ranges: int = 0  # profile ranges past the image or on nothing movable
    # the old image's touched ranges, mapped into the new image, first-touch order
    new_ranges: list[tuple[int, int, int]] = field(default_factory=list)  # (start, end, ms)

    def to_json(self) -> dict[str, object]:
        return {
            "image_size": self.image_size,
            "block_size": self.block_size,
            "inodes": self.inodes,
            "metadata_bytes": self.metadata_bytes,
            "hot_files": self.hot_files,
            "hot_bytes": self.hot_bytes,
            "hot_end": self.hot_end,
            "chunked_files": self.chunked_files,
            "cold_metadata_bytes": self.cold_metadata_bytes,
            "missing_paths": self.missing_paths,
        }


def relocate_image(src: str | os.PathLike[str], dst: str | os.PathLike[str], hints: Hints = Hints()) -> LayoutReport:
    """Rewrite the EROFS image ``src`` to ``dst``: hot metadata first, then
    the hinted blocks in first-use order, then the rest (see the module)."""
    with open(src, "rb") as f:
        data = f.read()
    image = ErofsImage(data, name=os.fspath(src))
    return _relocate(image, dst, hints)


_TAIL = -2  # a piece item: the file's inline tail, moved into a block of its own


@dataclass
class _Piece:
    """Data blocks of one file placed together: ``items`` are indexes into
    its ``blocks`` (or _TAIL)."""

    nid: int
    items: list[int]
    rank: float
    key: int  # old byte address: ties in rank and the cold part keep the old order


def _ranks(image: ErofsImage, hints: Hints) -> tuple[dict[int, float], dict[int, list[float]], dict[int, float], list[str]]:
    """(metadata rank per inode, rank of each data block, rank of the inline
    tail, hinted paths not in the image). Lower is earlier; _INF is cold."""
    B = image.block
    by_order = sorted(image.inodes.values(), key=lambda i: i.order)
    rr = _RangeRanks(hints.ranges)
    meta: dict[int, float] = {}
    blocks: dict[int, list[float]] = {}
    tail: dict[int, float] = {}
    missing: list[str] = []
    for inode in by_order:
        ranks = [rr.rank(a * B, (a + 1) * B) if a != _HOLE else _INF for a in inode.blocks]
        m = rr.rank(inode.offset, inode.offset + len(inode.head) + inode.map_len + len(inode.tail))
        if inode.is_dir:
            m = min(m, *ranks) if ranks else m
            ranks = [_INF] * len(ranks)
        # The inline tail lies among other inodes: reading its block says
        # little, it is only hot where the file is (see _plan).
        at = inode.offset + len(inode.head)
        tail[inode.nid] = rr.rank(at, at + len(inode.tail)) if inode.tail else _INF
        meta[inode.nid], blocks[inode.nid] = m, ranks
    if not hints.ranges and not hints.paths:  # no profile: metadata first, tree order
        meta = dict.fromkeys(meta, 0)
    if hints.paths:
        paths = image.paths()
        for rank, p in enumerate(hints.paths):
            inode = paths.get(p)
            if inode is None:
                missing.append(p)
                continue
            meta[inode.nid] = min(meta[inode.nid], rank)
            if not inode.is_dir:
                blocks[inode.nid] = [min(r, rank) for r in blocks[inode.nid]]
                tail[inode.nid] = min(tail[inode.nid], rank)
    parents: dict[int, int] = {}
    for inode in by_order:
        for child in inode.children:
            parents.setdefault(child, inode.nid)
    for inode in reversed(by_order):  # children before parents
        # A file whose data was read had its inode read too.
        mine = min(meta[inode.nid], *blocks[inode.nid]) if blocks[inode.nid] else meta[inode.nid]
        meta[inode.nid] = mine
        parent = parents.get(inode.nid)
        if parent is not None and mine < meta[parent]:
            meta[parent] = mine
    return meta, blocks, tail, missing


def _runs(items: list[int], ranks: list[float], nid: int, keys: list[int]) -> list[_Piece]:
    """Consecutive items of the same temperature (hot or cold) as pieces."""
    out: list[_Piece] = []
    for item, rank, key in zip(items, ranks, keys, strict=True):
        hot = rank < _INF
        if out and (out[-1].rank < _INF) == hot:
            out[-1].items.append(item)
            out[-1].rank = min(out[-1].rank, rank)
        else:
            out.append(_Piece(nid, [item], rank, key))
    return out


def _place_inode(pos: int, head: int, tail: int, extra: int, B: int, path: str, name: str) -> int:
    """Where an inode record goes at or after ``pos``: 32-byte slots; the
    inode with its xattrs and inline tail in one block (a record larger than
    a block starts one, its tail still within a block); a chunk map
    (``extra``) may run on into the next blocks (the kernel reads its
    entries one by one, each aligned to its size)."""
    pos = -(-pos // _SLOT) * _SLOT
    size = head + tail
    if size <= B and pos // B != (pos + size - 1) // B:
        pos = -(-pos // B) * B
    elif size > B:
        pos = -(-pos // B) * B
        if tail and (pos + head) % B + tail > B:
            raise FormatError(f"{name}: {path}: xattrs too large to keep its inline data in one block")
    return pos


def _relocate(image: ErofsImage, dst: str | os.PathLike[str], hints: Hints) -> LayoutReport:
    B = image.block
    inodes = image.inodes
    by_order = sorted(inodes.values(), key=lambda i: i.order)
    meta_rank, block_ranks, tail_rank, missing = _ranks(image, hints)
    if meta_rank[image.root_nid] == _INF:  # the root is read at mount: always hot
        meta_rank[image.root_nid] = -1

    # What becomes of each file's data: one flat piece, or chunk-based pieces.
    chunked: set[int] = set()
    pieces: list[_Piece] = []
    hot_files = 0
    for inode in by_order:
        if inode.is_dir or not inode.blocks:
            continue
        ranks = block_ranks[inode.nid]
        real = [r for r, a in zip(ranks, inode.blocks, strict=True) if a != _HOLE]
        hot = [r for r in real if r < _INF]
        hot_files += bool(hot)
        keys = [a * B if a != _HOLE else inode.offset for a in inode.blocks]
        if hot and len(hot) < len(real) and stat.S_ISREG(inode.mode):
            # Partly hot: per-block pieces; an inline tail becomes a block,
            # hot where the block before it is (readahead reads on into it)
            # or where its own bytes were read.
            chunked.add(inode.nid)
            items = [i for i, a in enumerate(inode.blocks) if a != _HOLE]
            item_ranks = [ranks[i] for i in items]
            item_keys = [keys[i] for i in items]
            if inode.tail:
                last = ranks[-1] if inode.blocks[-1] != _HOLE else _INF
                items.append(_TAIL)
                item_ranks.append(min(tail_rank[inode.nid], last) if tail_rank[inode.nid] < _INF or last < _INF else _INF)
                item_keys.append(inode.offset + len(inode.head))
            pieces += _runs(items, item_ranks, inode.nid, item_keys)
        else:
            pieces.append(_Piece(inode.nid, list(range(inode.nblocks)), min(hot) if hot else _INF, keys[0]))
    hot_pieces = sorted((p for p in pieces if p.rank < _INF), key=lambda p: (p.rank, p.key))
    cold_pieces = sorted((p for p in pieces if p.rank == _INF), key=lambda p: p.key)

    def entries(inode: _Inode) -> int:  # chunk map entries of a chunked inode
        return inode.nblocks + bool(inode.tail)

    def record(inode: _Inode) -> tuple[int, int]:  # (inline tail bytes, chunk map bytes) stored after head
        return (0, 4 * entries(inode)) if inode.nid in chunked else (len(inode.tail), 0)

    hot_inodes = sorted((i for i in by_order if meta_rank[i.nid] < _INF), key=lambda i: (meta_rank[i.nid], i.order))
    cold_inodes = [i for i in by_order if meta_rank[i.nid] == _INF]
    if hot_inodes[0].nid != image.root_nid:  # the root is everyone's ancestor; keep it first
        raise FormatError(f"{image.name}: internal: root not first")

    # ---- plan: where everything goes (byte offsets, block addresses)
    new_pos: dict[int, int] = {}  # nid -> inode record offset (meta_blkaddr 0: nid = offset / 32)
    new_blocks: dict[int, list[int]] = {}  # dirs and flat files: new block of each data block
    item_block: dict[tuple[int, int], int] = {}  # (nid, item) -> new block, for chunked files

    def place_inodes(pos: int, group: list[_Inode]) -> int:
        for inode in group:
            tail, extra = record(inode)
            pos = _place_inode(pos, len(inode.head), tail, extra, B, inode.path, image.name)
            new_pos[inode.nid] = pos
            pos += len(inode.head) + tail + extra
        return pos

    def place_dirs(pos: int, group: list[_Inode]) -> int:
        for inode in group:
            if inode.is_dir and inode.blocks:
                new_blocks[inode.nid] = list(range(pos // B, pos // B + inode.nblocks))
                pos += inode.nblocks * B
        return pos

    def place_pieces(pos: int, group: list[_Piece]) -> int:
        blk = pos // B
        for piece in group:
            if piece.nid in chunked:
                for item in piece.items:
                    item_block[piece.nid, item] = blk
                    blk += 1
            else:
                new_blocks[piece.nid] = list(range(blk, blk + len(piece.items)))
                blk += len(piece.items)
        return blk * B

    def up(pos: int) -> int:
        return -(-pos // B) * B

    pos = place_inodes(image.sb_end, hot_inodes)
    xattr_blkaddr = 0
    span = image.shared_xattr_span()
    if span:
        xattr_blkaddr = up(pos) // B
        pos = xattr_blkaddr * B + span
    metadata_bytes = place_dirs(up(pos), hot_inodes)
    hot_end = place_pieces(metadata_bytes, hot_pieces)
    cold_meta_end = place_dirs(up(place_inodes(hot_end, cold_inodes)), cold_inodes)
    total = place_pieces(cold_meta_end, cold_pieces)
    total_blocks = total // B
    if new_pos[image.root_nid] // _SLOT > 0xFFFF:
        raise FormatError(f"{image.name}: root inode lands past nid 65535")
    new_nid = {nid: p // _SLOT for nid, p in new_pos.items()}

    # ---- write, and note where each old byte range went (old start, old end, new start)
    out = bytearray(total)
    out[: image.sb_end] = image.data[: image.sb_end]
    extents: list[tuple[int, int, int]] = [(0, image.sb_end, 0)]

    def put_block(new: int, old: int) -> None:
        if old != _HOLE:
            out[new * B : (new + 1) * B] = image.data[old * B : (old + 1) * B]
            extents.append((old * B, (old + 1) * B, new * B))

    for inode in by_order:
        at = new_pos[inode.nid]
        head = bytearray(inode.head)
        if inode.nid in chunked:
            i_format = struct.unpack_from("<H", head, 0)[0] & ~(0x7 << 1) | (_LAYOUT_CHUNK_BASED << 1)
            struct.pack_into("<H", head, 0, i_format)
            struct.pack_into("<HH", head, _I_U, 0, 0)  # one-block chunks, 4-byte block map
            addrs = [item_block.get((inode.nid, i), _NULL_ADDR) for i in range(inode.nblocks)]
            if inode.tail:
                addrs.append(item_block[inode.nid, _TAIL])
            struct.pack_into(f"<{len(addrs)}I", out, at + len(head), *addrs)
        elif inode.nid in new_blocks:
            if inode.layout == _LAYOUT_CHUNK_BASED:  # was chunk-based, now one extent again
                i_format = struct.unpack_from("<H", head, 0)[0] & ~(0x7 << 1) | (_LAYOUT_FLAT_PLAIN << 1)
                struct.pack_into("<H", head, 0, i_format)
            struct.pack_into("<I", head, _I_U, new_blocks[inode.nid][0])
        out[at : at + len(head)] = head
        extents.append((inode.offset, inode.offset + len(head), at))
        if inode.tail:
            old_tail = inode.offset + len(inode.head)
            new_tail = item_block[inode.nid, _TAIL] * B if inode.nid in chunked else at + len(head)
            out[new_tail : new_tail + len(inode.tail)] = inode.tail
            extents.append((old_tail, old_tail + len(inode.tail), new_tail))
        if inode.is_dir:
            data = bytearray(image.file_data(inode))
            for p in inode.dirents:
                struct.pack_into("<Q", data, p, new_nid[struct.unpack_from("<Q", data, p)[0]])
            whole = inode.nblocks * B
            if inode.tail:  # entries patched in the inline part too
                out[at + len(head) : at + len(head) + len(inode.tail)] = data[whole:]
            for i, (old, new) in enumerate(zip(inode.blocks, new_blocks.get(inode.nid, []), strict=True)):
                out[new * B : (new + 1) * B] = data[i * B : (i + 1) * B]
                if old != _HOLE:
                    extents.append((old * B, (old + 1) * B, new * B))
        elif inode.nid in chunked:
            for i, old in enumerate(inode.blocks):
                if old != _HOLE:
                    put_block(item_block[inode.nid, i], old)
        else:
            for old, new in zip(inode.blocks, new_blocks.get(inode.nid, []), strict=True):
                put_block(new, old)
    if span:
        old = image.xattr_blkaddr * B
        out[xattr_blkaddr * B : xattr_blkaddr * B + span] = image.data[old : old + span]
        extents.append((old, old + span, xattr_blkaddr * B))

    # Superblock: root, metadata and xattr addresses, size, features, checksum
    # (after block 0 is final: the checksum covers it from byte 1024).
    sb = EROFS_SUPER_OFFSET
    struct.pack_into("<H", out, sb + _SB_ROOT_NID, new_nid[image.root_nid])
    struct.pack_into("<I", out, sb + _SB_BLOCKS, total_blocks)
    struct.pack_into("<II", out, sb + _SB_META_BLKADDR, 0, xattr_blkaddr)
    if chunked:
        incompat = struct.unpack_from("<I", out, sb + _SB_FEATURE_INCOMPAT)[0]
        struct.pack_into("<I", out, sb + _SB_FEATURE_INCOMPAT, incompat | _INCOMPAT_CHUNKED_FILE)
    features = struct.unpack_from("<I", out, sb + _SB_FEATURE_COMPAT)[0]
    if features & _FEATURE_COMPAT_SB_CHKSUM:
        struct.pack_into("<I", out, sb + _SB_CHECKSUM, 0)
        struct.pack_into("<I", out, sb + _SB_CHECKSUM, _sb_checksum(bytes(out[sb:B])))

    tmp = f"{os.fspath(dst)}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(out)
        # A fresh UUID derived from the new image, as make_erofs does: the
        # same inputs give the same bytes, and two layouts never share one.
        set_image_uuid(tmp, uuid_mod.UUID(bytes=hashlib.sha256(out).digest()[:16], version=4))
        os.replace(tmp, dst)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise

    report = LayoutReport(
        image_size=total, block_size=B, inodes=len(inodes), metadata_bytes=metadata_bytes,
        hot_files=hot_files, hot_bytes=hot_end - metadata_bytes, hot_end=hot_end, chunked_files=len(chunked),
        cold_metadata_bytes=cold_meta_end - hot_end, missing_paths=missing,
    )  # fmt: skip
    report.new_ranges, report.ignored_ranges = _translate(hints, _merge(extents), hot_end)
    return report


def _merge(extents: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """Extents sorted by old start, neighbours that moved together joined."""
    out: list[tuple[int, int, int]] = []
    for s, e, n in sorted(extents):
        if out and out[-1][1] == s and out[-1][2] + (s - out[-1][0]) == n:
            out[-1] = (out[-1][0], e, out[-1][2])
        else:
            out.append((s, e, n))
    return out


def _translate(hints: Hints, extents: list[tuple[int, int, int]], hot_end: int) -> tuple[list[tuple[int, int, int]], int]:
    """The hinted old ranges as new ranges (first-touch order, with their
    times), through the moved extents; for a path list, the hot part whole."""
    if not hints.ranges:
        return ([(0, hot_end, 0)] if hints.paths else []), hints.dropped
    starts = [e[0] for e in extents]
    by_rank = sorted(hints.ranges, key=lambda r: r[2])
    out: list[tuple[int, int, int]] = []
    ignored = hints.dropped
    longest = max(e[1] - e[0] for e in extents)
    for s, e, rank in by_rank:
        ms = hints.times_ms[rank] if rank < len(hints.times_ms) else 0
        hit = False
        i = bisect.bisect_left(starts, s - longest)
        while i < len(extents) and extents[i][0] < e:
            os_, oe, ns = extents[i]
            lo, hi = max(s, os_), min(e, oe)
            if lo < hi:
                out.append((ns + lo - os_, ns + hi - os_, ms))
                hit = True
            i += 1
        ignored += not hit
    return out, ignored


# ----------------------------------------------------------------- profiles


def read_hints(
    path: str | os.PathLike[str],
    image_size: int,
    *,
    layer_digest: str | None = None,
    default_chunk_size: int | None = None,
    required: bool = True,
) -> tuple[Hints, str | None]:
    """Hints for one layer from FILE: a startup profile (``lazyerofs profile
    save``) or a plain list of paths, one a line.

    A profile names layers by blob digest: with ``layer_digest`` that layer
    is used (absent: empty hints, or FormatError when ``required``); without,
    the profile must have exactly one layer with frames, and its frame count
    must fit the image. Returns the hints and the profile layer's digest
    (None for a path list).
    """
    from lazyfs.fetch.profile import MAX_PROFILE_BYTES, parse_profile

    name = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_PROFILE_BYTES + 1)
    except OSError as exc:
        raise FormatError(f"{name}: cannot read: {exc.strerror or exc}") from exc
    if not data.lstrip().startswith(b"{"):
        if len(data) > MAX_PROFILE_BYTES:
            raise FormatError(f"{name}: a path list of more than {MAX_PROFILE_BYTES} bytes")
        return hints_from_paths(data.decode("utf-8", "surrogateescape").splitlines()), None
    profile = parse_profile(data, name=name)
    layers = [layer for layer in profile.layers if layer.frames]
    if layer_digest is not None:
        chosen = [layer for layer in profile.layers if layer.digest == layer_digest]
        if not chosen:
            if required:
                have = ", ".join(layer.digest[:19] for layer in profile.layers) or "none"
                raise FormatError(f"{name}: no layer {layer_digest} in the profile (it has: {have})")
            return Hints(), None
        layer = chosen[0]
    elif len(layers) == 1:
        layer = layers[0]
    else:
        have = ", ".join(layer.digest for layer in layers) or "none"
        raise FormatError(f"{name}: {len(layers)} layers with frames ({have}); name one with --profile-layer")
    chunk = layer.chunk_size or default_chunk_size
    if not chunk:
        raise FormatError(f"{name}: layer {layer.digest[:19]} has no chunk_size; give --chunk-size of the image it was recorded on")
    if layer_digest is None and layer.frame_count is not None and layer.frame_count != -(-image_size // chunk):
        raise FormatError(
            f"{name}: layer {layer.digest[:19]} was recorded on an image of {layer.frame_count} frames of "
            f"{chunk} bytes, this one has {-(-image_size // chunk)}: not the same image"
        )
    ranges = [(f * chunk, min((f + 1) * chunk, image_size)) for f in layer.frames]
    return hints_from_ranges(ranges, layer.times_ms), layer.digest


def layout_profile_layer(report: LayoutReport, digest: str, chunk_size: int) -> tuple[list[int], list[int]]:
    """The frames (at ``chunk_size``) of the new image that the hinted reads
    fall in, first-touch order, with times: a profile for the new layer."""
    frames: dict[int, int] = {}
    count = -(-report.image_size // chunk_size)
    for start, end, ms in report.new_ranges:
        for f in range(start // chunk_size, min(-(-end // chunk_size), count)):
            frames.setdefault(f, ms)
    return list(frames), list(frames.values())
