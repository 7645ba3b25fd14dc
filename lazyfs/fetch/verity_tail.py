"""The dm-verity tail of a layer file, served lazily.

containerd's differ writes a verity layer as one file:
``[raw image][zeros up to the data block size][verity superblock + tree]``.
This serves the part after the image. Tree blocks are fetched from the
blob's verity skippable frame only when read, through the layer's
:class:`~lazyfs.fetch.source.CountingSource` (so they show in its stats and
the link estimate), and each is checked along its path to the root digest
from the (trusted) descriptor before it is served; blocks that fail are
refetched once. Checked blocks are kept in memory (the tree is ~1/64 of the
image for sha512 and 4 KiB blocks, and only the read part of it is ever held).
"""

from __future__ import annotations

import logging
import struct

import trio

from lazyfs.errors import FormatError, IntegrityError
from lazyfs.fetch.source import CountingSource
from lazyfs.format import seekable, verity

__all__ = ["VerityTail", "open_verity_tail"]

log = logging.getLogger(__name__)


class VerityTail:
    """Bytes of the layer file from the image end on: zero pad, then the payload."""

    def __init__(
        self, name: str, tree: verity.HashTree, hash_offset: int, payload_start: int, source: CountingSource
    ) -> None:
        self.name = name
        self.tree = tree
        self.hash_offset = hash_offset  # file offset of the payload's first byte
        self.payload_start = payload_start  # blob offset of the payload's first byte
        self.source = source
        self.block = tree.hash_block_size
        self.end = hash_offset + tree.payload_size
        self._verified: dict[int, bytes] = {}
        self._lock = trio.Lock()

    async def read(self, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of the layer file, all at or past the image end."""
        out = bytearray()
        if start < self.hash_offset:
            out += bytes(min(end, self.hash_offset) - start)
            start = self.hash_offset
        if start < end:
            out += await self._payload(start - self.hash_offset, end - start)
        return bytes(out)

    async def _payload(self, offset: int, length: int) -> bytes:
        needed = self.tree.blocks_needed(offset, length)
        async with self._lock:
            missing = [b for b in needed if b not in self._verified]
            fetched = await self._fetch_blocks(missing)
            try:
                blocks = self._check(needed, fetched)
            except IntegrityError as first_error:
                # A bad block may be a transport accident: refetch once.
                self.source.stats.verify_failures += 1
                log.warning("%s: %s; refetching %d verity blocks once", self.name, first_error, len(missing))
                fetched = await self._fetch_blocks(missing)
                try:
                    blocks = self._check(needed, fetched)
                except IntegrityError as exc:
                    self.source.stats.verify_failures += 1
                    raise IntegrityError(f"{self.name}: {exc}") from exc
            self._verified.update(fetched)
        first, last = offset // self.block, (offset + length - 1) // self.block
        data = b"".join(blocks[b] for b in range(first, last + 1))
        rel = offset - first * self.block
        return data[rel : rel + length]

    def _check(self, needed: list[int], fetched: dict[int, bytes]) -> dict[int, bytes]:
        blocks = {b: self._verified.get(b) or fetched[b] for b in needed}
        self.tree.verify_blocks(blocks)
        return blocks

    async def _fetch_blocks(self, indices: list[int]) -> dict[int, bytes]:
        """Fetch runs of adjacent blocks in one range each."""
        out: dict[int, bytes] = {}
        runs: list[list[int]] = []
        for b in sorted(indices):
            if runs and runs[-1][-1] == b - 1:
                runs[-1].append(b)
            else:
                runs.append([b])
        for run in runs:
            data = await self.source.read(self.payload_start + run[0] * self.block, len(run) * self.block)
            if len(data) != len(run) * self.block:
                raise IntegrityError(f"{self.name}: short read of verity blocks {run[0]}-{run[-1]}")
            out.update((b, data[k * self.block : (k + 1) * self.block]) for k, b in enumerate(run))
        return out


async def open_verity_tail(
    name: str,
    desc: seekable.LayerDescriptor,
    image_size: int,
    source: CountingSource,
) -> tuple[VerityTail, bytes]:
    """Read the verity superblock block, check it against the descriptor, and
    return the tail plus containerd's sidecar JSON."""
    assert desc.verity_offset is not None and desc.verity_root is not None
    algo, root_hex = desc.verity_root.split(":", 1)
    head = await source.read(desc.verity_offset, min(8 + verity.DEFAULT_BLOCK_SIZE, desc.size - desc.verity_offset))
    magic, payload_size = struct.unpack_from("<II", head)
    if not seekable.SKIPPABLE_MAGIC_FIRST <= magic <= seekable.SKIPPABLE_MAGIC_LAST:
        raise FormatError(f"{name}: dm-verity frame at {desc.verity_offset} is not a skippable frame")
    if desc.verity_offset + 8 + payload_size > desc.size:
        raise FormatError(f"{name}: dm-verity payload of {payload_size} bytes runs past the blob end")
    sb = verity.Superblock.parse(head[8 : 8 + 512])
    if sb.algorithm != algo:
        raise FormatError(f"{name}: verity superblock says {sb.algorithm}, root digest says {algo}")
    block = await source.read(desc.verity_offset + 8, sb.hash_block_size)
    tree = verity.HashTree.from_superblock(block, root_hex, image_size=image_size)
    if tree.payload_size > payload_size:
        raise FormatError(f"{name}: verity tree needs {tree.payload_size} bytes, frame holds {payload_size}")
    hash_offset = verity.materialized_hash_offset(image_size, sb.data_block_size)
    tail = VerityTail(name, tree, hash_offset, desc.verity_offset + 8, source)
    return tail, verity.sidecar_json(root_hex, hash_offset)
