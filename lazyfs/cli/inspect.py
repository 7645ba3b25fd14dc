"""``lazyerofs inspect``: check a seekable blob against its descriptor and show its table."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from typing import Any

import trio

from lazyfs.cli._registry_opts import add_registry_options
from lazyfs.errors import FormatError, IntegrityError
from lazyfs.format import seekable
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
    if not os.path.exists(args.target):
        if args.descriptor:
            raise FormatError(f"{args.target}: no such file")
        from lazyfs.cli import inspect_remote

        return inspect_remote.run(args)
    report = inspect_blob(args.target, args.descriptor or args.target + ".json")
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


def load_descriptor(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            desc = json.load(f)
    except FileNotFoundError as exc:
        raise FormatError(f"{path}: descriptor not found (pass --descriptor FILE)") from exc
    except json.JSONDecodeError as exc:
        raise FormatError(f"{path}: not valid JSON: {exc}") from exc
    return desc


def _blob_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return "sha256:" + h.hexdigest()


def inspect_blob(blob: str, descriptor_path: str) -> dict[str, Any]:
    """Check every link of the chain of trust of a local blob; collect, don't stop at, frame errors."""
    name = os.path.basename(blob)
    desc = seekable.parse_descriptor(load_descriptor(descriptor_path), name=name)
    size = os.path.getsize(blob)
    if size != desc.size:
        raise IntegrityError(f"{name}: blob is {size} bytes, descriptor says {desc.size}")
    digest = _blob_digest(blob)
    if digest != desc.digest:
        raise IntegrityError(f"{name}: blob digest {digest} != descriptor digest {desc.digest}")
    report: dict[str, Any] = {
        "blob": blob,
        "digest": desc.digest,
        "mediaType": desc.media_type,
        "size": desc.size,
        "errors": [],
    }
    if not desc.seekable:
        if desc.media_type != seekable.MEDIA_TYPE_PLAIN:
            raise FormatError(f"{name}: media type {desc.media_type} is not an EROFS layer")
        report["uncompressed_size"] = desc.size
        return report
    # The frame checks are `lazyerofs verify`'s, run on the local file.
    from lazyfs.cli.verify import Progress, verify_layer
    from lazyfs.fetch.source import FileSource

    source = FileSource(blob)
    try:
        checked = trio.run(verify_layer, 0, desc.to_dict(), source, Progress(False), name)
    finally:
        source.close()
    table = checked.table
    assert table is not None
    report["errors"] = checked.errors
    frame_errors = dict(zip(checked.bad_frames, checked.errors, strict=False))
    frames = []
    for i in range(table.frame_count):
        start, end = table.span(i)
        entry = {"index": i, "offset": start, "compressed": end - start, "raw": table.raw_length(i)}
        if i in frame_errors:
            entry["error"] = frame_errors[i]
        frames.append(entry)
    compressed = table.compressed_size
    report.update(
        uncompressed_size=table.uncompressed_size,
        chunk_size=table.chunk_size,
        frame_count=table.frame_count,
        compressed_size=compressed,
        ratio=round(compressed / table.uncompressed_size, 4) if table.uncompressed_size else 0,
        table_offset=table.table_offset,
        chunk_digest=desc.chunk_digest,
        frames=frames,
    )
    if desc.verity_offset is not None:
        report["dm_verity"] = {"offset": desc.verity_offset, "root_digest": desc.verity_root}
    return report


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
