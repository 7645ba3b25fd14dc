"""Machine-wide knobs the tests and benchmarks share."""

from __future__ import annotations

import os

__all__ = ["drop_caches"]


def drop_caches(*, sync: bool = True) -> None:
    """Forget the page cache, dentries and inodes (EROFS and FUSE pages
    included): the next reads go to the daemon again, as on a fresh node."""
    if sync:
        os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")
