"""``lazyerofs stats``: the live counters of a mount, as JSON."""

from __future__ import annotations

import argparse
import json
import os
import sys

from lazyfs.errors import MountError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "stats",
        help="print a mount's counters as JSON",
        description=(
            "Print bytes_fetched, requests, frames_fetched, cache_hits, cache_misses, "
            "verify_failures, read_errors and, per layer, the frames present out of "
            "the total, read from DIR/.lazyerofs/stats.json."
        ),
    )
    p.add_argument("mountpoint", metavar="DIR")
    p.set_defaults(func=run)


def read_stats(mountpoint: str) -> dict:
    path = os.path.join(mountpoint, ".lazyerofs", "stats.json")
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError as exc:
        raise MountError(f"{mountpoint}: not a lazyerofs mount (no {path})") from exc
    except PermissionError as exc:
        raise MountError(f"{mountpoint}: permission denied: the mount is root's only unless mounted with --allow-other") from exc
    except OSError as exc:
        raise MountError(f"{mountpoint}: cannot read stats: {exc.strerror} (daemon gone? try 'lazyerofs umount')") from exc


def run(args: argparse.Namespace) -> int:
    json.dump(read_stats(args.mountpoint), sys.stdout, indent=2)
    print()
    return 0
