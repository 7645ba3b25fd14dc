"""``lazyerofs verify``: check a whole image (or blob) against its chain of trust.

Every frame is fetched, hashed against the chunk table and decompressed to
its exact length; for dm-verity layers the decoded image and the hash tree
are checked against the root digest of the descriptor. A plain EROFS layer
has no chunk table: its whole blob is fetched and hashed against the
descriptor's digest. Bad frames and bad blocks are each reported; the
command does not stop at the first.
"""

from __future__ import annotations

import argparse
import json
import sys

import trio

from lazyfs import oci
from lazyfs.check import LayerReport, local_blob, verify_layer
from lazyfs.cli._progress import Progress
from lazyfs.cli._registry_opts import add_registry_options, options_from_args
from lazyfs.fetch import FileSource
from lazyfs.format import load_descriptor
from lazyfs.units import format_size


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "verify",
        help="check every frame (and the dm-verity tree) of an image or blob",
        description=(
            "Fetch every frame of every EROFS layer of TARGET (an image reference, "
            "or a local blob with its descriptor), check each against the chunk "
            "table's SHA-512 and decompressed length, and check dm-verity layers' "
            "hash trees against their root digest. Plain EROFS layers are fetched "
            "whole and checked against their blob digest. Reports every bad frame or block."
        ),
        epilog="exit status: 0 everything verified, 1 something did not (listed on stderr)",
    )
    p.add_argument("target", metavar="TARGET", help="image reference, or blob file")
    p.add_argument("--descriptor", metavar="FILE", help="descriptor of a blob file (default: BLOB.json)")
    p.add_argument("--json", action="store_true", help="print a JSON report on stdout")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    add_registry_options(p)
    p.set_defaults(func=run)


async def _verify(args: argparse.Namespace) -> list[LayerReport]:
    progress = Progress(enabled=not args.quiet and sys.stderr.isatty())
    reports = []
    local = local_blob(args.target, args.descriptor)
    if local is not None:
        blob, descriptor = local
        desc = load_descriptor(descriptor)
        source = FileSource(blob)
        try:
            reports.append(await verify_layer(0, desc, source, progress))
        finally:
            source.close()
        progress.done()
        return reports
    async with oci.RegistryClient(options_from_args(args)) as client:
        ref = oci.parse_reference(args.target)
        image = await client.resolve(ref)
        for i, desc in enumerate(image.layers):
            reports.append(await verify_layer(i, desc, client.blob(ref, desc), progress))
    progress.done()
    return reports


def run(args: argparse.Namespace) -> int:
    from lazyfs.mount import unwrap_group

    with unwrap_group():
        reports = trio.run(_verify, args)
    bad = False
    for r in reports:
        bad = bad or bool(r.errors)
        for err in r.errors:
            print(f"lazyerofs: verify: {err}", file=sys.stderr)
    if args.json:
        json.dump([r.to_json() for r in reports], sys.stdout, indent=2)
        print()
    else:
        for r in reports:
            if r.skipped:
                print(f"layer {r.index} {r.digest[:19]}  skipped: {r.skipped}")
                continue
            state = "OK" if not r.errors else "FAILED"
            if r.digest_checked:
                print(f"layer {r.index} {r.digest[:19]}  {state}: blob digest checked, {format_size(r.bytes_checked)}")
                continue
            verity = ", dm-verity tree checked" if r.verity else ""
            print(
                f"layer {r.index} {r.digest[:19]}  {state}: {r.frames - len(r.bad_frames)}/{r.frames} frames good"
                f"{verity}, {format_size(r.bytes_checked)} checked"
            )
    return 1 if bad else 0
