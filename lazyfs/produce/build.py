"""``lazyerofs build`` as a library: a directory or raw EROFS image in, a
seekable blob and its ``BLOB.json`` descriptor out."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import zstandard

from lazyfs.errors import FormatError
from lazyfs.format import MAX_CHUNK_SIZE, EncodeResult, encode_image
from lazyfs.produce.mkfs import is_erofs_image, make_erofs
from lazyfs.units import format_size

if TYPE_CHECKING:
    from lazyfs.produce.chunksize import ChunkChoice, Link
    from lazyfs.produce.layout import LayoutReport

__all__ = ["DEFAULT_HOT_LEVEL", "build_blob", "build_optimized_blob", "check_level", "write_descriptor"]

# The hot part of a profile-guided layout is what every lazy start fetches:
# at level 19 it is ~15% smaller than at level 3 (the cold-start image's
# imports: 8.4 vs 9.8 MB), costs seconds of build time, and decodes as fast.
DEFAULT_HOT_LEVEL = 19


def build_blob(
    src: str | os.PathLike[str],
    output: str,
    *,
    chunk_size: int | str,
    level: int = 3,
    dm_verity: bool = False,
    verity_block_size: int = 4096,
    source_date_epoch: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    link: Link | None = None,
    on_choice: Callable[[ChunkChoice], None] | None = None,
) -> EncodeResult:
    """Encode SRC (a directory, through mkfs.erofs, or a raw EROFS image) to ``output``.

    Reproducible: the same SRC and options give a byte-identical blob and
    descriptor. For a directory, ``source_date_epoch`` (else the
    ``SOURCE_DATE_EPOCH`` variable, else the tree's newest mtime) is the
    image's build time and clamps newer mtimes (see :func:`make_erofs`); a raw
    image is taken as it is. ``chunk_size="auto"`` measures it for
    ``link`` (:mod:`lazyfs.produce.chunksize`) and hands the choice to
    ``on_choice`` before encoding.
    """
    path, out_dir = _check_paths(src, output)
    _check_options(chunk_size, level)
    opts = dict(
        level=level,
        dm_verity=dm_verity,
        verity_block_size=verity_block_size,
        progress=progress,
    )
    if path.is_dir():
        with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
            image = os.path.join(tmp, "layer.erofs")
            make_erofs(path, image, source_date_epoch=source_date_epoch)
            chunk = resolve_chunk_size(image, chunk_size, level=level, link=link, on_choice=on_choice)
            return encode_image(image, output, chunk_size=chunk, **opts)
    if not is_erofs_image(path):
        raise FormatError(f"{src}: not a directory and not a raw EROFS image (no superblock magic)")
    chunk = resolve_chunk_size(path, chunk_size, level=level, link=link, on_choice=on_choice)
    return encode_image(path, output, chunk_size=chunk, **opts)


def resolve_chunk_size(
    image: str | os.PathLike[str],
    chunk_size: int | str,
    *,
    level: int = 3,
    link: Link | None = None,
    touched: list[tuple[int, int]] | None = None,
    basis: str | None = None,
    on_choice: Callable[[ChunkChoice], None] | None = None,
) -> int:
    """``chunk_size`` itself, or for ``"auto"`` the size measured on the raw
    ``image`` (``touched``: the ranges a profile says a start reads)."""
    if not isinstance(chunk_size, str):
        return chunk_size
    from lazyfs.produce.chunksize import DEFAULT_LINK, choose_chunk_size

    choice = choose_chunk_size(image, touched=touched, basis=basis, link=link or DEFAULT_LINK, level=level)
    if on_choice is not None:
        on_choice(choice)
    return choice.chunk_size


def build_optimized_blob(
    src: str | os.PathLike[str],
    output: str,
    profile: str | os.PathLike[str],
    *,
    chunk_size: int | str,
    profile_layer: str | None = None,
    level: int = 3,
    hot_level: int | None = DEFAULT_HOT_LEVEL,
    dm_verity: bool = False,
    verity_block_size: int = 4096,
    source_date_epoch: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    link: Link | None = None,
    on_choice: Callable[[ChunkChoice], None] | None = None,
) -> tuple[EncodeResult, LayoutReport]:
    """:func:`build_blob` with a profile-guided layout: the raw image (made
    from a directory, or given) is rewritten by
    :func:`~lazyfs.produce.layout.relocate_image` so that what ``profile``
    (a startup profile or a list of paths) touched comes first, then encoded.

    A profile's frames are byte ranges of the image it was recorded on: the
    plain image of the same SRC (builds are reproducible), at the profile
    layer's chunk size. Reproducible too: same SRC, profile and options,
    same bytes. With ``chunk_size="auto"`` the size is measured on the new
    image, for the ranges the profile's reads moved to. The frames of the
    hot part are compressed at ``hot_level`` (None: at ``level``).
    """
    from lazyfs.produce.layout import read_hints, relocate_image

    path, out_dir = _check_paths(src, output)
    _check_options(chunk_size, level)
    if hot_level is not None:
        check_level(hot_level, "--hot-level")
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        if path.is_dir():
            image = os.path.join(tmp, "plain.erofs")
            make_erofs(path, image, source_date_epoch=source_date_epoch)
        elif is_erofs_image(path):
            image = os.fspath(path)
        else:
            raise FormatError(f"{src}: not a directory and not a raw EROFS image (no superblock magic)")
        hints, _ = read_hints(
            profile, os.path.getsize(image), layer_digest=profile_layer,
            default_chunk_size=None if isinstance(chunk_size, str) else chunk_size,
        )  # fmt: skip
        laid_out = os.path.join(tmp, "layer.erofs")
        report = relocate_image(image, laid_out, hints)
        chunk = resolve_chunk_size(
            laid_out, chunk_size, level=level, link=link, on_choice=on_choice,
            touched=[(s, e) for s, e, _ms in report.new_ranges], basis=touched_basis(report, profile),
        )  # fmt: skip
        result = encode_image(
            laid_out, output, chunk_size=chunk, level=level, hot_bytes=report.hot_end, hot_level=hot_level,
            dm_verity=dm_verity, verity_block_size=verity_block_size, progress=progress,
        )  # fmt: skip
    return result, report


def touched_basis(report: LayoutReport, profile: str | os.PathLike[str]) -> str:
    """The why-line's words for the reads a profile-guided layout moved."""
    from lazyfs.produce.chunksize import profile_basis

    return profile_basis([(s, e) for s, e, _ms in report.new_ranges], f"profile {os.path.basename(profile)}")


def _check_paths(src: str | os.PathLike[str], output: str) -> tuple[Path, str]:
    """(source path, output directory), or FormatError naming what is wrong."""
    path = Path(src)
    if not path.exists():
        raise FormatError(f"{src}: no such file or directory")
    out_dir = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(out_dir):
        raise FormatError(f"{output}: output directory {out_dir} does not exist")
    if os.path.isdir(output):
        raise FormatError(f"{output}: is a directory; -o names the blob file to write")
    return path, out_dir


def _check_options(chunk_size: int | str, level: int) -> None:
    """Refuse values the encoder cannot use, as one clear line rather than a traceback."""
    if isinstance(chunk_size, str):
        if chunk_size != "auto":
            raise FormatError(f"--chunk-size must be a size or 'auto', not {chunk_size!r}")
    elif not 0 < chunk_size <= MAX_CHUNK_SIZE:
        raise FormatError(
            f"--chunk-size must be between 1 byte and {format_size(MAX_CHUNK_SIZE)}, not {chunk_size}"
        )
    check_level(level, "--level")


def check_level(level: int, option: str) -> None:
    """FormatError unless ``level`` is a zstd compression level."""
    # zstd's fastest negative level is -(1 << 17) (ZSTD_minCLevel).
    lo, hi = -(1 << 17), zstandard.MAX_COMPRESSION_LEVEL
    if not lo <= level <= hi:
        raise FormatError(f"{option} must be between {lo} and {hi}, not {level}")


def write_descriptor(blob: str, result: EncodeResult) -> str:
    """Write ``BLOB.json`` through a fresh temporary file and a rename, so a
    symlink planted at either name is replaced, never followed."""
    path = blob + ".json"
    directory, name = os.path.split(os.path.abspath(path))
    data = (json.dumps(result.descriptor, indent=2) + "\n").encode()
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    while True:
        tmp = os.path.join(directory, f".{name}.tmp.{os.urandom(8).hex()}")
        try:
            fd = os.open(tmp, flags, 0o644)
        except FileExistsError:
            continue
        break
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path
