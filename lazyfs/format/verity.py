"""dm-verity payloads of seekable EROFS layers: build, parse, verify.

A seekable EROFS blob may end with a skippable frame holding exactly what
``veritysetup format`` writes to a hash device that carries a superblock::

    [512-byte superblock][zeros up to one hash block][Merkle tree]

and containerd's differ "materializes" a layer as one file,
``[raw image][zeros up to the data block size][payload]``, next to a sidecar
JSON naming the root hash and the superblock's offset. The kernel (or
``veritysetup verify``) then checks that single file. This module is the pure
part of that: bytes in, bytes out, no FUSE and no HTTP, so the encoder, the
lazy reader and ``lazyerofs verify`` share one implementation of the format.

On-disk layout (cryptsetup's "VERITY" superblock, little-endian)::

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

Tree layout (hash_type 1): level 0 holds one digest per data block, level
``i+1`` one digest per block of level ``i``, until a level fits in one block.
Each digest is ``H(salt || block)``, stored zero-padded to the next power of
two, ``2**floor(log2(hash_block_size / digest_size))`` per block, each block
zero-padded to ``hash_block_size``. Levels are stored top level first, so the
payload's block 1 is the single top block, whose digest is the root hash. An
image of a single data block has no tree at all: its root is the digest of
that block.

What containerd's seekable converter writes (``WriteDMVeritySkippableFrameAtEOF``
over go-dmverity): sha512, data block size = hash block size = the block size
asked for (4096 by default), hash_type 1, *no salt*, a random (v4) UUID, the
superblock at payload offset 0 and the tree at one hash block. Hence the
defaults of :func:`build_payload`.
"""

from __future__ import annotations

import hashlib
import struct
import uuid as uuid_mod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import BinaryIO

from lazyfs.errors import FormatError, IntegrityError

__all__ = [
    "ALGORITHMS",
    "DEFAULT_ALGORITHM",
    "DEFAULT_BLOCK_SIZE",
    "MAX_BLOCK_SIZE",
    "MAX_SALT_SIZE",
    "MIN_BLOCK_SIZE",
    "SIGNATURE",
    "SUPERBLOCK_SIZE",
    "HashTree",
    "Superblock",
    "build_payload",
    "materialized_hash_offset",
    "sidecar_json",
    "verify_image",
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

# Streaming reads of the image go in this many bytes at a time.
_READ_CHUNK = 1 << 20


def _is_block_size(value: int) -> bool:
    return MIN_BLOCK_SIZE <= value <= MAX_BLOCK_SIZE and value & (value - 1) == 0


def _ceil_div(a: int, b: int) -> int:
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


@dataclass(frozen=True)
class _Geometry:
    """Where each tree level lives, shared by the builder and the verifier so
    the two cannot disagree about the layout."""

    digest_size: int
    digest_full: int  # digest_size rounded up to a power of two (hash_type 1)
    hash_per_block: int
    hash_block_size: int
    level_counts: tuple[int, ...]  # blocks per level, level 0 (bottom) first
    level_starts: tuple[int, ...]  # payload block index of each level's first block

    @classmethod
    def of(cls, data_blocks: int, hash_block_size: int, digest_size: int) -> _Geometry:
        digest_full = 1 << (digest_size - 1).bit_length()
        hash_per_block = 1 << ((hash_block_size // digest_size).bit_length() - 1)
        if hash_per_block < 2 or hash_per_block * digest_full > hash_block_size:
            raise FormatError(
                f"dm-verity: hash block size {hash_block_size} too small for {digest_size}-byte digests"
            )
        counts: list[int] = []
        n = data_blocks
        while n > 1:
            n = _ceil_div(n, hash_per_block)
            counts.append(n)
        if len(counts) > MAX_LEVELS:
            raise FormatError(f"dm-verity: {len(counts)} tree levels exceed {MAX_LEVELS}")
        starts = [0] * len(counts)
        position = 1  # block 0 is the superblock block
        for level in reversed(range(len(counts))):
            starts[level] = position
            position += counts[level]
        return cls(
            digest_size=digest_size,
            digest_full=digest_full,
            hash_per_block=hash_per_block,
            hash_block_size=hash_block_size,
            level_counts=tuple(counts),
            level_starts=tuple(starts),
        )

    @property
    def levels(self) -> int:
        return len(self.level_counts)

    @property
    def payload_blocks(self) -> int:
        return 1 + sum(self.level_counts)

    def level_of(self, block: int) -> int:
        """Tree level of payload block ``block`` (>= 1)."""
        for level, (start, count) in enumerate(
            zip(self.level_starts, self.level_counts, strict=True)
        ):
            if start <= block < start + count:
                return level
        raise ValueError(f"payload block {block} is not a tree block")

    def entry(self, level: int, index: int) -> tuple[int, int]:
        """(payload block, byte offset) of the digest of item ``index`` hashed
        into ``level`` (a data block for level 0, a block of level-1 above)."""
        block = self.level_starts[level] + index // self.hash_per_block
        return block, (index % self.hash_per_block) * self.digest_full


class _Hasher:
    """``H(salt || block)`` with the salt absorbed once."""

    def __init__(self, algorithm: str, salt: bytes) -> None:
        self._base = hashlib.new(algorithm)
        self._base.update(salt)

    def __call__(self, block: bytes | memoryview) -> bytes:
        h = self._base.copy()
        h.update(block)
        return h.digest()


class _LevelWriter:
    """Packs digests into hash blocks as they arrive (entries padded to the
    full digest size, blocks padded with zeros), so level 0 is built while
    the image streams past and never needs a list of digests."""

    def __init__(self, geometry: _Geometry) -> None:
        self._g = geometry
        self._entry_pad = bytes(geometry.digest_full - geometry.digest_size)
        self._block_tail = bytes(
            geometry.hash_block_size - geometry.hash_per_block * geometry.digest_full
        )
        self._in_block = 0
        self.data = bytearray()

    def add(self, digest: bytes) -> None:
        self.data += digest
        self.data += self._entry_pad
        self._in_block += 1
        if self._in_block == self._g.hash_per_block:
            self.data += self._block_tail
            self._in_block = 0

    def finish(self) -> bytes:
        rem = len(self.data) % self._g.hash_block_size
        if rem:
            self.data += bytes(self._g.hash_block_size - rem)
        return bytes(self.data)


def build_payload(
    image: BinaryIO,
    data_size: int,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    algorithm: str = DEFAULT_ALGORITHM,
    salt: bytes | None = None,
    uuid: bytes | None = None,
) -> tuple[bytes, str]:
    """Build the verity payload for the first ``data_size`` bytes of ``image``.

    The image is read once, front to back, and hashed as it goes; only the
    tree (about 1/64 of the image for sha512 and 4 KiB blocks) is held. The
    image is zero-padded to a whole data block, as containerd does before it
    formats. Data and hash blocks share ``block_size``, as in containerd.

    Args:
        salt: defaults to no salt (containerd's converter sets none).
        uuid: 16 bytes; defaults to a random UUID (containerd draws one per
            layer), so pass one to get reproducible bytes.

    Returns:
        ``(superblock block + tree, root hash as lowercase hex)``.

    Raises:
        FormatError: bad parameters, or the image ended before ``data_size``.
    """
    if data_size <= 0:
        raise FormatError(f"dm-verity: image size {data_size} must be positive")
    sb = Superblock(
        version=1,
        hash_type=1,
        uuid=uuid_mod.uuid4().bytes if uuid is None else bytes(uuid),
        algorithm=algorithm,
        data_block_size=block_size,
        hash_block_size=block_size,
        data_blocks=_ceil_div(data_size, block_size),
        salt=b"" if salt is None else bytes(salt),
    )
    geometry = _Geometry.of(sb.data_blocks, sb.hash_block_size, sb.digest_size)
    hasher = _Hasher(sb.algorithm, sb.salt)

    level0 = _LevelWriter(geometry)
    single: bytes | None = None  # digest of the only block, when there is no tree
    for block in _padded_blocks(image, data_size, block_size):
        digest = hasher(block)
        if geometry.levels:
            level0.add(digest)
        else:
            single = digest

    if not geometry.levels:
        assert single is not None
        return sb.to_bytes() + bytes(block_size - SUPERBLOCK_SIZE), single.hex()

    levels = [level0.finish()]
    for _ in range(1, geometry.levels):
        below = levels[-1]
        writer = _LevelWriter(geometry)
        for off in range(0, len(below), block_size):
            writer.add(hasher(memoryview(below)[off : off + block_size]))
        levels.append(writer.finish())
    assert len(levels[-1]) == block_size
    root = hasher(levels[-1])
    payload = b"".join([sb.to_bytes(), bytes(block_size - SUPERBLOCK_SIZE), *reversed(levels)])
    assert len(payload) == geometry.payload_blocks * block_size
    return payload, root.hex()


def _parse_root(root_hex: str, algorithm: str) -> bytes:
    size = ALGORITHMS[algorithm]
    if len(root_hex) != 2 * size:
        raise FormatError(
            f"dm-verity: root hash has {len(root_hex)} hex digits, {algorithm} needs {2 * size}"
        )
    try:
        return bytes.fromhex(root_hex)
    except ValueError:
        raise FormatError(f"dm-verity: root hash {root_hex!r} is not hex") from None


class HashTree:
    """A payload's geometry plus its trusted root, for checking blocks one at
    a time.

    A lazy reader fetches only the hash blocks a read touches and their path
    to the top (:meth:`blocks_needed`), checks them (:meth:`verify_blocks`)
    and only then serves them. Payload block ``0`` is the superblock block;
    tree blocks follow, top level first.
    """

    def __init__(self, superblock: Superblock, sb_block: bytes, root: bytes) -> None:
        self.superblock = superblock
        self.hash_block_size = superblock.hash_block_size
        self.data_block_size = superblock.data_block_size
        self.root = root
        self._sb_block = sb_block
        self._g = _Geometry.of(
            superblock.data_blocks, superblock.hash_block_size, superblock.digest_size
        )
        self._hash = _Hasher(superblock.algorithm, superblock.salt)
        self.payload_size = self._g.payload_blocks * self.hash_block_size

    @classmethod
    def from_superblock(cls, sb_block: bytes, root_hex: str, *, image_size: int) -> HashTree:
        """Check the payload's first hash block against the image it claims to
        cover, and keep it as the reference for later :meth:`verify_blocks`.

        Args:
            sb_block: at least the payload's first ``hash_block_size`` bytes.
            root_hex: the trusted root hash (from the descriptor), hex.
            image_size: size of the raw image the tree must cover.

        Raises:
            FormatError: a bad superblock, non-zero padding after it, a root
                hash of the wrong length, or ``data_blocks`` that does not match
                ``ceil(image_size / data_block_size)``.
        """
        sb = Superblock.parse(sb_block)
        if len(sb_block) < sb.hash_block_size:
            raise FormatError(
                f"dm-verity: superblock block is {len(sb_block)} bytes, hash block size is "
                f"{sb.hash_block_size}"
            )
        block = bytes(sb_block[: sb.hash_block_size])
        if block[SUPERBLOCK_SIZE:].strip(b"\0"):
            raise FormatError("dm-verity: padding after the superblock is not zero")
        if image_size <= 0:
            raise FormatError(f"dm-verity: image size {image_size} must be positive")
        want = _ceil_div(image_size, sb.data_block_size)
        if sb.data_blocks != want:
            raise FormatError(
                f"dm-verity superblock: data_blocks {sb.data_blocks} does not cover the "
                f"{image_size}-byte image ({want} blocks of {sb.data_block_size})"
            )
        return cls(sb, block, _parse_root(root_hex, sb.algorithm))

    @property
    def levels(self) -> int:
        """Tree depth (0 for a one-block image, which has no tree)."""
        return self._g.levels

    @property
    def hash_per_block(self) -> int:
        """Digests per hash block."""
        return self._g.hash_per_block

    @property
    def level_ranges(self) -> list[range]:
        """Payload block indices of each level, level 0 (bottom) first."""
        return [
            range(start, start + count)
            for start, count in zip(self._g.level_starts, self._g.level_counts, strict=True)
        ]

    def _parent(self, block: int) -> tuple[int, int] | None:
        """(parent block, byte offset of this block's digest in it), or None
        for the top block, whose digest is the root."""
        level = self._g.level_of(block)
        if level == self._g.levels - 1:
            return None
        return self._g.entry(level + 1, block - self._g.level_starts[level])

    def parent(self, block: int) -> int | None:
        """Payload block holding tree block ``block``'s digest; None for the
        top block (its digest is the root hash)."""
        if not 1 <= block < self._g.payload_blocks:
            raise ValueError(f"payload block {block} is not a tree block")
        found = self._parent(block)
        return None if found is None else found[0]

    def blocks_needed(self, payload_offset: int, length: int) -> list[int]:
        """Payload blocks to verify before serving ``[payload_offset, +length)``.

        That is the blocks the range touches plus each one's ancestors up to
        the top level: the path to the root, never the whole tree. Sorted
        ascending, which is also top level first.

        Raises:
            ValueError: a negative offset or length, or a range past the payload.
        """
        if payload_offset < 0 or length < 0 or payload_offset + length > self.payload_size:
            raise ValueError(
                f"range [{payload_offset}, {payload_offset + length}) outside the "
                f"{self.payload_size}-byte payload"
            )
        if length == 0:
            return []
        first = payload_offset // self.hash_block_size
        last = (payload_offset + length - 1) // self.hash_block_size
        needed: set[int] = set()
        for block in range(first, last + 1):
            while block not in needed:
                needed.add(block)
                if block == 0:
                    break
                parent = self._parent(block)
                if parent is None:
                    break
                block = parent[0]
        return sorted(needed)

    def verify_blocks(self, blocks: Mapping[int, bytes]) -> None:
        """Check each given payload block against its parent, up to the root.

        Blocks are checked top down, so an error names the highest bad block.
        Every ancestor of a given tree block must be given too (as
        :meth:`blocks_needed` lists them); a missing one is refused rather
        than trusted.

        Raises:
            FormatError: block 0 does not parse or has non-zero padding.
            IntegrityError: a block of the wrong size, a digest mismatch, a
                missing ancestor, or a superblock other than the trusted one.
        """
        bs = self.hash_block_size
        for index in sorted(blocks):
            data = blocks[index]
            if not 0 <= index < self._g.payload_blocks:
                raise IntegrityError(f"dm-verity: block {index} is outside the payload")
            if len(data) != bs:
                raise IntegrityError(
                    f"dm-verity: block {index} is {len(data)} bytes, expected {bs}"
                )
            if index == 0:
                Superblock.parse(data)
                if bytes(data[SUPERBLOCK_SIZE:]).strip(b"\0"):
                    raise FormatError("dm-verity: padding after the superblock is not zero")
                if bytes(data) != self._sb_block:
                    raise IntegrityError(
                        "dm-verity: block 0 (superblock) differs from the checked one"
                    )
                continue
            digest = self._hash(data)
            parent = self._parent(index)
            if parent is None:
                if digest != self.root:
                    raise IntegrityError(
                        f"dm-verity: block {index} (top level) does not match the root hash"
                    )
                continue
            pblock, off = parent
            pdata = blocks.get(pblock)
            if pdata is None:
                raise IntegrityError(
                    f"dm-verity: block {index} cannot be checked, its parent block {pblock} was not given"
                )
            if bytes(pdata[off : off + self._g.digest_size]) != digest:
                raise IntegrityError(
                    f"dm-verity: block {index} does not match its entry in block {pblock}"
                )

    def data_hash_block(self, index: int) -> int | None:
        """Payload block holding data block ``index``'s digest (None when the
        image is one block and its digest is the root itself)."""
        if not 0 <= index < self.superblock.data_blocks:
            raise ValueError(f"data block {index} outside 0..{self.superblock.data_blocks - 1}")
        if not self._g.levels:
            return None
        return self._g.entry(0, index)[0]

    def verify_data_block(self, index: int, data: bytes, level0_block: bytes) -> None:
        """Check data block ``index`` against its (already verified) level-0
        hash block, see :meth:`data_hash_block`.

        The image's last block may be given short; it is zero-padded, as the
        tree was built over the zero-padded image.

        Raises:
            IntegrityError: wrong size or digest mismatch.
        """
        hash_block = self.data_hash_block(index)
        dbs = self.data_block_size
        if len(data) > dbs or (len(data) < dbs and index != self.superblock.data_blocks - 1):
            raise IntegrityError(
                f"dm-verity: data block {index} is {len(data)} bytes, expected {dbs}"
            )
        if len(data) < dbs:
            data = bytes(data) + bytes(dbs - len(data))
        digest = self._hash(data)
        if hash_block is None:
            expected = self.root
        else:
            _, off = self._g.entry(0, index)
            expected = bytes(level0_block[off : off + self._g.digest_size])
        if digest != expected:
            raise IntegrityError(f"dm-verity: data block {index} does not match its hash")


def verify_image(
    image: BinaryIO, image_size: int, payload: bytes | BinaryIO, root_hex: str
) -> list[int]:
    """Check a whole image against its payload and root hash.

    The tree is checked first (any bad tree block raises, since nothing
    under it can be judged); then every data block is compared with its
    level-0 digest, and the bad ones are collected rather than raised, so
    ``lazyerofs verify`` can report all the damage at once.

    Returns:
        Indices of data blocks whose digest does not match (empty if clean).

    Raises:
        FormatError: bad superblock, or a payload shorter than its tree.
        IntegrityError: a tree block does not verify.
    """
    raw = payload if isinstance(payload, bytes | bytearray | memoryview) else payload.read()
    raw = bytes(raw)
    sb = Superblock.parse(raw)
    tree = HashTree.from_superblock(raw[: sb.hash_block_size], root_hex, image_size=image_size)
    if len(raw) < tree.payload_size:
        raise FormatError(
            f"dm-verity: payload is {len(raw)} bytes, its tree needs {tree.payload_size}"
        )
    hbs = tree.hash_block_size
    tree.verify_blocks({i: raw[i * hbs : (i + 1) * hbs] for i in range(tree.payload_size // hbs)})

    bad: list[int] = []
    dbs = tree.data_block_size
    for index, block in enumerate(_padded_blocks(image, image_size, dbs)):
        hash_block = tree.data_hash_block(index)
        level0 = b"" if hash_block is None else raw[hash_block * hbs : (hash_block + 1) * hbs]
        try:
            tree.verify_data_block(index, block, level0)
        except IntegrityError:
            bad.append(index)
    return bad


def _padded_blocks(image: BinaryIO, size: int, block_size: int) -> Iterator[bytes]:
    """The first ``size`` bytes of ``image`` as whole blocks, the last one
    zero-padded (the tree covers the padded image), read in large pieces so
    memory stays bounded."""
    remaining = size
    pending = bytearray()
    while remaining > 0:
        chunk = image.read(min(_READ_CHUNK, remaining))
        if not chunk:
            raise FormatError(f"dm-verity: image ended after {size - remaining} of {size} bytes")
        remaining -= len(chunk)
        pending += chunk
        if remaining == 0 and len(pending) % block_size:
            pending += bytes(block_size - len(pending) % block_size)
        whole = len(pending) - len(pending) % block_size
        for off in range(0, whole, block_size):
            yield bytes(pending[off : off + block_size])
        del pending[:whole]


def materialized_hash_offset(image_size: int, data_block_size: int) -> int:
    """Where the superblock starts in containerd's materialized
    ``layer.erofs``: the image size rounded up to a whole data block."""
    if image_size < 0 or data_block_size <= 0:
        raise ValueError(f"bad image size {image_size} or block size {data_block_size}")
    return _ceil_div(image_size, data_block_size) * data_block_size


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
