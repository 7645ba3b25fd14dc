"""Run state of a mount, and taking a mount down (``lazyerofs umount``).

Runtime state (pid and start time, kernel mounts) of the mount at DIR lives
in ``/run/lazyerofs/<id>/state.json`` so ``unmount(DIR)`` can clean up even
after the daemon was killed. ``<id>`` hashes DIR's real path. The run and
state directories are 0700 and the state file and log 0600: the per-layer
EROFS mounts sit in there, and a URL's secrets never go in.

A state file is read back as untrusted JSON (an older version, a crash, a
hand edit may have written it): every field is checked before it is used,
and only what is still the kind of mount we made is taken down.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from lazyfs.errors import MountError
from lazyfs.mount import kernel as kmount

__all__ = [
    "FUSE_TYPE",
    "RUN_DIR",
    "RunState",
    "State",
    "is_our_daemon",
    "load_state",
    "mount_id",
    "open_private",
    "private_dir",
    "process_start_time",
    "redact_url",
    "save_state",
    "state_dir",
    "teardown",
    "unmount",
    "wait_gone",
]

log = logging.getLogger(__name__)

RUN_DIR = Path(os.environ.get("LAZYEROFS_RUN_DIR", "/run/lazyerofs"))
# What /proc/self/mountinfo calls our FUSE mounts (fsname/subtype of the daemon).
FUSE_TYPE = "fuse.lazyerofs"

# A state file as read back: JSON, so every value is checked before use.
State = Mapping[str, object]


def mount_id(mountpoint: str) -> str:
    # The real path: a mount made through a symlink is the same mount.
    return hashlib.sha256(kmount.real_path(mountpoint).encode()).hexdigest()[:16]


def state_dir(mountpoint: str) -> Path:
    return RUN_DIR / mount_id(mountpoint)


def redact_url(ref: str) -> str:
    """``ref`` fit for a log or state file: a URL loses its userinfo, query
    and fragment (signed storage URLs carry their secret there)."""
    if "://" not in ref:
        return ref
    try:
        u = urlsplit(ref)
        netloc = u.netloc.rpartition("@")[2]
    except ValueError:
        return "<unparsable URL>"
    return urlunsplit((u.scheme, netloc, u.path, "", ""))


def private_dir(path: Path) -> None:
    """Make ``path`` a directory only its owner (us) can enter: 0700, ours,
    not a symlink. A looser mode is tightened; another owner is refused."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode):
        raise MountError(f"{path} is not a directory (a symlink?); remove it")
    if st.st_uid != os.geteuid():
        raise MountError(f"{path} is owned by uid {st.st_uid}, not by us (uid {os.geteuid()}); refusing to use it")
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(path, 0o700, follow_symlinks=False)


def open_private(path: str, flags: int) -> int:
    """Open ``path`` for writing, mode 0600, never through a symlink."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | flags, 0o600)
    try:
        os.fchmod(fd, 0o600)  # an existing file keeps its mode otherwise
    except BaseException:
        os.close(fd)
        raise
    return fd


def load_state(mountpoint: str) -> State | None:
    try:
        fd = os.open(state_dir(mountpoint) / "state.json", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return None
    with os.fdopen(fd) as f:
        try:
            state = json.load(f)
        except json.JSONDecodeError:
            return None
    return state if isinstance(state, dict) else None


def save_state(mountpoint: str, state: State) -> None:
    """Write ``state`` to the mount's state file (0600, in 0700 dirs), atomically."""
    private_dir(RUN_DIR)
    d = state_dir(mountpoint)
    private_dir(d)
    tmp = d / "state.json.tmp"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    with os.fdopen(open_private(str(tmp), os.O_EXCL), "w") as f:
        f.write(json.dumps(state, indent=2))
    tmp.replace(d / "state.json")


@dataclass
class RunState:
    """What the daemon records about its mount, saved after every step so a
    crash at any point leaves enough for ``unmount`` to undo."""

    pid: int
    start_time: int | None
    mountpoint: str
    ref: str  # redacted
    rootfs: str | None = None
    kernel_mounts: list[dict[str, str | None]] = field(default_factory=list)
    log: str | None = None

    def save(self) -> None:
        save_state(self.mountpoint, asdict(self))


def process_start_time(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat (clock ticks after boot): with the pid it
    names one process, so a pid reused by another one is told apart."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # comm (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = data.rpartition(b")")[2].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def is_our_daemon(state: State) -> bool:
    """True if the state's pid is still the daemon that wrote it: same start
    time, and a lazyerofs command line."""
    pid, started = state.get("pid"), state.get("start_time")
    if not isinstance(pid, int) or pid <= 0 or not isinstance(started, int):
        return False
    if process_start_time(pid) != started:
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except OSError:
        return False
    return b"lazyerofs" in cmdline or b"lazyfs" in cmdline


def wait_gone(pid: int, timeout: float) -> bool:
    """Wait until process ``pid`` exits; True if it did."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def teardown(mountpoint: str, state: State | None) -> None:
    """Undo kernel mounts recorded in ``state`` (rootfs, then EROFS, then loops).

    Only what is still the kind of mount we made is taken down: an overlay
    (or bind of an EROFS layer) at the rootfs, EROFS inside our state dir.
    """
    if not state:
        return
    errors = []
    rootfs = state.get("rootfs")
    if isinstance(rootfs, str):
        found = kmount.find_mount(rootfs)
        if found is not None and found[0] not in ("overlay", "erofs"):
            errors.append(f"{rootfs}: the mount there is {found[0]}, not our rootfs; left alone")
        elif found is not None:
            try:
                kmount.umount(rootfs)
            except MountError as exc:
                errors.append(str(exc))
    ours = str(state_dir(mountpoint)) + "/"
    recorded = state.get("kernel_mounts")
    for m in reversed(recorded if isinstance(recorded, list) else []):
        target = m.get("target") if isinstance(m, dict) else None
        if not isinstance(target, str) or not target.startswith(ours):
            errors.append(f"{target!r}: not inside {ours}; left alone")
            continue
        found = kmount.find_mount(target)
        if found is not None and found[0] != "erofs":
            errors.append(f"{target}: the mount there is {found[0]}, not EROFS; left alone")
            continue
        try:
            kmount.umount(target)
        except MountError as exc:
            errors.append(str(exc))
        loop = m.get("loop")
        if isinstance(loop, str) and loop:
            kmount.detach_loop(loop)
        with contextlib.suppress(OSError):
            os.rmdir(target)
    if errors:
        raise MountError("; ".join(errors))


def _our_fuse_mount(mountpoint: str) -> bool:
    """True if the topmost mount at ``mountpoint`` is a lazyerofs FUSE mount
    (False when nothing is mounted there)."""
    found = kmount.find_mount(mountpoint)
    return found is not None and found[0] == FUSE_TYPE


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def unmount(mountpoint: str, *, timeout: float = 15.0, warn: Callable[[str], None] = log.warning) -> None:
    """Take down what the daemon set up at ``mountpoint``: the rootfs
    overlay, the EROFS mounts, then the daemon and its FUSE mount.

    Works after a crash too (from the state file, then from mountinfo).
    Only a lazyerofs FUSE mount is touched, and only its own daemon is
    signalled. ``warn`` hears what happened along the way that is not an
    error (a daemon that had to be aborted, a reused pid).

    Raises:
        MountError: not root, someone else's mount, nothing of ours there,
            or the mount could not be taken down.
    """
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
            warn(f"daemon {pid} did not stop in {timeout:g}s; aborting its connection")
            if _our_fuse_mount(mountpoint):
                kmount.abort_fuse(mountpoint)
            if is_our_daemon(state):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            wait_gone(pid, 5)
    elif isinstance(pid, int) and pid > 0 and _alive(pid):
        # The recorded pid now names another process: leave it be.
        warn(f"process {pid} is not this mount's daemon (its pid was reused); not signalling it")
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
