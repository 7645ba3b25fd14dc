"""``lazyerofs stats``: the live counters of a mount, as JSON."""

from __future__ import annotations

import argparse
import json
import sys

from lazyfs.mount import read_stats


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "stats",
        help="print a mount's counters as JSON",
        description=(
            "Print bytes_fetched, requests, frames_fetched, cache_hits, cache_misses, "
            "verify_failures, read_errors and, per layer, the frames present out of "
            "the total, read from DIR/.lazyerofs/stats.json. Under 'profile': where the "
            "startup profile came from (or why none is used), its frames, those ignored "
            "(unknown layers, past a layer's end), fetched by the replay, already cached, "
            "used (fetched, then read) and wasted (fetched, not read yet), and whether "
            "the replay is done."
        ),
    )
    p.add_argument("mountpoint", metavar="DIR")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    json.dump(read_stats(args.mountpoint), sys.stdout, indent=2)
    print()
    return 0
