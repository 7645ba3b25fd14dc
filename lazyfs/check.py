"""What ``lazyerofs verify`` and ``lazyerofs inspect`` share: checking a
layer (or a local blob) against its whole chain of trust, collecting every
failure instead of stopping at the first.

* :func:`verify_layer`: every frame fetched, hashed against the chunk table
  and decompressed to its exact length; the dm-verity tree against the root
  digest; a plain EROFS layer fetched whole and hashed against its digest.
* :func:`inspect_blob`: a local blob against its descriptor, with the table.
* :func:`local_blob`: the one place that decides "file or reference?".
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import struct
import tempfile
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Protocol

import trio

from lazyfs.errors import FormatError, IntegrityError, LazyErofsError
from lazyfs.fetch import BlobSource, FileSource
from lazyfs.format import seekable, verity_build

__all__ = [
    "BATCH_BYTES",
    "NO_PROGRESS",
    "LayerReport",
    "ProgressSink",
    "blob_digest",
    "inspect_blob",
    "local_blob",
    "verify_layer",
]

# Frames are fetched in requests of about this many compressed bytes.
BATCH_BYTES = 8 << 20


class ProgressSink(Protocol):
    """Where long checks report progress (a terminal bar, or nothing)."""

    def show(self, label: str, done: int, total: int, nbytes: int, *, unit: str = "frames") -> None: ...


class _NoProgress:
    def show(self, label: str, done: int, total: int, nbytes: int, *, unit: str = "frames") -> None:
        return None


NO_PROGRESS: ProgressSink = _NoProgress()


def local_blob(target: str, descriptor: str | None) -> tuple[str, str] | None:
    """``(blob path, descriptor path)`` when TARGET names a local blob file,
    None when it is to be read as an image reference (or URL).

    A target that exists on disk is a file; its descriptor defaults to
    ``TARGET.json``. ``--descriptor`` with a target that is not a file is an
    error here, so the commands need not each decide it.
    """
    if os.path.exists(target):
        return target, descriptor or target + ".json"
    if descriptor and not target.startswith(("http://", "https://")):
        raise FormatError(f"{target}: no such file")
    return None


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


async def verify_layer(
    index: int, desc_dict: dict[str, Any], source: BlobSource, progress: ProgressSink, name: str | None = None
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
            progress.show(name, j + 1, table.frame_count, report.bytes_checked)
            i = j + 1
        if image is not None:
            await _verify_tree(desc, table, source, image, report)
    return report


async def _verify_plain(
    desc: seekable.LayerDescriptor, source: BlobSource, progress: ProgressSink, report: LayerReport, name: str
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


async def _verify_tree(desc: seekable.LayerDescriptor, table: seekable.ChunkTable, source: BlobSource, image: BinaryIO, report: LayerReport) -> None:

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
            verity_build.verify_image, image, table.uncompressed_size, payload, desc.verity_root.split(":", 1)[1]
        )
    except LazyErofsError as exc:
        report.errors.append(f"layer {report.index}: dm-verity: {exc}")
        return
    report.bad_blocks = bad
    if bad:
        shown = ", ".join(map(str, bad[:10])) + (" ..." if len(bad) > 10 else "")
        report.errors.append(f"layer {report.index}: dm-verity: {len(bad)} data blocks do not match the tree: {shown}")


def blob_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return "sha256:" + h.hexdigest()


def inspect_blob(blob: str, descriptor_path: str) -> dict[str, Any]:
    """Check every link of the chain of trust of a local blob; collect, don't stop at, frame errors."""
    name = os.path.basename(blob)
    desc = seekable.parse_descriptor(seekable.load_descriptor(descriptor_path), name=name)
    size = os.path.getsize(blob)
    if size != desc.size:
        raise IntegrityError(f"{name}: blob is {size} bytes, descriptor says {desc.size}")
    digest = blob_digest(blob)
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
    # The frame checks are verify_layer's, run on the local file.
    source = FileSource(blob)
    try:
        checked = trio.run(verify_layer, 0, desc.to_dict(), source, NO_PROGRESS, name)
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


