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

The superblock and the materialized layout live in
:mod:`lazyfs.format.verity_superblock`; building a payload and checking a
whole image in :mod:`lazyfs.format.verity_build`.

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
from collections.abc import Mapping
from dataclasses import dataclass

from lazyfs.errors import FormatError, IntegrityError
from lazyfs.format.verity_superblock import (
    ALGORITHMS,
    DEFAULT_ALGORITHM,
    DEFAULT_BLOCK_SIZE,
    MAX_BLOCK_SIZE,
    MAX_LEVELS,
    MAX_SALT_SIZE,
    MIN_BLOCK_SIZE,
    SIGNATURE,
    SUPERBLOCK_SIZE,
    Superblock,
    ceil_div,
    materialized_hash_offset,
    sidecar_json,
)

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
    "materialized_hash_offset",
    "sidecar_json",
]


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
            n = ceil_div(n, hash_per_block)
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
        want = ceil_div(image_size, sb.data_block_size)
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
