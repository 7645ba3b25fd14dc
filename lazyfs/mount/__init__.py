"""The data plane of one image: a lazily filled FUSE tree, optionally stacked
as a rootfs with the kernel's EROFS and overlay drivers.

    daemon.py   run_mount: checks, fork, readiness, logging, signals, the serve loop
    _ready.py   the readiness pipe: warnings and the final word up to the waiting parent
    image.py    open an image (reference, or descriptor + blob) into its layers; stats
    fuse.py     the pyfuse3 tree (thin: inodes, attributes, reads delegated to layers)
    rootfs.py   --rootfs: EROFS-mount every layer file and stack them with overlayfs
    kernel.py   EROFS / overlay / loop mounts, mountinfo, real_path (no stat of a mount)
    state.py    /run/lazyerofs/<id>: run state, process checks, teardown, unmount

Arrows: daemon -> image -> lazyfs.fetch (the bytes of each layer) and
lazyfs.oci (resolving); daemon -> fuse, rootfs -> kernel, state -> kernel.
fuse.py and kernel.py import neither fetch nor oci.

Code outside this package imports from here only (``kernel`` and ``state``
are public modules for tests and benchmarks that inspect mounts).
"""

from lazyfs.mount import kernel, state
from lazyfs.mount.daemon import MountConfig, run_mount, unwrap_group
from lazyfs.mount.image import STATS_PATH, read_stats
from lazyfs.mount.state import (
    FUSE_TYPE,
    is_our_daemon,
    list_states,
    load_state,
    redact_url,
    state_dir,
    teardown,
    unmount,
    wait_gone,
)

__all__ = [
    "FUSE_TYPE",
    "STATS_PATH",
    "MountConfig",
    "is_our_daemon",
    "kernel",
    "list_states",
    "load_state",
    "read_stats",
    "redact_url",
    "run_mount",
    "state",
    "state_dir",
    "teardown",
    "unmount",
    "unwrap_group",
    "wait_gone",
]
