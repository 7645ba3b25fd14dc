"""Turning a manifest's layer descriptor into a :class:`~lazyfs.fetch.files.Layer`.

:func:`open_layer` parses the descriptor, picks the layer's kind (plain,
seekable, or skipped), fetches and checks the chunk table (or reads it back from the mount's
table store, checked the same way), charges it to the
mount's table budget, opens the dm-verity tail, and returns the layer with
containerd's dm-verity sidecar. Every byte it fetches goes through the
layer's :class:`~lazyfs.fetch.source.CountingSource`, so the table and the
verity superblock count in the layer's stats and teach the link estimate its
round-trip time before the first read.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import trio

from lazyfs.errors import FetchError, FormatError, IntegrityError
from lazyfs.fetch.context import FetchContext, FrameCache, ReadSettings
from lazyfs.fetch.files import Layer, SeekableFile
from lazyfs.fetch.plain import PlainFile
from lazyfs.fetch.source import BlobSource, CountingSource
from lazyfs.fetch.verity_tail import open_verity_tail
from lazyfs.format import seekable

__all__ = ["OpenedLayer", "open_layer", "prefetch_all"]

log = logging.getLogger(__name__)


class OpenedLayer(NamedTuple):
    layer: Layer
    sidecar: bytes | None  # containerd's dm-verity sidecar JSON, if the layer has dm-verity


async def open_layer(
    index: int,
    descriptor: Mapping[str, Any],
    source: BlobSource,
    cache: FrameCache,
    settings: ReadSettings,
    context: FetchContext,
) -> OpenedLayer | None:
    """Open layer ``index`` (0 = bottom) of a mount; None if it is skipped
    (not an EROFS layer, and not ``settings.strict``).

    Raises:
        FormatError: a bad descriptor or table, a non-EROFS layer with
            ``strict``, or the mount's chunk tables over their budget.
        IntegrityError: the blob's size or table digest disagree with the
            descriptor, or its chain of trust is missing without
            ``insecure_skip_verify``.
        FetchError: the chunk table was not fetched within the read timeout.
    """
    digest = descriptor.get("digest", "?")
    name = f"layer {index} ({str(digest)[:19]})"
    desc = seekable.parse_descriptor(descriptor, name=name)
    counted = context.counted(source)
    if desc.media_type == seekable.MEDIA_TYPE_PLAIN:
        if source.size != desc.size:
            raise IntegrityError(f"{name}: registry says the blob is {source.size} bytes, descriptor {desc.size}")
        # Verified whole before its first byte is served (see PlainFile),
        # with or without --insecure-skip-verify: its digest is a chain.
        log.info("%s: plain EROFS layer: the whole blob is fetched and checked on first read", name)
        return OpenedLayer(PlainFile(name, desc, counted, settings, spool_dir=cache.root), None)
    if not desc.seekable:
        if settings.strict:
            raise FormatError(f"{name}: media type {desc.media_type} is not an EROFS layer (--strict)")
        log.warning("%s: skipping layer of media type %s", name, desc.media_type)
        return None
    assert desc.table_offset is not None
    if source.size != desc.size:
        raise IntegrityError(f"{name}: registry says the blob is {source.size} bytes, descriptor {desc.size}")
    table = await _load_table(name, desc, counted, settings, context)
    # Tables count against the mount's memory budget (less the memory LRU).
    context.configure_memory(settings.memory_budget, getattr(cache, "memory_limit", 0))
    context.tables.charge(name, table)
    if not (desc.chunk_digest is not None and table.hash_algo == seekable.HASH_SHA512):
        missing = "no frame checksums (hash_algo 0)" if table.hash_algo == seekable.HASH_NONE else "no chunk_digest"
        log.warning("%s: INSECURE: %s, its frames are served unverified (--insecure-skip-verify)", name, missing)
    verity = None
    sidecar = None
    if desc.verity_offset is not None:
        verity, sidecar = await open_verity_tail(name, desc, table.uncompressed_size, counted)
    layer = SeekableFile(name, desc, table, counted, cache, settings, context, verity=verity)
    return OpenedLayer(layer, sidecar)


async def _load_table(
    name: str, desc: seekable.LayerDescriptor, counted: CountingSource, settings: ReadSettings, context: FetchContext
) -> seekable.ChunkTable:
    """The layer's chunk table: from the mount's table store when a copy is
    there and passes the digest check, else fetched (and then stored).

    --insecure-skip-verify only lets through a layer whose chain cannot be
    established; a present chunk_digest and present frame checksums are
    always checked (SeekableFile decides that from the table itself). Only a
    table with a chunk_digest is stored or looked up: the digest is the key.
    """
    store = context.table_store if desc.chunk_digest is not None else None
    verify = not settings.insecure_skip_verify
    if store is not None:
        assert desc.chunk_digest is not None
        data = await trio.to_thread.run_sync(store.get, desc.chunk_digest, limiter=context.limiter)
        if data is not None:
            try:
                table = seekable.read_chunk_table(data, desc, verify=verify, name=name)
            except (FormatError, IntegrityError) as exc:
                # Damaged or planted: never served, fetched again below.
                log.warning("%s: stored chunk table %s refused, fetching it again: %s", name, store.path(desc.chunk_digest), exc)
                await trio.to_thread.run_sync(store.discard, desc.chunk_digest, limiter=context.limiter)
            else:
                context.tables_cached += 1
                return table
    assert desc.table_offset is not None
    try:
        with trio.fail_after(settings.read_timeout):
            data = await counted.read(desc.table_offset, seekable.table_read_size(desc))
    except trio.TooSlowError as exc:
        raise FetchError(f"{name}: chunk table not fetched within {settings.read_timeout:g}s") from exc
    table = seekable.read_chunk_table(data, desc, verify=verify, name=name)
    context.tables_fetched += 1
    if store is not None:
        assert desc.chunk_digest is not None
        await trio.to_thread.run_sync(store.put, desc.chunk_digest, bytes(data), limiter=context.limiter)
    return table


async def prefetch_all(layers: Sequence[Layer]) -> None:
    """Background fill of every layer, bottom first; yields to on-demand reads."""
    for layer in layers:
        fetched = await layer.prefetch()
        if layer.frames_total:  # a plain layer has nothing to prefetch
            log.info("%s: prefetched %d frames", layer.name, fetched)
