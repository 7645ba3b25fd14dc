"""The seekable EROFS layer format: descriptor, chunk table, frames.

Pure code: bytes in, bytes out. The
chain of trust lives here: a descriptor's ``chunk_digest`` vouches for the
chunk table, the table's SHA-512 entries vouch for each compressed frame, and
the table's sizes vouch for each frame's decompressed length.
:func:`decode_frame` is the one place where fetched bytes become servable data.

Blob layout (all integers little-endian)::

    [zstd frame 0]...[zstd frame N-1][skippable: chunk table][skippable: dm-verity]?
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import struct
import sys
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import zstandard

from lazyfs.errors import FormatError, IntegrityError
from lazyfs.format.digest import check_digest

__all__ = [
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
]

MEDIA_TYPE_SEEKABLE = "application/vnd.erofs.layer.v1+zstd"
MEDIA_TYPE_PLAIN = "application/vnd.erofs.layer.v1"

ANNOTATION_TABLE_OFFSET = "dev.containerd.erofs.zstd.chunk_table_offset"
ANNOTATION_CHUNK_DIGEST = "dev.containerd.erofs.zstd.chunk_digest"
ANNOTATION_VERITY_OFFSET = "dev.containerd.erofs.dmverity.offset"
ANNOTATION_VERITY_ROOT = "dev.containerd.erofs.dmverity.root_digest"

TABLE_MAGIC = 0xCDE4EC67
TABLE_VERSION = 1
HASH_NONE = 0
HASH_SHA512 = 1
HASH_SIZES = {HASH_NONE: 0, HASH_SHA512: 64}

SKIPPABLE_MAGIC_FIRST = 0x184D2A50
SKIPPABLE_MAGIC_LAST = 0x184D2A5F
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

DEFAULT_CHUNK_SIZE = 4 << 20
# The format allows any u32; a frame is decompressed into memory whole (and
# a few are in flight at once), so a table asking for more than this is
# refused rather than trusted. 8x the 4 MiB default.
MAX_CHUNK_SIZE = 32 << 20
# No frame of at most MAX_CHUNK_SIZE bytes needs a larger zstd window.
MAX_WINDOW_SIZE = MAX_CHUNK_SIZE
# A chunk-table payload larger than this is refused before it is fetched or
# parsed: 64 MiB of SHA-512 entries describe ~930k frames, 3.6 TiB of image
# at the default chunk size. Parsed, a table costs about its payload size.
MAX_TABLE_SIZE = 64 << 20
# Smallest possible zstd frame: magic (4) + frame header (2) + block header (3).
MIN_FRAME_SIZE = 9

_HEADER = struct.Struct("<IIQIBH")  # magic, version, size, chunk_size, algo, reserved
_SKIP_HEADER = struct.Struct("<II")
_ENTRY_OFFSET = struct.Struct("<Q")

_DECIMAL_RE = re.compile(r"(0|[1-9][0-9]{0,18})")


def parse_decimal(value: object, *, what: str) -> int:
    """Parse an annotation that must be a plain non-negative decimal integer."""
    if isinstance(value, str) and _DECIMAL_RE.fullmatch(value):
        return int(value)
    raise FormatError(f"{what} {value!r} is not a plain decimal integer")


# --------------------------------------------------------------------------
# Descriptor


@dataclass(frozen=True)
class LayerDescriptor:
    """An OCI layer descriptor with the seekable-EROFS annotations checked.

    ``table_offset``/``chunk_digest`` are None for plain EROFS layers, and
    ``chunk_digest`` may be None for a seekable layer that lacks one (which
    is only usable with verification switched off).
    """

    media_type: str
    digest: str
    size: int
    table_offset: int | None = None
    chunk_digest: str | None = None
    verity_offset: int | None = None
    verity_root: str | None = None
    annotations: Mapping[str, str] = field(default_factory=dict)

    @property
    def seekable(self) -> bool:
        return self.media_type == MEDIA_TYPE_SEEKABLE

    @property
    def table_end(self) -> int:
        """Where the chunk-table frame must end: the verity frame or EOF."""
        return self.verity_offset if self.verity_offset is not None else self.size

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        return out


def parse_descriptor(desc: Mapping[str, Any], *, name: str = "layer") -> LayerDescriptor:
    """Check an OCI descriptor dict and its annotations; FormatError names the field."""
    if not isinstance(desc, Mapping):
        raise FormatError(f"{name}: descriptor is not a JSON object")
    media_type = desc.get("mediaType")
    if not isinstance(media_type, str):
        raise FormatError(f"{name}: descriptor has no mediaType")
    digest = check_digest(desc.get("digest"), what=f"{name}: descriptor digest")
    size = desc.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise FormatError(f"{name}: descriptor size {size!r} is not a non-negative integer")
    ann = desc.get("annotations") or {}
    if not isinstance(ann, Mapping) or not all(isinstance(v, str) for v in ann.values()):
        raise FormatError(f"{name}: annotations must map strings to strings")
    if media_type != MEDIA_TYPE_SEEKABLE:
        return LayerDescriptor(media_type, digest, size, annotations=dict(ann))

    if ANNOTATION_TABLE_OFFSET not in ann:
        raise FormatError(f"{name}: seekable layer lacks annotation {ANNOTATION_TABLE_OFFSET}")
    table_offset = parse_decimal(ann[ANNOTATION_TABLE_OFFSET], what=f"{name}: {ANNOTATION_TABLE_OFFSET}")
    chunk_digest = None
    if ANNOTATION_CHUNK_DIGEST in ann:
        chunk_digest = check_digest(
            ann[ANNOTATION_CHUNK_DIGEST], what=f"{name}: {ANNOTATION_CHUNK_DIGEST}", algorithms=("sha512",)
        )
    verity_offset = verity_root = None
    if ANNOTATION_VERITY_OFFSET in ann:
        verity_offset = parse_decimal(ann[ANNOTATION_VERITY_OFFSET], what=f"{name}: {ANNOTATION_VERITY_OFFSET}")
        root = ann.get(ANNOTATION_VERITY_ROOT)
        if root is None:
            raise FormatError(f"{name}: {ANNOTATION_VERITY_OFFSET} given without {ANNOTATION_VERITY_ROOT}")
        verity_root = check_digest(root, what=f"{name}: {ANNOTATION_VERITY_ROOT}", algorithms=("sha256", "sha512"))
        if not table_offset < verity_offset <= size - 8:
            raise FormatError(
                f"{name}: {ANNOTATION_VERITY_OFFSET}={verity_offset} must lie after the chunk table "
                f"({table_offset}) and inside the blob (size {size})"
            )
    if table_offset + 8 + _HEADER.size > (verity_offset if verity_offset is not None else size):
        raise FormatError(
            f"{name}: {ANNOTATION_TABLE_OFFSET}={table_offset} leaves no room for a chunk table "
            f"in a blob of {size} bytes"
        )
    return LayerDescriptor(
        media_type, digest, size, table_offset, chunk_digest, verity_offset, verity_root, dict(ann)
    )


def load_descriptor(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read an OCI descriptor JSON file (``BLOB.json`` next to a blob, or
    ``--descriptor FILE``) and check it with :func:`parse_descriptor`.

    The one way descriptors are loaded from disk; FormatError names the file.
    """
    where = os.fspath(path)
    try:
        with open(where, "rb") as f:
            text = f.read(1 << 20)
    except FileNotFoundError as exc:
        raise FormatError(f"{where}: descriptor not found (pass --descriptor FILE)") from exc
    except OSError as exc:
        raise FormatError(f"{where}: cannot read descriptor: {exc.strerror}") from exc
    try:
        desc = json.loads(text)
    except (ValueError, RecursionError) as exc:  # RecursionError: nesting past the stack
        raise FormatError(f"{where}: descriptor is not valid JSON: {exc}") from exc
    parse_descriptor(desc, name=where)
    return desc


# --------------------------------------------------------------------------
# Chunk table


class FrameChecksums(Sequence[bytes]):
    """The frames' SHA-512 checksums, stored as one bytes object.

    ``checksums[i]`` is frame ``i``'s 64-byte digest. One buffer instead of a
    million small bytes objects: a table costs what its payload costs.
    """

    __slots__ = ("_data", "_size")

    def __init__(self, data: bytes = b"", size: int = HASH_SIZES[HASH_SHA512]) -> None:
        if size <= 0 or len(data) % size:
            raise ValueError(f"{len(data)} bytes are not a whole number of {size}-byte checksums")
        self._data = data
        self._size = size

    def __len__(self) -> int:
        return len(self._data) // self._size

    def __getitem__(self, i: int) -> bytes:  # type: ignore[override]
        if not isinstance(i, int):
            raise TypeError("checksum index must be an int")
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"checksum index {i} out of range ({n} frames)")
        return self._data[i * self._size : (i + 1) * self._size]

    @property
    def nbytes(self) -> int:
        return len(self._data)


@dataclass(frozen=True, eq=False)
class ChunkTable:
    """A parsed, validated chunk table. Frame ``i`` holds image bytes
    ``[i*chunk_size, min((i+1)*chunk_size, uncompressed_size))``.

    ``offsets`` is an ``array('Q')`` and ``checksums`` a :class:`FrameChecksums`
    (empty when ``hash_algo`` is 0): both index like tuples.
    """

    uncompressed_size: int
    chunk_size: int
    hash_algo: int
    offsets: Sequence[int]
    checksums: Sequence[bytes]
    table_offset: int

    @property
    def frame_count(self) -> int:
        return len(self.offsets)

    @property
    def nbytes(self) -> int:
        """Memory the per-frame entries take (what a mount's table budget counts)."""
        per_offset = getattr(self.offsets, "itemsize", 8)
        return len(self.offsets) * per_offset + getattr(self.checksums, "nbytes", 0)

    @property
    def compressed_size(self) -> int:
        return self.table_offset - (self.offsets[0] if self.offsets else 0)

    def span(self, i: int) -> tuple[int, int]:
        """Blob byte range ``[start, end)`` of frame ``i``."""
        end = self.offsets[i + 1] if i + 1 < len(self.offsets) else self.table_offset
        return self.offsets[i], end

    def raw_length(self, i: int) -> int:
        """Decompressed length frame ``i`` must have."""
        return min(self.chunk_size, self.uncompressed_size - i * self.chunk_size)

    def frames_for(self, offset: int, size: int) -> range:
        """Frames covering image bytes ``[offset, offset+size)``, clamped to the image."""
        end = min(offset + size, self.uncompressed_size)
        if size <= 0 or offset >= end:
            return range(0)
        return range(offset // self.chunk_size, (end - 1) // self.chunk_size + 1)


def _split_entries(entries: memoryview, count: int, hash_size: int) -> tuple[array[int], bytes]:
    """Split ``count`` packed ``offset:u64 + checksum`` entries into one
    offsets array and one checksum buffer, at C speed (strided memoryviews,
    no per-entry Python objects)."""
    words = entries.cast("Q")  # every entry is a whole number of 8-byte words
    stride = (8 + hash_size) // 8
    offsets = array("Q")
    offsets.frombytes(words[0::stride].tobytes())
    if sys.byteorder != "little":
        offsets.byteswap()
    if not hash_size:
        return offsets, b""
    # Copy each 8-byte column of the checksums into place: the words move
    # unchanged, so byte order does not matter here.
    sums = array("Q", bytes(count * hash_size))
    per = hash_size // 8
    for k in range(per):
        sums[k::per] = array("Q", words[1 + k :: stride].tobytes())
    return offsets, sums.tobytes()


def parse_chunk_table(
    frame: bytes,
    *,
    table_offset: int,
    blob_size: int,
    expected_digest: str | None,
    require_checksums: bool = True,
    name: str = "layer",
) -> ChunkTable:
    """Parse the chunk-table skippable frame read from ``table_offset``.

    ``frame`` starts at the 8-byte skippable header and may run on past the
    table (to the verity frame or EOF). ``expected_digest`` is the
    descriptor's ``chunk_digest`` (None: not checked). A table without frame
    checksums (hash_algo 0) is refused unless ``require_checksums`` is off.
    Every field is checked before it is used; nothing is allocated from an
    unverified size, and no payload over :data:`MAX_TABLE_SIZE` is accepted.
    """
    where = f"{name}: chunk table at offset {table_offset}"
    if len(frame) < _SKIP_HEADER.size:
        raise FormatError(f"{where}: truncated skippable-frame header ({len(frame)} bytes)")
    magic, payload_size = _SKIP_HEADER.unpack_from(frame)
    if not SKIPPABLE_MAGIC_FIRST <= magic <= SKIPPABLE_MAGIC_LAST:
        raise FormatError(f"{where}: frame magic 0x{magic:08x} is not a zstd skippable frame")
    if table_offset + _SKIP_HEADER.size + payload_size > blob_size:
        raise FormatError(
            f"{where}: payload size {payload_size} runs past the end of the blob ({blob_size} bytes)"
        )
    if _SKIP_HEADER.size + payload_size > MAX_TABLE_SIZE:
        raise FormatError(
            f"{where}: payload of {payload_size} bytes exceeds the chunk-table limit of {MAX_TABLE_SIZE} bytes"
        )
    if len(frame) < _SKIP_HEADER.size + payload_size:
        raise FormatError(f"{where}: got {len(frame) - 8} of {payload_size} payload bytes")
    # A view, not a copy: the payload may be tens of MiB.
    payload = memoryview(frame)[_SKIP_HEADER.size : _SKIP_HEADER.size + payload_size]

    if expected_digest is not None:
        actual = "sha512:" + hashlib.sha512(payload).hexdigest()
        if actual != expected_digest:
            raise IntegrityError(
                f"{where}: payload digest {actual[:23]}... does not match chunk_digest {expected_digest[:23]}..."
            )

    if payload_size < _HEADER.size:
        raise FormatError(f"{where}: payload of {payload_size} bytes is shorter than the 23-byte header")
    t_magic, version, usize, chunk_size, algo, reserved = _HEADER.unpack_from(payload)
    if t_magic != TABLE_MAGIC:
        raise FormatError(f"{where}: table magic 0x{t_magic:08x} != 0x{TABLE_MAGIC:08x}")
    if version != TABLE_VERSION:
        raise FormatError(f"{where}: unsupported table version {version}")
    if reserved != 0:
        raise FormatError(f"{where}: reserved field is {reserved}, must be 0")
    if chunk_size == 0:
        raise FormatError(f"{where}: chunk_size is 0")
    if chunk_size > MAX_CHUNK_SIZE:
        raise FormatError(f"{where}: chunk_size {chunk_size} exceeds the limit of {MAX_CHUNK_SIZE}")
    if algo not in HASH_SIZES:
        raise FormatError(f"{where}: unknown hash_algo {algo}")
    if algo == HASH_NONE and require_checksums:
        raise IntegrityError(f"{where}: hash_algo 0 (no frame checksums): the chain of trust stops here")
    hash_size = HASH_SIZES[algo]
    count = -(-usize // chunk_size)
    if count * MIN_FRAME_SIZE > table_offset:
        raise FormatError(f"{where}: {count} frames cannot fit in the {table_offset} bytes before the table")
    expected_size = _HEADER.size + count * (8 + hash_size)
    if payload_size != expected_size:
        raise FormatError(
            f"{where}: payload size {payload_size} != {expected_size} "
            f"(23 + {count} entries x {8 + hash_size} bytes)"
        )

    offsets, sums = _split_entries(payload[_HEADER.size :], count, hash_size)
    if not all(a < b for a, b in itertools.pairwise(offsets)):
        i = next(k for k in range(1, count) if offsets[k] <= offsets[k - 1])
        raise FormatError(f"{where}: frame {i} offset {offsets[i]} is not above frame {i - 1} offset {offsets[i - 1]}")
    if count and offsets[-1] >= table_offset:
        # Offsets increase, so only the last can reach the table.
        raise FormatError(f"{where}: frame {count - 1} offset {offsets[-1]} is at or past the table offset")
    checksums = FrameChecksums(sums, hash_size) if hash_size else FrameChecksums(b"")
    return ChunkTable(usize, chunk_size, algo, offsets, checksums, table_offset)


def read_chunk_table(
    data: bytes, desc: LayerDescriptor, *, verify: bool = True, name: str = "layer"
) -> ChunkTable:
    """Parse the table from ``data`` = blob bytes ``[table_offset, table_end)``.

    With ``verify`` a missing ``chunk_digest`` or a table without frame
    checksums is refused; without it they are accepted (the caller has said
    so loudly), but a digest that is there is still checked.
    """
    if desc.table_offset is None:
        raise FormatError(f"{name}: not a seekable layer ({desc.media_type})")
    if verify and desc.chunk_digest is None:
        raise IntegrityError(
            f"{name}: descriptor has no {ANNOTATION_CHUNK_DIGEST}; the chunk table cannot be verified"
        )
    return parse_chunk_table(
        data,
        table_offset=desc.table_offset,
        blob_size=desc.table_end,
        expected_digest=desc.chunk_digest,
        require_checksums=verify,
        name=name,
    )


def table_read_size(desc: LayerDescriptor) -> int:
    """How many bytes from ``table_offset`` to fetch to get the whole table."""
    assert desc.table_offset is not None
    return min(desc.table_end - desc.table_offset, MAX_TABLE_SIZE)


# --------------------------------------------------------------------------
# Frames


def decode_frame(table: ChunkTable, i: int, compressed: bytes, *, name: str = "layer") -> bytes:
    """Turn fetched frame bytes into servable image bytes, or raise.

    Order matters: the compressed span is hashed first (so a hostile frame
    never reaches the decompressor), then the frame header is read and a
    declared content size other than the expected length, or a window over
    :data:`MAX_WINDOW_SIZE`, is refused before anything is allocated (given a
    content size, zstd's one-shot decompress allocates it and ignores
    ``max_output_size``), then the frame is decompressed with a hard output
    cap and its length checked.
    """
    return decode_frame_bytes(compressed, i, table.span(i), table.raw_length(i), frame_checksum(table, i), name=name)


def frame_checksum(table: ChunkTable, i: int) -> bytes | None:
    """The SHA-512 frame ``i`` must hash to, or None for a table without checksums."""
    return table.checksums[i] if table.hash_algo == HASH_SHA512 else None


def decode_frame_bytes(
    compressed: bytes | memoryview,
    i: int,
    span: tuple[int, int],
    expected: int,
    checksum: bytes | None,
    *,
    name: str = "layer",
) -> bytes:
    """:func:`decode_frame` from what one frame's table entry says (its blob
    ``span``, decoded length and SHA-512, None for an unverified layer), for
    a process that holds no table (the fetch workers,
    :mod:`lazyfs.fetch.offload`)."""
    start, end = span
    if len(compressed) != end - start:
        raise IntegrityError(f"{name}: frame {i}: got {len(compressed)} bytes, span is {end - start}")
    if checksum is not None:
        digest = hashlib.sha512(compressed).digest()
        if digest != checksum:
            raise IntegrityError(
                f"{name}: frame {i} (bytes {start}-{end - 1}) SHA-512 mismatch: "
                f"got {digest.hex()[:16]}..., table says {checksum.hex()[:16]}..."
            )
    try:
        params = zstandard.get_frame_parameters(compressed)
    except zstandard.ZstdError as exc:
        raise IntegrityError(f"{name}: frame {i} has no valid zstd frame header: {exc}") from exc
    declared = params.content_size
    if declared not in (zstandard.CONTENTSIZE_UNKNOWN, expected):
        raise IntegrityError(
            f"{name}: frame {i} header declares {declared} decompressed bytes, expected {expected}"
        )
    if params.window_size > MAX_WINDOW_SIZE:
        raise IntegrityError(
            f"{name}: frame {i} asks for a {params.window_size}-byte window, over the {MAX_WINDOW_SIZE}-byte limit"
        )
    try:
        raw = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW_SIZE).decompress(
            compressed, max_output_size=expected, allow_extra_data=False
        )
    except zstandard.ZstdError as exc:
        raise IntegrityError(f"{name}: frame {i} does not decompress to {expected} bytes: {exc}") from exc
    if len(raw) != expected:
        raise IntegrityError(f"{name}: frame {i} decompressed to {len(raw)} bytes, expected {expected}")
    return raw
