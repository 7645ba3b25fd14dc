"""``lazyerofs optimize``: re-lay out an EROFS image already in a registry for
a recorded start, and push it under a new name.

For each layer the profile names (by blob digest), the blob is downloaded
(its digest checked as it passes), decompressed to its raw image,
rewritten by :mod:`lazyfs.produce.layout` (metadata first, then the data
the start touched, in first-touch order, then the rest), encoded again and
pushed; other layers are kept as they are. The config's ``diff_ids`` follow
the new images; the profile, translated to the new layout, is pushed next to
the new manifest (so the next ``lazyerofs mount`` replays it) and, with
``--profile-out``, written to a file.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lazyfs.cli._files import write_atomic
from lazyfs.cli._registry_opts import add_registry_options, options_from_args
from lazyfs.cli.build import (
    add_auto_options,
    add_profile_options,
    describe_layout,
    hot_level,
    report_choice,
)
from lazyfs.errors import FormatError, IntegrityError, LazyErofsError
from lazyfs.produce.chunksize import ChunkChoice, Link, parse_chunk_size
from lazyfs.units import format_size

__all__ = ["OptimizeReport", "optimize_image", "register", "run"]

_EROFS_ANNOTATIONS = ("dev.containerd.erofs.",)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "optimize",
        help="re-lay out a seekable EROFS image in a registry for a recorded start",
        description=(
            "Read SRC_REF (an image of seekable or plain EROFS layers), rewrite every layer the "
            "profile names so that the metadata and the data a recorded start touched come first "
            "and contiguous, in first-touch order, everything else after, and push the result to "
            "DST_REF. The tree each layer serves is unchanged (contents, modes, owners, xattrs, "
            "times, links). Layers the profile does not name are kept as they are. The profile, "
            "translated to the new layout, is pushed next to DST_REF's manifest for 'lazyerofs "
            "mount' to replay. Same inputs give the same bytes."
        ),
        epilog=(
            "example: lazyerofs profile save /mnt/app -o app.profile.json && "
            "lazyerofs optimize --profile app.profile.json localhost:5000/app:v1 localhost:5000/app:v1-opt"
        ),
    )
    p.add_argument("src", metavar="SRC_REF", help="image to optimize")
    p.add_argument("dst", metavar="DST_REF", help="where to push the optimized image")
    add_profile_options(p)
    p.add_argument(
        "--chunk-size",
        type=parse_chunk_size,
        default=None,
        metavar="SIZE",
        help="uncompressed bytes per zstd frame of the new layers, or 'auto': measured per layer "
        "on the new image and the profile's reads for --link (default: each layer's own)",
    )
    add_auto_options(p)
    p.add_argument("--level", type=int, default=3, help="zstd level (default: 3)")
    p.add_argument(
        "--no-push-profile",
        action="store_true",
        help="do not push the translated profile next to the new image",
    )
    p.add_argument("--workdir", metavar="DIR", help="temporary blobs and images (default: $TMPDIR or /tmp)")
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    add_registry_options(p)
    p.set_defaults(func=run)


@dataclass
class LayerResult:
    source_digest: str
    digest: str
    size: int
    relocated: bool
    layout: dict[str, Any] | None = None
    profile_frames: int = 0
    chunk_choice: dict[str, Any] | None = None  # with --chunk-size auto (ChunkChoice.to_json)


@dataclass
class OptimizeReport:
    source: str
    destination: str
    digest: str = ""
    profile_digest: str | None = None
    layers: list[LayerResult] = field(default_factory=list)
    seconds: float = 0.0


async def _download(client: Any, ref: Any, desc: dict[str, Any], path: str) -> None:
    import trio

    f = await trio.to_thread.run_sync(open, path, "wb")
    try:

        async def sink(piece: bytes) -> None:
            await trio.to_thread.run_sync(f.write, piece)

        await client.blob(ref, desc).stream(sink)
    finally:
        f.close()


def _raw_image(blob: str, media_type: str, out: str) -> str:
    """The raw EROFS image of a layer blob (a seekable blob decompresses, frames
    and skippable frames alike, with a plain streaming zstd decoder)."""
    from lazyfs.format import MEDIA_TYPE_PLAIN, MEDIA_TYPE_SEEKABLE

    if media_type == MEDIA_TYPE_PLAIN:
        return blob
    if media_type != MEDIA_TYPE_SEEKABLE:
        raise FormatError(f"layer media type {media_type!r} is not EROFS; convert the image first")
    import zstandard

    dctx = zstandard.ZstdDecompressor(max_window_size=1 << 27)
    with open(blob, "rb") as src, open(out, "wb") as dst:
        reader = dctx.stream_reader(src, read_across_frames=True)
        shutil.copyfileobj(reader, dst, 1 << 20)
    return out


def _sha256_file(path: str) -> str:
    with open(path, "rb") as f:
        return "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()


async def optimize_image(
    client: Any,
    src: Any,
    dst: Any,
    profile_path: str,
    *,
    chunk_size: int | str | None = None,
    level: int = 3,
    hot_level: int | None = None,
    push_profile: bool = True,
    profile_out: str | None = None,
    workdir: str | None = None,
    link: Link | None = None,
    on_choice: Callable[[str, ChunkChoice], None] | None = None,
) -> OptimizeReport:
    """Optimize ``src`` for the start ``profile_path`` recorded and push it as ``dst``.

    The frames of each layer's hot part are compressed at ``hot_level``
    (None: at ``level``). ``chunk_size="auto"`` measures each new layer's frame size for ``link``
    on the ranges the profile's
    reads moved to; ``on_choice(layer, ChunkChoice)`` hears each choice.
    """
    import trio

    from lazyfs.fetch.profile import MEDIA_TYPE_PROFILE, Profile, ProfileLayer, dump_profile
    from lazyfs.format import ANNOTATION_VERITY_ROOT, encode_image, parse_descriptor
    from lazyfs.oci import MEDIA_OCI_CONFIG, MEDIA_OCI_MANIFEST
    from lazyfs.oci.referrers import ANNOTATION_CREATED, push_artifact
    from lazyfs.produce.layout import layout_profile_layer, read_hints, relocate_image

    started = time.monotonic()
    report = OptimizeReport(str(src), str(dst))
    resolved = await client.resolve(src)
    config = resolved.config
    if not isinstance(config, dict):
        raise FormatError(f"{src}: image has no readable config")
    rootfs = config.get("rootfs")
    diff_ids = list(rootfs.get("diff_ids", [])) if isinstance(rootfs, dict) else []
    if len(diff_ids) != len(resolved.layers):
        raise FormatError(f"{src}: config lists {len(diff_ids)} diff_ids for {len(resolved.layers)} layers")
    new_layers: list[dict[str, Any]] = []
    profile_layers: list[ProfileLayer] = []
    named = profile_digests(profile_path)
    if named is not None and not named & {d["digest"] for d in resolved.layers}:
        raise FormatError(f"{profile_path}: names none of the layers of {src}; nothing to optimize")
    work = tempfile.mkdtemp(prefix="lazyerofs-optimize-", dir=workdir)
    try:
        for i, desc in enumerate(resolved.layers):
            what = f"{src.name} layer {i} {desc['digest'][:19]}"
            layer = parse_descriptor(desc, name=what)
            if named is not None and desc["digest"] not in named:
                # Not in the profile: the same blob (copied if DST's repository lacks it).
                if not await client.blob_exists(dst, desc["digest"]):
                    blob = os.path.join(work, f"{i}.blob")
                    await _download(client, src, desc, blob)
                    await client.push_blob(dst, blob, desc["digest"], desc["size"])
                    os.unlink(blob)
                new_layers.append(desc)
                report.layers.append(LayerResult(desc["digest"], desc["digest"], desc["size"], False))
                continue
            blob = os.path.join(work, f"{i}.blob")
            raw = os.path.join(work, f"{i}.raw")
            await _download(client, src, desc, blob)
            image = await trio.to_thread.run_sync(_raw_image, blob, desc.get("mediaType", ""), raw)
            got = await trio.to_thread.run_sync(_sha256_file, image)
            if got != diff_ids[i]:
                raise IntegrityError(f"{what}: raw image hashes to {got}, the config says {diff_ids[i]}")
            table_chunk = _chunk_size_of(blob, layer.table_offset, what) if layer.seekable else None
            hints, matched = read_hints(
                profile_path, os.path.getsize(image), layer_digest=desc["digest"],
                default_chunk_size=table_chunk, required=False,
            )  # fmt: skip
            del matched  # a path list applies to every layer, a profile's layer was picked above
            laid = os.path.join(work, f"{i}.erofs")
            layout = await trio.to_thread.run_sync(relocate_image, image, laid, hints)
            print(f"{what}: {describe_layout(layout)}", file=sys.stderr)
            out = os.path.join(work, f"{i}.new")
            choice = None
            if isinstance(chunk_size, str):
                from lazyfs.produce.build import touched_basis
                from lazyfs.produce.chunksize import DEFAULT_LINK, choose_chunk_size

                choice = await trio.to_thread.run_sync(
                    functools.partial(
                        choose_chunk_size, laid, touched=[(s, e) for s, e, _ms in layout.new_ranges],
                        basis=touched_basis(layout, profile_path), link=link or DEFAULT_LINK, level=level,
                    )
                )  # fmt: skip
                chunk = choice.chunk_size
                if on_choice is not None:
                    on_choice(what, choice)
            else:
                chunk = chunk_size or table_chunk or (4 << 20)
            verity = bool((desc.get("annotations") or {}).get(ANNOTATION_VERITY_ROOT))
            result = await trio.to_thread.run_sync(
                functools.partial(
                    encode_image, laid, out, chunk_size=chunk, level=level, hot_bytes=layout.hot_end,
                    hot_level=hot_level, dm_verity=verity, fsync=False,
                )
            )
            new = dict(result.descriptor)
            kept = {
                k: v for k, v in (desc.get("annotations") or {}).items() if not k.startswith(_EROFS_ANNOTATIONS)
            }
            if kept:
                new["annotations"] = {**kept, **(new.get("annotations") or {})}
            await client.push_blob(dst, out, new["digest"], new["size"])
            new_layers.append(new)
            diff_ids[i] = result.diff_id
            frames, times = layout_profile_layer(layout, new["digest"], result.chunk_size)
            profile_layers.append(
                ProfileLayer(new["digest"], tuple(frames), tuple(times), result.chunk_size, result.frame_count)
            )
            report.layers.append(
                LayerResult(
                    desc["digest"], new["digest"], new["size"], True, layout.to_json(), len(frames),
                    choice.to_json() if choice is not None else None,
                )
            )  # fmt: skip
            for path in (blob, raw, laid, out):
                if os.path.exists(path):
                    os.unlink(path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    config["rootfs"] = {**rootfs, "diff_ids": diff_ids}
    config_bytes = json.dumps(config, separators=(",", ":")).encode()
    config_digest = "sha256:" + hashlib.sha256(config_bytes).hexdigest()
    await client.push_blob(dst, config_bytes, config_digest, len(config_bytes))
    manifest: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": MEDIA_OCI_MANIFEST,
        "config": {"mediaType": MEDIA_OCI_CONFIG, "digest": config_digest, "size": len(config_bytes)},
        "layers": new_layers,
    }
    if resolved.manifest.get("annotations"):
        manifest["annotations"] = resolved.manifest["annotations"]
    body = json.dumps(manifest, indent=2).encode()
    report.digest = await client.push_manifest(dst, body, MEDIA_OCI_MANIFEST)
    profile = Profile(tuple(profile_layers), image=report.digest)
    data = dump_profile(profile)
    if profile_out:
        write_atomic(profile_out, data)
    if push_profile and profile.frame_total:
        subject = {"mediaType": MEDIA_OCI_MANIFEST, "digest": report.digest, "size": len(body)}
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        pushed = await push_artifact(client, dst, subject, MEDIA_TYPE_PROFILE, data, annotations={ANNOTATION_CREATED: created})
        report.profile_digest = pushed.digest
    report.seconds = round(time.monotonic() - started, 3)
    return report


def profile_digests(path: str) -> set[str] | None:
    """The layer digests a profile has frames for; None for a path list (every layer)."""
    from lazyfs.fetch.profile import MAX_PROFILE_BYTES, parse_profile

    try:
        with open(path, "rb") as f:
            data = f.read(MAX_PROFILE_BYTES + 1)
    except OSError as exc:
        raise FormatError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    if not data.lstrip().startswith(b"{"):
        return None
    return {layer.digest for layer in parse_profile(data, name=path).layers if layer.frames}


def _chunk_size_of(blob: str, table_offset: int | None, what: str) -> int:
    """The chunk size in a downloaded (digest-checked) seekable blob's chunk table header."""
    import struct

    from lazyfs.format import TABLE_MAGIC

    with open(blob, "rb") as f:
        f.seek(table_offset or 0)
        head = f.read(8 + 24)
    if len(head) < 32 or struct.unpack_from("<I", head, 8)[0] != TABLE_MAGIC:
        raise FormatError(f"{what}: no chunk table at offset {table_offset}")
    chunk = int(struct.unpack_from("<I", head, 24)[0])
    if chunk <= 0:
        raise FormatError(f"{what}: chunk size 0 in its chunk table")
    return chunk


def run(args: argparse.Namespace) -> int:
    import trio

    from lazyfs.oci import RegistryClient, parse_reference

    if not args.profile:
        raise LazyErofsError("optimize needs --profile FILE (from 'lazyerofs profile save', or a list of paths)")
    from lazyfs.produce.build import check_level

    check_level(args.level, "--level")
    check_level(hot_level(args), "--hot-level")
    src, dst = parse_reference(args.src), parse_reference(args.dst)
    options = options_from_args(args)

    async def go() -> OptimizeReport:
        async with RegistryClient(options) as client:
            return await optimize_image(
                client, src, dst, args.profile, chunk_size=args.chunk_size, level=args.level, hot_level=hot_level(args),
                push_profile=not args.no_push_profile, profile_out=args.profile_out, workdir=args.workdir,
                link=args.link, on_choice=lambda what, choice: report_choice(choice, args.verbose, what),
            )  # fmt: skip

    try:
        report = trio.run(go)
    except OSError as exc:
        raise LazyErofsError(f"optimize: {exc.filename or ''}: {exc.strerror or exc}") from exc
    if args.json:
        from dataclasses import asdict

        json.dump(asdict(report), sys.stdout, indent=2)
        print()
        return 0
    for n, layer in enumerate(report.layers):
        state = "relocated" if layer.relocated else "kept"
        print(f"layer {n}  {layer.source_digest[:19]} -> {layer.digest[:19]}  {format_size(layer.size):>10}  {state}", file=sys.stderr)
    if report.profile_digest:
        print(f"pushed the translated profile {report.profile_digest[:19]}", file=sys.stderr)
    print(report.digest)
    return 0
