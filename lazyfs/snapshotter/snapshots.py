"""The snapshotter itself: containerd's snapshot semantics over directories,
overlayfs and lazily mounted layers. No gRPC here (see ``server.py``).

On disk, under the root::

    metadata.db            the state (store.py)
    snapshots/<id>/fs      an active snapshot's upper dir, a committed one's
                           contents, or the mount point of a remote layer
    snapshots/<id>/work    overlayfs' work dir of an active snapshot
    images/<digest>/       the FUSE tree of a lazily mounted image (remote.py)

Short paths matter: containerd passes all lower dirs in one mount option.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from lazyfs.errors import LazyErofsError
from lazyfs.mount import kernel
from lazyfs.snapshotter.filters import parse_filters, snapshot_fields
from lazyfs.snapshotter.remote import (
    LABEL_IMAGE_REF,
    LABEL_LAYER_DIGEST,
    LABEL_MANIFEST_DIGEST,
    LABEL_TARGET,
    RemoteLayers,
)
from lazyfs.snapshotter.store import AlreadyExists, InvalidArgument, Kind, Snapshot, Store

__all__ = ["Mount", "Snapshotter", "Usage"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Mount:
    type: str
    source: str
    options: tuple[str, ...]


@dataclass(frozen=True)
class Usage:
    size: int
    inodes: int


def disk_usage(path: Path) -> Usage:
    """Bytes allocated and inodes under ``path``, not crossing into other mounts."""
    size = inodes = 0
    try:
        dev = path.lstat().st_dev
    except OSError:
        return Usage(0, 0)
    for top, dirs, files in os.walk(path):
        for name in dirs + files:
            try:
                st = os.lstat(os.path.join(top, name))
            except OSError:
                continue
            if st.st_dev != dev:
                if stat.S_ISDIR(st.st_mode):
                    dirs.remove(name)
                continue
            inodes += 1
            size += st.st_blocks * 512
    return Usage(size, inodes)


class Snapshotter:
    def __init__(self, root: Path, store: Store, remote: RemoteLayers | None) -> None:
        self.root = root
        self.snapshots_dir = root / "snapshots"
        self.snapshots_dir.mkdir(mode=0o700, exist_ok=True)
        self.store = store
        self.remote = remote

    # -- paths

    def dir_of(self, snap: Snapshot) -> Path:
        return self.snapshots_dir / str(snap.id)

    def fs_of(self, snap: Snapshot) -> Path:
        return self.dir_of(snap) / "fs"

    # -- containerd's calls

    def prepare(self, key: str, parent: str, labels: Mapping[str, str]) -> list[Mount]:
        target = labels.get(LABEL_TARGET)
        if target and self.remote is not None and self._remote_layer(labels) is not None:
            existing = self.store.find(target)
            if existing is not None and existing.kind == Kind.COMMITTED:
                raise AlreadyExists(f"target snapshot {target!r} already exists")
            if self._make_remote(target, parent, labels):
                raise AlreadyExists(f"target snapshot {target!r} was made available lazily")
        return self._create(key, parent, Kind.ACTIVE, labels)

    def view(self, key: str, parent: str, labels: Mapping[str, str]) -> list[Mount]:
        return self._create(key, parent, Kind.VIEW, labels)

    def mounts(self, key: str) -> list[Mount]:
        snap = self.store.get(key)
        if snap.kind == Kind.COMMITTED:
            raise InvalidArgument(f"snapshot {key!r} is committed; mount an active snapshot or a view of it")
        return self._mounts(snap)

    def commit(self, name: str, key: str, labels: Mapping[str, str]) -> Snapshot:
        snap = self.store.get(key)
        usage = disk_usage(self.fs_of(snap)) if snap.kind == Kind.ACTIVE else Usage(0, 0)
        committed = self.store.commit(key, name, labels, usage.size, usage.inodes)
        # The work dir is overlayfs' scratch space of the active snapshot only.
        shutil.rmtree(self.dir_of(committed) / "work", ignore_errors=True)
        return committed

    def remove(self, key: str) -> None:
        snap = self.store.remove(key)
        self._discard(snap)

    def stat(self, key: str) -> Snapshot:
        return self.store.get(key)

    def update(self, name: str, labels: Mapping[str, str], paths: Sequence[str]) -> Snapshot:
        snap = self.store.get(name)
        if not paths:
            new = dict(labels)
        else:
            new = dict(snap.labels)
            for path in paths:
                if path == "labels":
                    new = dict(labels)
                elif path.startswith("labels."):
                    k = path[len("labels.") :]
                    if k in labels:
                        new[k] = labels[k]
                    else:
                        new.pop(k, None)
                else:
                    raise InvalidArgument(f"cannot update field {path!r} of a snapshot (only labels)")
        return self.store.set_labels(name, new)

    def list(self, filters: Sequence[str]) -> list[Snapshot]:
        match = parse_filters(filters)
        return [
            s
            for s in self.store.all()
            if match(snapshot_fields(s.key, s.parent, s.kind.name.lower(), s.labels))
        ]

    def usage(self, key: str) -> Usage:
        snap = self.store.get(key)
        if snap.kind == Kind.ACTIVE:
            return disk_usage(self.fs_of(snap))
        return Usage(snap.size, snap.inodes)

    def cleanup(self) -> int:
        """Remove what no snapshot references: directories of snapshots that
        are gone (a crash between the two steps of a remove), and image
        mounts no snapshot uses. Returns how many things were removed."""
        known = {str(s.id) for s in self.store.all()}
        removed = 0
        for entry in os.scandir(self.snapshots_dir):
            if entry.name not in known:
                self._remove_dir(Path(entry.path))
                removed += 1
        if self.remote is not None:
            for row in self.store.images():
                if not self.store.image_users(row.digest):
                    self.remote.release(row.digest)
                    removed += 1
        return removed

    def recover(self) -> tuple[int, int]:
        if self.remote is None:
            return 0, 0
        return self.remote.recover(self.store.all(), self.fs_of)

    # -- internals

    def _create(self, key: str, parent: str, kind: Kind, labels: Mapping[str, str]) -> list[Mount]:
        snap = self.store.create(key, parent, kind, labels)
        try:
            (self.dir_of(snap) / "fs").mkdir(parents=True, mode=0o755)
            if kind == Kind.ACTIVE and parent:
                (self.dir_of(snap) / "work").mkdir(mode=0o711)
            return self._mounts(snap)
        except BaseException:
            self.store.remove(key)
            self._remove_dir(self.dir_of(snap))
            raise

    def _mounts(self, snap: Snapshot) -> list[Mount]:
        lowers = [str(self.fs_of(p)) for p in self.store.chain(snap.parent)] if snap.parent else []
        fs = str(self.fs_of(snap))
        if snap.kind == Kind.ACTIVE:
            if not lowers:
                return [Mount("bind", fs, ("rbind", "rw"))]
            work = str(self.dir_of(snap) / "work")
            return [
                Mount(
                    "overlay",
                    "overlay",
                    (f"workdir={work}", f"upperdir={fs}", f"lowerdir={':'.join(lowers)}"),
                )
            ]
        if not lowers:
            return [Mount("bind", fs, ("rbind", "ro"))]
        if len(lowers) == 1:
            return [Mount("bind", lowers[0], ("rbind", "ro"))]
        return [Mount("overlay", "overlay", (f"lowerdir={':'.join(lowers)}",))]

    @staticmethod
    def _remote_layer(labels: Mapping[str, str]) -> tuple[str, str, str] | None:
        image_ref = labels.get(LABEL_IMAGE_REF)
        manifest = labels.get(LABEL_MANIFEST_DIGEST)
        layer = labels.get(LABEL_LAYER_DIGEST)
        if image_ref and manifest and layer:
            return image_ref, manifest, layer
        return None

    def _make_remote(self, target: str, parent: str, labels: Mapping[str, str]) -> bool:
        """Commit ``target`` as a lazily mounted layer. False (logged) when
        it cannot be: then containerd fetches and applies the layer itself."""
        assert self.remote is not None
        found = self._remote_layer(labels)
        assert found is not None
        image_ref, manifest, layer = found
        t0 = time.monotonic()
        try:
            row, _ = self.remote.ensure_image(image_ref, manifest)
        except LazyErofsError as exc:
            log.warning("layer %s of %s: not lazily: %s", layer, image_ref, exc)
            return False
        if self.remote.layer_file(row, layer) is None:
            log.info("layer %s of %s is not seekable EROFS; containerd will apply it", layer, image_ref)
            self.remote.release(manifest)
            return False
        snap = self.store.create(target, parent, Kind.COMMITTED, labels, image=manifest, layer=layer)
        fs = self.fs_of(snap)
        try:
            fs.mkdir(parents=True, mode=0o755)
            self.remote.mount_layer(row, layer, fs)
        except LazyErofsError as exc:
            log.warning("layer %s of %s: not lazily: %s", layer, image_ref, exc)
            self.store.remove(target)
            self._remove_dir(self.dir_of(snap))
            self.remote.release(manifest)
            return False
        log.info("layer %s of %s mounted lazily as %s in %.2fs", layer, image_ref, target, time.monotonic() - t0)
        return True

    def _discard(self, snap: Snapshot) -> None:
        if snap.remote:
            kernel.umount(str(self.fs_of(snap)))
        self._remove_dir(self.dir_of(snap))
        if snap.image is not None and self.remote is not None:
            self.remote.release(snap.image)

    @staticmethod
    def _remove_dir(path: Path) -> None:
        """Remove a snapshot dir; a mount left inside (a crash) is detached first."""
        fs = path / "fs"
        if kernel.find_mount(str(fs)) is not None:
            kernel.umount(str(fs))
        shutil.rmtree(path, ignore_errors=True)
