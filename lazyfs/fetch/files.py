"""A layer's virtual file: the :class:`Layer` protocol and its seekable kind.

``await layer.read(offset, size)`` returns exactly the bytes of the layer's
virtual file, never an unverified one (unless the user allowed a layer whose
chain of trust cannot be established). :class:`SeekableFile` serves a seekable
layer's image through a :class:`~lazyfs.fetch.frames.FrameStore`, followed by
its materialized dm-verity tail if it has one;
:class:`~lazyfs.fetch.plain.PlainFile` serves a plain layer once its whole blob
matched its digest. Both are a :class:`Layer`, so the mount side never tells
them apart.
"""

from __future__ import annotations

import logging
from typing import Protocol

import trio

from lazyfs.errors import FetchError, IntegrityError, LazyErofsError
from lazyfs.fetch.context import FetchContext, FrameCache, ReadSettings
from lazyfs.fetch.frames import FrameStore
from lazyfs.fetch.policy import FetchPolicy
from lazyfs.fetch.source import CountingSource, LayerStats
from lazyfs.fetch.verity_tail import VerityTail
from lazyfs.format import seekable

__all__ = ["Layer", "SeekableFile"]

log = logging.getLogger(__name__)


class Layer(Protocol):
    """One layer's virtual file, as the mount side sees it."""

    name: str
    desc: seekable.LayerDescriptor
    verified: bool  # every served byte is checked against the manifest's digest
    stats: LayerStats

    @property
    def size(self) -> int:
        """Size of the virtual file."""
        ...

    @property
    def frames_total(self) -> int:
        """Frames of the layer (0 where the layer has none)."""
        ...

    @property
    def frames_present(self) -> int:
        """Frames known to be in the cache."""
        ...

    async def read(self, offset: int, size: int) -> bytes:
        """Bytes ``[offset, offset+size)``, clamped at EOF; raises FetchError
        or IntegrityError within the read timeout if they cannot be had."""
        ...

    def start(self, nursery: trio.Nursery) -> None:
        """Run fetches in ``nursery`` from now on, so they outlive a reader
        that gave up (no-op where nothing runs in the background)."""
        ...

    async def prefetch(self) -> int:
        """Fetch what is not cached yet, stepping aside for on-demand reads;
        returns the frames fetched (0 where not applicable)."""
        ...

    def touched(self) -> list[tuple[int, int, int]]:
        """(frame index, blob start, blob end) of the frames fetched, in
        first-fetch order (for the touch log)."""
        ...


class SeekableFile:
    """A seekable EROFS layer: the raw image, optionally followed by its
    materialized dm-verity tail (zero pad + verity payload).

    Whether frames are checked is decided per layer, from the table alone: a
    table with SHA-512 entries gets every frame hashed, whatever was asked.
    ``verified`` (the whole chain holds: a ``chunk_digest`` vouched for the
    table and the table has checksums) is derived too; a layer without it is
    refused unless ``settings.insecure_skip_verify``.

    Args:
        source: the blob, counted (its stats become this layer's).
        policy: how to fetch; by default the one ``settings`` describe.
    """

    def __init__(
        self,
        name: str,
        desc: seekable.LayerDescriptor,
        table: seekable.ChunkTable,
        source: CountingSource,
        cache: FrameCache,
        settings: ReadSettings,
        context: FetchContext,
        *,
        verity: VerityTail | None = None,
        policy: FetchPolicy | None = None,
    ) -> None:
        self.name = name
        self.desc = desc
        self.table = table
        self.settings = settings
        self.context = context
        self.policy = policy or settings.policy()
        self.verified = desc.chunk_digest is not None and table.hash_algo == seekable.HASH_SHA512
        if not self.verified and not settings.insecure_skip_verify:
            raise IntegrityError(f"{name}: the chain of trust cannot be established for this layer")
        self.verity = verity
        self.stats = source.stats
        # The mount's memory budget, less what the cache's memory LRU holds.
        context.configure_memory(settings.memory_budget, getattr(cache, "memory_limit", 0))
        self.store = FrameStore(name, desc, table, source, cache, self.policy, context, verified=self.verified)

    @property
    def image_size(self) -> int:
        return self.table.uncompressed_size

    @property
    def size(self) -> int:
        """Size of the virtual file (image, or image + verity tail)."""
        return self.verity.end if self.verity is not None else self.image_size

    @property
    def frames_total(self) -> int:
        return self.table.frame_count

    @property
    def frames_present(self) -> int:
        return self.store.frames_present

    def start(self, nursery: trio.Nursery) -> None:
        self.store.start(nursery)

    def touched(self) -> list[tuple[int, int, int]]:
        return self.store.touched()

    async def read(self, offset: int, size: int) -> bytes:
        end = min(offset + size, self.size)
        if offset >= end:
            return b""
        timeout = self.settings.read_timeout
        self.context.demand.begin()
        try:
            with trio.fail_after(timeout):
                parts: list[bytes] = []
                if offset < self.image_size:
                    parts.append(await self._read_image(offset, min(end, self.image_size)))
                if end > self.image_size:
                    assert self.verity is not None
                    parts.append(await self.verity.read(max(offset, self.image_size), end))
        except trio.TooSlowError as exc:
            self.stats.read_errors += 1
            raise FetchError(f"{self.name}: read of {end - offset} bytes at {offset} timed out after {timeout:g}s") from exc
        except LazyErofsError:
            self.stats.read_errors += 1
            raise
        finally:
            self.context.demand.end()
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def _read_image(self, offset: int, end: int) -> bytes:
        # Only the bytes asked for: a small read of a cached frame never
        # loads the whole frame.
        return await self.store.read(offset, end)

    async def prefetch(self) -> int:
        """Fetch every frame not yet cached, in the policy's order and batches,
        each batch only once no on-demand read is in progress (so prefetch
        never takes the bandwidth a waiting reader needs). A failed batch is
        logged and skipped. Returns the number of frames fetched."""
        before = self.stats.frames_fetched
        store = self.store
        batch = range(0)
        for i in self.policy.prefetch_order(self.table):
            if i in batch or await store.is_cached(i):
                continue
            batch = self.policy.prefetch_batch(i, self.table, lambda k: not store.known_present(k))
            await self.policy.before_prefetch(self.context.demand)
            try:
                with trio.fail_after(self.settings.read_timeout):
                    await store.fill(batch)
            except (LazyErofsError, trio.TooSlowError) as exc:
                log.warning("%s: prefetch of frames %d-%d failed: %s", self.name, batch[0], batch[-1], exc)
        return self.stats.frames_fetched - before
