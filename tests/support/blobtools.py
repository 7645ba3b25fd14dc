"""An independent, in-memory seekable-EROFS encoder for tests.

Written from FORMAT.md alone and sharing no code with ``lazyfs.format.seekable``, so
a bug in the encoder cannot hide the same bug in the reader. It builds frames
the way containerd's streaming Go encoder does (no content size, XXH64
checksum) and lets a test bend any field of the table.
"""

from __future__ import annotations

import hashlib
import io
import struct
from dataclasses import dataclass, field
from typing import Any

import zstandard

MEDIA_TYPE = "application/vnd.erofs.layer.v1+zstd"


def stream_frame(raw: bytes) -> bytes:
    """One zstd frame without a content size, as a streaming encoder writes it."""
    out = io.BytesIO()
    cctx = zstandard.ZstdCompressor(level=1, write_checksum=True, write_content_size=False)
    with cctx.stream_writer(out, closefd=False) as w:
        # Feed in pieces so the frame holds several blocks.
        for i in range(0, len(raw), 64 << 10):
            w.write(raw[i : i + (64 << 10)])
    return out.getvalue()


@dataclass
class Blob:
    data: bytes
    descriptor: dict[str, Any]
    table_offset: int
    frame_offsets: list[int] = field(default_factory=list)

    @property
    def annotations(self) -> dict[str, str]:
        return self.descriptor["annotations"]


def make_blob(
    raw: bytes,
    chunk_size: int,
    *,
    magic: int = 0x184D2A5E,
    hash_algo: int = 1,
    version: int = 1,
    table_magic: int = 0xCDE4EC67,
    reserved: int = 0,
    declared_size: int | None = None,
    declared_chunk_size: int | None = None,
    offsets: list[int] | None = None,
    extra_payload: bytes = b"",
    frames: list[bytes] | None = None,
) -> Blob:
    """Encode ``raw``; keyword arguments override what the table says."""
    if frames is None:
        frames = [stream_frame(raw[i : i + chunk_size]) for i in range(0, len(raw), chunk_size)]
    body = bytearray()
    real_offsets = []
    for frame in frames:
        real_offsets.append(len(body))
        body += frame
    table_offset = len(body)
    payload = bytearray(
        struct.pack(
            "<IIQIBH",
            table_magic,
            version,
            len(raw) if declared_size is None else declared_size,
            chunk_size if declared_chunk_size is None else declared_chunk_size,
            hash_algo,
            reserved,
        )
    )
    for off, frame in zip(offsets if offsets is not None else real_offsets, frames, strict=True):
        payload += struct.pack("<Q", off)
        if hash_algo == 1:
            payload += hashlib.sha512(frame).digest()
    payload += extra_payload
    body += struct.pack("<II", magic, len(payload)) + payload
    data = bytes(body)
    descriptor = {
        "mediaType": MEDIA_TYPE,
        "digest": "sha256:" + hashlib.sha256(data).hexdigest(),
        "size": len(data),
        "annotations": {
            "dev.containerd.erofs.zstd.chunk_table_offset": str(table_offset),
            "dev.containerd.erofs.zstd.chunk_digest": "sha512:" + hashlib.sha512(payload).hexdigest(),
        },
    }
    return Blob(data, descriptor, table_offset, real_offsets)
