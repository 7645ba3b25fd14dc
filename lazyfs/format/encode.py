"""The seekable EROFS encoder: a raw EROFS image in, a blob and its descriptor out.

Streams between two files with bounded memory; frames are compressed in
threads (zstd releases the GIL) and written in order. Every frame carries its
content size and a checksum; the chunk table carries each frame's SHA-512.
The blob is a function of the image and the options alone (the dm-verity
UUID included), so the same image always encodes to the same bytes.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import zstandard

from lazyfs.format.seekable import (
    _ENTRY_OFFSET,
    _HEADER,
    _SKIP_HEADER,
    ANNOTATION_CHUNK_DIGEST,
    ANNOTATION_TABLE_OFFSET,
    ANNOTATION_VERITY_OFFSET,
    ANNOTATION_VERITY_ROOT,
    DEFAULT_CHUNK_SIZE,
    HASH_SHA512,
    MAX_CHUNK_SIZE,
    MEDIA_TYPE_SEEKABLE,
    SKIPPABLE_MAGIC_FIRST,
    SKIPPABLE_MAGIC_LAST,
    TABLE_MAGIC,
    TABLE_VERSION,
)

__all__ = ["BlobTail", "EncodeResult", "encode_image", "skippable_frame", "write_tail"]


@dataclass(frozen=True)
class BlobTail:
    """What writing a blob's tail (chunk table, dm-verity payload) decided."""

    annotations: dict[str, str]
    verity_root: str | None
    verity_hash_offset: int | None
    end: int  # blob size

    def descriptor(self, blob_sha256: str) -> dict[str, Any]:
        """The blob's OCI descriptor, given the hex SHA-256 of all its bytes."""
        return {
            "mediaType": MEDIA_TYPE_SEEKABLE,
            "digest": "sha256:" + blob_sha256,
            "size": self.end,
            "annotations": self.annotations,
        }


def write_tail(
    emit: Callable[[bytes], None],
    position: int,
    *,
    usize: int,
    chunk_size: int,
    frames: Iterator[tuple[int, bytes]] | list[tuple[int, bytes]],
    image: BinaryIO,
    image_digest: bytes,
    dm_verity: bool,
    verity_block_size: int,
) -> BlobTail:
    """Emit the chunk table (frames: (blob offset, SHA-512) each) as a
    skippable frame at ``position``, then with ``dm_verity`` the hash tree
    payload of ``image`` (read from its start); return the descriptor's
    annotations. The one place a blob's tail is written (encode_image and
    the converter's streaming encoder)."""
    payload = bytearray(_HEADER.pack(TABLE_MAGIC, TABLE_VERSION, usize, chunk_size, HASH_SHA512, 0))
    for off, digest in frames:
        payload += _ENTRY_OFFSET.pack(off) + digest
    table = skippable_frame(bytes(payload))
    emit(table)
    annotations = {
        ANNOTATION_TABLE_OFFSET: str(position),
        ANNOTATION_CHUNK_DIGEST: "sha512:" + hashlib.sha512(payload).hexdigest(),
    }
    position += len(table)
    verity_root = verity_hash_offset = None
    if dm_verity:
        from lazyfs.format import verity, verity_build  # only needed here

        image.seek(0)
        # The superblock UUID comes from the image, not from chance, so the
        # same image always gives the same blob.
        vpayload, verity_root = verity_build.build_payload(
            image, usize, block_size=verity_block_size, uuid=verity_build.content_uuid(image_digest)
        )
        annotations[ANNOTATION_VERITY_OFFSET] = str(position)
        annotations[ANNOTATION_VERITY_ROOT] = f"sha512:{verity_root}"
        verity_hash_offset = verity.materialized_hash_offset(usize, verity_block_size)
        frame = skippable_frame(vpayload)
        emit(frame)
        position += len(frame)
    return BlobTail(annotations, verity_root, verity_hash_offset, position)


def skippable_frame(payload: bytes, magic: int = SKIPPABLE_MAGIC_FIRST) -> bytes:
    """Wrap ``payload`` in a zstd skippable frame (plain decoders pass over it)."""
    if not SKIPPABLE_MAGIC_FIRST <= magic <= SKIPPABLE_MAGIC_LAST:
        raise ValueError(f"0x{magic:08x} is not a skippable-frame magic")
    return _SKIP_HEADER.pack(magic, len(payload)) + payload



@dataclass(frozen=True)
class EncodeResult:
    """What :func:`encode_image` wrote."""

    descriptor: dict[str, Any]
    diff_id: str  # sha256 of the raw EROFS image, as containerd records it
    uncompressed_size: int
    chunk_size: int
    frame_count: int
    verity_root: str | None = None  # hex, no algorithm prefix
    verity_hash_offset: int | None = None  # of the materialized layout


def _read_chunks(src: BinaryIO, chunk_size: int) -> Iterator[bytes]:
    while True:
        chunk = src.read(chunk_size)
        if not chunk:
            return
        yield chunk


def encode_image(
    src_path: str | os.PathLike[str],
    dst_path: str | os.PathLike[str],
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    level: int = 3,
    hot_bytes: int = 0,
    hot_level: int | None = None,
    dm_verity: bool = False,
    verity_block_size: int = 4096,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    fsync: bool = True,
) -> EncodeResult:
    """Write the seekable blob of the raw EROFS image at ``src_path``.

    Streams: at most ``2 * workers`` chunks are in memory at once, so a
    multi-GiB image needs no more than a few chunk sizes of RAM. Frames are
    compressed in threads (zstd releases the GIL) but written in order.
    The output is written to a temporary name and renamed on success; that
    name is random and created exclusively without following symlinks, so
    nobody who can write the directory can redirect the write elsewhere.
    ``progress(done_bytes, total_bytes)`` is called after each frame.
    ``fsync=False`` skips flushing the blob to disk, for a scratch blob that is
    uploaded and deleted (convert) rather than kept.

    ``hot_level``: the zstd level of the frames that start in the image's
    first ``hot_bytes`` (a profile-guided layout's hot part, which every lazy
    start fetches: worth a slower, smaller compression; zstd decodes any level
    about as fast). The output stays a function of the input and options.
    """
    if not 0 < chunk_size <= MAX_CHUNK_SIZE:
        raise ValueError(f"chunk size must be in 1..{MAX_CHUNK_SIZE}, got {chunk_size}")
    workers = workers or min(4, os.cpu_count() or 1)
    local = threading.local()  # a ZstdCompressor must not be shared between threads
    dst_path = os.fspath(dst_path)
    dst_dir, dst_name = os.path.split(os.path.abspath(dst_path))
    tmp_path = ""
    blob_hash = hashlib.sha256()
    image_hash = hashlib.sha256()
    offsets: list[int] = []
    checksums: list[bytes] = []
    position = 0
    usize = 0

    def compress(chunk: bytes, frame_level: int) -> tuple[bytes, bytes]:
        if not hasattr(local, "cctx"):
            local.cctx = {}
        cctx = local.cctx.get(frame_level)
        if cctx is None:
            cctx = zstandard.ZstdCompressor(level=frame_level, write_checksum=True, write_content_size=True)
            local.cctx[frame_level] = cctx
        frame = cctx.compress(chunk)
        return frame, hashlib.sha512(frame).digest()

    try:
        fd = -1
        while fd < 0:  # O_EXCL: an existing name (a planted symlink too) is never opened
            candidate = os.path.join(dst_dir, f".{dst_name}.tmp.{os.urandom(8).hex()}")
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            with contextlib.suppress(FileExistsError):
                fd = os.open(candidate, flags, 0o644)
                tmp_path = candidate
        with os.fdopen(fd, "wb") as dst, open(src_path, "rb") as src:

            total = os.fstat(src.fileno()).st_size

            def emit(data: bytes) -> None:
                nonlocal position
                dst.write(data)
                blob_hash.update(data)
                position += len(data)

            def emit_frame(frame: bytes, digest: bytes) -> None:
                offsets.append(position)
                checksums.append(digest)
                emit(frame)
                if progress is not None:
                    progress(min(len(offsets) * chunk_size, total), total)

            with concurrent.futures.ThreadPoolExecutor(workers) as pool:
                pending: list[concurrent.futures.Future[tuple[bytes, bytes]]] = []
                for chunk in _read_chunks(src, chunk_size):
                    frame_level = hot_level if hot_level and usize < hot_bytes else level
                    image_hash.update(chunk)
                    usize += len(chunk)
                    pending.append(pool.submit(compress, chunk, frame_level))
                    while len(pending) >= 2 * workers or (pending and pending[0].done()):
                        emit_frame(*pending.pop(0).result())
                for fut in pending:
                    emit_frame(*fut.result())

            tail = write_tail(
                emit, position, usize=usize, chunk_size=chunk_size, frames=list(zip(offsets, checksums, strict=True)),
                image=src, image_digest=image_hash.digest(), dm_verity=dm_verity, verity_block_size=verity_block_size,
            )  # fmt: skip
            dst.flush()
            if fsync:
                os.fsync(dst.fileno())
        os.replace(tmp_path, dst_path)
    except BaseException:
        if tmp_path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_path)
        raise
    return EncodeResult(
        descriptor=tail.descriptor(blob_hash.hexdigest()),
        diff_id="sha256:" + image_hash.hexdigest(),
        uncompressed_size=usize,
        chunk_size=chunk_size,
        frame_count=len(offsets),
        verity_root=tail.verity_root,
        verity_hash_offset=tail.verity_hash_offset,
    )
