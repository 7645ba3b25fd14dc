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
import select
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
    "discard_log",
    "is_our_daemon",
    "list_states",
    "load_state",
    "log_path",
    "mount_id",
    "open_pidfd",
    "open_private",
    "private_dir",
    "process_start_time",
    "prune_kept_logs",
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


def log_path(mountpoint: str) -> Path:
    """The daemon's default log: one per mount id, beside the state dirs
    (not in them: it outlives a failed mount, whose state dir is removed)."""
    return RUN_DIR / f"{mount_id(mountpoint)}.log"


# Logs kept after failed or killed daemons, at most (the oldest go first).
KEPT_LOGS = 32


def prune_kept_logs(keep: int = KEPT_LOGS) -> int:
    """Remove all but the newest ``keep`` default logs in RUN_DIR whose mount
    is gone (no state dir): each failure keeps its log for a post-mortem, and
    without a bound they would pile up for ever. Returns how many went."""
    try:
        names = [n for n in os.listdir(RUN_DIR) if n.endswith(".log")]
    except FileNotFoundError:
        return 0
    kept: list[tuple[float, str]] = []
    for name in names:
        if (RUN_DIR / name.removesuffix(".log")).is_dir():
            continue  # a live mount's (or one being set up)
        with contextlib.suppress(FileNotFoundError):
            kept.append((os.lstat(RUN_DIR / name).st_mtime, name))
    kept.sort(reverse=True)
    removed = 0
    for _mtime, name in kept[keep:]:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(RUN_DIR / name)
            removed += 1
    return removed


def discard_log(log_file: str | None, mountpoint: str) -> None:
    """Remove the daemon's log after a clean exit, when it is the default one
    (a file the user named is theirs): logs would otherwise pile up in
    RUN_DIR, one for every mount ever made. A failed or killed daemon
    never gets here, so its log stays for whoever looks into it."""
    if log_file is not None and log_file == str(log_path(mountpoint)):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(log_file)


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


def list_states() -> list[tuple[Path, State]]:
    """Every mount's state under RUN_DIR: (state dir, state read back as
    untrusted JSON), for ``lazyerofs status``. Read-only; a link, a stray
    file or an unreadable state is skipped. Raises OSError when RUN_DIR
    cannot be listed (not root), and returns [] when it does not exist."""
    try:
        entries = sorted(os.scandir(RUN_DIR), key=lambda e: e.name)
    except FileNotFoundError:
        return []
    found = []
    for e in entries:
        if not e.is_dir(follow_symlinks=False):
            continue  # the daemons' logs live beside the state dirs
        try:
            fd = os.open(Path(e.path) / "state.json", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        with os.fdopen(fd) as f:
            try:
                state = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError, OSError):
                continue
        if isinstance(state, dict):
            found.append((Path(e.path), state))
    return found


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


def open_pidfd(pid: int) -> int | None:
    """A pidfd for ``pid`` (Linux 5.3+), or None where there is none to be had
    (the process is gone, or no pidfd support). Open it *before* checking the
    process is ours: the fd then names the process that was checked, and a
    signal sent through it cannot reach another one that reused the pid."""
    try:
        return os.pidfd_open(pid)
    except (OSError, AttributeError):
        return None


def _exited(pid: int) -> bool:
    """True once ``pid`` has exited: no such process, or a zombie not yet
    reaped (our daemons are reparented to init, which may reap late)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return True
    return data.rpartition(b")")[2].split()[:1] in ([b"Z"], [b"X"])


def _wait_pidfd(pidfd: int, timeout: float) -> bool:
    # A pidfd polls readable the moment its process exits, zombie or not.
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(max(0, int(timeout * 1000))))


def wait_gone(pid: int, timeout: float, *, pidfd: int | None = None) -> bool:
    """Wait until process ``pid`` exits (``pidfd``, if given, names it); True
    if it did. Returns as soon as it exits: waits on a pidfd, and only
    where there is none polls /proc, starting at a few milliseconds."""
    own = None
    if pidfd is None:
        pidfd = own = open_pidfd(pid)
    try:
        if pidfd is not None:
            return _wait_pidfd(pidfd, timeout)
        deadline = time.monotonic() + timeout
        pause = 0.002
        while not _exited(pid):
            if time.monotonic() >= deadline:
                return False
            time.sleep(pause)
            pause = min(pause * 2, 0.05)
        return True
    finally:
        if own is not None:
            os.close(own)


def teardown(mountpoint: str, state: State | None) -> None:
    """Undo kernel mounts recorded in ``state`` (rootfs, then EROFS, then loops).

    Only what is still the kind of mount we made is taken down: an overlay
    (or bind of an EROFS layer) at the rootfs, EROFS inside our state dir.
    """
    if not state:
        return
    errors = []
    # One look at mountinfo for all of them: with hundreds of layers, one per
    # mount would be hundreds of reads of a list hundreds of lines long.
    topmost = {point: (fstype, source) for point, fstype, source in kmount.mounts()}
    rootfs = state.get("rootfs")
    if isinstance(rootfs, str):
        found = topmost.get(rootfs) or kmount.find_mount(rootfs)
        if found is not None and found[0] not in ("overlay", "erofs"):
            errors.append(f"{rootfs}: the mount there is {found[0]}, not our rootfs; left alone")
        elif found is not None:
            try:
                kmount.umount(rootfs)
            except MountError as exc:
                errors.append(str(exc))
    ours = str(state_dir(mountpoint)) + "/"
    # mountinfo names real paths; the state dir is no mount point, so
    # resolving it cannot wait on a FUSE daemon.
    real_ours = os.path.realpath(ours) + "/"
    recorded = state.get("kernel_mounts")
    for m in reversed(recorded if isinstance(recorded, list) else []):
        target = m.get("target") if isinstance(m, dict) else None
        if not isinstance(target, str) or not target.startswith(ours):
            errors.append(f"{target!r}: not inside {ours}; left alone")
            continue
        found = topmost.get(real_ours + target[len(ours) :])
        if found is not None and found[0] != "erofs":
            errors.append(f"{target}: the mount there is {found[0]}, not EROFS; left alone")
            continue
        if found is not None:
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
    stopped = False  # the daemon stopped when asked, so it could clean up after itself
    pidfd = open_pidfd(pid) if isinstance(pid, int) and pid > 0 else None
    try:
        if state and is_our_daemon(state):
            assert isinstance(pid, int)
            _signal(pid, pidfd, signal.SIGTERM)
            stopped = wait_gone(pid, timeout, pidfd=pidfd)
            if not stopped:
                warn(f"daemon {pid} did not stop in {timeout:g}s; aborting its connection")
                if _our_fuse_mount(mountpoint):
                    kmount.abort_fuse(mountpoint)
                if pidfd is not None or is_our_daemon(state):
                    _signal(pid, pidfd, signal.SIGKILL)
                wait_gone(pid, 5, pidfd=pidfd)
        elif isinstance(pid, int) and pid > 0 and _alive(pid) and not _exited(pid):
            # The recorded pid now names another process: leave it be.
            warn(f"process {pid} is not this mount's daemon (its pid was reused); not signalling it")
    finally:
        if pidfd is not None:
            os.close(pidfd)
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
    _tell_of_kept_log(mountpoint, state, stopped, warn)
    if _our_fuse_mount(mountpoint):
        raise MountError(f"{mountpoint} is still mounted")


def _signal(pid: int, pidfd: int | None, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        if pidfd is not None:
            signal.pidfd_send_signal(pidfd, signum)
        else:
            os.kill(pid, signum)


def _tell_of_kept_log(mountpoint: str, state: State | None, stopped: bool, warn: Callable[[str], None]) -> None:
    """A daemon that exits cleanly removes its default log (:func:`discard_log`);
    one still there after it is gone tells of a crash, a kill or a failure:
    say where it is. A log file the user chose is theirs: not mentioned."""
    default = str(log_path(mountpoint))
    recorded = state.get("log") if state else None
    path = recorded if isinstance(recorded, str) else default
    if path != default or not os.path.exists(path):
        return
    if stopped:
        warn(f"the daemon reported a failure while stopping; its log is kept at {path}")
    else:
        warn(f"the daemon did not stop cleanly (killed or crashed?); its log is kept at {path}")

