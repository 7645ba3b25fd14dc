"""``lazyerofs status``: the live mounts, their daemons and their health
(the checks themselves are :mod:`lazyfs.mount.health`)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from lazyfs.errors import MountError
from lazyfs.mount import list_states
from lazyfs.mount.health import DEFAULT_PROBE_TIMEOUT, mount_status


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
