"""Profile-guided layout of an uncompressed EROFS image.

mkfs.erofs (erofs-utils 1.5) places data in the order it walks the tree and
has no option to change that, so the image is rewritten after mkfs: every
inode, directory block and file extent is read, then written again in a new
order, with the block addresses (inodes' ``raw_blkaddr``) and node ids
(directory entries, the superblock's ``root_nid``) updated to match::

    [superblock + inodes: hot first][shared xattrs][directory blocks: hot first]
    [hot files' data, in first-touch order][every other file's data, as before]

"Hot" comes from a startup profile (byte ranges of the old image, in the
order a recorded start first read them) or a plain list of paths. Bytes of
files, xattrs, modes, owners, times, link targets and hard links are copied
as they are: the served tree is the same, only where things lie changes.
Same image and same hints give the same bytes.

Facts used (the kernel's ``erofs_fs.h``): the superblock is 128 bytes at
1024 (+16 bytes per ``sb_extslots``) and its CRC-32C covers block 0 from
byte 1024; an inode lives at ``meta_blkaddr * block + nid * 32`` and is
32 (compact) or 64 (extended) bytes, followed by its inline xattrs
(``12 + 4 * (icount - 1)`` bytes when ``i_xattr_icount`` is set) and, for
FLAT_INLINE, the data's tail, which must not cross a block boundary;
``i_u`` at byte 16 of either form is the start block of FLAT_PLAIN /
FLAT_INLINE data; a directory block holds 12-byte entries (nid:u64,
nameoff:u16, type:u8, reserved) then the names, the first ``nameoff``
giving the entry count. Compressed and chunk-based files are not handled
here (lazyerofs builds neither) and are refused by name.
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
# Incompatible features this rewriter understands: only "zero padding" (set
# by mkfs.erofs even for uncompressed images; it concerns compressed data).
_INCOMPAT_KNOWN = 0x1

_LAYOUT_FLAT_PLAIN = 0
_LAYOUT_FLAT_INLINE = 2
_LAYOUT_NAMES = {1: "compressed", 3: "compressed (compact)", 4: "chunk-based"}
_SLOT = 32  # inode slot size: nid = byte offset / 32
_DIRENT = 12
_I_U = 16  # i_u (raw_blkaddr) in both inode forms
_MAX_INODES = 1 << 24  # far past any real layer; a hostile image stops here
_INF = float("inf")


@dataclass
class _Inode:
    nid: int
    offset: int  # byte offset in the old image
    head: bytes  # inode + inline xattrs, as stored
    layout: int
    mode: int
    size: int
    blkaddr: int
    nblocks: int  # whole blocks at blkaddr
    tail: bytes  # FLAT_INLINE: the data's last piece, stored after head
    shared_xattrs: tuple[int, ...]
    path: str
    order: int  # DFS preorder position (the tree's own order)
    children: list[int] = field(default_factory=list)  # nids, directories only
    dirents: list[int] = field(default_factory=list)  # byte positions of nid fields in the dir's data

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def data_bytes(self) -> int:
        return self.nblocks


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
                f"{name}: EROFS incompatible features {incompat:#x} (compression, chunks, devices...) "
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
        nblocks, tail = 0, b""
        if has_data:
            if layout not in (_LAYOUT_FLAT_PLAIN, _LAYOUT_FLAT_INLINE):
                raise FormatError(
                    f"{self.name}: {path}: {_LAYOUT_NAMES.get(layout, f'layout {layout}')} data is not "
                    "supported by the layout rewriter; build the image uncompressed"
                )
            total = -(-size // self.block)
            if layout == _LAYOUT_FLAT_INLINE and size:
                nblocks = total - 1
                tail_len = size - nblocks * self.block
                tail_at = offset + len(head)
                if tail_at % self.block + tail_len > self.block:
                    raise FormatError(f"{self.name}: {path}: inline data crosses a block boundary")
                tail = self._bytes(tail_at, tail_len, f"inline data of {path}")
            else:
                nblocks = total
            if nblocks:
                self._bytes(blkaddr * self.block, nblocks * self.block, f"data of {path}")  # bounds only
                if (blkaddr + nblocks) > self.blocks:
                    raise FormatError(f"{self.name}: data of {path} lies past the image's {self.blocks} blocks")
        return _Inode(nid, offset, head, layout, mode, size, blkaddr, nblocks, tail, shared, path, order)

    def file_data(self, inode: _Inode) -> bytes:
        """The whole content of a regular file, directory or symlink."""
        start = inode.blkaddr * self.block
        return bytes(self.data[start : start + inode.nblocks * self.block]) + inode.tail if inode.nblocks else inode.tail

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
    metadata_bytes: int  # superblock, inodes, shared xattrs, directory blocks
    hot_files: int
    hot_bytes: int  # data of hot files, after the metadata
    hot_end: int  # byte offset where the hot part (metadata + hot data) ends
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
            "missing_paths": self.missing_paths,
        }


def relocate_image(src: str | os.PathLike[str], dst: str | os.PathLike[str], hints: Hints = Hints()) -> LayoutReport:
    """Rewrite the EROFS image ``src`` to ``dst``: metadata first, then the
    hinted files' data in first-use order, then the rest (see the module)."""
    with open(src, "rb") as f:
        data = f.read()
    image = ErofsImage(data, name=os.fspath(src))
    return _relocate(image, dst, hints)


def _relocate(image: ErofsImage, dst: str | os.PathLike[str], hints: Hints) -> LayoutReport:
    B = image.block
    inodes = image.inodes
    by_order = sorted(inodes.values(), key=lambda i: i.order)
    parents: dict[int, int] = {}
    for inode in by_order:
        for child in inode.children:
            parents.setdefault(child, inode.nid)

    # Ranks: data (a file's blocks, or its path's place in the list) and
    # metadata (its inode or directory blocks, or any descendant's rank).
    data_rank: dict[int, float] = {}
    meta_rank: dict[int, float] = {}
    missing: list[str] = []
    rr = _RangeRanks(hints.ranges)
    for inode in by_order:
        d = rr.rank(inode.blkaddr * B, (inode.blkaddr + inode.nblocks) * B) if inode.nblocks else _INF
        m = rr.rank(inode.offset, inode.offset + len(inode.head) + len(inode.tail))
        if inode.is_dir:
            m, d = min(m, d), _INF
        # An inline tail lies in the inode's block: reading that block (any
        # inode in it) says nothing about the file's data, so it adds nothing.
        data_rank[inode.nid], meta_rank[inode.nid] = d, m
    if hints.paths:
        paths = image.paths()
        for rank, p in enumerate(hints.paths):
            inode = paths.get(p)
            if inode is None:
                missing.append(p)
                continue
            meta_rank[inode.nid] = min(meta_rank[inode.nid], rank)
            if not inode.is_dir:
                data_rank[inode.nid] = min(data_rank[inode.nid], rank)
    for inode in reversed(by_order):  # children before parents
        mine = min(meta_rank[inode.nid], data_rank[inode.nid])
        parent = parents.get(inode.nid)
        if parent is not None and mine < meta_rank[parent]:
            meta_rank[parent] = mine
    order = sorted(by_order, key=lambda i: (meta_rank[i.nid], i.order))
    if order[0].nid != image.root_nid:  # the root is everyone's ancestor; keep it first
        raise FormatError(f"{image.name}: internal: root not first")

    # 1. block 0: superblock, then inode records (nid = offset / 32, meta_blkaddr 0).
    out = bytearray(image.data[: image.sb_end])
    new_nid: dict[int, int] = {}
    new_offset: dict[int, int] = {}
    extents: list[tuple[int, int, int]] = [(0, image.sb_end, 0)]  # (old start, old end, new start)
    for inode in order:
        size = len(inode.head) + len(inode.tail)
        pos = -(-len(out) // _SLOT) * _SLOT
        if size <= B and pos // B != (pos + size - 1) // B:
            pos = -(-pos // B) * B
        elif size > B:
            pos = -(-pos // B) * B
            if inode.tail and (pos + len(inode.head)) % B + len(inode.tail) > B:
                raise FormatError(f"{image.name}: {inode.path}: xattrs too large to keep its inline data in one block")
        out.extend(bytes(pos - len(out)))
        new_nid[inode.nid] = pos // _SLOT
        new_offset[inode.nid] = pos
        out += inode.head
        out += inode.tail
        extents.append((inode.offset, inode.offset + size, pos))
    if new_nid[image.root_nid] > 0xFFFF:
        raise FormatError(f"{image.name}: root inode lands past nid 65535")

    # 2. shared xattrs, verbatim (ids are offsets in them, so they stay valid).
    xattr_blkaddr = 0
    span = image.shared_xattr_span()
    if span:
        out.extend(bytes(-len(out) % B))
        xattr_blkaddr = len(out) // B
        old = image.xattr_blkaddr * B
        out += image.data[old : old + span]
        extents.append((old, old + span, xattr_blkaddr * B))
    out.extend(bytes(-len(out) % B))

    # 3. directory blocks, entries pointing at the new nids.
    new_blkaddr: dict[int, int] = {}
    for inode in order:
        if not inode.is_dir:
            continue
        data = bytearray(image.file_data(inode))
        for pos in inode.dirents:
            old = struct.unpack_from("<Q", data, pos)[0]
            struct.pack_into("<Q", data, pos, new_nid[old])
        whole = inode.nblocks * B
        tail = bytes(data[whole:])
        if tail != inode.tail:  # patched entries in the inline part
            start = new_offset[inode.nid] + len(inode.head)
            out[start : start + len(tail)] = tail
        if inode.nblocks:
            new_blkaddr[inode.nid] = len(out) // B
            extents.append((inode.blkaddr * B, inode.blkaddr * B + whole, len(out)))
            out += data[:whole]
    metadata_bytes = len(out)

    # 4. file data: hot files in first-use order, then the rest in the old order.
    files = [i for i in by_order if not i.is_dir and i.nblocks]
    hot = sorted((i for i in files if data_rank[i.nid] < _INF), key=lambda i: (data_rank[i.nid], i.blkaddr))
    cold = sorted((i for i in files if data_rank[i.nid] == _INF), key=lambda i: i.blkaddr)
    hot_bytes = sum(i.nblocks * B for i in hot)
    hot_end = metadata_bytes + hot_bytes
    # Patch every inode's block address in the metadata we already laid out.
    cursor = len(out) // B
    for inode in hot + cold:
        new_blkaddr[inode.nid] = cursor
        extents.append((inode.blkaddr * B, (inode.blkaddr + inode.nblocks) * B, cursor * B))
        cursor += inode.nblocks
    total_blocks = cursor
    for nid, blk in new_blkaddr.items():
        struct.pack_into("<I", out, new_offset[nid] + _I_U, blk)

    # Superblock: root, metadata and xattr addresses, size, checksum (after
    # block 0 is final: the checksum covers it from byte 1024).
    sb = EROFS_SUPER_OFFSET
    struct.pack_into("<H", out, sb + _SB_ROOT_NID, new_nid[image.root_nid])
    struct.pack_into("<I", out, sb + _SB_BLOCKS, total_blocks)
    struct.pack_into("<II", out, sb + _SB_META_BLKADDR, 0, xattr_blkaddr)
    features = struct.unpack_from("<I", out, sb + _SB_FEATURE_COMPAT)[0]
    if features & _FEATURE_COMPAT_SB_CHKSUM:
        struct.pack_into("<I", out, sb + _SB_CHECKSUM, 0)
        struct.pack_into("<I", out, sb + _SB_CHECKSUM, _sb_checksum(bytes(out[sb:B])))

    tmp = f"{os.fspath(dst)}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(out)
            for inode in hot + cold:
                start = inode.blkaddr * B
                f.write(image.data[start : start + inode.nblocks * B])
        # A fresh UUID derived from the new image, as make_erofs does: the
        # same inputs give the same bytes, and two layouts never share one.
        with open(tmp, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").digest()
        set_image_uuid(tmp, uuid_mod.UUID(bytes=digest[:16], version=4))
        os.replace(tmp, dst)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise

    report = LayoutReport(
        image_size=total_blocks * B, block_size=B, inodes=len(inodes), metadata_bytes=metadata_bytes,
        hot_files=len(hot), hot_bytes=hot_bytes, hot_end=hot_end, missing_paths=missing,
    )  # fmt: skip
    report.new_ranges, report.ignored_ranges = _translate(hints, extents, image, metadata_bytes, hot_end)
    return report


def _translate(
    hints: Hints, extents: list[tuple[int, int, int]], image: ErofsImage, metadata_bytes: int, hot_end: int
) -> tuple[list[tuple[int, int, int]], int]:
    """The hinted old ranges as new ranges (first-touch order, with their
    times), through the moved extents; for a path list, the hot part whole."""
    if not hints.ranges:
        return ([(0, hot_end, 0)] if hints.paths else []), hints.dropped
    extents = sorted(extents)
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
