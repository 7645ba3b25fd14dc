"""``lazyerofs status``: the live mounts, their daemons and their health.

Every state directory under /run/lazyerofs is one mount. For each, the
daemon is checked (still the process that wrote the state?), the FUSE mount
looked up in mountinfo (never stat-ed), and the mount's own stats file read
in a child process with a deadline: a hung daemon blocks that read, and a
blocked read of a FUSE file can be beyond even SIGKILL, so it must never be
this process's own (it could not exit). Such a mount is reported "hung".
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from lazyfs.errors import MountError
from lazyfs.mount import FUSE_TYPE, STATS_PATH, is_our_daemon, kernel, list_states

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


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "status",
        help="list live mounts, their daemons and their health",
        description=(
            "List every lazyerofs mount on this machine (from /run/lazyerofs): mount point, "
            "image, daemon pid and whether it is still running, rootfs, kernel mounts, and "
            "health: 'healthy' (the FUSE mount answers, no read errors or verify failures), "
            "'degraded' (it answers but has counted read errors or verify failures), "
            "'hung' (no answer within --timeout), 'unreachable' (the read failed), "
            "'not mounted' (daemon running, no FUSE mount: starting, or unmounted under it), "
            "'stale' (the daemon is gone: run 'lazyerofs umount DIR'). Needs root."
        ),
    )
    p.add_argument("--json", action="store_true", help="print one JSON object for machines")
    p.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_PROBE_TIMEOUT,
        help=f"seconds a daemon gets to answer (default: {DEFAULT_PROBE_TIMEOUT:g})",
    )
    p.set_defaults(func=run)


def _probe(mountpoint: str, timeout: float) -> tuple[dict[str, object] | None, str | None]:
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
        stats, why = _probe(mountpoint, timeout)
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


def _print(mounts: list[dict[str, object]]) -> None:
    if not mounts:
        print("no lazyerofs mounts")
        return
    for i, m in enumerate(mounts):
        if i:
            print()
        print(f"{m['mountpoint']}: {m['health']}")
        print(f"  image:           {m['ref']}")
        print(f"  daemon:          pid {m['pid']} ({m['daemon']})")
        print(f"  rootfs:          {m['rootfs'] or '-'}")
        print(f"  kernel mounts:   {m['kernel_mounts_present']} of {m['kernel_mounts']} recorded present")
        if m["read_errors"] is not None or m["verify_failures"] is not None:
            print(f"  read errors:     {m['read_errors']}")
            print(f"  verify failures: {m['verify_failures']}")
        if m["detail"]:
            print(f"  note:            {m['detail']}")


def run(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        raise MountError("status needs root (the mounts and /run/lazyerofs are root's); run it as root")
    if not args.timeout > 0:
        raise MountError(f"--timeout must be positive, not {args.timeout:g}")
    try:
        states = list_states()
    except OSError as exc:
        raise MountError(f"cannot list the mounts' run state: {exc.strerror or exc}") from exc
    mounts = [mount_status(str(path), dict(state), args.timeout) for path, state in states]
    mounts.sort(key=lambda m: str(m["mountpoint"]))
    if args.json:
        json.dump({"mounts": mounts}, sys.stdout, indent=2)
        print()
    else:
        _print(mounts)
    return 0
