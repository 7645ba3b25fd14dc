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
import sys
import time
from dataclasses import dataclass

from lazyfs.errors import MountError

__all__ = [
    "LOWER_FLAGS",
    "OVERLAY_MAX_LOWERS",
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

# overlayfs refuses more lower layers than this (OVL_MAX_STACK).
OVERLAY_MAX_LOWERS = 500
# The new mount API's syscall numbers: one table for x86_64 and aarch64 (and
# every architecture's generic table since Linux 5.2, where they came in).
_SYSCALLS = {"move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432}
_NEW_API_MACHINES = ("x86_64", "aarch64")
FSOPEN_CLOEXEC = 1
FSCONFIG_SET_FLAG = 0
FSCONFIG_SET_STRING = 1
FSCONFIG_CMD_CREATE = 6
FSMOUNT_CLOEXEC = 1
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_NOEXEC = 0x8
MOVE_MOUNT_F_EMPTY_PATH = 0x4
AT_FDCWD = -100
_MS_TO_ATTR = {MS_NOSUID: MOUNT_ATTR_NOSUID, MS_NODEV: MOUNT_ATTR_NODEV, MS_NOEXEC: MOUNT_ATTR_NOEXEC}

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


def mount_overlay(
    lowers_top_first: list[str], target: str, *, flags: int = ROOTFS_FLAGS, api: str = "auto"
) -> KernelMount:
    """Stack read-only layers at ``target`` (first = top), with ``flags``
    (default: nosuid, nodev) on top of read-only. One layer is bind-mounted.

    Any number of lowers up to overlayfs' own limit (500): mount(2) passes
    its options in one page, which ~100 absolute paths overflow, so lowers
    go one by one through the new mount API (``fsconfig(..., "lowerdir+",
    path)``, Linux 6.8+). Older kernels (or a seccomp filter refusing the
    new calls) fall back to mount(2), with paths relative to the lowers'
    common parent when the absolute ones do not fit. ``api`` forces one way
    ("fsconfig" or "legacy"; tests).
    """
    os.makedirs(target, exist_ok=True)
    if not lowers_top_first:
        raise MountError("no layers to stack")
    if len(lowers_top_first) > OVERLAY_MAX_LOWERS:
        raise MountError(
            f"cannot stack {len(lowers_top_first)} layers: overlayfs takes at most {OVERLAY_MAX_LOWERS} lower dirs"
        )
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
        if api == "fsconfig" or (api == "auto" and _has_lowerdir_plus()):
            try:
                _overlay_fsconfig(lowers_top_first, target, flags)
                return KernelMount(target, "overlay", "overlay")
            except OSError as exc:
                # No new mount API after all (seccomp, an odd kernel): fall back.
                if api == "fsconfig" or exc.errno not in (errno.ENOSYS, errno.EPERM):
                    raise
        _overlay_legacy(lowers_top_first, target, flags)
    except OSError as exc:
        raise MountError(f"cannot stack overlay of {len(lowers_top_first)} layers at {target}: {exc.strerror}") from exc
    return KernelMount(target, "overlay", "overlay")


# --- overlay through the new mount API ----------------------------------------------------



def _kernel_at_least(major: int, minor: int) -> bool:
    release = os.uname().release
    parts = release.split(".", 2)
    try:
        found = (int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or 0))
    except (IndexError, ValueError):
        return False
    return found >= (major, minor)


def _has_lowerdir_plus() -> bool:
    """True where overlayfs takes ``lowerdir+`` through fsconfig (Linux 6.8+).

    Decided from the release, not probed: before 6.5 an unknown key is
    only collected into a legacy option string, so a probe would pass
    and the mount fail later.
    """
    return os.uname().machine in _NEW_API_MACHINES and _kernel_at_least(6, 8)


def _syscall(name: str, *args: int | bytes | None) -> int:
    nr = _SYSCALLS[name]
    cargs = [ctypes.c_char_p(a) if isinstance(a, bytes) or a is None else ctypes.c_long(a) for a in args]
    rc = _libc.syscall(ctypes.c_long(nr), *cargs)
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{name}: {os.strerror(err)}")
    return rc


def _fs_messages(fs: int) -> str:
    """What the filesystem said about a failed fsconfig (its context's log)."""
    out = []
    for _ in range(16):
        try:
            msg = os.read(fs, 1024)
        except OSError:
            break
        if not msg:
            break
        out.append(msg.decode(errors="replace").strip())
    return "; ".join(out)


def _overlay_fsconfig(lowers_top_first: list[str], target: str, flags: int) -> None:
    attrs = MOUNT_ATTR_RDONLY
    for ms, attr in _MS_TO_ATTR.items():
        if flags & ms:
            attrs |= attr
    fs = _syscall("fsopen", b"overlay", FSOPEN_CLOEXEC)
    try:
        step = "source"
        try:
            _syscall("fsconfig", fs, FSCONFIG_SET_STRING, b"source", b"overlay", 0)
            for d in lowers_top_first:  # "lowerdir+" appends: first is the top
                step = f"lower dir {d}"
                _syscall("fsconfig", fs, FSCONFIG_SET_STRING, b"lowerdir+", os.fsencode(d), 0)
            step = "create"
            _syscall("fsconfig", fs, FSCONFIG_SET_FLAG, b"ro", None, 0)
            _syscall("fsconfig", fs, FSCONFIG_CMD_CREATE, None, None, 0)
        except OSError as exc:
            said = _fs_messages(fs)
            reason = f"{step}: {os.strerror(exc.errno)}{f' ({said})' if said else ''}"
            raise OSError(exc.errno, reason) from exc
        mnt = _syscall("fsmount", fs, FSMOUNT_CLOEXEC, attrs)
    finally:
        os.close(fs)
    try:
        _syscall("move_mount", mnt, b"", AT_FDCWD, os.fsencode(target), MOVE_MOUNT_F_EMPTY_PATH)
    finally:
        os.close(mnt)


# --- overlay through mount(2) -------------------------------------------------------------

# Run in a child with its cwd at the lowers' parent: mount(2) there with
# relative lower paths. A child, because the cwd is the whole process's and
# the daemon's other threads must not see it change.
_MOUNT_IN_CWD = (
    "import ctypes, ctypes.util, os, sys\n"
    "libc = ctypes.CDLL(ctypes.util.find_library('c'), use_errno=True)\n"
    "rc = libc.mount(b'overlay', os.fsencode(sys.argv[1]), b'overlay', int(sys.argv[2]), os.fsencode(sys.argv[3]))\n"
    "sys.exit((ctypes.get_errno() or 1) if rc else 0)\n"
)


def _overlay_legacy(lowers_top_first: list[str], target: str, flags: int) -> None:
    data = "lowerdir=" + ":".join(lowers_top_first)
    # The kernel copies one page of options, NUL included.
    if len(os.fsencode(data)) < os.sysconf("SC_PAGE_SIZE"):
        _mount("overlay", target, "overlay", MS_RDONLY | flags, data)
        return
    parent = os.path.dirname(lowers_top_first[0])
    if not parent or any(os.path.dirname(d) != parent for d in lowers_top_first):
        raise OSError(errno.E2BIG, "the lower dirs' paths do not fit in one page and share no parent dir")
    short = "lowerdir=" + ":".join(os.path.basename(d) for d in lowers_top_first)
    proc = subprocess.run(
        [sys.executable, "-I", "-S", "-c", _MOUNT_IN_CWD, os.path.abspath(target), str(MS_RDONLY | flags), short],
        cwd=parent,
        capture_output=True,
        check=False,
    )
    if proc.returncode != 0:
        err = proc.returncode if 0 < proc.returncode < 200 else errno.EIO
        raise OSError(err, f"mount -t overlay (in {parent}): {os.strerror(err)}")


def umount(target: str, *, lazy_after: float = 5.0) -> None:
    """Unmount ``target``; retry while busy, then detach lazily (never leave it)."""
    deadline = time.monotonic() + lazy_after
    pause = 0.005  # a mount that is not busy goes at once; a busy one is retried, backing off
    while True:
        if _libc.umount2(target.encode(), 0) == 0:
            return
        err = ctypes.get_errno()
        if err in (errno.EINVAL, errno.ENOENT):
            return  # not mounted
        if err != errno.EBUSY or time.monotonic() >= deadline:
            break
        time.sleep(pause)
        pause = min(pause * 2, 0.1)
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
