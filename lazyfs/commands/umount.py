"""``lazyerofs umount``: take down a mount in order, even after a crash."""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys

from lazyfs import kmount
from lazyfs.daemon import load_state, state_dir, teardown, wait_gone
from lazyfs.errors import MountError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "umount",
        aliases=["unmount"],
        help="unmount (rootfs overlay, EROFS mounts, FUSE) and stop the daemon",
        description=(
            "Take down what 'lazyerofs mount' set up at DIR: the overlay rootfs, "
            "the kernel EROFS mounts and the FUSE mount, in that order, and stop "
            "the daemon. Also cleans up after a daemon that was killed."
        ),
    )
    p.add_argument("mountpoint", metavar="DIR")
    p.add_argument("--timeout", type=float, default=15.0, help="seconds to wait for the daemon (default: 15)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    unmount(args.mountpoint, timeout=args.timeout)
    return 0


def unmount(mountpoint: str, *, timeout: float = 15.0) -> None:
    mountpoint = os.path.abspath(mountpoint)
    state = load_state(mountpoint)
    if state is None and kmount.find_mount(mountpoint) is None:
        raise MountError(f"{mountpoint}: not mounted by lazyerofs")
    # Kernel mounts first: they read through the FUSE mount below them.
    teardown(mountpoint, state)
    pid = state.get("pid") if state else None
    if pid and _alive(pid):
        os.kill(pid, signal.SIGTERM)
        if not wait_gone(pid, timeout):
            print(f"lazyerofs: daemon {pid} did not stop in {timeout:g}s; aborting its connection", file=sys.stderr)
            kmount.abort_fuse(mountpoint)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            wait_gone(pid, 5)
    found = kmount.find_mount(mountpoint)
    if found is not None and found[0].startswith("fuse"):
        # The daemon is gone but its mount is left: a stale "transport
        # endpoint is not connected" mount. Detach it.
        kmount.abort_fuse(mountpoint)
        fusermount = shutil.which("fusermount3") or shutil.which("fusermount")
        if fusermount:
            subprocess.run([fusermount, "-u", "-z", mountpoint], capture_output=True, check=False)
        if kmount.find_mount(mountpoint) is not None:
            kmount.umount(mountpoint, lazy_after=0)
    shutil.rmtree(state_dir(mountpoint), ignore_errors=True)
    if kmount.find_mount(mountpoint) is not None:
        raise MountError(f"{mountpoint} is still mounted")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
