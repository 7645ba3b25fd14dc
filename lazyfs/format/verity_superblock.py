"""The dm-verity superblock (cryptsetup's "VERITY" format) and containerd's
materialized layout: where the superblock sits in ``layer.erofs`` and the
``layer.erofs.dmverity`` sidecar. See :mod:`lazyfs.format.verity` for the tree.

On-disk layout of the superblock (little-endian)::

    0   signature        8   b"verity\\0\\0"
    8   version          u32 1
    12  hash_type        u32 1 (0 is the Chrome OS layout, not supported)
    16  uuid             16
    32  algorithm        32  NUL-terminated name, e.g. "sha512"
    64  data_block_size  u32
    68  hash_block_size  u32
    72  data_blocks      u64
    80  salt_size        u16 <= 256
    82  pad              6   zero
    88  salt             256 (salt_size used, rest zero)
    344 pad              168 zero
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from lazyfs.errors import FormatError

__all__ = [
    "ALGORITHMS",
    "DEFAULT_ALGORITHM",
    "DEFAULT_BLOCK_SIZE",
    "MAX_BLOCK_SIZE",
    "MAX_LEVELS",
    "MAX_SALT_SIZE",
    "MIN_BLOCK_SIZE",
    "SIGNATURE",
    "SUPERBLOCK_SIZE",
    "Superblock",
    "ceil_div",
    "materialized_hash_offset",
    "sidecar_json",
]

DEFAULT_BLOCK_SIZE = 4096
DEFAULT_ALGORITHM = "sha512"
SUPERBLOCK_SIZE = 512
SIGNATURE = b"verity\0\0"
MAX_SALT_SIZE = 256
# The range cryptsetup and go-dmverity accept (power of two, 512 B .. 512 KiB).
MIN_BLOCK_SIZE = 512
MAX_BLOCK_SIZE = 512 * 1024
# dm-verity's kernel limit on tree depth.
MAX_LEVELS = 63
# Digest sizes of the algorithms we can check; all are in hashlib everywhere.
ALGORITHMS: dict[str, int] = {"sha1": 20, "sha224": 28, "sha256": 32, "sha384": 48, "sha512": 64}

# signature, version, hash_type, uuid, algorithm, data_block_size,
# hash_block_size, data_blocks, salt_size, pad1, salt, pad2
_SB = struct.Struct("<8sII16s32sIIQH6s256s168s")
assert _SB.size == SUPERBLOCK_SIZE

def _is_block_size(value: int) -> bool:
    return MIN_BLOCK_SIZE <= value <= MAX_BLOCK_SIZE and value & (value - 1) == 0


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class Superblock:
    """The 512-byte header at the start of a verity payload.

    Constructing one validates every field that has a meaning of its own, so a
    ``Superblock`` in hand is always one the rest of this module can use;
    :meth:`parse` adds the checks that only exist on disk (signature, padding).
    """

    version: int
    hash_type: int
    uuid: bytes
    algorithm: str
    data_block_size: int
    hash_block_size: int
    data_blocks: int
    salt: bytes

    def __post_init__(self) -> None:
        if self.version != 1:
            raise FormatError(f"dm-verity superblock: version {self.version} is not 1")
        if self.hash_type != 1:
            raise FormatError(
                f"dm-verity superblock: hash_type {self.hash_type} is not supported (only 1)"
            )
        if len(self.uuid) != 16:
            raise FormatError(f"dm-verity superblock: uuid is {len(self.uuid)} bytes, not 16")
        if self.algorithm not in ALGORITHMS:
            raise FormatError(
                f"dm-verity superblock: algorithm {self.algorithm!r} is not one of "
                f"{', '.join(sorted(ALGORITHMS))}"
            )
        for name in ("data_block_size", "hash_block_size"):
            value = getattr(self, name)
            if not _is_block_size(value):
                raise FormatError(
                    f"dm-verity superblock: {name} {value} must be a power of two "
                    f"from {MIN_BLOCK_SIZE} to {MAX_BLOCK_SIZE}"
                )
        if not 0 < self.data_blocks < 1 << 64:
            raise FormatError(f"dm-verity superblock: data_blocks {self.data_blocks} out of range")
        if len(self.salt) > MAX_SALT_SIZE:
            raise FormatError(
                f"dm-verity superblock: salt_size {len(self.salt)} exceeds {MAX_SALT_SIZE}"
            )

    @property
    def digest_size(self) -> int:
        """Bytes of one digest of :attr:`algorithm`."""
        return ALGORITHMS[self.algorithm]

    def to_bytes(self) -> bytes:
        """The 512 on-disk bytes (unused fields zero, as veritysetup writes them)."""
        return _SB.pack(
            SIGNATURE,
            self.version,
            self.hash_type,
            self.uuid,
            self.algorithm.encode("ascii"),
            self.data_block_size,
            self.hash_block_size,
            self.data_blocks,
            len(self.salt),
            bytes(6),
            self.salt,
            bytes(168),
        )

    @classmethod
    def parse(cls, data: bytes) -> Superblock:
        """Decode and check the first 512 bytes of ``data``.

        Everything here is untrusted until the tree verifies against a root
        hash from the descriptor, so each field is checked before use and a
        failure names the field.

        Raises:
            FormatError: short input, bad signature, an unsupported or
                inconsistent field, or non-zero padding.
        """
        if len(data) < SUPERBLOCK_SIZE:
            raise FormatError(f"dm-verity superblock: {len(data)} bytes, need {SUPERBLOCK_SIZE}")
        (
            signature,
            version,
            hash_type,
            uuid,
            algorithm_raw,
            data_block_size,
            hash_block_size,
            data_blocks,
            salt_size,
            pad1,
            salt_raw,
            pad2,
        ) = _SB.unpack_from(data)
        if signature != SIGNATURE:
            raise FormatError(f"dm-verity superblock: signature {signature!r} is not {SIGNATURE!r}")
        name, nul, rest = algorithm_raw.partition(b"\0")
        if not nul or rest.strip(b"\0"):
            raise FormatError(
                "dm-verity superblock: algorithm name is not NUL-terminated and zero-padded"
            )
        try:
            algorithm = name.decode("ascii")
        except UnicodeDecodeError:
            raise FormatError(f"dm-verity superblock: algorithm {name!r} is not ASCII") from None
        if salt_size > MAX_SALT_SIZE:
            raise FormatError(
                f"dm-verity superblock: salt_size {salt_size} exceeds {MAX_SALT_SIZE}"
            )
        if salt_raw[salt_size:].strip(b"\0"):
            raise FormatError(
                "dm-verity superblock: bytes after the salt (salt padding) are not zero"
            )
        if pad1.strip(b"\0") or pad2.strip(b"\0"):
            raise FormatError("dm-verity superblock: reserved padding is not zero")
        return cls(
            version=version,
            hash_type=hash_type,
            uuid=uuid,
            algorithm=algorithm,
            data_block_size=data_block_size,
            hash_block_size=hash_block_size,
            data_blocks=data_blocks,
            salt=salt_raw[:salt_size],
        )



def materialized_hash_offset(image_size: int, data_block_size: int) -> int:
    """Where the superblock starts in containerd's materialized
    ``layer.erofs``: the image size rounded up to a whole data block."""
    if image_size < 0 or data_block_size <= 0:
        raise ValueError(f"bad image size {image_size} or block size {data_block_size}")
    return ceil_div(image_size, data_block_size) * data_block_size


def sidecar_json(root_hex: str, hash_offset: int) -> bytes:
    """containerd's ``layer.erofs.dmverity`` sidecar, byte for byte.

    containerd marshals ``DmverityMetadata{RootHash string `json:"roothash"`;
    HashOffset uint64 `json:"hashoffset"`}`` with ``json.MarshalIndent(m, "",
    "  ")`` and appends a newline; the root hash is plain lowercase hex, which
    is what go-dmverity's ``ParseRootHash`` decodes at mount time.
    """
    root = root_hex.lower()
    if not root or len(root) % 2 or root.strip("0123456789abcdef"):
        raise FormatError(f"dm-verity: root hash {root_hex!r} is not hex")
    if not 0 <= hash_offset < 1 << 64:
        raise FormatError(f"dm-verity: hash offset {hash_offset} out of range")
    return f'{{\n  "roothash": "{root}",\n  "hashoffset": {hash_offset}\n}}\n'.encode("ascii")
