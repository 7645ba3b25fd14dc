"""``lazyerofs convert`` as a library: an ordinary OCI or Docker image (layers
tar, tar+gzip, tar+zstd) in, the same image with seekable EROFS layers out.

Per layer, bounded memory throughout: the blob is streamed from the registry
(its digest checked as it passes, the last piece held back until it matches)
through the decompressor (a thread of its own) into
:func:`~lazyfs.produce.erofs_writer.write_erofs_from_tar`, which writes the
raw EROFS image of exactly the layer's changes (whiteouts in overlayfs form)
straight from the tar stream while a
:class:`~lazyfs.produce.erofs_writer.StreamingEncoder` compresses each frame
of it as soon as its bytes are final (frame 0, which holds the superblock,
and the metadata's frames at the end); then the blob is assembled and pushed
(blobs the registry has are skipped). ``via_mkfs`` takes the older road instead: the tar
into a staging tree (:func:`~lazyfs.produce.tarstage.stage_tar`, needs root),
then ``mkfs.erofs``; both refuse the same hostile tars with the same errors.
Layers form a pipeline: the next layer is unpacked while the previous one goes
through encoding and push (see :func:`_convert_layers`). The new config is the old one with
``rootfs.diff_ids`` replaced by the sha256 of the raw EROFS images (as
containerd's converter records them); history, annotations and everything
else are kept. An index in (with ``all_platforms``) gives an index out.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import struct
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

import trio

from lazyfs.errors import FormatError, LazyErofsError
from lazyfs.format import DEFAULT_CHUNK_SIZE, encode_image
from lazyfs.format.digest import verify_bytes
from lazyfs.oci import (
    INDEX_TYPES,
    MEDIA_OCI_CONFIG,
    MEDIA_OCI_INDEX,
    MEDIA_OCI_MANIFEST,
    Reference,
    RegistryClient,
    check_descriptor,
    check_image_manifest,
)
from lazyfs.produce.chunksize import Link
from lazyfs.produce.erofs_writer import StreamingEncoder, write_erofs_from_tar
from lazyfs.produce.mkfs import make_erofs, source_date_epoch_from_env
from lazyfs.produce.tarstage import DEFAULT_MAX_LAYER_BYTES
from lazyfs.produce.unpack import PiecePipe, ProgressFn, stage_layer

__all__ = [
    "LAYER_MEDIA_TYPES",
    "ConvertOptions",
    "ConvertReport",
    "LayerReport",
    "PlatformReport",
    "convert_image",
]

log = logging.getLogger(__name__)

_TAR = "application/vnd.oci.image.layer.v1.tar"
_FOREIGN = "application/vnd.oci.image.layer.nondistributable.v1.tar"
LAYER_MEDIA_TYPES = frozenset(
    {
        _TAR, _TAR + "+gzip", _TAR + "+zstd", _FOREIGN, _FOREIGN + "+gzip", _FOREIGN + "+zstd",
        "application/vnd.docker.image.rootfs.diff.tar.gzip",
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    }
)  # fmt: skip
MAX_CONFIG_SIZE = 16 << 20
_PIECE = 1 << 20


@dataclass(frozen=True)
class ConvertOptions:
    chunk_size: int | str = DEFAULT_CHUNK_SIZE  # or "auto": measured per layer for ``link``
    level: int = 3
    dm_verity: bool = False
    verity_block_size: int = 4096
    all_platforms: bool = False
    max_layer_bytes: int = DEFAULT_MAX_LAYER_BYTES
    workdir: str | None = None  # staging and temporary images (default: $TMPDIR)
    # The build time of the EROFS images: SOURCE_DATE_EPOCH if set, else the
    # source config's "created", else 0. Never "now": converting the same
    # image twice gives the same blobs (deduplicated in registry and cache).
    source_date_epoch: int | None = None
    link: Link | None = None  # with chunk_size "auto" (default: 20 ms/100 Mbit/s)
    # Stage each tar into a directory tree and run mkfs.erofs on it (needs
    # root), instead of writing the image straight from the tar stream.
    via_mkfs: bool = False


@dataclass
class LayerReport:
    source_digest: str
    source_media_type: str
    source_size: int
    tar_bytes: int  # uncompressed tar read
    entries: int
    digest: str
    size: int
    diff_id: str
    image_size: int
    uploaded: bool
    seconds: float
    # wall seconds per stage: "stage" (download, digest, decompress, and the tar
    # into the EROFS image, or into the staging tree with via_mkfs; these
    # overlap), "wait" (for the previous layer to be finished), "mkfs" (0
    # unless via_mkfs), "encode", "push"; layers overlap each other
    stages: dict[str, float] = field(default_factory=dict)
    # with chunk_size "auto": the choice and the estimates behind it (ChunkChoice.to_json)
    chunk_choice: dict[str, Any] | None = None


@dataclass
class PlatformReport:
    platform: str
    source_digest: str
    digest: str
    size: int
    layers: list[LayerReport] = field(default_factory=list)


@dataclass
class ConvertReport:
    source: str
    destination: str
    digest: str  # what DST_REF now names: a manifest, or an index
    media_type: str
    platforms: list[PlatformReport] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def tar_bytes(self) -> int:
        return sum(layer.tar_bytes for p in self.platforms for layer in p.layers)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["tar_bytes"] = self.tar_bytes
        out["tar_mb_per_s"] = (
            round(self.tar_bytes / 1e6 / self.seconds, 1) if self.seconds else None
        )
        return out


_FS_IOC_GETFLAGS = 0x80086601
_FS_IOC_SETFLAGS = 0x40086602
_FS_TOPDIR_FL = 0x00020000


def _spread_inodes(directory: str) -> None:
    """Mark ``directory`` as a top of a hierarchy (``chattr +T``), best effort.

    ext4's allocator then puts each new subdirectory (each layer's staging
    tree) in a block group of its own instead of next to its parent. Why it
    matters: on ext4 without a journal, creating an inode skips every inode of
    its group freed in the last minutes, one by one; staging a layer right
    where the previous layer's tree was just deleted made each file creation
    cost a millisecond (measured: ~1000 us against ~40 us per file).
    """
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        got = fcntl.ioctl(fd, _FS_IOC_GETFLAGS, struct.pack("l", 0))
        flags = struct.unpack("l", got)[0]
        fcntl.ioctl(fd, _FS_IOC_SETFLAGS, struct.pack("l", flags | _FS_TOPDIR_FL))
    except OSError:
        pass  # not ext2/3/4 (tmpfs, xfs, btrfs...): nothing to gain there
    finally:
        os.close(fd)


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class _Staged:
    """A layer whose tar is unpacked, waiting for encode and push: into its
    EROFS image (``image``), or into its staging tree for mkfs (``stage_dir``)."""

    desc: dict[str, Any]
    media_type: str
    what: str
    stage_dir: str
    tar_bytes: int
    entries: int
    started: float
    staged: float
    image: str | None = None
    # With a fixed chunk size, the image's frames are compressed as it is written.
    encoder: StreamingEncoder | None = None
    # Awaited once the blob is encoded, before its push: the next layer may encode.
    on_encoded: Callable[[], Awaitable[None]] | None = None


def _check_layer(desc: dict[str, Any], what: str) -> str:
    media_type = desc.get("mediaType", "")
    if media_type not in LAYER_MEDIA_TYPES:
        raise FormatError(f"{what}: media type {media_type!r} is not a tar layer this converts")
    if desc.get("urls") and media_type.startswith(
        (_FOREIGN, "application/vnd.docker.image.rootfs.foreign")
    ):
        log.warning("%s: foreign layer; fetching it from the registry, not from its urls", what)
    return media_type


async def _stage_layer(
    client: RegistryClient,
    src: Reference,
    desc: dict[str, Any],
    work: str,
    what: str,
    options: ConvertOptions,
    progress: ProgressFn,
) -> _Staged:
    """Download, decompress and unpack one layer (the first half of its conversion)."""
    started = time.monotonic()
    media_type = _check_layer(desc, what)
    if not options.via_mkfs:
        return await _write_layer(client, src, desc, work, what, options, progress, media_type, started)
    # A random name: with the work directory marked as a top directory (see
    # _spread_inodes), ext4 places each tree in a block group of its own.
    stage_dir = os.path.join(work, f"stage-{os.urandom(8).hex()}")
    os.mkdir(stage_dir)
    try:
        os.chmod(stage_dir, 0o755)  # the layer root's mode and owner, unless the tar says otherwise
        os.chown(stage_dir, 0, 0)
        tar_bytes, entries = await stage_layer(
            client, src, desc, stage_dir, what, options.max_layer_bytes, progress
        )
    except BaseException:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(functools.partial(shutil.rmtree, stage_dir, ignore_errors=True))
        raise
    staged = time.monotonic()
    log.info("%s: staged in %.2fs", what, staged - started)
    return _Staged(desc, media_type, what, stage_dir, tar_bytes, entries, started, staged)


async def _write_layer(
    client: RegistryClient,
    src: Reference,
    desc: dict[str, Any],
    work: str,
    what: str,
    options: ConvertOptions,
    progress: ProgressFn,
    media_type: str,
    started: float,
) -> _Staged:
    """The layer's raw EROFS image, written straight from its tar stream; with
    a fixed chunk size its frames are compressed meanwhile (as they become final)."""
    image = os.path.join(work, f"layer-{os.urandom(8).hex()}.erofs")
    epoch = options.source_date_epoch if options.source_date_epoch is not None else 0
    encoder = None
    if isinstance(options.chunk_size, int):
        encoder = StreamingEncoder(image, chunk_size=options.chunk_size, level=options.level, scratch_dir=work)

    def consume(pipe: PiecePipe) -> tuple[int, int]:
        result = write_erofs_from_tar(
            pipe.get, image, layer=what, source_date_epoch=epoch,
            max_layer_bytes=options.max_layer_bytes,
            # The source blob's digest, checked as it streamed, names the tar exactly.
            uuid_seed=desc["digest"].encode(),
            on_final=encoder.final if encoder is not None else None,
        )  # fmt: skip
        return result.tar_bytes, result.entries

    try:
        tar_bytes, entries = await stage_layer(
            client, src, desc, "", what, options.max_layer_bytes, progress, consume
        )
    except BaseException:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(
                _discard, _Staged(desc, media_type, what, "", 0, 0, started, started, image, encoder)
            )
        raise
    staged = time.monotonic()
    log.info("%s: EROFS image written in %.2fs", what, staged - started)
    return _Staged(desc, media_type, what, "", tar_bytes, entries, started, staged, image, encoder)


async def _finish_layer(
    client: RegistryClient,
    dst: Reference,
    layer: _Staged,
    work: str,
    options: ConvertOptions,
    progress: ProgressFn,
) -> tuple[LayerReport, dict[str, Any]]:
    """(mkfs,) encode and push one unpacked layer (the second half of its conversion)."""
    what, desc = layer.what, layer.desc
    name = os.path.basename(layer.image or layer.stage_dir).removesuffix(".erofs")
    image = layer.image or os.path.join(work, f"{name}.erofs")
    blob_path = os.path.join(work, f"{name}.blob")
    begun = time.monotonic()
    if layer.image is None:
        try:
            await trio.to_thread.run_sync(
                functools.partial(make_erofs, layer.stage_dir, image, source_date_epoch=options.source_date_epoch)
            )
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(functools.partial(shutil.rmtree, layer.stage_dir, ignore_errors=True))
    made = time.monotonic()
    choice = None
    try:
        chunk = options.chunk_size
        if isinstance(chunk, str):
            from lazyfs.produce.chunksize import DEFAULT_LINK, choose_chunk_size

            choice = await trio.to_thread.run_sync(
                functools.partial(choose_chunk_size, image, link=options.link or DEFAULT_LINK, level=options.level)
            )
            chunk = choice.chunk_size
            log.info("%s: %s", what, choice.why())
        if layer.encoder is not None:
            result = await trio.to_thread.run_sync(
                functools.partial(
                    layer.encoder.finish, blob_path, dm_verity=options.dm_verity,
                    verity_block_size=options.verity_block_size,
                    progress=lambda done, total: progress(what, "encode", done, total),
                )
            )  # fmt: skip
        else:
            result = await trio.to_thread.run_sync(
                functools.partial(
                    encode_image, image, blob_path, chunk_size=chunk,
                    level=options.level, dm_verity=options.dm_verity,
                    verity_block_size=options.verity_block_size,
                    progress=lambda done, total: progress(what, "encode", done, total),
                    fsync=False,  # a scratch file, pushed then deleted
                )
            )  # fmt: skip
    finally:
        if layer.encoder is not None:
            await trio.to_thread.run_sync(layer.encoder.close)
        os.unlink(image)
    encoded = time.monotonic()
    if layer.on_encoded is not None:
        await layer.on_encoded()
    log.info("%s: mkfs in %.2fs, encoded in %.2fs", what, made - begun, encoded - made)
    try:
        descriptor = dict(result.descriptor)
        annotations = {**(desc.get("annotations") or {}), **(descriptor.get("annotations") or {})}
        if annotations:
            descriptor["annotations"] = annotations
        progress(what, "push", 0, descriptor["size"])
        uploaded = await client.push_blob(dst, blob_path, descriptor["digest"], descriptor["size"])
        progress(what, "push", descriptor["size"], descriptor["size"])
    finally:
        os.unlink(blob_path)
    pushed = time.monotonic()
    report = LayerReport(
        source_digest=desc["digest"], source_media_type=layer.media_type,
        source_size=desc["size"], tar_bytes=layer.tar_bytes, entries=layer.entries,
        digest=descriptor["digest"], size=descriptor["size"], diff_id=result.diff_id,
        image_size=result.uncompressed_size, uploaded=uploaded,
        seconds=round(pushed - layer.started, 3),
        stages={
            "stage": round(layer.staged - layer.started, 3),
            "wait": round(begun - layer.staged, 3), "mkfs": round(made - begun, 3),
            "encode": round(encoded - made, 3), "push": round(pushed - encoded, 3),
        },
        chunk_choice=choice.to_json() if choice is not None else None,
    )  # fmt: skip
    return report, descriptor


async def _convert_layers(
    client: RegistryClient,
    src: Reference,
    dst: Reference,
    layers: list[dict[str, Any]],
    whats: list[str],
    work: str,
    options: ConvertOptions,
    progress: ProgressFn,
) -> list[tuple[LayerReport, dict[str, Any]]]:
    """Convert the layers as a pipeline: layer i+1 is downloaded and written
    (Python and the network; decompression and the compression of its frames
    as they become final in threads of their own) while layer i is finished
    (its last frames and blob, or with ``via_mkfs`` mkfs.erofs and the whole
    encoding), so both cores work; layer i's push overlaps layer i+1's
    finishing. One layer is unpacked at a time, one finished and one pushed:
    disk use stays bounded by three layers, memory by a few tens of MiB each.
    (Two layers unpacked at once measured no faster here: the two writers
    contend for the GIL, and memory grows.)"""
    results: list[tuple[LayerReport, dict[str, Any]] | None] = [None] * len(layers)
    failures: list[BaseException] = []
    finishing = trio.Semaphore(1)
    pushing = trio.Semaphore(1)

    async def finish(i: int, staged: _Staged) -> None:
        held = {"finishing": True, "pushing": False}

        async def encoded() -> None:  # the next layer may be finished while this one is pushed
            await pushing.acquire()
            held["pushing"] = True
            held["finishing"] = False
            finishing.release()

        staged.on_encoded = encoded
        try:
            results[i] = await _finish_layer(client, dst, staged, work, options, progress)
        except Exception as exc:
            failures.append(exc)
            nursery.cancel_scope.cancel()
        finally:
            if held["finishing"]:
                finishing.release()
            if held["pushing"]:
                pushing.release()

    async with trio.open_nursery() as nursery:
        for i, desc in enumerate(layers):
            try:
                staged = await _stage_layer(client, src, desc, work, whats[i], options, progress)
            except Exception as exc:
                failures.append(exc)
                nursery.cancel_scope.cancel()
                break
            try:
                await finishing.acquire()  # the previous layer is finished
            except trio.Cancelled:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(functools.partial(_discard, staged))
                raise
            nursery.start_soon(finish, i, staged)
    if failures:
        raise failures[0]
    return [r for r in results if r is not None]


def _discard(staged: _Staged) -> None:
    """Remove what an unpacked layer left on disk (cancelled before finishing)."""
    if staged.encoder is not None:
        staged.encoder.close()
    if staged.image is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(staged.image)
    if staged.stage_dir:
        shutil.rmtree(staged.stage_dir, ignore_errors=True)


async def _source_config(client: RegistryClient, src: Reference, desc: Any) -> dict[str, Any]:
    desc = check_descriptor(desc, f"{src}: config")
    if desc["size"] > MAX_CONFIG_SIZE:
        raise FormatError(f"{src}: config of {desc['size']} bytes is over {MAX_CONFIG_SIZE}")
    data = await client.blob(src, desc).read(0, desc["size"]) if desc["size"] else b""
    verify_bytes(data, desc["digest"], f"{src}: config")
    try:
        config = json.loads(data)
    except (ValueError, RecursionError) as exc:  # RecursionError: nested past the stack
        raise FormatError(f"{src}: config is not JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise FormatError(f"{src}: config is not a JSON object")
    return config


def _build_epoch(config: dict[str, Any]) -> int:
    """SOURCE_DATE_EPOCH, else the config's ``created`` (RFC 3339), else 0."""
    env = source_date_epoch_from_env()
    if env is not None:
        return env
    created = config.get("created")
    if isinstance(created, str):
        text = created.strip().replace("Z", "+00:00")
        # Python's parser takes at most microseconds; registries write nanoseconds.
        text = re.sub(r"(\.\d{6})\d+", r"\1", text)
        try:
            return max(0, int(datetime.fromisoformat(text).timestamp()))
        except ValueError:
            log.info("config created %r is not RFC 3339; build time 0", created)
    return 0


def _platform_of(config: dict[str, Any]) -> str:
    parts = [config.get("os"), config.get("architecture"), config.get("variant")]
    return "/".join(str(p) for p in parts if p) or "unknown"


async def _convert_manifest(
    client: RegistryClient,
    src: Reference,
    source_digest: str,
    manifest: dict[str, Any],
    dst: Reference,
    work: str,
    options: ConvertOptions,
    progress: ProgressFn,
) -> tuple[PlatformReport, bytes]:
    """Convert and push one image manifest's layers and config; the new manifest's
    bytes are returned, not pushed (the caller knows under which name)."""
    layers = check_image_manifest(manifest, src)
    for i, layer in enumerate(layers):
        if layer.get("mediaType") not in LAYER_MEDIA_TYPES:
            raise FormatError(
                f"{src}: layer {i} ({layer['digest']}) has media type "
                f"{layer.get('mediaType')!r}, not a tar layer this converts"
            )
    config = await _source_config(client, src, manifest.get("config"))
    rootfs = config.get("rootfs")
    if not isinstance(rootfs, dict) or not isinstance(rootfs.get("diff_ids"), list):
        raise FormatError(f"{src}: config has no rootfs.diff_ids")
    if len(rootfs["diff_ids"]) != len(layers):
        raise FormatError(
            f"{src}: config lists {len(rootfs['diff_ids'])} diff_ids for {len(layers)} layers"
        )
    platform = _platform_of(config)
    if options.source_date_epoch is None:
        options = dataclasses.replace(options, source_date_epoch=_build_epoch(config))
    report = PlatformReport(platform=platform, source_digest=source_digest, digest="", size=0)
    whats = [
        f"{src.name}@{source_digest[:19]} ({platform}) layer {i + 1}/{len(layers)} {desc['digest'][:19]}"
        for i, desc in enumerate(layers)
    ]
    descriptors = []
    for layer_report, descriptor in await _convert_layers(
        client, src, dst, layers, whats, work, options, progress
    ):
        report.layers.append(layer_report)
        descriptors.append(descriptor)
    config["rootfs"] = {**rootfs, "diff_ids": [layer.diff_id for layer in report.layers]}
    config_bytes = json.dumps(config, separators=(",", ":")).encode()
    await client.push_blob(dst, config_bytes, _sha256(config_bytes), len(config_bytes))
    out: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": MEDIA_OCI_MANIFEST,
        "config": {
            "mediaType": MEDIA_OCI_CONFIG,
            "digest": _sha256(config_bytes),
            "size": len(config_bytes),
        },
        "layers": descriptors,
    }
    if manifest.get("annotations"):
        out["annotations"] = manifest["annotations"]
    body = json.dumps(out, indent=2).encode()
    report.digest, report.size = _sha256(body), len(body)
    return report, body


def _index_entries(index: dict[str, Any], src: Reference) -> list[dict[str, Any]]:
    entries = index.get("manifests")
    if not isinstance(entries, list):
        raise FormatError(f"{src}: index has no 'manifests' list")
    return [check_descriptor(e, f"{src}: index entry {i}") for i, e in enumerate(entries)]


async def convert_image(
    client: RegistryClient,
    src: Reference,
    dst: Reference,
    options: ConvertOptions = ConvertOptions(),
    *,
    progress: ProgressFn = lambda what, stage, done, total: None,
) -> ConvertReport:
    """Convert ``src`` and push the result as ``dst`` (see the module's docstring).

    With ``via_mkfs``, needs root: the staging tree keeps owners, device nodes
    and trusted.* xattrs.
    """
    if options.via_mkfs and os.geteuid() != 0:
        raise LazyErofsError(
            "convert --via-mkfs needs root: its staging tree keeps owners, device nodes and trusted.* xattrs"
        )
    started = time.monotonic()
    work = tempfile.mkdtemp(prefix="lazyerofs-convert-", dir=options.workdir)
    _spread_inodes(work)
    try:
        if options.all_platforms:
            body, media_type, digest, _ = await client.fetch_manifest(src)
            if media_type in INDEX_TYPES:
                report = await _convert_index(
                    client, src, dst, json.loads(body), work, options, progress
                )
                report.seconds = round(time.monotonic() - started, 3)
                return report
        resolved = await client.resolve(src)
        plat, body = await _convert_manifest(
            client, src, resolved.digest, resolved.manifest, dst, work, options, progress
        )
        digest = await client.push_manifest(dst, body, MEDIA_OCI_MANIFEST)
        report = ConvertReport(str(src), str(dst), digest, MEDIA_OCI_MANIFEST, [plat])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report.seconds = round(time.monotonic() - started, 3)
    return report


async def _convert_index(
    client: RegistryClient,
    src: Reference,
    dst: Reference,
    index: dict[str, Any],
    work: str,
    options: ConvertOptions,
    progress: ProgressFn,
) -> ConvertReport:
    report = ConvertReport(str(src), str(dst), "", MEDIA_OCI_INDEX)
    out_entries = []
    for entry in _index_entries(index, src):
        plat = entry.get("platform") if isinstance(entry.get("platform"), dict) else {}
        label = "/".join(str(plat.get(k)) for k in ("os", "architecture", "variant") if plat.get(k))
        if not label or label.startswith("unknown/"):
            # buildkit's attestation manifests and other artifacts: not a root filesystem.
            report.skipped.append(f"{entry['digest']} ({label or 'no platform'})")
            continue
        child = Reference(src.registry, src.repository, None, entry["digest"])
        resolved = await client.resolve(child)
        if resolved.index_digest is not None:
            raise FormatError(f"{src}: index entry {entry['digest']} is itself an index")
        plat_report, body = await _convert_manifest(
            client, child, resolved.digest, resolved.manifest, dst, work, options, progress
        )
        digest = await client.push_manifest(
            Reference(dst.registry, dst.repository, None, plat_report.digest),
            body,
            MEDIA_OCI_MANIFEST,
        )
        report.platforms.append(plat_report)
        new_entry = {"mediaType": MEDIA_OCI_MANIFEST, "digest": digest, "size": len(body)}
        for key in ("platform", "annotations"):
            if key in entry:
                new_entry[key] = entry[key]
        out_entries.append(new_entry)
    if not out_entries:
        raise FormatError(f"{src}: index has no image for any platform to convert")
    out: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": MEDIA_OCI_INDEX,
        "manifests": out_entries,
    }
    if index.get("annotations"):
        out["annotations"] = index["annotations"]
    body = json.dumps(out, indent=2).encode()
    report.digest = await client.push_manifest(dst, body, MEDIA_OCI_INDEX)
    return report
