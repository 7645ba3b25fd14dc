"""An uncompressed EROFS image written straight from one layer's tar stream.

What :mod:`~lazyfs.produce.tarstage` followed by ``mkfs.erofs`` makes, in one
pass and without a staging tree: the tar is read member by member into an
in-memory tree of inodes (later entries replace earlier ones of the same path,
as extraction would; whiteouts in overlayfs form: ``.wh.NAME`` a 0/0 character
device ``NAME``, ``.wh..wh..opq`` the directory xattr
``trusted.overlay.opaque=y``), and every regular file's data goes to the image
as it arrives. The same hostile tars are refused with the same messages as
tarstage gives (path traversal, a symlink, device or file where a directory is
needed, a hard link to something not in the layer, the size cap counting
sparse holes); with nothing on disk but the image, nothing outside can be
touched in the first place.

Image layout (block size 4096)::

    [block 0: superblock at 1024][file data, whole blocks, in tar order]
    [inodes, each with its inline xattrs and data tail][directory blocks, tails
    that could not be inlined]

File data is FLAT_PLAIN blocks from its first block; the last partial block
of a file (its "tail", < 4096 bytes) is kept in memory and stored inline after
the inode (FLAT_INLINE), as mkfs.erofs does, as long as the tails held stay
under a budget (past it a tail is written as a block of its own: memory stays
bounded whatever the layer). Sparse holes are left as holes of the image file
(zeros). Directories list their entries sorted by name (the kernel
binary-searches), "." and ".." included, 12-byte dirents then names, no name
crossing a block. Metadata is written after the data and the superblock last.

Facts of the format used (the kernel's ``fs/erofs/erofs_fs.h``, ``inode.c``,
``dir.c``, ``namei.c``, ``xattr.c``): inodes are 32-byte compact or 64-byte
extended records addressed by ``nid = (offset - meta_blkaddr * 4096) / 32``;
a compact inode carries no mtime (it is the superblock's build time, its
nanoseconds 0), no uid/gid past 65535, no nlink past 65535, no size past
4 GiB; inline xattrs follow the inode (a 12-byte header, then 4-byte aligned
``name_len:u8 index:u8 value_size:u16 name value`` entries, ``i_xattr_icount
= 1 + (bytes - 12) / 4``); a FLAT_INLINE tail follows them and may not cross
a block; ``root_nid`` is 16 bits; the superblock CRC-32C covers block 0 from
byte 1024.

Reproducible: the same tar and epoch give the same bytes. Times are clamped
as ``mkfs.erofs`` clamps them with ``SOURCE_DATE_EPOCH`` (an mtime at or after
the epoch becomes the epoch); nodes no tar entry describes (the root, implied
parent directories, whiteouts) get the epoch. The filesystem UUID is derived
from a seed that names the tar (convert: the source blob's checked digest;
else the tar stream's SHA-256), the epoch and the metadata written.

Tar headers: the common ones (ustar, GNU long names, PAX extended headers)
are parsed here, several times faster than :mod:`tarfile`, to the same
:class:`tarfile.TarInfo` results; everything else (GNU sparse, global
headers, base-256 numbers, anything odd) goes through tarfile's own code.

:class:`StreamingEncoder` compresses the image's frames while it is written.
"""

from __future__ import annotations

import bisect
import collections
import concurrent.futures
import contextlib
import decimal
import hashlib
import logging
import operator
import os
import re
import stat
import struct
import tarfile
import tempfile
import threading
import uuid as uuid_mod
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO

from lazyfs.errors import FormatError
from lazyfs.produce.layout import (
    _DIRENT,
    _FEATURE_COMPAT_SB_CHKSUM,
    _LAYOUT_FLAT_INLINE,
    _LAYOUT_FLAT_PLAIN,
    _SB_BLKSZBITS,
    _SB_BLOCKS,
    _SB_CHECKSUM,
    _SB_FEATURE_COMPAT,
    _SB_META_BLKADDR,
    _SB_ROOT_NID,
    _SB_SIZE,
    _SLOT,
)
from lazyfs.produce.mkfs import _SB_UUID, EROFS_MAGIC, EROFS_SUPER_OFFSET, _sb_checksum
from lazyfs.produce.tarstage import (
    DEFAULT_MAX_LAYER_BYTES,
    OPAQUE,
    OPAQUE_XATTR,
    WHITEOUT,
    _kind,
    _xattrs,
)
from lazyfs.units import format_size

if TYPE_CHECKING:
    from lazyfs.format.encode import EncodeResult

__all__ = ["BLOCK_SIZE", "StreamingEncoder", "WriteResult", "write_erofs_from_tar"]

log = logging.getLogger(__name__)

BLOCK_SIZE = 4096
_BLKBITS = 12
# Superblock fields layout.py does not name (erofs_fs.h), relative to byte 1024.
_SB_INOS = 16  # u64
_SB_BUILD_TIME = 24  # u64, and u32 nanoseconds after it
_FEATURE_COMPAT_MTIME = 0x2  # what mkfs.erofs 1.5 sets beside the checksum
_VERSION_EXTENDED = 1
_COMPACT = struct.Struct("<HHHHIIIIHHI")  # erofs_inode_compact, 32 bytes
_EXTENDED = struct.Struct("<HHHHQIIIIQII16x")  # erofs_inode_extended, 64 bytes
_DIRENT_ST = struct.Struct("<QHBB")
_XATTR_ENTRY = struct.Struct("<BBH")
_XATTR_HEADER = 12
_NAME_MAX = 255  # EROFS_NAME_LEN
_SYMLINK_MAX = 4095  # PATH_MAX less its NUL, what symlink(2) takes
_XATTR_INDEX = (("user.", 1), ("trusted.", 4), ("security.", 6))
_XATTR_EXACT = {"system.posix_acl_access": 2, "system.posix_acl_default": 3}
_FILE_TYPES = {
    stat.S_IFREG: 1, stat.S_IFDIR: 2, stat.S_IFCHR: 3, stat.S_IFBLK: 4,
    stat.S_IFIFO: 5, stat.S_IFSOCK: 6, stat.S_IFLNK: 7,
}  # fmt: skip
# Data tails kept in memory for inlining; past this, tails are written as blocks.
DEFAULT_TAIL_BUDGET = 64 << 20
# Largest read a tar header may ask for (PAX records, GNU long names).
_MAX_HEADER_BYTES = 16 << 20
_WRITE_BUFFER = 1 << 20  # small writes gathered up to this before one pwrite
_DIRECT_WRITE = 256 << 10  # pieces at least this big are written as they are
_PIECE = 1 << 20
_UUID_TAG = b"lazyerofs tar->erofs 1\0"

Parts = tuple[bytes, ...]


@dataclass(frozen=True)
class WriteResult:
    entries: int  # tar members read
    tar_bytes: int  # bytes of the tar stream, trailing padding included
    tar_sha256: str | None  # "sha256:<hex>" of the tar stream (without a uuid_seed only)
    image_size: int
    inodes: int
    file_bytes: int  # apparent sizes of the regular files, sparse holes included
    whiteouts: int  # whiteout devices in the image
    opaque_dirs: int  # times a directory was made opaque
    uuid: uuid_mod.UUID


class _Node:
    """One inode of the tree. A directory has ``children``; every other kind
    has ``children`` None. Hard links are one _Node under several names."""

    __slots__ = (
        "blkaddr",
        "children",
        "compact",
        "gid",
        "inline",
        "mode",
        "nblocks",
        "nid",
        "nsec",
        "pos",
        "rdev",
        "sec",
        "size",
        "tail",
        "uid",
        "whiteout",
        "xattrs",
        "xbody",
    )  # fmt: skip

    def __init__(self, mode: int, epoch: int) -> None:
        self.mode = mode
        self.uid = self.gid = 0
        self.sec, self.nsec = epoch, 0
        self.xattrs: dict[str, bytes] | None = None
        self.xbody = b""  # encoded inline xattrs, made at layout
        self.size = 0
        self.blkaddr = 0
        self.nblocks = 0  # blocks at blkaddr
        self.tail: bytes | None = None  # the data after the last whole block, to inline
        self.rdev = 0
        self.children: dict[bytes, _Node] | None = {} if stat.S_ISDIR(mode) else None
        self.whiteout = False
        self.nid = 0
        self.pos = 0
        self.inline = False
        self.compact = False


class _Truncated(Exception):
    """The tar stream ended inside an entry's data."""


class _Input:
    """The tar stream as tarfile's header parser reads it (``read``, ``tell``),
    plus zero-copy views of entries' data. Hashes the stream as it passes."""

    def __init__(self, next_piece: Callable[[], bytes], layer: str, *, hash_stream: bool) -> None:
        self._next = next_piece
        self._layer = layer
        self._buf = b""
        self._pos = 0
        self._base = 0  # stream offset of _buf[0]
        self.hash = hashlib.sha256() if hash_stream else None

    def _fill(self) -> bool:
        piece = self._next()
        if not piece:
            return False
        if self.hash is not None:
            self.hash.update(piece)  # drops the GIL on big pieces
        self._base += len(self._buf)
        self._buf, self._pos = piece, 0
        return True

    def tell(self) -> int:
        return self._base + self._pos

    def read(self, size: int = -1) -> bytes:
        """``size`` bytes, fewer only at the end of the stream."""
        if size < 0 or size > _MAX_HEADER_BYTES:
            raise FormatError(f"{self._layer}: a tar header asks for {size} bytes of extended data")
        end = self._pos + size
        if end <= len(self._buf):
            out = self._buf[self._pos : end]
            self._pos = end
            return out
        parts = [self._buf[self._pos :]]
        need = size - len(parts[0])
        self._pos = len(self._buf)
        while need > 0 and self._fill():
            take = min(need, len(self._buf))
            parts.append(self._buf[:take])
            self._pos = take
            need -= take
        return b"".join(parts)

    def views(self, size: int) -> Iterator[memoryview]:
        """The next ``size`` bytes as views of the stream's pieces (no copy)."""
        while size:
            if self._pos == len(self._buf) and not self._fill():
                raise _Truncated
            take = min(size, len(self._buf) - self._pos)
            yield memoryview(self._buf)[self._pos : self._pos + take]
            self._pos += take
            size -= take

    def skip(self, size: int) -> bool:
        """Pass over ``size`` bytes; False if the stream ended first."""
        while size:
            if self._pos == len(self._buf) and not self._fill():
                return False
            take = min(size, len(self._buf) - self._pos)
            self._pos += take
            size -= take
        return True

    def rest(self) -> Iterator[bytes]:
        """Whatever is left of the stream."""
        if self._pos < len(self._buf):
            yield self._buf[self._pos :]
        self._pos = len(self._buf)
        while self._fill():
            self._pos = len(self._buf)
            yield self._buf


class _TarShim:
    """What :meth:`tarfile.TarInfo.fromtarfile` needs of a TarFile: the stream,
    the offset of the next header, global PAX headers, the name encoding."""

    encoding = "utf-8"
    errors = "surrogateescape"

    def __init__(self, stream: _Input) -> None:
        self.fileobj = stream
        self.offset = 0
        self.pax_headers: dict[str, str] = {}


class _Output:
    """The image file: positioned writes, small neighbouring ones gathered."""

    def __init__(self, fd: int, on_final: Callable[[int], None] | None = None) -> None:
        self.fd = fd
        self._buf = bytearray()
        self._at = 0  # image offset of _buf[0]
        # Told how far the file is written while the data area is: writes only
        # go forward there, so every byte before that is final.
        self.on_final = on_final

    def write(self, pos: int, data: bytes | memoryview) -> None:
        end = self._at + len(self._buf)
        if self._buf and 0 < pos - end <= BLOCK_SIZE:
            self._buf += bytes(pos - end)  # a block's padding: cheaper than another write
        elif pos != end or not self._buf:
            self.flush()
            self._at = pos
        if len(data) >= _DIRECT_WRITE:
            self.flush()
            self._pwrite(self._at, data)
            self._at += len(data)
            return
        self._buf += data
        if len(self._buf) >= _WRITE_BUFFER:
            self.flush()

    def flush(self) -> None:
        if self._buf:
            self._pwrite(self._at, self._buf)
            self._at += len(self._buf)
            self._buf = bytearray()

    def _pwrite(self, pos: int, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, pos)
            view, pos = view[n:], pos + n
        if self.on_final is not None:
            self.on_final(pos)


def _xattr_body(xattrs: dict[str, bytes] | None, fail: Callable[[str], FormatError]) -> bytes:
    """Inline xattrs as stored after the inode (empty without any)."""
    if not xattrs:
        return b""
    entries = []
    for key, value in xattrs.items():
        index = _XATTR_EXACT.get(key)
        if index is not None:
            suffix = b""
        else:
            for prefix, index in _XATTR_INDEX:  # noqa: B007
                if key.startswith(prefix):
                    suffix = key[len(prefix) :].encode("utf-8", "surrogateescape")
                    break
            else:
                raise fail(f"xattr {key!r}: EROFS stores only user.*, trusted.*, security.* and POSIX ACLs")
        if len(suffix) > _NAME_MAX or (not suffix and index not in (2, 3)):
            raise fail(f"xattr name {key!r} is empty or longer than {_NAME_MAX} bytes after its prefix")
        if len(value) > 0xFFFF:
            raise fail(f"xattr {key!r}: a value of {len(value)} bytes is over 65535")
        entries.append((index, suffix, value))
    body = bytearray(_XATTR_HEADER)  # no name filter, no shared xattrs
    for index, suffix, value in sorted(entries):
        body += _XATTR_ENTRY.pack(len(suffix), index, len(value)) + suffix + value
        body += bytes(-len(body) % 4)
    if (len(body) - _XATTR_HEADER) // 4 + 1 > 0xFFFF:
        raise fail("inline xattrs too large for one inode")
    return bytes(body)


def _mtime(member: tarfile.TarInfo) -> tuple[int, int]:
    """(seconds, nanoseconds): from a PAX record exactly (tarfile's float loses
    the last digits), else whole seconds."""
    text = member.pax_headers.get("mtime")
    if text is not None:
        sec, _, frac = text.partition(".")
        if sec.isdigit() and (frac.isdigit() or not frac) and sec.isascii() and frac.isascii():
            return int(sec), int(frac[:9].ljust(9, "0")) if frac else 0
        with contextlib.suppress(ArithmeticError, ValueError):
            return divmod(int(decimal.Decimal(text).scaleb(9)), 10**9)
    return int(member.mtime), 0


class _Writer:
    def __init__(self, inp: _Input, out: _Output, layer: str, max_bytes: int, epoch: int, tail_budget: int) -> None:
        self.inp = inp
        self.out = out
        self.layer = layer
        self.max_bytes = max_bytes
        self.epoch = epoch
        self.tail_budget = tail_budget
        self.tails_held = 0
        self.root = _Node(stat.S_IFDIR | 0o755, epoch)
        self.dirs: dict[Parts, _Node] = {(): self.root}  # directories by path, cleared when one goes
        self.data_end = BLOCK_SIZE  # next free byte of the data area (block 0: superblock)
        self.entries = 0
        self.file_bytes = 0
        self.opaque = 0
        self.where = ""
        self.whiteouts = 0  # counted at finish

    def fail(self, why: str) -> FormatError:
        return FormatError(f"{self.layer}: entry {self.where}: {why}")

    # ------------------------------------------------------------ paths

    def split(self, name: str, what: str = "path") -> Parts:
        """``name`` as components below the root; ``..`` may not climb above it."""
        raw = os.fsencode(name)
        if b"/." not in b"/" + raw and b"//" not in raw and b"\0" not in raw and len(raw) <= _NAME_MAX:
            inner = raw.strip(b"/")  # the usual name: no ".", "..", empty or long parts
            return tuple(inner.split(b"/")) if inner else ()
        parts: list[bytes] = []
        for part in raw.split(b"/"):
            if part in (b"", b"."):
                continue
            if part == b"..":
                if not parts:
                    raise self.fail(f"{what} {name!r} climbs out of the layer root")
                parts.pop()
            elif b"\0" in part:
                raise self.fail(f"{what} has a NUL byte")
            elif len(part) > _NAME_MAX:
                raise self.fail(f"{what} has a name of {len(part)} bytes, over {_NAME_MAX}")
            else:
                parts.append(part)
        return tuple(parts)

    @staticmethod
    def _show(parts: Parts) -> str:
        return repr(os.fsdecode(b"/".join(parts)))[:300]

    def directory(self, parts: Parts, *, create: bool = True) -> _Node:
        """The directory at ``parts``, never going through anything else; missing
        directories are made (0755, root) when ``create``."""
        node = self.dirs.get(parts)
        if node is not None:
            return node
        node = self.root
        for i, part in enumerate(parts):
            assert node.children is not None
            child = node.children.get(part)
            here = parts[: i + 1]
            if child is None:
                if not create:
                    raise self.fail(f"{self._show(here)} is not in this layer")
                child = node.children[part] = _Node(stat.S_IFDIR | 0o755, self.epoch)
            elif child.children is None:
                if not (create and child.whiteout):
                    raise self.fail(
                        f"{self._show(here)} is a {_kind(child.mode)}, not a directory; refusing to go through it"
                    )
                # A path this layer deleted and now fills: a new, opaque directory.
                child = node.children[part] = _Node(stat.S_IFDIR | 0o755, self.epoch)
                self.set_opaque(child)
            node = child
        self.dirs[parts] = node
        return node

    def set_opaque(self, node: _Node) -> None:
        if node.xattrs is None:
            node.xattrs = {}
        node.xattrs[OPAQUE_XATTR] = b"y"
        self.opaque += 1

    def remove(self, parent: _Node, name: bytes, node: _Node) -> None:
        """A later entry replaces an earlier one of the same name (tar semantics)."""
        assert parent.children is not None
        del parent.children[name]
        if node.children is not None:
            self.dirs = {(): self.root}  # paths below it name nothing now

    # ------------------------------------------------------------ entries

    def entry(self, member: tarfile.TarInfo) -> None:
        self.where = repr(member.name)[:300]
        self.entries += 1
        parts = self.split(member.name)
        if parts and parts[-1].startswith(WHITEOUT):
            self.whiteout(parts)
            return
        if not parts:
            if not member.isdir():
                raise self.fail("names the layer root but is not a directory")
            self.meta(self.root, member)
            return
        parent = self.directory(parts[:-1])
        assert parent.children is not None
        name = parts[-1]
        existing = parent.children.get(name)
        if member.isdir():
            if existing is not None and existing.children is not None:
                self.meta(existing, member)  # listed again: its entries stay
                return
            node = _Node(stat.S_IFDIR, self.epoch)
            self.meta(node, member)
            if existing is not None:
                if existing.whiteout:
                    self.set_opaque(node)
                self.remove(parent, name, existing)
            parent.children[name] = node
            return
        if existing is not None:
            self.remove(parent, name, existing)
        if member.isreg():
            node = _Node(stat.S_IFREG, self.epoch)
            self.meta(node, member)
            self.regular(member, node)
        elif member.issym():
            target = os.fsencode(member.linkname)
            if not target or len(target) > _SYMLINK_MAX or b"\0" in target:
                raise self.fail(f"symlink target is empty, has a NUL byte or is over {_SYMLINK_MAX} bytes")
            node = _Node(stat.S_IFLNK | 0o777, self.epoch)
            self.meta(node, member)
            node.tail, node.size = target, len(target)
        elif member.islnk():
            node = self.hardlink(member)
        elif member.ischr() or member.isblk() or member.isfifo():
            kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK if member.isblk() else stat.S_IFIFO
            node = _Node(kind, self.epoch)
            self.meta(node, member)
            if not member.isfifo():
                major, minor = member.devmajor, member.devminor
                if not (0 <= major < 1 << 12 and 0 <= minor < 1 << 20):
                    raise self.fail(f"device number {major}:{minor} is out of range")
                node.rdev = (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)  # new_encode_dev
        else:
            raise self.fail(f"unsupported tar entry type {member.type!r}")
        parent.children[name] = node

    def meta(self, node: _Node, member: tarfile.TarInfo) -> None:
        """Owner, mode (not a symlink's), xattrs (added to any it has), mtime."""
        xattrs = _xattrs(member)
        for key, _ in xattrs:
            if key.startswith("trusted.overlay."):
                raise self.fail(f"xattr {key!r} is reserved for overlayfs whiteouts")
        if not (0 <= member.uid < 0xFFFFFFFF and 0 <= member.gid < 0xFFFFFFFF):
            raise self.fail(f"owner {member.uid}:{member.gid} is out of range")
        node.uid, node.gid = member.uid, member.gid
        if not stat.S_ISLNK(node.mode):
            node.mode = stat.S_IFMT(node.mode) | (member.mode & 0o7777)
        if xattrs:
            if node.xattrs is None:
                node.xattrs = {}
            node.xattrs.update(xattrs)
        if node.children is not None:
            sec, nsec = int(member.mtime), 0  # tarstage sets directories' times in whole seconds
        else:
            sec, nsec = _mtime(member)
        # mkfs.erofs's clamping: at or after the build time is the build time.
        node.sec, node.nsec = (self.epoch, 0) if sec >= self.epoch else (max(sec, 0), nsec if sec >= 0 else 0)

    def whiteout(self, parts: Parts) -> None:
        parent = self.directory(parts[:-1])
        assert parent.children is not None
        base = parts[-1]
        if base == OPAQUE:
            self.set_opaque(parent)
            return
        if base.startswith(WHITEOUT + WHITEOUT):
            log.debug("%s: ignoring aufs metadata entry %s", self.layer, self.where)
            return
        name = base[len(WHITEOUT) :]
        if name in (b"", b".", b".."):
            raise self.fail("whiteout of an empty, '.' or '..' name")
        existing = parent.children.get(name)
        if existing is None:
            node = parent.children[name] = _Node(stat.S_IFCHR, self.epoch)
            node.whiteout = True
        elif existing.children is not None:
            # This layer's own directory stays; what lower layers had there goes.
            self.set_opaque(existing)
        # else: this layer's own non-directory hides the lower path already.

    def hardlink(self, member: tarfile.TarInfo) -> _Node:
        """The inode keeps its first entry's metadata: a link entry adds a name only."""
        target = self.split(member.linkname, "hard link target")
        if not target:
            raise self.fail("hard link to the layer root")
        parent = self.directory(target[:-1], create=False)
        assert parent.children is not None
        node = parent.children.get(target[-1])
        if node is None:
            raise self.fail(f"hard link target {self._show(target)} is not in this layer")
        if node.whiteout:
            raise self.fail(f"hard link to {self._show(target)}, which this layer deletes")
        if node.children is not None:
            raise self.fail(f"hard link to a directory {self._show(target)}")
        return node

    def regular(self, member: tarfile.TarInfo, node: _Node) -> None:
        size = member.size
        if size < 0:
            raise self.fail(f"negative size {size}")
        self.file_bytes += size
        if self.file_bytes > self.max_bytes:
            raise self.fail(
                f"claims {format_size(size)} (sparse holes count), which takes the layer past "
                f"its cap of {format_size(self.max_bytes)} unpacked (--max-layer-size)"
            )
        segments = [(0, size)]
        if member.sparse is not None:
            segments = [(off, n) for off, n in member.sparse if n]
            end = 0
            for off, n in segments:
                if off < end or off + n > size:
                    raise self.fail("sparse map out of order or past the file's size")
                end = off + n
        node.size = size
        tail_len = size % BLOCK_SIZE
        full = size - tail_len
        # Inline the tail if it can sit after the largest inode and the xattrs.
        node.xbody = _xattr_body(node.xattrs, self.fail)
        inline = 0 < tail_len <= BLOCK_SIZE - 64 - len(node.xbody) and self.tails_held + tail_len <= self.tail_budget
        node.nblocks = full // BLOCK_SIZE + (1 if tail_len and not inline else 0)
        base = self.data_end
        node.blkaddr = base // BLOCK_SIZE if node.nblocks else 0
        self.data_end = base + node.nblocks * BLOCK_SIZE
        limit = full if inline else size  # bytes that go to the data area
        tail = bytearray(tail_len) if inline else None
        write = self.out.write
        try:
            for off, n in segments:
                for view in self.inp.views(n):
                    length = len(view)
                    if off < limit:
                        write(base + off, view if off + length <= limit else view[: limit - off])
                    if tail is not None and off + length > limit:
                        skip = max(0, limit - off)
                        tail[off + skip - limit : off + length - limit] = view[skip:]
                    off += length
        except _Truncated:
            raise self.fail("the tar ends inside this file's data") from None
        if tail is not None:
            node.tail = bytes(tail)
            self.tails_held += tail_len

    # ------------------------------------------------------------ the image

    def finish(self) -> tuple[bytes, bytes, int]:
        """Lay out inodes and directories after the data; returns (superblock
        block with a nil UUID, metadata bytes, inode count)."""
        self.out.flush()
        B = BLOCK_SIZE
        # Breadth first from the root, entries by name: each inode once, hard
        # links counted; a directory's nlink is 2 + its subdirectories.
        order: list[_Node] = [self.root]
        parents: dict[int, _Node] = {id(self.root): self.root}
        links: dict[int, int] = collections.defaultdict(int)  # names; for directories 2 + subdirectories
        links[id(self.root)] = 2
        listings: dict[int, list[tuple[bytes, _Node]]] = {}
        queue = collections.deque([self.root])
        whiteouts = 0
        while queue:
            d = queue.popleft()
            assert d.children is not None
            entries = sorted(d.children.items())
            listings[id(d)] = entries
            for _name, child in entries:
                if child.children is not None:
                    links[id(d)] += 1
                    links[id(child)] = 2
                    parents[id(child)] = d
                    order.append(child)
                    queue.append(child)
                    continue
                links[id(child)] += 1
                if links[id(child)] == 1:
                    order.append(child)
                    whiteouts += child.whiteout
        self.whiteouts = whiteouts

        # Directory contents: how many blocks and how much of the last (names
        # only; the nids are known after placement).
        dir_blocks: dict[int, list[list[tuple[bytes, _Node]]]] = {}
        first = operator.itemgetter(0)
        for node in order:
            if node.children is None:
                continue
            entries = listings[id(node)]
            bisect.insort(entries, (b".", node), key=first)
            bisect.insort(entries, (b"..", parents[id(node)]), key=first)
            blocks: list[list[tuple[bytes, _Node]]] = [[]]
            used = 0
            for entry in entries:
                if used + _DIRENT + len(entry[0]) > B:
                    blocks.append([])
                    used = 0
                blocks[-1].append(entry)
                used += _DIRENT + len(entry[0])
            dir_blocks[id(node)] = blocks
            node.size = (len(blocks) - 1) * B + used
            node.nblocks = len(blocks) - (1 if used < B else 0)

        # Inode records (inode, xattrs, inline tail), none crossing a block:
        # each goes to the partly filled block with the least room that fits
        # it (best fit, as mkfs.erofs does), or to a new block.
        meta_start = self.data_end  # block aligned
        meta_base = meta_start - B  # meta_blkaddr: the root gets nid 128, never 0
        end = meta_start
        # Partly filled blocks by their free 32-byte slots: offsets of the first free slot.
        free_slots: list[list[int]] = [[] for _ in range(B // _SLOT + 1)]
        nonempty = 0  # bit n set: free_slots[n] has a block
        epoch = self.epoch
        for node in order:
            is_dir = node.children is not None
            if node.xattrs is not None and (is_dir or not stat.S_ISREG(node.mode)):
                node.xbody = _xattr_body(node.xattrs, lambda why: FormatError(f"{self.layer}: {why}"))
            node.compact = (
                node.uid <= 0xFFFF and node.gid <= 0xFFFF and links[id(node)] <= 0xFFFF
                and node.size <= 0xFFFFFFFF and node.sec == epoch and node.nsec == 0
            )  # fmt: skip
            head = (32 if node.compact else 64) + len(node.xbody)
            tail_len = node.size % B if is_dir else len(node.tail or b"")
            node.inline = tail_len > 0 and head + tail_len <= B
            if is_dir and tail_len and not node.inline:
                node.nblocks += 1
            record = head + (tail_len if node.inline else 0)
            need = -(-record // _SLOT)
            fits = nonempty >> need
            if fits and record <= B:
                have = need + (fits & -fits).bit_length() - 1
                node.pos = free_slots[have].pop()
                if not free_slots[have]:
                    nonempty &= ~(1 << have)
                left = have - need
            else:
                node.pos = end
                end += -(-record // B) * B
                left = B // _SLOT - need if record <= B else 0
            if left >= 2:
                free_slots[left].append(node.pos + need * _SLOT)
                nonempty |= 1 << left
            node.nid = (node.pos - meta_base) // _SLOT
        # Blocks after the inodes: directories' blocks, and the tails of
        # symlinks and regular files that could not be inlined.
        late = end
        for node in order:
            if node.children is not None:
                node.blkaddr = late // B if node.nblocks else 0
                late += node.nblocks * B
            elif node.tail is not None and not node.inline:
                if stat.S_ISREG(node.mode) and node.nblocks:
                    raise AssertionError("a file with data blocks lost its inline tail")  # see regular()
                node.blkaddr = late // B
                node.nblocks = 1
                late += B
        meta = bytearray(late - meta_start)
        for index, node in enumerate(order):
            self._place(meta, meta_start, node, links[id(node)], index + 1, dir_blocks.get(id(node)))

        sb = bytearray(B)
        s = EROFS_SUPER_OFFSET
        struct.pack_into("<I", sb, s, EROFS_MAGIC)
        struct.pack_into("<I", sb, s + _SB_FEATURE_COMPAT, _FEATURE_COMPAT_SB_CHKSUM | _FEATURE_COMPAT_MTIME)
        sb[s + _SB_BLKSZBITS] = _BLKBITS
        struct.pack_into("<H", sb, s + _SB_ROOT_NID, self.root.nid)
        struct.pack_into("<Q", sb, s + _SB_INOS, len(order))
        struct.pack_into("<QI", sb, s + _SB_BUILD_TIME, self.epoch, 0)  # compact inodes' mtime
        struct.pack_into("<I", sb, s + _SB_BLOCKS, late // B)
        struct.pack_into("<II", sb, s + _SB_META_BLKADDR, meta_base // B, 0)
        assert len(sb) >= s + _SB_SIZE
        return bytes(sb), bytes(meta), len(order)

    def _place(
        self, meta: bytearray, meta_start: int, node: _Node, links: int, ino: int,
        blocks: list[list[tuple[bytes, _Node]]] | None,
    ) -> None:  # fmt: skip
        B = BLOCK_SIZE
        layout = _LAYOUT_FLAT_INLINE if node.inline else _LAYOUT_FLAT_PLAIN
        icount = (len(node.xbody) - _XATTR_HEADER) // 4 + 1 if node.xbody else 0
        i_u = node.rdev if stat.S_ISCHR(node.mode) or stat.S_ISBLK(node.mode) else node.blkaddr
        at = node.pos - meta_start
        if node.compact:
            _COMPACT.pack_into(
                meta, at, layout << 1, icount, node.mode, links, node.size, 0, i_u, ino, node.uid, node.gid, 0
            )
            at += 32
        else:
            _EXTENDED.pack_into(
                meta, at, (layout << 1) | _VERSION_EXTENDED, icount, node.mode, 0, node.size, i_u, ino,
                node.uid, node.gid, node.sec, node.nsec, links,
            )  # fmt: skip
            at += 64
        meta[at : at + len(node.xbody)] = node.xbody
        at += len(node.xbody)
        if blocks is not None:
            data = [self._dir_block(b) for b in blocks]
            full = b"".join(d + bytes(B - len(d)) for d in data[: node.size // B])
            last = data[-1] if node.size % B else b""
        else:
            full, last = b"", node.tail or b""
        if node.inline:
            meta[at : at + len(last)] = last
            rest = full
        else:
            rest = full + (last + bytes(-len(last) % B) if last else b"")
        if blocks is not None or (node.tail is not None and not node.inline):
            start = node.blkaddr * B - meta_start
            meta[start : start + len(rest)] = rest

    @staticmethod
    def _dir_block(entries: list[tuple[bytes, _Node]]) -> bytes:
        head = bytearray()
        names = bytearray()
        nameoff = _DIRENT * len(entries)
        for name, child in entries:
            head += _DIRENT_ST.pack(child.nid, nameoff + len(names), _FILE_TYPES[stat.S_IFMT(child.mode)], 0)
            names += name
        return bytes(head + names)


_ENC, _ERR = "utf-8", "surrogateescape"
# Header types parsed here; tarfile parses the rest (GNU sparse "S", global and
# Solaris PAX headers, unknown types, base-256 numbers, anything odd).
_PLAIN_TYPES = frozenset(
    {tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE, tarfile.LNKTYPE, tarfile.SYMTYPE,
     tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.DIRTYPE, tarfile.FIFOTYPE}
)  # fmt: skip
_FAST_TYPES = _PLAIN_TYPES | {tarfile.XHDTYPE, tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK}
_NUMBERS = struct.Struct("8s8s8s12s12s8s")  # mode uid gid size mtime chksum, from byte 100
_PAX_RECORD = re.compile(rb"(\d+) ([^=]+)=")


def _nts(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode(_ENC, _ERR)


def _octal(field: bytes) -> int:
    # What tarfile's nti() reads, when the field is NUL-terminated or padded (it
    # always is); a NUL followed by more raises ValueError, and tarfile decides.
    return int(field.rstrip(b"\0 ") or b"0", 8)


def _fast_frombuf(buf: bytes) -> tarfile.TarInfo | None:
    """:meth:`tarfile.TarInfo.frombuf` for the common header block, several
    times faster; None where tarfile must parse it (it then also raises the
    right errors: an end block, a bad checksum, base-256 numbers...)."""
    kind = buf[156:157]
    if len(buf) != tarfile.BLOCKSIZE or kind not in _FAST_TYPES:
        return None
    if kind == tarfile.XHDTYPE:  # only its size matters (and the checksum)
        try:
            size, chksum = _octal(buf[124:136]), _octal(buf[148:156])
        except ValueError:
            return None
        if zlib.adler32(buf) & 0xFFFF != (chksum - 256 + sum(buf[148:156]) + 1) % 65521:
            return None
        info = tarfile.TarInfo()
        info.type, info.size, info.chksum = kind, size, chksum
        return info
    try:
        mode, uid, gid, size, mtime, chksum = map(_octal, _NUMBERS.unpack_from(buf, 100))
        devmajor = devminor = 0  # read for devices only: other writers leave anything there
        if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
            devmajor, devminor = _octal(buf[329:337]), _octal(buf[337:345])
    except ValueError:
        return None
    # The header checksum is the byte sum with the field as spaces (256); the
    # low half of Adler-32 is 1 + that sum mod 65521: the sum without a Python
    # loop. (tarfile also takes a sum of signed bytes: a mismatch goes to it.)
    if zlib.adler32(buf) & 0xFFFF != (chksum - 256 + sum(buf[148:156]) + 1) % 65521:
        return None
    info = tarfile.TarInfo()
    name = _nts(buf[0:100])
    if kind == tarfile.AREGTYPE and name.endswith("/"):
        kind = tarfile.DIRTYPE  # old V7 tar's directories
    if kind == tarfile.DIRTYPE:
        name = name.rstrip("/")
    prefix = _nts(buf[345:500])
    if prefix and kind not in tarfile.GNU_TYPES:
        name = prefix + "/" + name
    info.name, info.mode, info.uid, info.gid, info.size, info.mtime = name, mode, uid, gid, size, mtime
    info.chksum, info.type = chksum, kind
    if kind in (tarfile.LNKTYPE, tarfile.SYMTYPE):
        info.linkname = _nts(buf[157:257])
    info.devmajor, info.devminor = devmajor, devminor
    return info


class _Headers:
    """Tar members in order, exactly as :meth:`tarfile.TarFile.next` reads them
    in stream mode, but with the common headers (ustar, GNU long names, PAX
    extended headers) parsed here; every other case goes through tarfile's own
    code (``TarInfo._proc_member``, its documented extension point)."""

    def __init__(self, inp: _Input, layer: str) -> None:
        self.inp = inp
        self.shim = _TarShim(inp)
        self.layer = layer

    def member(self) -> tarfile.TarInfo:
        inp, shim = self.inp, self.shim
        start = inp.tell()
        buf = inp.read(tarfile.BLOCKSIZE)
        info = _fast_frombuf(buf) or tarfile.TarInfo.frombuf(buf, _ENC, _ERR)
        info.offset = start
        kind = info.type
        if kind in _PLAIN_TYPES:
            info.offset_data = inp.tell()
            shim.offset = info.offset_data + (info._block(info.size) if info.isreg() else 0)
            if shim.pax_headers:
                info._apply_pax_info(shim.pax_headers, _ENC, _ERR)
                if info.isdir():
                    info.name = info.name.rstrip("/")
            return info
        if kind in (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK):
            data = inp.read(info._block(info.size))
            nxt = self._subsequent()
            nxt.offset = info.offset
            if kind == tarfile.GNUTYPE_LONGNAME:
                nxt.name = _nts(data)
            else:
                nxt.linkname = _nts(data)
            if nxt.isdir():
                nxt.name = nxt.name.removesuffix("/")
            return nxt
        if kind == tarfile.XHDTYPE:
            return self._pax(info)
        return info._proc_member(shim)  # type: ignore[attr-defined]

    def _subsequent(self) -> tarfile.TarInfo:
        try:
            return self.member()
        except tarfile.HeaderError as exc:
            raise tarfile.SubsequentHeaderError(str(exc)) from None

    def _pax(self, info: tarfile.TarInfo) -> tarfile.TarInfo:
        """tarfile's ``_proc_pax`` for an extended (per-member) header."""
        data = self.inp.read(info._block(info.size))
        pax = self.shim.pax_headers.copy()
        pos = 0
        while match := _PAX_RECORD.match(data, pos):
            length = int(match.group(1))
            if length == 0:
                raise tarfile.InvalidHeaderError("invalid header")
            value = data[match.end(2) + 1 : match.start(1) + length - 1]
            pax[match.group(2).decode(_ENC, _ERR)] = value.decode(_ENC, _ERR)
            pos += length
        nxt = self._subsequent()
        if "GNU.sparse.map" in pax:
            info._proc_gnusparse_01(nxt, pax)  # type: ignore[attr-defined]
        elif "GNU.sparse.size" in pax:
            info._proc_gnusparse_00(nxt, pax, data)  # type: ignore[attr-defined]
        elif pax.get("GNU.sparse.major") == "1" and pax.get("GNU.sparse.minor") == "0":
            info._proc_gnusparse_10(nxt, pax, self.shim)  # type: ignore[attr-defined]
        nxt._apply_pax_info(pax, _ENC, _ERR)  # type: ignore[attr-defined]
        nxt.offset = info.offset
        if "size" in pax:
            offset = nxt.offset_data
            if nxt.isreg() or nxt.type not in tarfile.SUPPORTED_TYPES:
                offset += nxt._block(nxt.size)  # type: ignore[attr-defined]
            self.shim.offset = offset
        return nxt


def _members(inp: _Input, writer: _Writer, layer: str) -> Iterator[tarfile.TarInfo]:
    """Tar members in order. A bad header ends the archive where tarfile's
    stream mode ends it (a zero block, a bad checksum after the first member);
    the other header errors are refused."""
    headers = _Headers(inp, layer)
    first = True
    while True:
        offset = headers.shim.offset
        if inp.tell() < offset and not inp.skip(offset - inp.tell()):
            raise FormatError(
                f"{layer}: the tar ends inside an entry's data (a header claims more bytes than the stream holds)"
            )
        try:
            member = headers.member()
        except tarfile.EOFHeaderError:
            return
        except (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError, tarfile.InvalidHeaderError) as exc:
            if first:
                raise FormatError(f"{layer}: not a tar archive: {exc or 'empty file'}") from exc
            return  # what tarfile does: the archive ends at a bad header
        except (tarfile.TarError, ValueError, EOFError) as exc:  # bad PAX/sparse numbers, UTF-8
            if first:
                raise FormatError(f"{layer}: not a tar archive: {exc}") from exc
            raise FormatError(f"{layer}: bad tar header after {writer.where}: {exc}") from exc
        first = False
        if inp.tell() != member.offset_data:
            raise FormatError(f"{layer}: entry {member.name!r}: its data is not where its header says")
        yield member


def write_erofs_from_tar(
    source: BinaryIO | Callable[[], bytes],
    out_path: str | os.PathLike[str],
    *,
    layer: str,
    source_date_epoch: int,
    max_layer_bytes: int = DEFAULT_MAX_LAYER_BYTES,
    tail_budget: int = DEFAULT_TAIL_BUDGET,
    uuid_seed: bytes | None = None,
    on_entry: Callable[[int], None] | None = None,
    on_final: Callable[[int], None] | None = None,
) -> WriteResult:
    """Write the EROFS image of the uncompressed tar ``source`` (a binary file,
    or a callable returning its next piece, b"" at the end) to ``out_path``,
    which must not exist (created exclusively; removed on failure). Reads the
    stream to its end. ``layer`` names the layer in errors.

    The filesystem UUID is derived from ``uuid_seed`` (something that names
    the tar exactly, e.g. the digest of the blob it was unpacked from, already
    checked), the epoch and the metadata written; without a seed, from the
    tar stream's SHA-256 (which costs a pass over it).

    ``on_final(offset)`` is told, from this thread, whenever the image bytes
    before ``offset`` are written for good, block 0 aside (the superblock is
    written last): :class:`StreamingEncoder` compresses them meanwhile."""
    if source_date_epoch < 0:
        raise FormatError(f"source date epoch {source_date_epoch} is negative")
    if callable(source):
        next_piece = source
    else:
        stream = source
        next_piece = lambda: stream.read(_PIECE)  # noqa: E731
    inp = _Input(next_piece, layer, hash_stream=uuid_seed is None)
    fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        out = _Output(fd, on_final)
        writer = _Writer(inp, out, layer, max_layer_bytes, source_date_epoch, tail_budget)
        for member in _members(inp, writer, layer):
            try:
                writer.entry(member)
            except (ValueError, OverflowError) as exc:
                raise writer.fail(str(exc)) from exc
            if on_entry is not None:
                on_entry(writer.entries)
        trailing = sum(len(piece) - piece.count(0) for piece in inp.rest())
        if trailing:
            log.warning("%s: %d non-zero bytes after the end of the tar archive ignored", layer, trailing)
        sb_block, meta, inodes = writer.finish()
        out.on_final = None  # metadata and superblock: told by the return
        tar_sha256 = None if inp.hash is None else "sha256:" + inp.hash.hexdigest()
        # The UUID: from what decides every byte (the tar, the epoch) and the
        # metadata itself, so the same input gives the same image.
        seed = hashlib.sha256(_UUID_TAG + struct.pack("<Q", source_date_epoch))
        seed.update(uuid_seed if uuid_seed is not None else (tar_sha256 or "").encode())
        seed.update(meta)
        seed.update(sb_block)
        fs_uuid = uuid_mod.UUID(bytes=seed.digest()[:16], version=4)
        block = bytearray(sb_block)
        s = EROFS_SUPER_OFFSET
        block[s + _SB_UUID : s + _SB_UUID + 16] = fs_uuid.bytes
        struct.pack_into("<I", block, s + _SB_CHECKSUM, _sb_checksum(block[s:]))
        out.write(writer.data_end, meta)
        out.flush()
        image_size = writer.data_end + len(meta)
        os.ftruncate(fd, image_size)  # holes at the end of the data read as zeros
        out.write(0, bytes(block))  # the superblock last
        out.flush()
    except BaseException:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(out_path)
        raise
    os.close(fd)
    return WriteResult(
        entries=writer.entries, tar_bytes=inp.tell(), tar_sha256=tar_sha256,
        image_size=image_size, inodes=inodes, file_bytes=writer.file_bytes,
        whiteouts=writer.whiteouts, opaque_dirs=writer.opaque, uuid=fs_uuid,
    )  # fmt: skip


class StreamingEncoder:
    """The seekable blob of an image while it is being written.

    Each frame whose image bytes are final (:meth:`final`, fed by
    ``write_erofs_from_tar(on_final=...)``) is compressed at once in worker
    threads (zstd and SHA-512 drop the GIL, so this runs beside the tar
    parsing) and kept in an anonymous scratch file; frame 0, which holds the
    superblock, and the frames the metadata lands in wait for :meth:`finish`.
    The blob and result are exactly :func:`~lazyfs.format.encode_image`'s for
    the finished image (same compressor settings, table, dm-verity payload).
    Memory: ``2 * workers`` frames at most.
    """

    def __init__(
        self, image_path: str | os.PathLike[str], *, chunk_size: int, level: int = 3,
        workers: int | None = None, scratch_dir: str | os.PathLike[str] | None = None,
    ) -> None:  # fmt: skip
        from lazyfs.format.seekable import MAX_CHUNK_SIZE

        if not 0 < chunk_size <= MAX_CHUNK_SIZE:
            raise ValueError(f"chunk size must be in 1..{MAX_CHUNK_SIZE}, got {chunk_size}")
        self._image = os.fspath(image_path)
        self._fd = -1  # opened on first use: the writer creates the file
        self._chunk = chunk_size
        self._level = level
        self._workers = workers or min(4, os.cpu_count() or 1)
        self._pool = concurrent.futures.ThreadPoolExecutor(self._workers, thread_name_prefix="encode")
        self._local = threading.local()  # a ZstdCompressor must not be shared between threads
        self._pending: collections.deque[concurrent.futures.Future[tuple[bytes, bytes]]] = collections.deque()
        self._next = 1  # the next frame to compress (frame 0 waits for the superblock)
        # Frames 1.., compressed, in order; closed by close().
        self._body = tempfile.TemporaryFile(dir=scratch_dir)  # noqa: SIM115
        self._sizes: list[int] = []
        self._digests: list[bytes] = []

    def _open(self) -> int:
        if self._fd < 0:
            self._fd = os.open(self._image, os.O_RDONLY | os.O_CLOEXEC)
        return self._fd

    def _frame(self, index: int) -> tuple[bytes, bytes]:
        data = os.pread(self._fd, self._chunk, index * self._chunk)
        cctx = getattr(self._local, "cctx", None)
        if cctx is None:
            import zstandard

            cctx = self._local.cctx = zstandard.ZstdCompressor(
                level=self._level, write_checksum=True, write_content_size=True
            )
        frame = cctx.compress(data)
        return frame, hashlib.sha512(frame).digest()

    def final(self, upto: int) -> None:
        """Image bytes before ``upto`` are final: compress the frames they fill."""
        while (self._next + 1) * self._chunk <= upto:
            self._open()
            self._pending.append(self._pool.submit(self._frame, self._next))
            self._next += 1
            self._drain(2 * self._workers)

    def _drain(self, keep: int) -> None:
        while len(self._pending) > keep or (self._pending and self._pending[0].done()):
            frame, digest = self._pending.popleft().result()
            self._body.write(frame)
            self._sizes.append(len(frame))
            self._digests.append(digest)

    def finish(
        self, blob_path: str | os.PathLike[str], *, dm_verity: bool = False, verity_block_size: int = 4096,
        progress: Callable[[int, int], None] | None = None,
    ) -> EncodeResult:  # fmt: skip
        """The image is complete: encode what is left and write the blob (to a
        temporary name in its directory, renamed at the end)."""
        from lazyfs.format.encode import EncodeResult, write_tail

        fd = self._open()
        usize = os.fstat(fd).st_size
        count = -(-usize // self._chunk)
        for index in range(self._next, count):
            self._pending.append(self._pool.submit(self._frame, index))
            self._drain(2 * self._workers)
        self._next = count
        first = self._pool.submit(self._frame, 0) if count else None

        def hash_image() -> Any:  # the diff_id, in order now that block 0 is written
            image_hash = hashlib.sha256()
            for at in range(0, usize, _PIECE):
                image_hash.update(os.pread(fd, _PIECE, at))
            return image_hash

        hashing = self._pool.submit(hash_image)  # beside the blob's assembly below
        self._drain(0)
        frames = [first.result()] if first is not None else []
        sizes = [len(f) for f, _ in frames] + self._sizes
        digests = [d for _, d in frames] + self._digests
        blob_path = os.fspath(blob_path)
        tmp = os.path.join(os.path.dirname(os.path.abspath(blob_path)), f".{os.path.basename(blob_path)}.{os.urandom(8).hex()}")
        blob_hash = hashlib.sha256()
        position = 0
        try:
            with open(tmp, "xb") as dst:

                def emit(data: bytes | memoryview) -> None:
                    nonlocal position
                    dst.write(data)
                    blob_hash.update(data)
                    position += len(data)

                for frame, _ in frames:
                    emit(frame)
                self._body.seek(0)
                while piece := self._body.read(_PIECE):
                    emit(piece)
                    if progress is not None:
                        progress(min(position * usize // max(sum(sizes), 1), usize), usize)
                frame_offsets = []
                offset = 0
                for size in sizes:
                    frame_offsets.append(offset)
                    offset += size
                image_hash = hashing.result()
                with open(self._image, "rb") as src:
                    tail = write_tail(
                        emit, position, usize=usize, chunk_size=self._chunk,
                        frames=list(zip(frame_offsets, digests, strict=True)), image=src,
                        image_digest=image_hash.digest(), dm_verity=dm_verity, verity_block_size=verity_block_size,
                    )  # fmt: skip
            os.replace(tmp, blob_path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        if progress is not None:
            progress(usize, usize)
        return EncodeResult(
            descriptor=tail.descriptor(blob_hash.hexdigest()), diff_id="sha256:" + image_hash.hexdigest(), uncompressed_size=usize,
            chunk_size=self._chunk, frame_count=count, verity_root=tail.verity_root,
            verity_hash_offset=tail.verity_hash_offset,
        )  # fmt: skip

    def close(self) -> None:
        """Stop the workers and drop the scratch file (after finish, or instead of it)."""
        for fut in self._pending:
            fut.cancel()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._pending.clear()
        self._body.close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
