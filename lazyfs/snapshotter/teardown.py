"""Unmount everything a snapshotter root holds (``--unmount-all``, tests)."""

from __future__ import annotations

import logging
from pathlib import Path

from lazyfs.errors import LazyErofsError
from lazyfs.mount import FUSE_TYPE, kernel, unmount

__all__ = ["unmount_all"]

log = logging.getLogger(__name__)


def unmount_all(root: Path) -> int:
    """Unmount every mount below ``root``: layer EROFS mounts and anything
    else first (deepest first), then the image daemons' FUSE trees, which
    the layers read through. Returns how many mounts were taken down."""
    prefix = str(root.resolve()).rstrip("/") + "/"
    below = [(point, fstype) for point, fstype, _src in kernel.mounts() if point.startswith(prefix)]
    # Last mounted first: a mount on top of another goes before it.
    below.reverse()
    count = 0
    for point, fstype in below:
        if fstype == FUSE_TYPE:
            continue
        kernel.umount(point)
        count += 1
    for point, fstype in below:
        if fstype != FUSE_TYPE:
            continue
        try:
            unmount(point, warn=log.warning)
        except LazyErofsError as exc:
            log.warning("%s: %s", point, exc)
            kernel.abort_fuse(point)
            kernel.umount(point)
        count += 1
    return count
