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
import contextlib
import functools
import hashlib
import json
import struct
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import trio

from lazyfs.cli._registry_opts import add_registry_options, options_from_args
from lazyfs.errors import FormatError, IntegrityError, LazyErofsError
from lazyfs.format import seekable
from lazyfs.units import format_size

BATCH_BYTES = 8 << 20


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


@dataclass
class LayerReport:
    index: int
    digest: str
    media_type: str
    frames: int = 0
    bytes_checked: int = 0
    bad_frames: list[int] = field(default_factory=list)
    bad_blocks: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    verity: bool = False
    digest_checked: bool = False  # the whole blob was hashed (plain layers)
    skipped: str | None = None
    table: seekable.ChunkTable | None = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "table"}


class Progress:
    """A one-line progress bar on stderr (only when it is a terminal or forced)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.started = time.monotonic()

    def show(self, label: str, done: int, total: int, nbytes: int, *, unit: str = "frames") -> None:
        if not self.enabled:
            return
        width = 30
        filled = width * done // total if total else width
        rate = nbytes / max(time.monotonic() - self.started, 1e-6)
        sys.stderr.write(f"\r{label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} {unit} {format_size(int(rate))}/s ")
        sys.stderr.flush()

    def done(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


async def verify_layer(
    index: int, desc_dict: dict[str, Any], source: Any, progress: Progress, name: str | None = None
) -> LayerReport:
    name = name or f"layer {index}"
    desc = seekable.parse_descriptor(desc_dict, name=name)
    report = LayerReport(index, desc.digest, desc.media_type)
    if desc.media_type == seekable.MEDIA_TYPE_PLAIN:
        await _verify_plain(desc, source, progress, report, name)
        return report
    if not desc.seekable:
        report.skipped = f"media type {desc.media_type} is not an EROFS layer"
        return report
    assert desc.table_offset is not None
    table = seekable.read_chunk_table(
        await source.read(desc.table_offset, seekable.table_read_size(desc)), desc, name=name
    )
    report.frames = table.frame_count
    report.table = table
    report.verity = desc.verity_offset is not None
    with tempfile.TemporaryFile() if report.verity else contextlib.nullcontext() as image:
        i = 0
        while i < table.frame_count:
            j = i
            while j + 1 < table.frame_count and table.span(j + 1)[1] - table.span(i)[0] <= BATCH_BYTES:
                j += 1
            start = table.span(i)[0]
            data = await source.read(start, table.span(j)[1] - start)
            for k in range(i, j + 1):
                s, e = table.span(k)
                try:
                    raw = await trio.to_thread.run_sync(
                        functools.partial(seekable.decode_frame, table, k, data[s - start : e - start], name=name)
                    )
                except LazyErofsError as exc:
                    report.bad_frames.append(k)
                    report.errors.append(str(exc))
                    raw = bytes(table.raw_length(k))
                if image is not None:
                    image.write(raw)
            report.bytes_checked += len(data)
            progress.show(f"{name}", j + 1, table.frame_count, report.bytes_checked)
            i = j + 1
        if image is not None:
            await _verify_tree(desc, table, source, image, report)
    return report


async def _verify_plain(
    desc: seekable.LayerDescriptor, source: Any, progress: Progress, report: LayerReport, name: str
) -> None:
    """A plain layer's only chain is its blob digest: fetch it all and hash it."""
    if source.size != desc.size:
        report.errors.append(f"{name}: blob is {source.size} bytes, descriptor says {desc.size}")
        return
    h = hashlib.new(desc.digest.split(":", 1)[0])
    done = 0
    while done < desc.size:
        length = min(BATCH_BYTES, desc.size - done)
        piece = await source.read(done, length)
        if len(piece) != length:
            raise IntegrityError(f"{name}: got {len(piece)} of {length} bytes at {done}")
        await trio.to_thread.run_sync(h.update, piece)
        done += length
        report.bytes_checked = done
        progress.show(name, done, desc.size, done, unit="bytes")
    actual = f"{h.name}:{h.hexdigest()}"
    report.digest_checked = True
    if actual != desc.digest:
        report.errors.append(f"{name}: plain blob digest {actual} does not match the descriptor's {desc.digest}")


async def _verify_tree(desc: seekable.LayerDescriptor, table: seekable.ChunkTable, source: Any, image: Any, report: LayerReport) -> None:
    from lazyfs.format import verity

    assert desc.verity_offset is not None and desc.verity_root is not None
    magic, size = struct.unpack("<II", await source.read(desc.verity_offset, 8))
    if not seekable.SKIPPABLE_MAGIC_FIRST <= magic <= seekable.SKIPPABLE_MAGIC_LAST or desc.verity_offset + 8 + size > desc.size:
        report.errors.append(f"layer {report.index}: dm-verity frame at {desc.verity_offset} is malformed")
        return
    payload = await source.read(desc.verity_offset + 8, size)
    report.bytes_checked += size + 8
    image.seek(0)
    try:
        bad = await trio.to_thread.run_sync(
            verity.verify_image, image, table.uncompressed_size, payload, desc.verity_root.split(":", 1)[1]
        )
    except LazyErofsError as exc:
        report.errors.append(f"layer {report.index}: dm-verity: {exc}")
        return
    report.bad_blocks = bad
    if bad:
        shown = ", ".join(map(str, bad[:10])) + (" ..." if len(bad) > 10 else "")
        report.errors.append(f"layer {report.index}: dm-verity: {len(bad)} data blocks do not match the tree: {shown}")


async def _verify(args: argparse.Namespace) -> list[LayerReport]:
    import os

    progress = Progress(enabled=not args.quiet and sys.stderr.isatty())
    reports = []
    if os.path.exists(args.target):
        from lazyfs.cli.inspect import load_descriptor
        from lazyfs.fetch.source import FileSource

        desc = load_descriptor(args.descriptor or args.target + ".json")
        source = FileSource(args.target)
        try:
            reports.append(await verify_layer(0, desc, source, progress))
        finally:
            source.close()
        progress.done()
        return reports
    if args.descriptor:
        raise FormatError(f"{args.target}: no such file")
    from lazyfs.oci import client as registry
    async with registry.RegistryClient(options_from_args(args)) as client:
        ref = registry.parse_reference(args.target)
        image = await client.resolve(ref)
        for i, desc in enumerate(image.layers):
            reports.append(await verify_layer(i, desc, client.blob(ref, desc), progress))
    progress.done()
    return reports


def run(args: argparse.Namespace) -> int:
    from lazyfs.mount.daemon import unwrap_group

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
