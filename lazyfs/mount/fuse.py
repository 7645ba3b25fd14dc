"""The read-only FUSE tree (pyfuse3). Thin on purpose: an inode table,
attributes, and ``read`` delegating to the layer objects.

    <dir>/manifest.json                     the resolved image manifest
    <dir>/layers/<i>/layer.erofs            layer i (0 = bottom), lazily filled
    <dir>/layers/<i>/layer.erofs.dmverity   containerd's sidecar (verity layers only)
    <dir>/layers/<i>/digest                 the layer blob's digest
    <dir>/.lazyerofs/stats.json             live counters (what ``lazyerofs stats`` reads)
    <dir>/.lazyerofs/profile.json           reads recorded so far (``lazyerofs profile save``)

Every failure below is logged once by the layer and surfaces here as EIO.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import pyfuse3

from lazyfs.errors import LazyErofsError

__all__ = ["LayerFile", "LazyFS"]

log = logging.getLogger(__name__)

# The tree never changes while mounted: let the kernel cache names and
# attributes for a long time.
ATTR_TIMEOUT = 3600.0


class LayerFile(Protocol):
    """What the tree needs of a layer's file (``lazyfs.fetch.Layer`` is one)."""

    @property
    def size(self) -> int: ...

    async def read(self, offset: int, size: int) -> bytes: ...


@dataclass
class _Node:
    inode: int
    name: bytes
    mode: int
    parent: int
    children: dict[bytes, int] = field(default_factory=dict)
    data: bytes | None = None
    layer: LayerFile | None = None
    generate: Callable[[], bytes] | None = None

    @property
    def size(self) -> int:
        if self.layer is not None:
            return self.layer.size
        if self.data is not None:
            return len(self.data)
        return 0


class LazyFS(pyfuse3.Operations):
    """The tree of one mount, built once in ``__init__``."""

    enable_writeback_cache = False

    def __init__(
        self,
        *,
        manifest: bytes,
        layers: list[tuple[LayerFile, str, bytes | None]],
        stats: Callable[[], Mapping[str, object]],
        profile: Callable[[], bytes] | None = None,
    ) -> None:
        """``layers``: (file, blob digest, dm-verity sidecar JSON or None), bottom
        first; ``profile``: the startup profile recorded so far (JSON)."""
        super().__init__()
        self._nodes: dict[int, _Node] = {}
        self._open: dict[int, tuple[_Node, bytes | None]] = {}
        self._next_fh = 1
        self._stats = stats
        self._mtime_ns = time.time_ns()
        root = self._add(pyfuse3.ROOT_INODE, b"", stat.S_IFDIR | 0o555, pyfuse3.ROOT_INODE)
        self._add_file(root, b"manifest.json", data=manifest)
        layers_dir = self._add_dir(root, b"layers")
        for i, (file, digest, sidecar) in enumerate(layers):
            d = self._add_dir(layers_dir, str(i).encode())
            self._add_file(d, b"layer.erofs", layer=file)
            if sidecar is not None:
                self._add_file(d, b"layer.erofs.dmverity", data=sidecar)
            self._add_file(d, b"digest", data=digest.encode() + b"\n")
        state = self._add_dir(root, b".lazyerofs")
        self._add_file(state, b"stats.json", generate=self._stats_json)
        if profile is not None:
            self._add_file(state, b"profile.json", generate=profile)

    # -- building --------------------------------------------------------------

    def _add(
        self,
        inode: int,
        name: bytes,
        mode: int,
        parent: int,
        *,
        data: bytes | None = None,
        layer: LayerFile | None = None,
        generate: Callable[[], bytes] | None = None,
    ) -> _Node:
        node = _Node(inode, name, mode, parent, data=data, layer=layer, generate=generate)
        self._nodes[inode] = node
        if inode != parent:
            self._nodes[parent].children[name] = inode
        return node

    def _add_dir(self, parent: _Node, name: bytes) -> _Node:
        return self._add(len(self._nodes) + pyfuse3.ROOT_INODE, name, stat.S_IFDIR | 0o555, parent.inode)

    def _add_file(
        self,
        parent: _Node,
        name: bytes,
        *,
        data: bytes | None = None,
        layer: LayerFile | None = None,
        generate: Callable[[], bytes] | None = None,
    ) -> _Node:
        inode = len(self._nodes) + pyfuse3.ROOT_INODE
        return self._add(inode, name, stat.S_IFREG | 0o444, parent.inode, data=data, layer=layer, generate=generate)

    def _stats_json(self) -> bytes:
        import json

        return json.dumps(self._stats(), indent=2).encode() + b"\n"

    # -- helpers -----------------------------------------------------------------

    def _node(self, inode: int) -> _Node:
        try:
            return self._nodes[inode]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    def _attr(self, node: _Node) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = node.inode
        a.st_mode = node.mode
        a.st_nlink = 2 + sum(1 for c in node.children.values() if stat.S_ISDIR(self._nodes[c].mode)) if stat.S_ISDIR(node.mode) else 1
        a.st_uid = 0
        a.st_gid = 0
        a.st_size = len(node.generate()) if node.generate is not None else node.size
        a.st_blksize = 4096
        a.st_blocks = (a.st_size + 511) // 512
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = self._mtime_ns
        timeout = 0.0 if node.generate is not None else ATTR_TIMEOUT
        a.attr_timeout = timeout
        a.entry_timeout = ATTR_TIMEOUT
        return a

    # -- operations ----------------------------------------------------------------

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        return self._attr(self._node(inode))

    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        parent = self._node(parent_inode)
        if name == b".":
            return self._attr(parent)
        if name == b"..":
            return self._attr(self._node(parent.parent))
        child = parent.children.get(name)
        if child is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(self._nodes[child])

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if not stat.S_ISDIR(self._node(inode).mode):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        entries = sorted(self._nodes[fh].children.items())
        for index in range(start_id, len(entries)):
            name, inode = entries[index]
            if not pyfuse3.readdir_reply(token, name, self._attr(self._nodes[inode]), index + 1):
                return

    async def releasedir(self, fh: int) -> None:
        return None

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self._node(inode)
        if stat.S_ISDIR(node.mode):
            raise pyfuse3.FUSEError(errno.EISDIR)
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise pyfuse3.FUSEError(errno.EROFS)
        fh = self._next_fh
        self._next_fh += 1
        snapshot = node.generate() if node.generate is not None else None
        self._open[fh] = (node, snapshot)
        # Layer bytes never change: let the page cache keep them across opens.
        # Generated files change on every open, so they bypass it.
        return pyfuse3.FileInfo(fh=fh, keep_cache=snapshot is None, direct_io=snapshot is not None)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        try:
            node, snapshot = self._open[fh]
        except KeyError:
            raise pyfuse3.FUSEError(errno.EBADF) from None
        if snapshot is not None:
            return snapshot[off : off + size]
        if node.data is not None:
            return node.data[off : off + size]
        assert node.layer is not None
        try:
            return await node.layer.read(off, size)
        except LazyErofsError as exc:
            log.error("read %s at %d+%d: %s", self._path(node), off, size, exc)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except Exception:
            # A bug below must cost one read, not the mount: an exception
            # escaping a handler ends pyfuse3's loop, and a kernel mount
            # waiting on this very read would then hang for ever.
            log.exception("read %s at %d+%d failed unexpectedly", self._path(node), off, size)
            raise pyfuse3.FUSEError(errno.EIO) from None

    async def release(self, fh: int) -> None:
        self._open.pop(fh, None)

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        total = sum(n.size for n in self._nodes.values())
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = (total + 4095) // 4096
        s.f_bfree = s.f_bavail = 0
        s.f_files = len(self._nodes)
        s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR)

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return []

    def _path(self, node: _Node) -> str:
        parts = []
        while node.inode != pyfuse3.ROOT_INODE:
            parts.append(node.name.decode())
            node = self._nodes[node.parent]
        return "/".join(reversed(parts))
