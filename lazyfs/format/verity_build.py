"""Building a dm-verity payload while an image streams past, and checking a
whole image against one (what ``lazyerofs build --dm-verity`` and ``lazyerofs
verify`` use). The layout is :mod:`lazyfs.format.verity`'s.
"""

from __future__ import annotations

import uuid as uuid_mod
from collections.abc import Iterator
from typing import BinaryIO

from lazyfs.errors import FormatError, IntegrityError
from lazyfs.format.verity import HashTree, _Geometry, _Hasher
from lazyfs.format.verity_superblock import (
    DEFAULT_ALGORITHM,
    DEFAULT_BLOCK_SIZE,
    SUPERBLOCK_SIZE,
    Superblock,
    ceil_div,
)

__all__ = ["build_payload", "content_uuid", "verify_image"]

# Streaming reads of the image go in this many bytes at a time.
_READ_CHUNK = 1 << 20


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


def content_uuid(image_sha256: bytes) -> bytes:
    """The verity superblock UUID a reproducible build uses: the first 16
    bytes of the raw image's SHA-256 (its diff_id), with the version and
    variant bits of a v4 UUID set, so it looks like the random one containerd
    draws but the same image always gets the same one."""
    if len(image_sha256) < 16:
        raise FormatError(f"dm-verity: a UUID needs 16 digest bytes, got {len(image_sha256)}")
    return uuid_mod.UUID(bytes=bytes(image_sha256[:16]), version=4).bytes


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
            layer), so pass one to get reproducible bytes: the encoder passes
            :func:`content_uuid` of the image's SHA-256.

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
        data_blocks=ceil_div(data_size, block_size),
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
