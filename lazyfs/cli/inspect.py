"""``lazyerofs inspect``: check a seekable blob against its descriptor and show its table."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from lazyfs.check import inspect_blob, local_blob
from lazyfs.cli._registry_opts import add_registry_options
from lazyfs.units import format_size


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect",
        help="check a blob (or a registry image) and show its chunk tables",
        description=(
            "TARGET is a local blob file or an image reference. For a file, the "
            "blob is checked against its descriptor (digest, size, chunk table "
            "digest, every frame's SHA-512 and decompressed length) and the table "
            "is printed. For a reference, only manifests and chunk tables are fetched."
        ),
        epilog="exit status: 0 all checks passed, 1 a check failed (named on stderr)",
    )
    p.add_argument("target", metavar="TARGET", help="blob file or image reference")
    p.add_argument(
        "--descriptor", metavar="FILE", help="OCI descriptor JSON of the blob (default: BLOB.json)"
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--frames", action="store_true", help="list every frame")
    add_registry_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    local = local_blob(args.target, args.descriptor)
    if local is None:
        from lazyfs.cli import inspect_remote

        return inspect_remote.run(args)
    report = inspect_blob(*local)
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        print()
    else:
        print_report(report, frames=args.frames)
    if report["errors"]:
        for err in report["errors"]:
            print(f"lazyerofs: check failed: {err}", file=sys.stderr)
        return 1
    return 0


def print_report(report: dict[str, Any], *, frames: bool) -> None:
    print(f"blob         {report['blob']}")
    print(f"digest       {report['digest']}  (verified)")
    print(f"media type   {report['mediaType']}")
    print(f"blob size    {format_size(report['size'])} ({report['size']} bytes)")
    if "chunk_size" not in report:
        return
    print(f"image size   {format_size(report['uncompressed_size'])} ({report['uncompressed_size']} bytes)")
    print(f"chunk size   {format_size(report['chunk_size'])}")
    print(f"frames       {report['frame_count']}")
    print(f"compressed   {format_size(report['compressed_size'])}, ratio {report['ratio']:.3f}")
    print(f"chunk table  offset {report['table_offset']}, {report['chunk_digest'] or 'NO DIGEST'}")
    if "dm_verity" in report:
        v = report["dm_verity"]
        print(f"dm-verity    offset {v['offset']}, root {v['root_digest']}")
    bad = sum(1 for fr in report["frames"] if "error" in fr)
    print(f"verified     {report['frame_count'] - bad}/{report['frame_count']} frames")
    if frames:
        print(f"{'frame':>6} {'offset':>12} {'compressed':>11} {'raw':>9} {'ratio':>6}")
        for fr in report["frames"]:
            ratio = fr["compressed"] / fr["raw"] if fr["raw"] else 0
            mark = "  BAD" if "error" in fr else ""
            print(f"{fr['index']:>6} {fr['offset']:>12} {fr['compressed']:>11} {fr['raw']:>9} {ratio:>6.3f}{mark}")
