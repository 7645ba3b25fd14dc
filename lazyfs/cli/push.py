"""``lazyerofs push``: turn directories or EROFS images into an OCI image of seekable layers.

Each SRC becomes one layer, the first the bottom one: a directory goes
through mkfs.erofs and the seekable encoder, a raw EROFS image through the
encoder, and an existing seekable blob (with its ``BLOB.json`` descriptor
next to it) is pushed as it is. The image config records each layer's
``diff_id`` (sha256 of the raw EROFS image), as containerd expects.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
from pathlib import Path

import trio
import zstandard

from lazyfs.cli._registry_opts import add_registry_options, options_from_args
from lazyfs.cli.build import add_encode_options, encode_source
from lazyfs.errors import FormatError, IntegrityError
from lazyfs.format import load_descriptor, parse_descriptor
from lazyfs.oci import (
    ImageLayer,
    Reference,
    RegistryClient,
    RegistryOptions,
    default_platform,
    parse_reference,
    push_image,
)
from lazyfs.produce.mkfs import is_erofs_image
from lazyfs.units import format_size

__all__ = ["prepare_layer", "register", "run"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "push",
        help="push directories or EROFS images as an image of seekable EROFS layers",
        description=(
            "Push an OCI image whose layers are seekable EROFS blobs. Each SRC is a "
            "directory (made into an EROFS image with mkfs.erofs), a raw EROFS image, "
            "or a seekable blob with its descriptor BLOB.json next to it. The first "
            "SRC is the bottom layer. Prints the manifest digest."
        ),
        epilog="example: lazyerofs push --chunk-size 1MiB ./base ./app localhost:5000/demo:v1",
    )
    p.add_argument(
        "sources", nargs="+", metavar="SRC", help="directory, raw EROFS image or seekable blob"
    )
    p.add_argument("ref", metavar="REF", help="where to push, e.g. localhost:5000/demo:v1")
    add_encode_options(p)
    add_registry_options(p)
    p.set_defaults(func=run)


def _diff_id_of_blob(blob: Path) -> str:
    """sha256 of what the blob decompresses to (skippable frames are skipped)."""
    h = hashlib.sha256()
    with open(blob, "rb") as f:
        reader = zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True)
        while piece := reader.read(1 << 20):
            h.update(piece)
    return "sha256:" + h.hexdigest()


def _blob_digest(blob: Path) -> str:
    h = hashlib.sha256()
    with open(blob, "rb") as f:
        while piece := f.read(1 << 20):
            h.update(piece)
    return "sha256:" + h.hexdigest()


def prepare_layer(src: str, workdir: Path, index: int, args: argparse.Namespace) -> ImageLayer:
    """Encode (or check) SRC into a blob in ``workdir``."""
    path = Path(src)
    if not path.exists():
        raise FormatError(f"{src}: no such file or directory")
    descriptor_file = Path(f"{src}.json")
    if path.is_file() and not is_erofs_image(path):
        if not descriptor_file.exists():
            raise FormatError(
                f"{src}: not a directory, not a raw EROFS image, and no {descriptor_file.name} descriptor next to it"
            )
        parsed = parse_descriptor(load_descriptor(descriptor_file), name=src)
        if parsed.size != path.stat().st_size:
            raise IntegrityError(
                f"{src}: blob is {path.stat().st_size} bytes, {descriptor_file.name} says {parsed.size}"
            )
        digest = _blob_digest(path)
        if digest != parsed.digest:
            raise IntegrityError(
                f"{src}: blob digest {digest} != descriptor digest {parsed.digest}"
            )
        return ImageLayer(path, parsed.to_dict(), _diff_id_of_blob(path))
    out = workdir / f"layer{index}.blob"
    result = encode_source(src, str(out), args, label=src)
    return ImageLayer(out, dict(result.descriptor), result.diff_id)


async def _push(
    ref: Reference, options: RegistryOptions, layers: list[ImageLayer], sources: list[str]
) -> str:
    def report(i: int, uploaded: bool) -> None:
        desc = layers[i].descriptor
        state = "pushed" if uploaded else "exists"
        print(
            f"layer {i}  {desc['digest'][:19]}  {format_size(desc['size']):>10}  {state}  ({sources[i]})",
            file=sys.stderr,
        )

    async with RegistryClient(options) as client:
        platform = options.platform or default_platform()
        return await push_image(client, ref, layers, platform=platform, on_layer=report)


def run(args: argparse.Namespace) -> int:
    ref = parse_reference(args.ref)  # fail before any encoding work
    options = options_from_args(args)
    with tempfile.TemporaryDirectory(prefix="lazyerofs-push-") as tmp:
        layers = [prepare_layer(src, Path(tmp), i, args) for i, src in enumerate(args.sources)]
        digest = trio.run(_push, ref, options, layers, list(args.sources))
    print(f"{ref.name}{':' + ref.tag if ref.tag else ''}@{digest}", file=sys.stderr)
    print(digest)
    return 0
