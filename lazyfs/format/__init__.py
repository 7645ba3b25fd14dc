"""The seekable EROFS blob format alone: bytes in, bytes out, no I/O but files
the caller names.

    digest.py     check_digest: OCI digests, exactly sha256:<64 hex> / sha512:<128 hex>
    seekable.py   descriptor and annotations, chunk table, decode_frame (the one
                  place fetched bytes become servable), load_descriptor
    encode.py     the streaming encoder: raw EROFS image -> blob + descriptor
    verity.py     the dm-verity hash tree: geometry, lazy path checks (HashTree)
    verity_superblock.py  its superblock; containerd's materialized layout and sidecar
    verity_build.py  building a payload from an image; checking a whole image

Names are loaded on first use, so ``from lazyfs.format import check_digest``
(the registry path) does not import zstandard.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "check_digest": "digest",
    "verify_bytes": "digest",
    "BlobTail": "encode",
    "EncodeResult": "encode",
    "encode_image": "encode",
    "skippable_frame": "encode",
    "write_tail": "encode",
    **{
        name: "seekable"
        for name in (
            "ANNOTATION_CHUNK_DIGEST",
            "ANNOTATION_TABLE_OFFSET",
            "ANNOTATION_VERITY_OFFSET",
            "ANNOTATION_VERITY_ROOT",
            "DEFAULT_CHUNK_SIZE",
            "HASH_NONE",
            "HASH_SHA512",
            "MAX_CHUNK_SIZE",
            "MAX_TABLE_SIZE",
            "MAX_WINDOW_SIZE",
            "MEDIA_TYPE_PLAIN",
            "MEDIA_TYPE_SEEKABLE",
            "SKIPPABLE_MAGIC_FIRST",
            "SKIPPABLE_MAGIC_LAST",
            "TABLE_MAGIC",
            "ChunkTable",
            "FrameChecksums",
            "LayerDescriptor",
            "decode_frame",
            "decode_frame_bytes",
            "frame_checksum",
            "load_descriptor",
            "parse_chunk_table",
            "parse_decimal",
            "parse_descriptor",
            "read_chunk_table",
            "table_read_size",
        )
    },
}
_MODULES = ("digest", "encode", "seekable", "verity", "verity_build", "verity_superblock")

__all__ = sorted([*_WHERE, *_MODULES])


def __getattr__(name: str) -> Any:
    if name in _MODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name in _WHERE:
        value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
