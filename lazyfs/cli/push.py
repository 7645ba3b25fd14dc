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
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
import zstandard

from lazyfs.cli._registry_opts import add_registry_options, options_from_args
from lazyfs.cli.build import add_encode_options, encode_source
from lazyfs.errors import FormatError, IntegrityError
from lazyfs.format import seekable
from lazyfs.oci.client import (
    MEDIA_OCI_CONFIG,
    MEDIA_OCI_MANIFEST,
    RegistryClient,
    default_platform,
    parse_reference,
)
from lazyfs.produce.mkfs import is_erofs_image
from lazyfs.units import format_size

__all__ = ["Layer", "build_config", "build_manifest", "prepare_layer", "register", "run"]


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


@dataclass(frozen=True)
class Layer:
    """One layer ready to upload: blob file, its descriptor and the raw image's diff_id."""

    source: str
    blob: Path
    descriptor: dict[str, Any]
    diff_id: str


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


def prepare_layer(src: str, workdir: Path, index: int, args: argparse.Namespace) -> Layer:
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
        try:
            desc = json.loads(descriptor_file.read_text())
        except json.JSONDecodeError as exc:
            raise FormatError(f"{descriptor_file}: not valid JSON: {exc}") from exc
        parsed = seekable.parse_descriptor(desc, name=src)
        if parsed.size != path.stat().st_size:
            raise IntegrityError(
                f"{src}: blob is {path.stat().st_size} bytes, {descriptor_file.name} says {parsed.size}"
            )
        digest = _blob_digest(path)
        if digest != parsed.digest:
            raise IntegrityError(
                f"{src}: blob digest {digest} != descriptor digest {parsed.digest}"
            )
        return Layer(src, path, parsed.to_dict(), _diff_id_of_blob(path))
    out = workdir / f"layer{index}.blob"
    result = encode_source(src, str(out), args)
    return Layer(src, out, dict(result.descriptor), result.diff_id)


def build_config(layers: list[Layer], platform: str) -> bytes:
    os_, arch, *variant = platform.split("/")
    config: dict[str, Any] = {"architecture": arch, "os": os_}
    if variant:
        config["variant"] = variant[0]
    config["rootfs"] = {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]}
    return json.dumps(config, separators=(",", ":")).encode()


def build_manifest(layers: list[Layer], config: bytes) -> bytes:
    manifest = {
        "schemaVersion": 2,
        "mediaType": MEDIA_OCI_MANIFEST,
        "config": {
            "mediaType": MEDIA_OCI_CONFIG,
            "digest": "sha256:" + hashlib.sha256(config).hexdigest(),
            "size": len(config),
        },
        "layers": [layer.descriptor for layer in layers],
    }
    return json.dumps(manifest, indent=2).encode()


async def _push(
    args: argparse.Namespace, layers: list[Layer], config: bytes, manifest: bytes
) -> str:
    ref = parse_reference(args.ref)
    async with RegistryClient(options_from_args(args)) as client:
        for i, layer in enumerate(layers):
            desc = layer.descriptor
            uploaded = await client.push_blob(ref, layer.blob, desc["digest"], desc["size"])
            state = "pushed" if uploaded else "exists"
            print(
                f"layer {i}  {desc['digest'][:19]}  {format_size(desc['size']):>10}  {state}  ({layer.source})",
                file=sys.stderr,
            )
        config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
        await client.push_blob(ref, config, config_digest, len(config))
        return await client.push_manifest(ref, manifest, MEDIA_OCI_MANIFEST)


def run(args: argparse.Namespace) -> int:
    ref = parse_reference(args.ref)  # fail before any encoding work
    options = options_from_args(args)
    with tempfile.TemporaryDirectory(prefix="lazyerofs-push-") as tmp:
        layers = [prepare_layer(src, Path(tmp), i, args) for i, src in enumerate(args.sources)]
        config = build_config(layers, options.platform or default_platform())
        manifest = build_manifest(layers, config)
        digest = trio.run(_push, args, layers, config, manifest)
    print(f"{ref.name}{':' + ref.tag if ref.tag else ''}@{digest}", file=sys.stderr)
    print(digest)
    return 0
