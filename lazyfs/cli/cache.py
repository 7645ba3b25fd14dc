"""``lazyerofs cache``: look at and trim the local chunk cache.

``ls`` and ``du`` only read the directory (a missing one is an empty cache,
not an error, and is not created); ``gc`` and ``clear`` take the cache's lock
like a running daemon would, so they are safe next to live mounts. A path
that is not a directory, or a cache the store refuses to trust, is a one-line
``lazyerofs: error: ...``.
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
import time
from typing import Any

from cache import (
    DEFAULT_MAX_BYTES,
    CacheError,
    ChunkCache,
    default_cache_dir,
    format_size,
    parse_size,
)
from lazyfs.errors import LazyErofsError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "cache",
        help="inspect or trim the local chunk cache (ls, du, gc, clear)",
        description=(
            "The chunk cache holds verified, decompressed frames keyed by their "
            "SHA-512, shared by every mount that uses the same directory."
        ),
    )
    # Accepted before or after the sub-subcommand: the sub-level default is
    # SUPPRESS so it never overwrites a value given at the 'cache' level.
    p.add_argument("--cache-dir", metavar="DIR", default=None, help=f"cache directory (default: {default_cache_dir()})")
    p.set_defaults(func=lambda _args: _usage(p))
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--cache-dir", metavar="DIR", default=argparse.SUPPRESS, help="cache directory")
    size = argparse.ArgumentParser(add_help=False)
    size.add_argument(
        "--cache-size",
        type=parse_size,
        metavar="SIZE",
        default=DEFAULT_MAX_BYTES,
        help=f"disk budget, e.g. 10GiB (default: {format_size(DEFAULT_MAX_BYTES)})",
    )
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="machine-readable output")

    cmds = p.add_subparsers(dest="cache_command", metavar="SUBCOMMAND")
    ls = cmds.add_parser("ls", parents=[common, as_json], help="list entries, most recently used first")
    ls.set_defaults(func=run_ls)
    du = cmds.add_parser("du", parents=[common, size, as_json], help="entries and bytes against the budget")
    du.set_defaults(func=run_du)
    gc = cmds.add_parser(
        "gc",
        parents=[common, size],
        help="evict least recently used entries down to the budget",
        description=(
            "Over the budget, evict least recently used entries until 90% of it is "
            "used; also remove temp files of writers that died."
        ),
    )
    gc.add_argument("--verify", action="store_true", help="also re-hash every entry and drop damaged ones")
    gc.set_defaults(func=run_gc)
    clear = cmds.add_parser("clear", parents=[common], help="remove every entry")
    clear.set_defaults(func=run_clear)


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def _cache_dir(args: argparse.Namespace) -> str:
    return str(args.cache_dir or default_cache_dir())


def _open(args: argparse.Namespace, max_bytes: int = DEFAULT_MAX_BYTES) -> ChunkCache | None:
    """The cache at ``--cache-dir``, or None when there is none yet.

    Raises:
        LazyErofsError: the path is not a directory, cannot be read, or the
            cache refuses it (another user's, writable by others, a link).
    """
    root = _cache_dir(args)
    try:
        st = os.lstat(root)
    except FileNotFoundError:
        return None
    except OSError as exc:  # ENOTDIR (a parent is a file), EACCES, ...
        raise LazyErofsError(f"cache directory {root}: {exc.strerror or exc}") from exc
    if not stat.S_ISDIR(st.st_mode) and not stat.S_ISLNK(st.st_mode):
        raise LazyErofsError(f"cache directory {root} is not a directory")
    if stat.S_ISDIR(st.st_mode) and not os.path.lexists(os.path.join(root, "chunks")):
        # Some directory that was never a cache: nothing to show, and not
        # ours to create files (or change modes) in.
        return None
    try:
        # No memory LRU and, for a look, a budget so large that opening never evicts.
        return ChunkCache(root, max_bytes=max_bytes, memory_bytes=0)
    except CacheError as exc:
        raise LazyErofsError(str(exc)) from exc


def _summary(entries: int, used: int, budget: int) -> str:
    noun = "entry" if entries == 1 else "entries"
    return f"{entries} {noun}, {format_size(used)} of {format_size(budget)}"


def run_ls(args: argparse.Namespace) -> int:
    c = _open(args, max_bytes=sys.maxsize)
    entries = [] if c is None else c.entries()
    if c is not None:
        c.close()
    if args.json:
        json.dump([e._asdict() for e in entries], sys.stdout, indent=2)
        print()
        return 0
    for e in entries:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.atime))
        print(f"{e.key_hex[:32]}  {format_size(e.size):>10}  {when}")
    total = sum(e.size for e in entries)
    noun = "entry" if len(entries) == 1 else "entries"
    print(f"{len(entries)} {noun}, {format_size(total)} in {_cache_dir(args)}")
    return 0


def _usage_of(args: argparse.Namespace) -> dict[str, Any]:
    c = _open(args, max_bytes=sys.maxsize)
    if c is None:
        entries, used = 0, 0
    else:
        stats = c.statistics()
        entries, used = stats.disk_entries, stats.disk_bytes
        c.close()
    return {"cache_dir": _cache_dir(args), "entries": entries, "bytes": used, "max_bytes": args.cache_size}


def run_du(args: argparse.Namespace) -> int:
    usage = _usage_of(args)
    if args.json:
        json.dump(usage, sys.stdout, indent=2)
        print()
        return 0
    print(f"{_summary(usage['entries'], usage['bytes'], usage['max_bytes'])} ({usage['cache_dir']})")
    return 0


def run_gc(args: argparse.Namespace) -> int:
    c = _open(args, max_bytes=sys.maxsize)
    if c is None:
        print(f"no cache at {_cache_dir(args)}")
        return 0
    with c:
        damaged = c.verify() if args.verify else 0
        freed = c.gc(args.cache_size)
        stats = c.statistics()
    extra = f", {damaged} damaged removed" if args.verify else ""
    print(f"freed {format_size(freed)}{extra}; {_summary(stats.disk_entries, stats.disk_bytes, args.cache_size)}")
    return 0


def run_clear(args: argparse.Namespace) -> int:
    c = _open(args, max_bytes=sys.maxsize)
    if c is None:
        print(f"no cache at {_cache_dir(args)}")
        return 0
    with c:
        entries = c.statistics().disk_entries
        freed = c.clear()
    noun = "entry" if entries == 1 else "entries"
    print(f"removed {entries} {noun}, {format_size(freed)}")
    return 0
