"""``lazyerofs umount``: take down a mount in order, even after a crash."""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys

from lazyfs.errors import MountError
from lazyfs.mount import kernel as kmount
from lazyfs.mount.daemon import FUSE_TYPE, is_our_daemon, load_state, state_dir, teardown, wait_gone


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "umount",
        aliases=["unmount"],
        help="unmount (rootfs overlay, EROFS mounts, FUSE) and stop the daemon",
        description=(
            "Take down what 'lazyerofs mount' set up at DIR: the overlay rootfs, "
            "the kernel EROFS mounts and the FUSE mount, in that order, and stop "
            "the daemon. Also cleans up after a daemon that was killed. Only a "
            "lazyerofs FUSE mount is touched, and only its own daemon is signalled."
        ),
    )
    p.add_argument("mountpoint", metavar="DIR")
    p.add_argument("--timeout", type=float, default=15.0, help="seconds to wait for the daemon (default: 15)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    unmount(args.mountpoint, timeout=args.timeout)
    return 0


def _our_fuse_mount(mountpoint: str) -> bool:
    """True if the topmost mount at ``mountpoint`` is a lazyerofs FUSE mount;
    None-safe: False when nothing is mounted there."""
    found = kmount.find_mount(mountpoint)
    return found is not None and found[0] == FUSE_TYPE


def unmount(mountpoint: str, *, timeout: float = 15.0) -> None:
    if os.geteuid() != 0:
        raise MountError("unmounting needs root (the mounts and /run/lazyerofs are root's); run it as root")
    mountpoint = kmount.real_path(mountpoint)
    state = load_state(mountpoint)
    found = kmount.find_mount(mountpoint)
    if found is not None and found[0] != FUSE_TYPE:
        # Someone else's mount (maybe stacked on ours): never abort or detach it.
        raise MountError(f"{mountpoint}: the mount there is {found[0]}, not a lazyerofs mount; left alone")
    if state is None and found is None:
        raise MountError(f"{mountpoint}: not mounted by lazyerofs")
    # Kernel mounts first: they read through the FUSE mount below them.
    teardown(mountpoint, state)
    pid = state.get("pid") if state else None
    if state and is_our_daemon(state):
        assert isinstance(pid, int)
        os.kill(pid, signal.SIGTERM)
        if not wait_gone(pid, timeout):
            print(f"lazyerofs: daemon {pid} did not stop in {timeout:g}s; aborting its connection", file=sys.stderr)
            if _our_fuse_mount(mountpoint):
                kmount.abort_fuse(mountpoint)
            if is_our_daemon(state):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            wait_gone(pid, 5)
    elif isinstance(pid, int) and pid > 0 and _alive(pid):
        # The recorded pid now names another process: leave it be.
        print(f"lazyerofs: process {pid} is not this mount's daemon (its pid was reused); not signalling it", file=sys.stderr)
    if _our_fuse_mount(mountpoint):
        # The daemon is gone but its mount is left: a stale "transport
        # endpoint is not connected" mount. Detach it.
        kmount.abort_fuse(mountpoint)
        fusermount = shutil.which("fusermount3") or shutil.which("fusermount")
        if fusermount:
            subprocess.run([fusermount, "-u", "-z", mountpoint], capture_output=True, check=False)
        if _our_fuse_mount(mountpoint):
            kmount.umount(mountpoint, lazy_after=0)
    shutil.rmtree(state_dir(mountpoint), ignore_errors=True)
    if _our_fuse_mount(mountpoint):
        raise MountError(f"{mountpoint} is still mounted")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
