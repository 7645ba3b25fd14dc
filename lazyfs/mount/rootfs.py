"""The ``--rootfs`` stack: every layer file of the FUSE tree mounted with the
kernel EROFS driver inside the state dir, then stacked with overlayfs.

Blocking, and the kernel reads the layer files back through our own FUSE
mount: the daemon runs this in a worker thread while its trio loop serves.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

from lazyfs.mount import kernel as kmount
from lazyfs.mount.state import RunState, state_dir

__all__ = ["EROFS_MOUNT_THREADS", "mount_rootfs"]

# EROFS mounts made at once. Each waits on FUSE reads of its superblock
# (served by the daemon's loop, maybe fetched), so a few in flight overlap
# those waits; hundreds of layers then mount in a fraction of the time.
EROFS_MOUNT_THREADS = 8


def mount_rootfs(state: RunState, rootfs: str, count: int, loop: bool, rootfs_flags: int) -> None:
    """EROFS-mount each of the ``count`` layer files (nosuid, nodev, noexec:
    they are only overlay lowers) and stack them at ``rootfs`` with
    ``rootfs_flags``; record (and save) each step in ``state``."""
    mountpoint = state.mountpoint
    base = state_dir(mountpoint) / "erofs"
    targets = [str(base / str(i)) for i in range(count)]
    # Every target is recorded, in one save, before any is mounted: teardown
    # skips one that is not mounted, so a crash at any point still leaves a
    # complete record, and 500 layers do not rewrite a growing state file
    # 500 times (seconds). Only a loop device, known once made, is saved as
    # it comes.
    records: list[dict[str, str | None]] = [
        {"target": target, "loop": None, "source": os.path.join(mountpoint, "layers", str(i), "layer.erofs")}
        for i, target in enumerate(targets)
    ]
    state.kernel_mounts.extend(records)
    state.save()
    lock = threading.Lock()

    def mount_one(record: dict[str, str | None]) -> None:
        source, target = record["source"], record["target"]
        assert source is not None and target is not None
        m = kmount.mount_erofs(source, target, force_loop=loop)
        if m.loop is not None:
            with lock:
                record["loop"] = m.loop
                state.save()

    with ThreadPoolExecutor(max_workers=max(1, min(EROFS_MOUNT_THREADS, count))) as pool:
        # list(): the first failure is raised, after every mount has finished.
        list(pool.map(mount_one, records))
    kmount.mount_overlay(list(reversed(targets)), rootfs, flags=rootfs_flags)
    state.rootfs = kmount.real_path(rootfs)
    state.save()
