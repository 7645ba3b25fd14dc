"""The bytes of a layer's virtual file, fetched lazily and verified.

Modules (arrows point down; nothing here imports lazyfs.mount or lazyfs.cli)::

    opener.py       open_layer(): descriptor -> Layer (+ dm-verity sidecar); prefetch_all()
    files.py        the Layer protocol; SeekableFile (image via FrameStore + VerityTail)
    plain.py        PlainFile: a plain layer, served once its whole blob matched its digest
    profile.py      startup profiles: schema (parse/dump, capped), ProfileRecorder,
                    RecordingLayer, ProfileReplay (the replay scheduler)
    verity_tail.py  VerityTail: the materialized dm-verity tail, checked block by block
    frames.py       FrameStore: single flight per frame, verify-then-serve, cache
    context.py      ReadSettings (the user's choices), FetchContext (per-mount shared state),
                    DecodeBudget, TableBudget, FrameCache
    policy.py       FetchPolicy: the only place deciding what/how much/in what order to fetch;
                    Demand, LinkEstimate
    tables.py       TableStore: verified chunk tables on disk, keyed by chunk_digest
    source.py       BlobSource, FileSource, CountingSource (every byte counted once), LayerStats

A mount makes one :class:`FetchContext`, one :class:`ReadSettings`, calls
:func:`open_layer` per layer descriptor, :meth:`Layer.start` each layer with
its background nursery, and reads through :meth:`Layer.read`.
"""

from lazyfs.fetch.context import (
    DEFAULT_DECODE_BUDGET,
    DEFAULT_READ_TIMEOUT,
    MAX_MOUNT_TABLE_BYTES,
    DecodeBudget,
    FetchContext,
    FrameCache,
    ReadSettings,
    TableBudget,
)
from lazyfs.fetch.files import Layer, SeekableFile
from lazyfs.fetch.frames import FrameStore
from lazyfs.fetch.opener import OpenedLayer, open_layer, prefetch_all
from lazyfs.fetch.plain import PlainFile
from lazyfs.fetch.policy import DEFAULT_MERGE_BYTES, Demand, FetchAhead, FetchPolicy, LinkEstimate
from lazyfs.fetch.profile import (
    MAX_PROFILE_BYTES,
    MEDIA_TYPE_PROFILE,
    Profile,
    ProfileRecorder,
    ProfileReplay,
    RecordingLayer,
    dump_profile,
    parse_profile,
)
from lazyfs.fetch.source import BlobSource, CountingSource, FileSource, LayerStats
from lazyfs.fetch.tables import TableStore
from lazyfs.fetch.verity_tail import VerityTail, open_verity_tail

__all__ = [
    "DEFAULT_DECODE_BUDGET",
    "DEFAULT_MERGE_BYTES",
    "DEFAULT_READ_TIMEOUT",
    "MAX_MOUNT_TABLE_BYTES",
    "MAX_PROFILE_BYTES",
    "MEDIA_TYPE_PROFILE",
    "BlobSource",
    "CountingSource",
    "DecodeBudget",
    "Demand",
    "FetchAhead",
    "FetchContext",
    "FetchPolicy",
    "FileSource",
    "FrameCache",
    "FrameStore",
    "Layer",
    "LayerStats",
    "LinkEstimate",
    "OpenedLayer",
    "PlainFile",
    "Profile",
    "ProfileRecorder",
    "ProfileReplay",
    "ReadSettings",
    "RecordingLayer",
    "SeekableFile",
    "TableBudget",
    "TableStore",
    "VerityTail",
    "dump_profile",
    "open_layer",
    "open_verity_tail",
    "parse_profile",
    "prefetch_all",
]
