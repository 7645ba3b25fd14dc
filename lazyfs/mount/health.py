"""The health of live mounts: is the daemon there, does the FUSE mount answer?

Every state directory under /run/lazyerofs is one mount. For each, the
daemon is checked (still the process that wrote the state?), the FUSE mount
looked up in mountinfo (never stat-ed), and the mount's own stats file read
in a child process with a deadline: a hung daemon blocks that read, and a
blocked read of a FUSE file can be beyond even SIGKILL, so it must never be
this process's own (it could not exit). Such a mount is reported "hung".
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from lazyfs.mount import kernel
from lazyfs.mount.image import STATS_PATH
from lazyfs.mount.state import FUSE_TYPE, is_our_daemon

# How long a live daemon gets to answer a read of its stats file.
DEFAULT_PROBE_TIMEOUT = 3.0

# The child that reads the stats file: no site, no project imports (fast),
# the errno's text on stderr when the read fails.
_PROBE = (
    "import sys\n"
    "try:\n"
    "    with open(sys.argv[1], 'rb') as f: sys.stdout.buffer.write(f.read())\n"
    "except OSError as e:\n"
    "    sys.exit(e.strerror or str(e))\n"
)

# Health, worst first in the summary.
HEALTHY, DEGRADED, HUNG, UNREACHABLE, NOT_MOUNTED, STALE = (
    "healthy",
    "degraded",
    "hung",
    "unreachable",
    "not mounted",
    "stale",
)


def probe_stats(mountpoint: str, timeout: float) -> tuple[dict[str, object] | None, str | None]:
    """(stats, None) when the mount answers, else (None, why); why is
    "hung" when it did not answer in ``timeout`` seconds."""
    proc = subprocess.Popen(
        [sys.executable, "-I", "-S", "-c", _PROBE, os.path.join(mountpoint, STATS_PATH)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # Killed, never waited for: a child stuck in a FUSE request may not
        # die until the connection is aborted (umount does that).
        proc.kill()
        return None, HUNG
    if proc.returncode != 0:
        return None, err.decode(errors="replace").strip() or f"exit status {proc.returncode}"
    try:
        stats = json.loads(out)
    except ValueError:
        return None, f"{STATS_PATH} is not JSON"
    if not isinstance(stats, dict):
        return None, f"{STATS_PATH} is not a JSON object"
    return stats, None


def _daemon(state: dict[str, object]) -> str:
    """running (ours), dead, or reused (the pid names another process now)."""
    if is_our_daemon(state):
        return "running"
    pid = state.get("pid")
    if isinstance(pid, int) and pid > 0:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return "dead"
        except PermissionError:
            pass
        return "pid reused"
    return "dead"


def _count(stats: dict[str, object], key: str) -> int | None:
    value = stats.get(key)
    return value if isinstance(value, int) else None


def mount_status(state_path: str, state: dict[str, object], timeout: float) -> dict[str, object]:
    """One mount as ``status --json`` shows it (every state field checked:
    the state file is untrusted JSON)."""
    mountpoint = state.get("mountpoint")
    mountpoint = mountpoint if isinstance(mountpoint, str) else None
    rootfs = state.get("rootfs")
    recorded = state.get("kernel_mounts")
    targets = [m.get("target") for m in recorded if isinstance(m, dict)] if isinstance(recorded, list) else []
    pid = state.get("pid")
    ref = state.get("ref")
    found = kernel.find_mount(mountpoint) if mountpoint else None
    status: dict[str, object] = {
        "mountpoint": mountpoint,
        "ref": ref if isinstance(ref, str) else None,
        "pid": pid if isinstance(pid, int) else None,
        "daemon": _daemon(state),
        "rootfs": rootfs if isinstance(rootfs, str) else None,
        "kernel_mounts": len(targets),
        "kernel_mounts_present": sum(
            1 for t in targets if isinstance(t, str) and kernel.find_mount(t) is not None
        ),
        "fuse_mounted": found is not None and found[0] == FUSE_TYPE,
        "health": HEALTHY,
        "read_errors": None,
        "verify_failures": None,
        "detail": None,
        "state_dir": state_path,
    }
    if status["daemon"] != "running":
        status["health"] = STALE
        status["detail"] = f"the daemon is {status['daemon']}; run 'lazyerofs umount {mountpoint}' to clean up"
    elif not status["fuse_mounted"]:
        status["health"] = NOT_MOUNTED
        status["detail"] = "no lazyerofs FUSE mount there (still starting, or unmounted under the daemon)"
    else:
        assert mountpoint is not None
        stats, why = probe_stats(mountpoint, timeout)
        if stats is None:
            status["health"] = HUNG if why == HUNG else UNREACHABLE
            status["detail"] = (
                f"no answer in {timeout:g}s; 'lazyerofs umount {mountpoint}' aborts it"
                if why == HUNG
                else f"cannot read {STATS_PATH}: {why}"
            )
        else:
            status["read_errors"] = _count(stats, "read_errors")
            status["verify_failures"] = _count(stats, "verify_failures")
            if status["read_errors"] or status["verify_failures"]:
                status["health"] = DEGRADED
    return status
