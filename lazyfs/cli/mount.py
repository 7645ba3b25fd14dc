"""``lazyerofs mount``: serve an image's seekable EROFS layers lazily over FUSE."""

from __future__ import annotations

import argparse
import math
import os

from lazyfs.cli._registry_opts import add_registry_options, options_from_args
from lazyfs.errors import MountError
from lazyfs.fetch import DEFAULT_MERGE_BYTES, DEFAULT_READ_TIMEOUT, FetchAhead, ReadSettings
from lazyfs.fetch.context import DEFAULT_MEMORY_BUDGET, MIN_MEMORY_BUDGET
from lazyfs.mount import MountConfig, run_mount
from lazyfs.units import parse_size


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "mount",
        help="mount an image's layers lazily (FUSE), optionally as a rootfs",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""\
Resolve REF, read each seekable EROFS layer's chunk table (verified against
its chunk_digest) and mount a read-only FUSE tree at DIR:

  DIR/manifest.json                     the resolved image manifest
  DIR/layers/<i>/layer.erofs            raw EROFS image of layer i (0 = bottom)
  DIR/layers/<i>/layer.erofs.dmverity   containerd's sidecar (dm-verity layers)
  DIR/layers/<i>/digest                 the layer blob's digest
  DIR/.lazyerofs/stats.json             live counters ('lazyerofs stats DIR')
  DIR/.lazyerofs/profile.json           reads recorded so far ('lazyerofs profile save')

Only the zstd frames that are read are fetched (HTTP range requests); each is
checked against its SHA-512 before a byte is served and kept in the chunk
cache. Returns once the mount is ready; on failure nothing stays mounted.
Needs root.

Who can read what: the FUSE tree is root's alone unless --allow-other. The
--rootfs overlay is readable as the image's own modes say, but mounted
nosuid,nodev: an image cannot hand out setuid root or device nodes (see
--rootfs-allow-suid-dev). The per-layer EROFS mounts under
/run/lazyerofs/<id>/ (0700) are nosuid,nodev,noexec.""",
        epilog="""\
examples:
  lazyerofs mount localhost:5000/app:v1 /mnt/app
  lazyerofs mount --rootfs /mnt/rootfs localhost:5000/app:v1 /mnt/app
  lazyerofs mount --descriptor layer.blob.json https://host/layer.blob /mnt/one
  lazyerofs umount /mnt/app""",
    )
    p.add_argument("ref", metavar="REF", help="image reference, or a blob URL with --descriptor")
    p.add_argument("mountpoint", metavar="DIR", help="empty directory to mount the tree on")
    p.add_argument("--nonempty", action="store_true", help="mount on DIR (and --rootfs) even if not empty, hiding what is there")
    p.add_argument("--descriptor", metavar="FILE", help="REF is one blob URL; FILE is its OCI descriptor JSON")
    p.add_argument(
        "--rootfs",
        metavar="DIR",
        help="also mount every layer with the kernel EROFS driver and stack them (overlayfs) at DIR",
    )
    p.add_argument(
        "--rootfs-allow-suid-dev",
        action="store_true",
        help=(
            "with --rootfs: honour setuid/setgid bits and device nodes of the image (default: nosuid,nodev). "
            "Only for a trusted image, e.g. when a container runtime needs a setuid binary (sudo, ping) in it"
        ),
    )
    p.add_argument(
        "--allow-other",
        action="store_true",
        help=(
            "let every local user read the FUSE tree (the layer files, manifest), checked against its "
            "0444 modes (default: root only; the --rootfs overlay does not need this)"
        ),
    )
    p.add_argument(
        "--loop",
        action="store_true",
        help="with --rootfs: mount layers through loop devices even where the kernel can mount files",
    )
    p.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground, log to stderr (never through 'lazyerofs service')")
    p.add_argument("--no-service", action="store_true", help="mount in this process even when 'lazyerofs service' runs")
    p.add_argument("--log-file", metavar="FILE", help="daemon log (default: /run/lazyerofs/<id>.log)")
    g = p.add_argument_group("cache")
    g.add_argument("--cache-dir", metavar="DIR", help="chunk cache directory (default: /var/cache/lazyerofs as root)")
    g.add_argument("--cache-size", type=parse_size, metavar="SIZE", help="disk budget, e.g. 10GiB (default: 10GiB)")
    g.add_argument(
        "--memory-cache",
        type=parse_size,
        metavar="SIZE",
        help="in-memory LRU of hot chunks, part of --memory-budget (default: a quarter of it)",
    )
    g.add_argument(
        "--memory-budget",
        type=parse_size,
        default=DEFAULT_MEMORY_BUDGET,
        metavar="SIZE",
        help=(
            "memory the daemon may hold for data: hot-chunk LRU, chunk tables and frames in flight "
            "together; reads wait rather than exceed it (default: 96MiB)"
        ),
    )
    g.add_argument("--verify-at-rest", action="store_true", help="re-hash cached chunks when read back: catches disk corruption (bit rot, torn writes), not forgery by someone who can write the cache dir (that is why the cache refuses a dir others can write)")
    g = p.add_argument_group("reads")
    g.add_argument(
        "--read-timeout",
        type=_positive_seconds,
        default=DEFAULT_READ_TIMEOUT,
        metavar="SECONDS",
        help=f"a read that cannot be served by then fails with EIO (default: {DEFAULT_READ_TIMEOUT:g})",
    )
    g.add_argument(
        "--merge-size",
        type=parse_size,
        default=DEFAULT_MERGE_BYTES,
        metavar="SIZE",
        help="fetch adjacent missing frames in one request up to SIZE compressed bytes (default: 8MiB)",
    )
    g.add_argument(
        "--prefetch",
        action=argparse.BooleanOptionalAction,
        default=True,
        help=(
            "once mounted (and after the startup profile), fetch the rest of the image in the background: "
            "metadata first, then frames next to recent misses, with enough requests in flight to fill the "
            "measured link, stepping aside for on-demand reads (default: on; --no-prefetch: on demand only)"
        ),
    )
    g.add_argument(
        "--fetch-ahead",
        type=_fetch_ahead,
        default=0,
        metavar="SIZE|auto",
        help=(
            "on a miss, also fetch up to SIZE of the following missing frames in the same request; "
            "'auto' = the measured bandwidth x round-trip time, at most 4MiB (default: 0)"
        ),
    )
    g.add_argument(
        "--fetch-workers",
        type=_workers,
        default=None,
        metavar="N",
        help=(
            "processes that fetch, verify, decompress and cache frames, so the daemon's own process "
            "only serves reads (Python runs one thread at a time per process); 0: all in the daemon "
            "(default: 1 when the machine has a second CPU, else 0)"
        ),
    )
    g.add_argument(
        "--readahead",
        type=parse_size,
        default=4 << 20,
        metavar="SIZE",
        help="kernel readahead window of the FUSE mount (default: 4MiB). Above the kernel's own 128KiB it "
        "applies once every frame is cached: until then a larger window would fetch frames nobody reads",
    )
    g = p.add_argument_group("startup profile")
    prof = g.add_mutually_exclusive_group()
    prof.add_argument(
        "--profile",
        metavar="FILE",
        help=(
            "replay this startup profile ('lazyerofs profile save') instead of the one pushed "
            "next to the image: its frames are fetched ahead of the reads, in recorded order"
        ),
    )
    prof.add_argument(
        "--no-profile",
        action="store_true",
        help="replay no startup profile (default: the one 'lazyerofs profile push' stored for the image, if any)",
    )
    g = p.add_argument_group("trust")
    g.add_argument(
        "--insecure-skip-verify",
        action="store_true",
        help="DANGEROUS: serve layers whose chain of trust cannot be established (no chunk_digest, hash_algo 0)",
    )
    g.add_argument("--strict", action="store_true", help="refuse images with non-EROFS layers instead of skipping them")
    add_registry_options(p)
    p.add_argument("--touch-log", metavar="FILE", help=argparse.SUPPRESS)
    p.set_defaults(func=run)


def _positive_seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {value}")
    return seconds


def _workers(value: str) -> int:
    if not value.isdigit() or int(value) > 16:
        raise argparse.ArgumentTypeError(f"must be a number from 0 to 16, not {value}")
    return int(value)


def _fetch_ahead(value: str) -> FetchAhead:
    return "auto" if value == "auto" else parse_size(value)


def run(args: argparse.Namespace) -> int:
    if args.rootfs_allow_suid_dev and not args.rootfs:
        raise MountError("--rootfs-allow-suid-dev only applies with --rootfs")
    if args.profile is not None and not os.path.isfile(args.profile):
        raise MountError(f"--profile {args.profile}: no such file")
    registry_options = options_from_args(args)
    if args.memory_budget < MIN_MEMORY_BUDGET:
        raise MountError(f"--memory-budget must be at least {MIN_MEMORY_BUDGET >> 20}MiB")
    cfg = MountConfig(
        ref=args.ref,
        mountpoint=args.mountpoint,
        descriptor_file=args.descriptor,
        rootfs=args.rootfs,
        cache_dir=args.cache_dir,
        cache_size=args.cache_size,
        memory_cache=args.memory_cache,
        verify_at_rest=args.verify_at_rest,
        read=ReadSettings(
            read_timeout=args.read_timeout,
            merge_bytes=args.merge_size,
            fetch_ahead=args.fetch_ahead,
            prefetch=args.prefetch,
            insecure_skip_verify=args.insecure_skip_verify,
            strict=args.strict,
            memory_budget=args.memory_budget,
        ),
        foreground=args.foreground,
        log_file=args.log_file,
        log_level="debug" if args.log_level == "debug" else "info",
        registry=registry_options,
        touch_log=args.touch_log,
        profile_file=os.path.abspath(args.profile) if args.profile is not None else None,
        profile_lookup=not args.no_profile,
        readahead_kb=max(args.readahead // 1024, 4),
        loop=args.loop,
        allow_other=args.allow_other,
        rootfs_allow_suid_dev=args.rootfs_allow_suid_dev,
        nonempty=args.nonempty,
        started=getattr(args, "started", None),
        fetch_workers=args.fetch_workers,
    )
    if cfg.read.insecure_skip_verify:
        import sys

        print(
            "lazyerofs: WARNING: --insecure-skip-verify: layers without a chain of trust will be served unverified",
            file=sys.stderr,
        )
    return run_mount(cfg)
