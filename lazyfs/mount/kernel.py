"""Kernel mounts: EROFS over a layer file, overlayfs over the layers.

Blocking calls. Never call them from the daemon's own trio thread when the
image file is served by that daemon: the kernel reads the file back through
FUSE while mount(2) waits. Use ``trio.to_thread`` or another process.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import subprocess
import time
from dataclasses import dataclass

from lazyfs.errors import MountError

__all__ = [
    "LOWER_FLAGS",
    "ROOTFS_FLAGS",
    "KernelMount",
    "abort_fuse",
    "detach_loop",
    "device_of",
    "find_mount",
    "mount_erofs",
    "mount_overlay",
    "mounts",
    "real_path",
    "umount",
]

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_BIND = 4096
MS_REMOUNT = 32
MNT_DETACH = 2

# Per-layer EROFS mounts are only overlay lowers: nothing on them is meant to
# be run, opened as a device or honoured as setuid from there. (Overlayfs
# checks exec against its own mount, so a noexec lower still runs in the rootfs.)
LOWER_FLAGS = MS_NOSUID | MS_NODEV | MS_NOEXEC
# The rootfs: an untrusted image must not hand out setuid root or device nodes.
ROOTFS_FLAGS = MS_NOSUID | MS_NODEV

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def _mount(source: str, target: str, fstype: str, flags: int, data: str = "") -> None:
    rc = _libc.mount(source.encode(), target.encode(), fstype.encode(), flags, data.encode() or None)
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount -t {fstype} {source} {target}: {os.strerror(err)}")


@dataclass(frozen=True)
class KernelMount:
    """A mount made here; ``loop`` is the loop device to detach after it, if any."""

    target: str
    fstype: str
    source: str
    loop: str | None = None


def mount_erofs(
    image: str, target: str, *, allow_loop: bool = True, force_loop: bool = False, flags: int = LOWER_FLAGS
) -> KernelMount:
    """Mount the EROFS image file read-only at ``target``, with ``flags``
    (default: nosuid, nodev, noexec) on top of read-only.

    Tries a file-backed mount first (Linux 6.12+ reads the file directly);
    falls back to a read-only loop device where the kernel wants a block
    device, or always with ``force_loop``.
    """
    os.makedirs(target, exist_ok=True)
    if not force_loop:
        try:
            _mount(image, target, "erofs", MS_RDONLY | flags)
            return KernelMount(target, "erofs", image)
        except OSError as exc:
            if not allow_loop or exc.errno not in (errno.ENOTBLK, errno.EINVAL, errno.ENODEV):
                raise MountError(f"cannot mount {image} with the kernel EROFS driver: {exc.strerror}") from exc
    loop = subprocess.run(
        ["losetup", "--find", "--show", "--read-only", image], capture_output=True, text=True
    )
    if loop.returncode != 0:
        raise MountError(f"losetup {image}: {loop.stderr.strip()}")
    dev = loop.stdout.strip()
    try:
        _mount(dev, target, "erofs", MS_RDONLY | flags)
    except OSError as exc:
        detach_loop(dev)
        raise MountError(f"cannot mount {image} (via {dev}) as EROFS: {exc.strerror}") from exc
    return KernelMount(target, "erofs", image, dev)


def mount_overlay(lowers_top_first: list[str], target: str, *, flags: int = ROOTFS_FLAGS) -> KernelMount:
    """Stack read-only layers at ``target`` (first = top), with ``flags``
    (default: nosuid, nodev) on top of read-only. One layer is bind-mounted."""
    os.makedirs(target, exist_ok=True)
    if not lowers_top_first:
        raise MountError("no layers to stack")
    for d in lowers_top_first:
        if ":" in d or "," in d:
            raise MountError(f"overlay lower dir {d!r} contains ':' or ','")
    try:
        if len(lowers_top_first) == 1:
            # A bind copies the source's flags (noexec on a lower); the
            # remount sets exactly ours, which is the only way to apply them.
            _mount(lowers_top_first[0], target, "", MS_BIND)
            try:
                _mount("", target, "", MS_BIND | MS_REMOUNT | MS_RDONLY | flags)
            except OSError:
                umount(target, lazy_after=0)
                raise
            return KernelMount(target, "bind", lowers_top_first[0])
        data = "lowerdir=" + ":".join(lowers_top_first)
        _mount("overlay", target, "overlay", MS_RDONLY | flags, data)
    except OSError as exc:
        raise MountError(f"cannot stack overlay at {target}: {exc.strerror}") from exc
    return KernelMount(target, "overlay", "overlay")


def umount(target: str, *, lazy_after: float = 5.0) -> None:
    """Unmount ``target``; retry while busy, then detach lazily (never leave it)."""
    deadline = time.monotonic() + lazy_after
    while True:
        if _libc.umount2(target.encode(), 0) == 0:
            return
        err = ctypes.get_errno()
        if err in (errno.EINVAL, errno.ENOENT):
            return  # not mounted
        if err != errno.EBUSY or time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    if _libc.umount2(target.encode(), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOENT):
            raise MountError(f"cannot unmount {target}: {os.strerror(err)}")


def detach_loop(dev: str) -> None:
    with contextlib.suppress(OSError):
        subprocess.run(["losetup", "--detach", dev], capture_output=True, check=False)


def _unescape(field: str) -> str:
    # /proc/self/mountinfo escapes space, tab, newline and backslash as octal.
    return field.encode().decode("unicode_escape") if "\\" in field else field


def mounts() -> list[tuple[str, str, str]]:
    """(mount point, fstype, source) of every mount, in mount order."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, right = line.split(" - ", 1)
            target = _unescape(left.split()[4])
            fstype, source = right.split()[:2]
            out.append((target, fstype, _unescape(source)))
    return out


def real_path(path: str) -> str:
    """``os.path.realpath(path)`` without ever stat-ing a mount point.

    A FUSE mount point is answered by its daemon: by this very process before
    it serves, by nobody when the daemon is stopped. realpath's lstat of the
    last component would then hang, so when the parent's real path plus the
    name is already a mount point (a directory, never a symlink), that is
    the answer.
    """
    parent, name = os.path.split(os.path.abspath(path))
    candidate = os.path.join(os.path.realpath(parent), name) if name else parent
    if any(point == candidate for point, _fstype, _source in mounts()):
        return candidate
    return os.path.realpath(candidate)


def device_of(target: str) -> str | None:
    """``major:minor`` of the topmost mount at ``target``, from mountinfo.

    Unlike stat(2) this never enters the filesystem, so a FUSE daemon can
    ask about its own mount before it serves requests.
    """
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split(" - ", 1)[0].split()
            if _unescape(fields[4]) == target:
                found = fields[2]
    return found


def abort_fuse(target: str) -> bool:
    """Abort the FUSE connection behind ``target`` (its daemon hangs or is
    gone): pending and future requests fail at once instead of blocking.
    Mounts fusectl if needed. True if a connection was aborted."""
    device = device_of(real_path(target))
    if device is None:
        return False
    conns = "/sys/fs/fuse/connections"
    if not os.path.exists(f"{conns}/{device.split(':')[1]}"):
        with contextlib.suppress(OSError):
            _mount("fusectl", conns, "fusectl", 0)
    try:
        with open(f"{conns}/{device.split(':')[1]}/abort", "w") as f:
            f.write("1")
    except OSError:
        return False
    return True


def find_mount(target: str) -> tuple[str, str] | None:
    """(fstype, source) of the topmost mount at ``target``, or None."""
    target = real_path(target)
    found = None
    for point, fstype, source in mounts():
        if point == target:
            found = (fstype, source)
    return found
