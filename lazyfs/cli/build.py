"""``lazyerofs build``: a directory or raw EROFS image -> seekable blob + descriptor."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable

from lazyfs.cli._files import write_atomic
from lazyfs.errors import LazyErofsError
from lazyfs.format import EncodeResult, seekable
from lazyfs.produce import build_blob, write_descriptor
from lazyfs.produce.chunksize import DEFAULT_LINK, ChunkChoice, parse_chunk_size, parse_link
from lazyfs.units import format_size


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "build",
        help="make a seekable EROFS blob from a directory or raw EROFS image",
        description=(
            "Make a seekable EROFS layer blob. SRC is a directory (turned into an "
            "EROFS image with mkfs.erofs) or an existing raw EROFS image. Writes the "
            "blob to BLOB and its OCI descriptor (mediaType, digest, size, "
            "annotations) to BLOB.json. The blob still decompresses with plain "
            "'zstd -d' to the raw image. "
            "Builds are reproducible: the same SRC and options give a byte-identical "
            "blob and descriptor. Directory entries are sorted by name; the EROFS and "
            "dm-verity UUIDs are derived from the image's own SHA-256, not drawn at "
            "random. Times: the epoch is --source-date-epoch, else the "
            "SOURCE_DATE_EPOCH environment variable, else the newest mtime in SRC "
            "(rounded up to a second). It is the image's build time, and any mtime "
            "newer than it is clamped to it, as 'tar --clamp-mtime' does; older "
            "mtimes are kept exactly. So without an epoch every file keeps its "
            "mtime (the same tree on disk gives the same blob), and with one a fresh "
            "checkout of the same content gives the same blob whenever it was made. "
            "A raw EROFS image SRC is encoded as it is."
        ),
        epilog="example: SOURCE_DATE_EPOCH=0 lazyerofs build ./rootfs -o layer.blob --chunk-size 1MiB",
    )
    p.add_argument("src", metavar="SRC", help="directory or raw EROFS image")
    p.add_argument("-o", "--output", required=True, metavar="BLOB", help="blob to write")
    add_encode_options(p)
    p.add_argument(
        "--source-date-epoch",
        type=_epoch,
        default=None,
        metavar="SECONDS",
        help="build time of the image; newer mtimes are clamped to it (default: "
        "$SOURCE_DATE_EPOCH, else the newest mtime in SRC, which keeps all mtimes)",
    )
    add_profile_options(p)
    p.add_argument(
        "--profile-layer",
        metavar="DIGEST",
        help="with --profile: the profile layer to use (default: its only layer with frames)",
    )
    p.add_argument("--json", action="store_true", help="print the descriptor as JSON on stdout")
    p.set_defaults(func=run)


def add_profile_options(p: argparse.ArgumentParser) -> None:
    """The layout options shared by ``build`` and ``optimize``."""
    p.add_argument(
        "--profile",
        metavar="FILE",
        help=(
            "lay the image out for a recorded start: FILE is a startup profile "
            "('lazyerofs profile save', recorded on the plain image of the same SRC) or a list "
            "of paths, one a line, in first-use order. Metadata comes first, then the data of "
            "the files the start touched in first-touch order, then everything else. The tree "
            "served is unchanged."
        ),
    )
    p.add_argument(
        "--profile-out",
        metavar="FILE",
        help="with --profile: write the profile translated to the new layout (for 'profile push')",
    )
    p.add_argument(
        "--hot-level",
        type=int,
        default=None,
        metavar="N",
        help="with --profile: zstd level of the frames of the hot part, which every lazy start fetches "
        "(default: 19, about 15%% fewer bytes than level 3 at a few seconds of build time; decoding is "
        "as fast; --hot-level 3 compresses it like the rest)",
    )


def add_encode_options(p: argparse.ArgumentParser) -> None:
    """Options shared by ``build`` and ``push``."""
    p.add_argument(
        "--chunk-size",
        type=parse_chunk_size,
        default=seekable.DEFAULT_CHUNK_SIZE,
        metavar="SIZE",
        help="uncompressed bytes per zstd frame, e.g. 256KiB, 1MiB, or 'auto': measured on the "
        "image (and the profile, if any) for --link (default: 4MiB, as containerd)",
    )
    add_auto_options(p)
    p.add_argument("--level", type=int, default=3, help="zstd level (default: 3)")
    p.add_argument("--dm-verity", action="store_true", help="append a dm-verity hash tree (sha512)")
    p.add_argument(
        "--verity-block-size",
        type=int,
        default=4096,
        metavar="N",
        help="dm-verity data and hash block size (default: 4096)",
    )


def add_auto_options(p: argparse.ArgumentParser) -> None:
    """The options of ``--chunk-size auto`` (build, push, convert, optimize)."""
    p.add_argument(
        "--link",
        type=parse_link,
        default=DEFAULT_LINK,
        metavar="RTT_MS/MBIT",
        help="with --chunk-size auto: the link to plan for, round trip in ms and bandwidth in "
        "Mbit/s (default: 20/100)",
    )
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="with --chunk-size auto: print every candidate size's estimate, not only the choice",
    )


def report_choice(choice: ChunkChoice, verbose: bool, label: str | None = None) -> None:
    """The why-line of a ``--chunk-size auto`` choice on stderr, and with
    ``verbose`` the table of candidates."""
    print(f"{label}: {choice.why()}" if label else choice.why(), file=sys.stderr)
    if verbose:
        print("\n".join(choice.table_lines()), file=sys.stderr)


def encode_source(src: str, output: str, args: argparse.Namespace, label: str | None = None) -> EncodeResult:
    """Encode SRC (directory or raw image) to ``output`` with the command's
    options; shared with ``push`` (``label`` starts its why-lines)."""
    return build_blob(
        src,
        output,
        chunk_size=args.chunk_size,
        level=args.level,
        dm_verity=args.dm_verity,
        verity_block_size=args.verity_block_size,
        # push shares this without the flag: it still honours SOURCE_DATE_EPOCH
        source_date_epoch=getattr(args, "source_date_epoch", None),
        progress=_progress_printer(os.path.basename(output)) if sys.stderr.isatty() else None,
        link=args.link,
        on_choice=lambda choice: report_choice(choice, args.verbose, label),
    )


def _epoch(text: str) -> int:
    """A non-negative whole number of seconds since 1970, as SOURCE_DATE_EPOCH."""
    if not (text.isascii() and text.isdigit()):
        raise argparse.ArgumentTypeError(f"{text!r} is not a non-negative whole number of seconds")
    return int(text)


def _progress_printer(label: str) -> Callable[[int, int], None]:
    """A one-line progress display on stderr, redrawn at most 10 times a second."""
    last = [0.0]

    def show(done: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] < 0.1 and done < total:
            return
        last[0] = now
        pct = 100 * done / total if total else 100.0
        end = "\n" if done >= total else ""
        sys.stderr.write(f"\rencoding {label}: {format_size(done)} of {format_size(total)} ({pct:.0f}%){end}")
        sys.stderr.flush()

    return show


def _build_optimized(args: argparse.Namespace) -> EncodeResult:
    from lazyfs.fetch.profile import Profile, ProfileLayer, dump_profile
    from lazyfs.produce.build import build_optimized_blob
    from lazyfs.produce.layout import layout_profile_layer

    result, report = build_optimized_blob(
        args.src, args.output, args.profile, chunk_size=args.chunk_size,
        profile_layer=args.profile_layer, level=args.level, hot_level=hot_level(args), dm_verity=args.dm_verity,
        verity_block_size=args.verity_block_size, source_date_epoch=args.source_date_epoch,
        progress=_progress_printer(os.path.basename(args.output)) if sys.stderr.isatty() else None,
        link=args.link, on_choice=lambda choice: report_choice(choice, args.verbose),
    )  # fmt: skip
    print(describe_layout(report), file=sys.stderr)
    if args.profile_out:
        digest = result.descriptor["digest"]
        frames, times = layout_profile_layer(report, digest, result.chunk_size)
        layer = ProfileLayer(digest, tuple(frames), tuple(times), result.chunk_size, result.frame_count)
        write_atomic(args.profile_out, dump_profile(Profile((layer,))))
    return result


def describe_layout(report: object) -> str:
    """One line about a relocation (a LayoutReport), for stderr."""
    from lazyfs.produce.layout import LayoutReport

    assert isinstance(report, LayoutReport)
    line = (
        f"layout: {report.inodes} inodes, hot metadata {format_size(report.metadata_bytes)}, then "
        f"{report.hot_files} hot files ({format_size(report.hot_bytes)}; {report.chunked_files} read in part, "
        f"chunk-based): hot part {format_size(report.hot_end)} of {format_size(report.image_size)}"
    )
    if report.missing_paths:
        line += f"; {len(report.missing_paths)} listed paths not in the image (first: {report.missing_paths[0]})"
    if report.ignored_ranges:
        line += f"; {report.ignored_ranges} profile frames on nothing in the image"
    return line


def hot_level(args: argparse.Namespace) -> int:
    """``--hot-level``, or the library's default."""
    from lazyfs.produce.build import DEFAULT_HOT_LEVEL

    return DEFAULT_HOT_LEVEL if args.hot_level is None else int(args.hot_level)


def run(args: argparse.Namespace) -> int:
    started = time.monotonic()
    if (args.profile_out or args.profile_layer or args.hot_level is not None) and not args.profile:
        raise LazyErofsError("--profile-out, --profile-layer and --hot-level need --profile")
    try:
        result = _build_optimized(args) if args.profile else encode_source(args.src, args.output, args)
        desc_path = write_descriptor(args.output, result)
    except OSError as exc:  # disk full, permission denied...: one line, not a traceback
        where = exc.filename or args.output
        raise LazyErofsError(f"build: {where}: {exc.strerror or exc}") from exc
    if args.json:
        json.dump(result.descriptor, sys.stdout, indent=2)
        print()
        return 0
    size = result.descriptor["size"]
    ratio = size / result.uncompressed_size if result.uncompressed_size else 0.0
    print(f"wrote {args.output} ({format_size(size)}) and {desc_path}")
    print(f"  digest      {result.descriptor['digest']}")
    print(f"  diff_id     {result.diff_id}")
    print(
        f"  image       {format_size(result.uncompressed_size)} in {result.frame_count} frames "
        f"of {format_size(result.chunk_size)}, ratio {ratio:.3f}"
    )
    if result.verity_root:
        print(f"  dm-verity   root {result.verity_root}, hash offset {result.verity_hash_offset}")
    print(f"  took        {time.monotonic() - started:.2f}s")
    return 0
