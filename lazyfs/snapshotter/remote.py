"""Remote layers: images mounted lazily, and their layers mounted as EROFS.

One ``lazyerofs mount`` daemon per image (by manifest digest) serves the
image's layer files over FUSE under ``ROOT/images/<digest>``; each remote
snapshot is one of those files mounted by the kernel's EROFS driver at the
snapshot's own directory, which overlay then stacks for containers.

The daemons are separate processes on purpose: containers keep reading
through them while the snapshotter is stopped or restarted. A restarted
snapshotter adopts the daemons that still run and re-mounts what is gone.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from lazyfs.containerd import labels
from lazyfs.errors import LazyErofsError
from lazyfs.mount import FUSE_TYPE, is_our_daemon, kernel, load_state, unmount
from lazyfs.mount.health import probe_stats
from lazyfs.oci.reference import parse_reference
from lazyfs.snapshotter.store import ImageRow, Snapshot, Store
from lazyfs.snapshotter.zygote import Zygote

__all__ = [
    "LABEL_IMAGE_REF",
    "LABEL_LAYER_DIGEST",
    "LABEL_MANIFEST_DIGEST",
    "LABEL_TARGET",
    "RemoteError",
    "RemoteLayers",
]

log = logging.getLogger(__name__)

LABEL_TARGET = labels.TARGET
LABEL_IMAGE_REF = labels.IMAGE_REF
LABEL_MANIFEST_DIGEST = labels.MANIFEST_DIGEST
LABEL_LAYER_DIGEST = labels.LAYER_DIGEST

# Seconds an image mount may take (resolving, chunk tables, first frames).
MOUNT_TIMEOUT = 120.0
# Seconds a daemon gets to answer a read of its stats file.
PROBE_TIMEOUT = 5.0


class RemoteError(LazyErofsError):
    """A layer that cannot be made available lazily (the caller falls back)."""


def _image_dir_name(digest: str) -> str:
    algo, _, hexpart = digest.partition(":")
    return f"{algo}-{hexpart[:32]}"


class RemoteLayers:
    """Starts, adopts and stops the image daemons; mounts their layers."""

    def __init__(
        self,
        root: Path,
        store: Store,
        *,
        mount_args: Sequence[str] = (),
        password: str | None = None,
        log_level: str = "warning",
        zygote: Zygote | None = None,
    ) -> None:
        self.images_dir = root / "images"
        self.images_dir.mkdir(mode=0o700, exist_ok=True)
        self.store = store
        self.mount_args = list(mount_args)
        self.password = password
        self.log_level = log_level
        self.zygote = zygote
        self._locks: dict[str, threading.Lock] = {}
        # manifest digest -> {layer digest: its file in the image tree}
        self._files: dict[str, dict[str, str]] = {}
        self._locks_guard = threading.Lock()

    def _lock(self, digest: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(digest, threading.Lock())

    # -- images

    def healthy(self, row: ImageRow) -> bool:
        """Its daemon is the one that mounted it, and the FUSE mount is there."""
        state = load_state(row.dir)
        if state is None or not is_our_daemon(state):
            return False
        found = kernel.find_mount(row.dir)
        return found is not None and found[0] == FUSE_TYPE

    def ensure_image(self, image_ref: str, manifest_digest: str) -> tuple[ImageRow, bool]:
        """The image's mount, started if needed: (row, True if (re)mounted now)."""
        with self._lock(manifest_digest):
            row = self.store.image(manifest_digest)
            if row is not None and self.healthy(row):
                return row, False
            if row is not None:
                log.warning("image %s: its daemon is gone; mounting it again", row.ref)
                self._unmount_dir(row.dir)
            try:
                ref = str(parse_reference(image_ref).with_digest(manifest_digest))
            except LazyErofsError as exc:
                raise RemoteError(f"image reference {image_ref!r}: {exc}") from exc
            target = self.images_dir / _image_dir_name(manifest_digest)
            target.mkdir(mode=0o700, exist_ok=True)
            self._files.pop(manifest_digest, None)
            self._run_mount(ref, target)
            row = ImageRow(manifest_digest, ref, str(target))
            self.store.add_image(row)
            self._warm(row)
            return row, True

    def _run_mount(self, ref: str, target: Path) -> None:
        argv = ["--log-level", self.log_level, "mount", *self.mount_args, "--nonempty"]
        if self.password is not None:
            argv.append("--password-stdin")
        argv += [ref, str(target)]
        stdin = (self.password + "\n") if self.password is not None else None
        log.info("mounting image %s at %s", ref, target)
        done = self.zygote.run(argv, stdin, MOUNT_TIMEOUT) if self.zygote is not None else None
        if done is None:  # no helper, or it is busy: a process of its own
            try:
                proc = subprocess.run(
                    [sys.executable, "-m", "lazyfs.cli", *argv],
                    input=stdin,
                    capture_output=True,
                    text=True,
                    timeout=MOUNT_TIMEOUT,
                )
            except subprocess.TimeoutExpired:
                self._unmount_dir(str(target))
                raise RemoteError(f"mounting {ref} took longer than {MOUNT_TIMEOUT:g}s") from None
            done = proc.returncode, proc.stderr
        rc, stderr = done
        if rc == 124:
            self._unmount_dir(str(target))
        if rc != 0:
            why = stderr.strip().splitlines()
            raise RemoteError(f"cannot mount {ref}: {why[-1] if why else f'exit status {rc}'}")

    def layer_files(self, row: ImageRow) -> dict[str, str]:
        """{layer digest: file} of the image's EROFS layers (asked once per mount)."""
        known = self._files.get(row.digest)
        if known is not None:
            return known
        stats, why = probe_stats(row.dir, PROBE_TIMEOUT)
        if stats is None:
            raise RemoteError(f"image {row.ref} does not answer: {why}")
        layers = stats.get("layers")
        files = {
            entry["digest"]: os.path.join(row.dir, "layers", str(entry.get("index")), "layer.erofs")
            for entry in (layers if isinstance(layers, list) else [])
            if isinstance(entry, dict) and isinstance(entry.get("digest"), str)
        }
        self._files[row.digest] = files
        return files

    def layer_file(self, row: ImageRow, layer_digest: str) -> str | None:
        """The image tree's file of ``layer_digest``, or None when the image
        has no such EROFS layer (not seekable EROFS, or not in the image)."""
        return self.layer_files(row).get(layer_digest)

    def _warm(self, row: ImageRow) -> None:
        """Start fetching every layer's first frame now, all at once: the
        kernel mount of each layer reads its superblock there, and containerd
        prepares the layers one after another."""

        def read_head(path: str) -> None:
            try:
                with open(path, "rb") as f:
                    f.read(4096)
            except OSError as exc:
                log.debug("early read of %s: %s", path, exc)

        try:
            files = list(self.layer_files(row).values())
        except RemoteError:
            return
        for path in files:
            threading.Thread(target=read_head, args=(path,), name="warm", daemon=True).start()

    def release(self, manifest_digest: str) -> None:
        """Unmount the image when no snapshot uses it any more."""
        with self._lock(manifest_digest):
            row = self.store.image(manifest_digest)
            if row is None or self.store.image_users(manifest_digest):
                return
            self._unmount_dir(row.dir)
            self._files.pop(manifest_digest, None)
            self.store.drop_image(manifest_digest)
            shutil.rmtree(row.dir, ignore_errors=True)

    @staticmethod
    def _unmount_dir(path: str) -> None:
        try:
            unmount(path, warn=log.warning)
        except LazyErofsError as exc:
            log.warning("unmounting %s: %s", path, exc)

    # -- layers

    def mount_layer(self, row: ImageRow, layer_digest: str, target: Path) -> None:
        path = self.layer_file(row, layer_digest)
        if path is None:
            raise RemoteError(f"{row.ref} has no seekable EROFS layer {layer_digest}")
        # No nosuid/nodev/noexec here: these are a container's files (setuid
        # sudo must work in it, as with any snapshotter); the snapshot dirs
        # under the 0700 root keep them from other users of this machine.
        try:
            kernel.mount_erofs(path, str(target), flags=0)
        except LazyErofsError as exc:
            raise RemoteError(str(exc)) from exc

    @staticmethod
    def unmount_layer(target: Path) -> None:
        try:
            kernel.umount(str(target))
        except LazyErofsError as exc:
            log.warning("unmounting layer at %s: %s", target, exc)

    def recover(self, snapshots: Sequence[Snapshot], fs_dir: Callable[[Snapshot], Path]) -> tuple[int, int]:
        """After a restart: adopt live image daemons, re-mount dead ones and
        any layer mount that is missing or sits on a re-mounted image.
        Returns (images re-mounted, layers re-mounted)."""
        remounted: set[str] = set()
        for row in self.store.images():
            if self.healthy(row):
                continue
            try:
                self.ensure_image(row.ref, row.digest)
                remounted.add(row.digest)
            except LazyErofsError as exc:
                log.error("image %s cannot be mounted again: %s", row.ref, exc)
        layers = 0
        for snap in snapshots:
            if not snap.remote or snap.image is None or snap.layer is None:
                continue
            target = Path(fs_dir(snap))
            mounted = kernel.find_mount(str(target)) is not None
            if mounted and snap.image not in remounted:
                continue
            row = self.store.image(snap.image)
            if row is None:
                log.error("snapshot %s: its image %s is not recorded", snap.key, snap.image)
                continue
            if mounted:
                self.unmount_layer(target)
            try:
                target.mkdir(parents=True, exist_ok=True)
                self.mount_layer(row, snap.layer, target)
                layers += 1
            except LazyErofsError as exc:
                log.error("snapshot %s: cannot mount layer %s again: %s", snap.key, snap.layer, exc)
        return len(remounted), layers
