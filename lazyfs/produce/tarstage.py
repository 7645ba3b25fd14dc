"""One layer's tar, staged as a directory holding exactly that layer's changes.

What ``mkfs.erofs --tar --aufs`` would record, for an erofs-utils without
``--tar``: whiteouts are never applied but written in overlayfs form (a
``.wh.NAME`` entry becomes a 0/0 character device ``NAME``, ``.wh..wh..opq``
the directory xattr ``trusted.overlay.opaque=y``); hard links, symlinks,
devices, fifos, owners by number, modes with setuid/setgid/sticky, PAX
xattrs (``SCHILY.xattr.*``, ``LIBARCHIVE.xattr.*``) and sparse files are kept.

Nothing is ever written outside the staging directory: every path is walked
one component at a time from a directory fd with ``O_NOFOLLOW``, so a
symlink, device or file where a directory is needed is an error, never
followed; ``..`` that climbs above the root is an error; a hard link must
name something of this layer. A layer may unpack to at most
``max_layer_bytes`` (the apparent sizes of its files, sparse holes included).
Every refusal is a FormatError naming the layer and the entry.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import logging
import os
import shutil
import stat
import tarfile
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO
from urllib.parse import unquote_to_bytes

from lazyfs.errors import FormatError
from lazyfs.units import format_size

__all__ = ["DEFAULT_MAX_LAYER_BYTES", "StageResult", "stage_tar"]

log = logging.getLogger(__name__)

DEFAULT_MAX_LAYER_BYTES = 8 << 30
OPAQUE_XATTR = "trusted.overlay.opaque"
WHITEOUT = b".wh."
OPAQUE = b".wh..wh..opq"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_PIECE = 1 << 20
# tarfile reads at the end of the stream once or twice to find the end of the
# archive; more empty reads than this mean it is skipping data that is not there.
_MAX_EMPTY_READS = 64
_OPEN_DIRS = 128

Parts = tuple[bytes, ...]


@dataclass(frozen=True)
class StageResult:
    entries: int
    file_bytes: int  # apparent sizes of the regular files written
    whiteouts: int
    opaque_dirs: int


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "directory"), (stat.S_ISLNK, "symlink"), (stat.S_ISREG, "file"),
        (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"), (stat.S_ISFIFO, "fifo"),
    ):  # fmt: skip
        if test(mode):
            return name
    return "special file"


def _xattrs(member: tarfile.TarInfo) -> list[tuple[str, bytes]]:
    """The PAX xattr records of ``member``, names and values as raw as they came."""
    out = []
    for key, value in member.pax_headers.items():
        if key.startswith("SCHILY.xattr."):
            # tarfile decodes PAX values as UTF-8 with surrogateescape: undo it.
            out.append((key[len("SCHILY.xattr.") :], value.encode("utf-8", "surrogateescape")))
        elif key.startswith("LIBARCHIVE.xattr."):
            name = unquote_to_bytes(key[len("LIBARCHIVE.xattr.") :]).decode(
                "utf-8", "surrogateescape"
            )
            try:
                out.append((name, base64.b64decode(value + "=" * (-len(value) % 4))))
            except ValueError as exc:
                raise FormatError(f"xattr {name!r}: value is not base64") from exc
    return out


class _EndGuard:
    """The stream as tarfile sees it. In stream mode tarfile skips an entry's
    data (a whiteout's, say) by reading it block by block, even past the end
    of the stream: a header claiming a huge size would spin for hours."""

    def __init__(self, stream: BinaryIO, layer: str) -> None:
        self._stream = stream
        self._layer = layer
        self._empty = 0

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read(size)
        if data or size == 0:
            self._empty = 0
        else:
            self._empty += 1
            if self._empty > _MAX_EMPTY_READS:
                raise FormatError(
                    f"{self._layer}: the tar ends inside an entry's data "
                    "(a header claims more bytes than the stream holds)"
                )
        return data


class _Stager:
    def __init__(self, tar: tarfile.TarFile, root: str, layer: str, max_bytes: int) -> None:
        self.tar = tar
        self.layer = layer
        self.max_bytes = max_bytes
        self.root_fd = os.open(root, _DIR_FLAGS)
        self.file_bytes = 0
        self.entries = 0
        self.whiteouts: set[Parts] = set()  # the 0/0 devices this layer made
        self.opaque = 0
        self.dir_times: list[tuple[Parts, int]] = []
        # Recently used directories, open (tars list a directory's entries together).
        self._dirs: OrderedDict[Parts, int] = OrderedDict()
        self.where = ""

    def close(self) -> None:
        self._forget()
        os.close(self.root_fd)

    def fail(self, why: str) -> FormatError:
        return FormatError(f"{self.layer}: entry {self.where}: {why}")

    # ------------------------------------------------------------ paths

    def split(self, name: str, what: str = "path") -> Parts:
        """``name`` as components below the root; ``..`` may not climb above it."""
        parts: list[bytes] = []
        for part in os.fsencode(name).split(b"/"):
            if part in (b"", b"."):
                continue
            if part == b"..":
                if not parts:
                    raise self.fail(f"{what} {name!r} climbs out of the layer root")
                parts.pop()
            elif b"\0" in part:
                raise self.fail(f"{what} has a NUL byte")
            else:
                parts.append(part)
        return tuple(parts)

    def _forget(self, under: Parts | None = None) -> None:
        """Close the cached fds of ``under`` and below (all of them when None)."""
        n = len(under) if under is not None else 0
        for key in [k for k in self._dirs if under is None or k[:n] == under]:
            os.close(self._dirs.pop(key))

    def parent(self, parts: Parts, *, create: bool = True) -> int:
        """An fd of directory ``parts`` (borrowed until the next call: do not close),
        walked without following anything; missing directories are made (0755, root)
        when ``create``."""
        fd = self._dirs.get(parts)
        if fd is not None:
            self._dirs.move_to_end(parts)
            return fd
        fd = os.dup(self.root_fd)
        try:
            for i, part in enumerate(parts):
                fd = self._step(fd, part, parts[: i + 1], create)
        except BaseException:
            os.close(fd)
            raise
        self._dirs[parts] = fd
        if len(self._dirs) > _OPEN_DIRS:
            os.close(self._dirs.popitem(last=False)[1])
        return fd

    def _step(self, fd: int, part: bytes, here: Parts, create: bool) -> int:
        try:
            nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
        except FileNotFoundError:
            if not create:
                raise self.fail(f"{self._show(here)} is not in this layer") from None
            os.mkdir(part, 0o755, dir_fd=fd)
            nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
            os.fchmod(nxt, 0o755)  # whatever the umask says
        except OSError as exc:
            if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
                raise
            if create and here in self.whiteouts:
                # A path this layer deleted and now fills: a new, opaque directory.
                os.unlink(part, dir_fd=fd)
                self.whiteouts.discard(here)
                os.mkdir(part, 0o755, dir_fd=fd)
                nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
                os.fchmod(nxt, 0o755)
                self._set_opaque(nxt)
            else:
                kind = _kind(os.stat(part, dir_fd=fd, follow_symlinks=False).st_mode)
                raise self.fail(
                    f"{self._show(here)} is a {kind}, not a directory; refusing to go through it"
                ) from None
        os.close(fd)
        return nxt

    @staticmethod
    def _show(parts: Parts) -> str:
        return repr(os.fsdecode(b"/".join(parts)))[:300]

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
            self.meta(member, fd=self.root_fd)
            self.dir_times.append(((), int(member.mtime)))
            return
        parent = self.parent(parts[:-1])
        name = parts[-1]
        existing = self._lstat(parent, name)
        if existing is None:
            self.whiteouts.discard(parts)  # stale: what it named went with its directory
        if member.isdir():
            opaque = False
            if existing is not None and not stat.S_ISDIR(existing.st_mode):
                opaque = parts in self.whiteouts
                self.remove(parent, name, parts, existing)
                existing = None
            if existing is None:
                os.mkdir(name, 0o700, dir_fd=parent)
            fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
            try:
                self.meta(member, fd=fd)
                if opaque:
                    self._set_opaque(fd)
            finally:
                os.close(fd)
            self.dir_times.append((parts, int(member.mtime)))
            return
        if existing is not None:
            self.remove(parent, name, parts, existing)
        if member.isreg():
            self.regular(member, parent, name)
        elif member.issym():
            os.symlink(os.fsencode(member.linkname), name, dir_fd=parent)
            self.meta(member, parent=parent, name=name)
        elif member.islnk():
            self.hardlink(member, parent, name)
        elif member.ischr() or member.isblk():
            kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK
            os.mknod(
                name, kind | 0o600, os.makedev(member.devmajor, member.devminor), dir_fd=parent
            )
            self.meta(member, parent=parent, name=name)
        elif member.isfifo():
            os.mkfifo(name, 0o600, dir_fd=parent)
            self.meta(member, parent=parent, name=name)
        else:
            raise self.fail(f"unsupported tar entry type {member.type!r}")

    @staticmethod
    def _lstat(parent: int, name: bytes) -> os.stat_result | None:
        try:
            return os.stat(name, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def remove(self, parent: int, name: bytes, parts: Parts, st: os.stat_result) -> None:
        """A later entry replaces an earlier one of the same name (tar semantics)."""
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(name, dir_fd=parent)  # fd-based: never follows a symlink
            self._forget(parts)  # cached fds of what went would create files nobody sees
            n = len(parts)
            self.whiteouts = {w for w in self.whiteouts if w[:n] != parts}
        else:
            os.unlink(name, dir_fd=parent)
        self.whiteouts.discard(parts)

    def whiteout(self, parts: Parts) -> None:
        parent = self.parent(parts[:-1])
        base = parts[-1]
        if base == OPAQUE:
            self._set_opaque(parent)
            return
        if base.startswith(WHITEOUT + WHITEOUT):
            log.debug("%s: ignoring aufs metadata entry %s", self.layer, self.where)
            return
        name = base[len(WHITEOUT) :]
        if name in (b"", b".", b".."):
            raise self.fail("whiteout of an empty, '.' or '..' name")
        target = (*parts[:-1], name)
        existing = self._lstat(parent, name)
        if existing is None:
            os.mknod(name, stat.S_IFCHR, os.makedev(0, 0), dir_fd=parent)
            os.chown(name, 0, 0, dir_fd=parent, follow_symlinks=False)
            self.whiteouts.add(target)
        elif stat.S_ISDIR(existing.st_mode):
            # This layer's own directory stays; what lower layers had there goes.
            fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
            try:
                self._set_opaque(fd)
            finally:
                os.close(fd)
        # else: this layer's own non-directory hides the lower path already.

    def _set_opaque(self, fd: int) -> None:
        os.setxattr(fd, OPAQUE_XATTR, b"y")
        self.opaque += 1

    def _claim(self, size: int) -> None:
        if size < 0:
            raise self.fail(f"negative size {size}")
        self.file_bytes += size
        if self.file_bytes > self.max_bytes:
            raise self.fail(
                f"claims {format_size(size)} (sparse holes count), which takes the layer past "
                f"its cap of {format_size(self.max_bytes)} unpacked (--max-layer-size)"
            )

    def regular(self, member: tarfile.TarInfo, parent: int, name: bytes) -> None:
        self._claim(member.size)
        segments = [(0, member.size)]
        if member.sparse is not None:
            segments = [(off, n) for off, n in member.sparse if n]
            end = 0
            for off, n in segments:
                if off < end or off + n > member.size:
                    raise self.fail("sparse map out of order or past the file's size")
                end = off + n
        fd = os.open(name, _FILE_FLAGS, 0o600, dir_fd=parent)
        try:
            for off, n in segments:
                self._copy(fd, off, n)
            if member.sparse is not None:
                os.ftruncate(fd, member.size)  # the trailing hole
            self.meta(member, fd=fd)
        finally:
            os.close(fd)

    def _copy(self, fd: int, offset: int, length: int) -> None:
        src = self.tar.fileobj
        assert src is not None
        while length:
            piece = src.read(min(_PIECE, length))
            if not piece:
                raise self.fail("the tar ends inside this file's data")
            view = memoryview(piece)
            while view:
                n = os.pwrite(fd, view, offset)
                view, offset = view[n:], offset + n
            length -= len(piece)

    def hardlink(self, member: tarfile.TarInfo, parent: int, name: bytes) -> None:
        """The inode keeps its first entry's metadata: a link entry adds a name only."""
        target = self.split(member.linkname, "hard link target")
        if not target:
            raise self.fail("hard link to the layer root")
        if target in self.whiteouts:
            raise self.fail(f"hard link to {self._show(target)}, which this layer deletes")
        # parent() may replace the cached fd: hold our own on the link's directory.
        dst = os.dup(parent)
        try:
            src = self.parent(target[:-1], create=False)
            st = self._lstat(src, target[-1])
            if st is None:
                raise self.fail(f"hard link target {self._show(target)} is not in this layer")
            if stat.S_ISDIR(st.st_mode):
                raise self.fail(f"hard link to a directory {self._show(target)}")
            os.link(target[-1], name, src_dir_fd=src, dst_dir_fd=dst, follow_symlinks=False)
        finally:
            os.close(dst)

    def meta(
        self,
        member: tarfile.TarInfo,
        *,
        fd: int | None = None,
        parent: int | None = None,
        name: bytes = b"",
    ) -> None:
        """Owner, then mode (chown clears setuid), then xattrs (chown clears
        security.capability), then mtime."""
        mode = member.mode & 0o7777
        xattrs = _xattrs(member)
        for key, _ in xattrs:
            if key.startswith("trusted.overlay."):
                raise self.fail(f"xattr {key!r} is reserved for overlayfs whiteouts")
        if fd is not None:
            os.fchown(fd, member.uid, member.gid)
            os.fchmod(fd, mode)
            for key, value in xattrs:
                os.setxattr(fd, key, value)
            os.utime(fd, ns=(int(member.mtime * 1e9),) * 2)
            return
        assert parent is not None
        os.chown(name, member.uid, member.gid, dir_fd=parent, follow_symlinks=False)
        if not member.issym():
            # Not a symlink (we just made it, nobody else writes here): chmod may follow.
            os.chmod(name, mode, dir_fd=parent)
        path = b"/proc/self/fd/%d/%s" % (parent, name)
        for key, value in xattrs:
            os.setxattr(path, key, value, follow_symlinks=False)
        os.utime(name, dir_fd=parent, follow_symlinks=False, ns=(int(member.mtime * 1e9),) * 2)

    def finish(self) -> None:
        """Directory mtimes last: making their entries changed them."""
        for parts, mtime in reversed(self.dir_times):
            with contextlib.suppress(FormatError, FileNotFoundError, NotADirectoryError):
                fd = self.parent(parts, create=False) if parts else self.root_fd
                os.utime(fd, (mtime, mtime))


def stage_tar(
    stream: BinaryIO,
    root: str | os.PathLike[str],
    *,
    layer: str,
    max_layer_bytes: int = DEFAULT_MAX_LAYER_BYTES,
    on_entry: Callable[[int], None] | None = None,
) -> StageResult:
    """Unpack the uncompressed tar ``stream`` into the empty directory ``root`` as
    described above; reads ``stream`` to its end (so a checked stream gets checked).

    ``on_entry(count)`` is called after each entry. ``layer`` names the layer in errors.
    """
    try:
        # Closed in the finally below (a stream-mode TarFile never closes ``stream``).
        tar = tarfile.open(  # noqa: SIM115
            fileobj=_EndGuard(stream, layer), mode="r|", encoding="utf-8", errors="surrogateescape"
        )
    except (tarfile.TarError, ValueError) as exc:  # tarfile parses PAX numbers with bare int()
        raise FormatError(f"{layer}: not a tar archive: {exc}") from exc
    stager = _Stager(tar, os.fspath(root), layer, max_layer_bytes)
    try:
        while True:
            try:
                member = tar.next()
            except (tarfile.TarError, ValueError) as exc:  # ValueError: bad PAX/sparse numbers, UTF-8
                raise FormatError(f"{layer}: bad tar header after {stager.where}: {exc}") from exc
            if member is None:
                break
            tar.members.clear()  # tarfile keeps every header otherwise: memory grows per entry
            try:
                stager.entry(member)
            except OSError as exc:
                raise stager.fail(exc.strerror or str(exc)) from exc
            except (ValueError, OverflowError) as exc:
                raise stager.fail(str(exc)) from exc
            if on_entry is not None:
                on_entry(stager.entries)
        stager.finish()
    finally:
        stager.close()
        tar.close()
    trailing = 0
    while piece := stream.read(_PIECE):
        trailing += len(piece) - piece.count(0)
    if trailing:
        log.warning(
            "%s: %d non-zero bytes after the end of the tar archive ignored", layer, trailing
        )
    return StageResult(stager.entries, stager.file_bytes, len(stager.whiteouts), stager.opaque)
