"""``lazyerofs umount``: take down a mount in order, even after a crash."""

from __future__ import annotations

import argparse
import sys

from lazyfs.mount import unmount


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "umount",
        aliases=["unmount"],
        help="unmount (rootfs overlay, EROFS mounts, FUSE) and stop the daemon",
        description=(
            "Take down what 'lazyerofs mount' set up at DIR: the overlay rootfs, "
            "the kernel EROFS mounts and the FUSE mount, in that order, and stop "
            "the daemon. Also cleans up after a daemon that was killed. Only a "
            "lazyerofs FUSE mount is touched, and only its own daemon is signalled. "
            "A daemon that stops cleanly removes its log; after a crash, a kill or a "
            "failure the log is kept and its path printed."
        ),
    )
    p.add_argument("mountpoint", metavar="DIR")
    p.add_argument("--timeout", type=float, default=15.0, help="seconds to wait for the daemon (default: 15)")
    p.set_defaults(func=run)


def _warn(message: str) -> None:
    print(f"lazyerofs: {message}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    unmount(args.mountpoint, timeout=args.timeout, warn=_warn)
    return 0
