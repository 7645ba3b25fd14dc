"""The ``--rootfs`` stack: every layer file of the FUSE tree mounted with the
kernel EROFS driver inside the state dir, then stacked with overlayfs.

Blocking, and the kernel reads the layer files back through our own FUSE
mount: the daemon runs this in a worker thread while its trio loop serves.
"""

from __future__ import annotations

import os

from lazyfs.mount import kernel as kmount
from lazyfs.mount.state import RunState, state_dir

__all__ = ["mount_rootfs"]


def mount_rootfs(state: RunState, rootfs: str, count: int, loop: bool, rootfs_flags: int) -> None:
    """EROFS-mount each of the ``count`` layer files (nosuid, nodev, noexec:
    they are only overlay lowers) and stack them at ``rootfs`` with
    ``rootfs_flags``; record (and save) each step in ``state``."""
    mountpoint = state.mountpoint
    base = state_dir(mountpoint) / "erofs"
    targets = []
    for i in range(count):
        target = str(base / str(i))
        m = kmount.mount_erofs(os.path.join(mountpoint, "layers", str(i), "layer.erofs"), target, force_loop=loop)
        state.kernel_mounts.append({"target": m.target, "loop": m.loop, "source": m.source})
        state.save()
        targets.append(target)
    kmount.mount_overlay(list(reversed(targets)), rootfs, flags=rootfs_flags)
    state.rootfs = kmount.real_path(rootfs)
    state.save()
