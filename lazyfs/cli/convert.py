"""``lazyerofs convert``: an ordinary OCI/Docker image (tar, tar+gzip, tar+zstd
layers) to the same image in seekable EROFS, pushed to DST_REF."""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from dataclasses import asdict
from typing import TYPE_CHECKING

import trio

from lazyfs.cli._registry_opts import add_registry_options, options_from_args
from lazyfs.cli.build import add_encode_options
from lazyfs.errors import FormatError, LazyErofsError
from lazyfs.oci import RegistryClient, RegistryOptions, parse_reference
from lazyfs.produce import DEFAULT_MAX_LAYER_BYTES, ConvertOptions, ConvertReport, convert_image
from lazyfs.produce.chunksize import table_lines
from lazyfs.units import format_size, parse_size

if TYPE_CHECKING:
    from lazyfs.cli.optimize import OptimizeReport

__all__ = ["register", "run"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert an OCI/Docker image of tar layers to seekable EROFS and push it",
        description=(
            "Read SRC_REF (an OCI or Docker schema 2 image or index; layers tar, tar+gzip or "
            "tar+zstd), turn each layer into one seekable EROFS layer holding exactly its "
            "changes (whiteouts as overlayfs whiteouts and opaque directories), and push the "
            "result to DST_REF with a config whose diff_ids are the raw EROFS images' sha256. "
            "Layers are streamed (source digests checked as they pass) and each EROFS image "
            "is written straight from its tar; a tar that climbs out of the layer root, goes "
            "through a symlink or device, or unpacks to more than --max-layer-size is refused."
        ),
        epilog="example: lazyerofs convert localhost:5000/app:v1 localhost:5000/app:v1-erofs",
    )
    p.add_argument("src", metavar="SRC_REF", help="image to convert")
    p.add_argument("dst", metavar="DST_REF", help="where to push the converted image")
    p.add_argument(
        "--all-platforms",
        action="store_true",
        help="convert every platform of an index and push an index (default: one platform)",
    )
    p.add_argument(
        "--max-layer-size",
        type=parse_size,
        default=DEFAULT_MAX_LAYER_BYTES,
        metavar="SIZE",
        help=(
            "refuse a layer whose files unpack to more than SIZE, sparse holes included "
            f"(default: {format_size(DEFAULT_MAX_LAYER_BYTES)})"
        ),
    )
    p.add_argument(
        "--workdir", metavar="DIR", help="staging and temporary images (default: $TMPDIR or /tmp)"
    )
    p.add_argument(
        "--via-mkfs",
        action="store_true",
        help=(
            "unpack each tar into a staging tree under --workdir and build it with mkfs.erofs "
            "(slower; needs root and erofs-utils) instead of writing the image directly"
        ),
    )
    p.add_argument(
        "--profile",
        metavar="FILE",
        help=(
            "then lay the converted image out for a recorded start, as 'lazyerofs optimize' "
            "does: FILE is a startup profile recorded on an earlier conversion of the same "
            "SRC_REF (conversion is reproducible, so its layers are these), or a list of paths "
            "in first-use order. The translated profile is pushed next to DST_REF. One platform only"
        ),
    )
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    add_encode_options(p)
    add_registry_options(p)
    p.set_defaults(func=run)


class _Bar:
    """One line per layer stage on a terminal, redrawn at most 10 times a second."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._last = 0.0
        self._lock = threading.Lock()

    def __call__(self, what: str, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        with self._lock:
            now = time.monotonic()
            finished = done >= total
            if now - self._last < 0.1 and not finished:
                return
            self._last = now
            pct = 100 * done / total if total else 100.0
            label = what.rsplit(" ", 3)[-3:]  # "layer i/n digest"
            sys.stderr.write(
                f"\r\x1b[K{' '.join(label)} {stage}: {format_size(done)} of {format_size(total)} ({pct:.0f}%)"
                + ("\n" if finished and stage == "push" else "")
            )
            sys.stderr.flush()


def _chunk_choices(report: ConvertReport, verbose: bool) -> None:
    """The why-line of each layer's ``--chunk-size auto`` choice (and the table)."""
    for plat in report.platforms:
        for i, layer in enumerate(plat.layers):
            if layer.chunk_choice is not None:
                print(f"{plat.platform} layer {i}: {layer.chunk_choice['why']}", file=sys.stderr)
                if verbose:
                    print("\n".join(table_lines(layer.chunk_choice)), file=sys.stderr)


def _summary(report: ConvertReport) -> None:
    for plat in report.platforms:
        for i, layer in enumerate(plat.layers):
            state = "pushed" if layer.uploaded else "exists"
            print(
                f"{plat.platform} layer {i}  {layer.source_digest[:19]} -> {layer.digest[:19]}  "
                f"tar {format_size(layer.tar_bytes):>10}  blob {format_size(layer.size):>10}  {state}",
                file=sys.stderr,
            )
    for skipped in report.skipped:
        print(f"skipped {skipped}: not an image for a platform", file=sys.stderr)
    rate = report.tar_bytes / max(report.seconds, 1e-6)
    print(
        f"{report.destination} {report.digest}: {format_size(report.tar_bytes)} of tar in "
        f"{report.seconds:.1f}s ({format_size(int(rate))}/s)",
        file=sys.stderr,
    )


async def _convert(
    args: argparse.Namespace, options: RegistryOptions, convert: ConvertOptions
) -> ConvertReport:
    src, dst = parse_reference(args.src), parse_reference(args.dst)
    async with RegistryClient(options) as client:
        return await convert_image(client, src, dst, convert, progress=_Bar(sys.stderr.isatty()))


def run(args: argparse.Namespace) -> int:
    if args.all_platforms and args.platform:
        raise FormatError("--platform and --all-platforms exclude each other")
    parse_reference(args.src), parse_reference(args.dst)  # fail before any network
    if args.profile and args.all_platforms:
        raise FormatError("--profile and --all-platforms exclude each other: a profile records one platform's start")
    if args.profile and not os.path.isfile(args.profile):
        raise FormatError(f"--profile {args.profile}: no such file")
    if args.max_layer_size <= 0:
        raise FormatError(f"--max-layer-size must be > 0, not {args.max_layer_size}")
    convert = ConvertOptions(
        chunk_size=args.chunk_size, level=args.level, dm_verity=args.dm_verity,
        verity_block_size=args.verity_block_size, all_platforms=args.all_platforms,
        max_layer_bytes=args.max_layer_size, workdir=args.workdir, link=args.link,
        via_mkfs=args.via_mkfs,
    )  # fmt: skip
    try:
        report = trio.run(_convert, args, options_from_args(args), convert)
    except OSError as exc:  # disk full, no space for staging: one line, not a traceback
        raise LazyErofsError(f"convert: {exc.filename or ''}: {exc.strerror or exc}") from exc
    _chunk_choices(report, args.verbose)
    summary = report.to_json()
    digest = report.digest
    if args.profile:
        from lazyfs.cli.optimize import profile_digests

        named = profile_digests(args.profile)  # None: a path list, for every layer
        converted = {layer.digest for plat in report.platforms for layer in plat.layers}
        if named is not None and not named & converted:
            print(
                "lazyerofs: warning: the profile names none of the converted layers (recorded on "
                "another image, or with other options?): the image is pushed as converted",
                file=sys.stderr,
            )
        else:
            optimized = asdict(trio.run(_optimize, args, options_from_args(args), report.digest))
            summary["optimized"], digest = optimized, optimized["digest"]
    if args.json:
        json.dump(summary, sys.stdout, indent=2)
        print()
    else:
        _summary(report)
        for layer in summary.get("optimized", {}).get("layers", []):
            if layer["relocated"]:
                print(f"laid out for the profile: {layer['source_digest'][:19]} -> {layer['digest'][:19]}", file=sys.stderr)
        print(digest)
    return 0


async def _optimize(args: argparse.Namespace, options: RegistryOptions, digest: str) -> OptimizeReport:
    """--profile: the image just pushed, laid out for the recorded start and pushed again as DST_REF."""
    from lazyfs.cli.optimize import optimize_image

    dst = parse_reference(args.dst)
    async with RegistryClient(options) as client:
        return await optimize_image(
            client, dst.with_digest(digest), dst, args.profile, level=args.level, workdir=args.workdir
        )
