"""One image, opened for mounting: its manifest and its layers' files.

``open_image`` resolves a reference (or takes one descriptor plus a local
blob or a blob URL), opens every layer through :func:`lazyfs.fetch.open_layer`
(all chunk tables in one round trip) and returns an :class:`Image`. What a
layer is (seekable, plain) is the fetch side's business: here every layer is
a :class:`lazyfs.fetch.Layer`, and ``stats`` and ``write_touch_log`` read
only what that protocol offers.

Startup profiles (:mod:`lazyfs.fetch.profile`): every layer's reads are
recorded (served as ``.lazyerofs/profile.json``, what ``lazyerofs profile
save`` reads), and a profile, looked up in the registry while the chunk
tables are fetched or read from a local file, is replayed in the background
as soon as both are there: never on the way to the mount being ready.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from lazyfs.errors import FormatError, MountError
from lazyfs.mount.state import redact_url

# The fetch side, the registry client (httpx) and trio are imported by
# open_image: read_stats (``lazyerofs stats``) needs none of them.
if TYPE_CHECKING:
    import trio

    from cache import ChunkCache
    from lazyfs.fetch import BlobSource, FetchContext, Layer, OpenedLayer, ReadSettings
    from lazyfs.fetch.offload import FetchWorkers
    from lazyfs.fetch.profile import DemandReads, ProfileRecorder, ProfileReplay
    from lazyfs.oci import Reference, RegistryClient, RegistryOptions

__all__ = [
    "PROFILE_PATH",
    "STATS_PATH",
    "Image",
    "ImageLayer",
    "ProfileOptions",
    "ProfileSession",
    "open_image",
    "read_profile_record",
    "read_stats",
    "stats",
    "write_touch_log",
]

log = logging.getLogger(__name__)

# Where the FUSE tree serves ``stats`` (see fuse.py), relative to the mount point.
STATS_PATH = ".lazyerofs/stats.json"
# Where it serves what this mount recorded: a startup profile (see fuse.py).
PROFILE_PATH = ".lazyerofs/profile.json"
# A registry lookup of the profile that takes longer than this is dropped.
PROFILE_LOOKUP_TIMEOUT = 30.0
# The counters every layer keeps, summed over the image in ``stats``.
_COUNTERS = ("bytes_fetched", "requests", "frames_fetched", "cache_hits", "cache_misses", "verify_failures", "read_errors")


@dataclass(frozen=True)
class ImageLayer:
    """A layer as the mount shows it: its file, blob digest and dm-verity sidecar."""

    file: Layer
    digest: str
    sidecar: bytes | None


@dataclass(frozen=True)
class ProfileOptions:
    """Which startup profile a mount replays: ``file`` if given, else the
    one found in the registry if ``lookup``, else none. Reads are recorded
    either way."""

    lookup: bool = True
    file: str | None = None


@dataclass
class ProfileSession:
    """A mount's startup profile: what it records, and what it replays."""

    recorder: ProfileRecorder | None = None
    image_digest: str | None = None
    source: str | None = None  # where the replayed profile came from
    error: str | None = None  # why no profile is replayed, if one was looked for
    replay: ProfileReplay | None = None
    reads: DemandReads | None = None  # on-demand reads in progress (the replay steps aside)
    # Set by the daemon once the mount is ready: the rest of the image
    # (--prefetch) waits for it, so it never competes with the mount's own reads.
    mounted: trio.Event = field(default_factory=lambda: _event())

    def record(self) -> bytes:
        """The profile recorded so far, as JSON (``.lazyerofs/profile.json``)."""
        from lazyfs.fetch.profile import Profile, dump_profile

        if self.recorder is None:
            return dump_profile(Profile((), image=self.image_digest))
        return dump_profile(self.recorder.profile(image=self.image_digest, created=_now()))

    def statistics(self) -> dict[str, object]:
        out: dict[str, object] = {"source": self.source}
        if self.error is not None:
            out["error"] = self.error
        if self.replay is not None and self.recorder is not None:
            out.update(self.replay.statistics(self.recorder.touched))
        return out


def _event() -> trio.Event:
    import trio

    return trio.Event()


def _now() -> str:
    import time

    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass
class Image:
    manifest: bytes
    context: FetchContext | None = None  # what the layers share (chunk-table counters)
    layers: list[ImageLayer] = field(default_factory=list)  # bottom first; skipped layers left out
    profile: ProfileSession = field(default_factory=ProfileSession)

    @property
    def files(self) -> list[Layer]:
        return [layer.file for layer in self.layers]


async def open_image(
    ref: str,
    *,
    descriptor_file: str | None,
    registry: RegistryOptions,
    settings: ReadSettings,
    cache: ChunkCache,
    stack: contextlib.AsyncExitStack,
    mark: Callable[[str], None] = lambda _step: None,
    profile: ProfileOptions = ProfileOptions(lookup=False),
    offload: FetchWorkers | None = None,
) -> Image:
    """Open the image ``ref`` names; its sources stay open until ``stack`` closes.

    With ``descriptor_file``, ``ref`` is one blob: a local file if it exists,
    else a URL, and the manifest shown is a one-layer one built around the
    descriptor (no registry to look a profile up in).

    The layers' reads are recorded (``image.profile``); the startup profile
    ``profile`` asks for is looked up alongside the chunk tables and
    replayed in a background task that lives until ``stack`` closes. A
    profile never fails a mount: a missing or bad one is a warning.
    ``offload``: fetch workers (running) that carry out the layers' frame fetches.

    Raises:
        FormatError: a bad descriptor, or no EROFS layer to mount.
        RegistryError, FetchError, IntegrityError: from resolving and opening.
    """
    import trio

    from lazyfs.fetch import FetchContext, FileSource, TableStore, open_layer
    from lazyfs.format import load_descriptor, parse_descriptor
    from lazyfs.oci import RegistryClient, open_url_blob, parse_reference

    descs: list[tuple[Mapping[str, object], BlobSource]]
    client: RegistryClient | None = None
    reference: Reference | None = None
    image_digest: str | None = None
    if descriptor_file:
        desc = load_descriptor(descriptor_file)
        if os.path.exists(ref):
            source: BlobSource = FileSource(ref)
            stack.callback(source.close)
        else:
            size = parse_descriptor(desc, name=descriptor_file).size
            source = await stack.enter_async_context(open_url_blob(ref, size=size, options=registry))
        manifest = json.dumps({"schemaVersion": 2, "layers": [desc]}, indent=2).encode()
        descs = [(desc, source)]
    else:
        client = await stack.enter_async_context(RegistryClient(registry))
        reference = parse_reference(ref)
        # A mount needs the layers only: the config would cost a round trip.
        resolved = await client.resolve(reference, with_config=False)
        manifest = resolved.manifest_bytes
        image_digest = resolved.digest
        descs = [(d, client.blob(reference, d)) for d in resolved.layers]
    mark("resolve")
    session = ProfileSession(image_digest=image_digest)
    layers_ready = trio.Event()
    opened_image: list[Image] = []
    if profile.file is not None or (profile.lookup and client is not None) or settings.prefetch:
        # Lives until the stack closes (cancelled first, then the client closes).
        background = await stack.enter_async_context(trio.open_nursery())
        stack.callback(background.cancel_scope.cancel)
        background.start_soon(
            _profile_task, session, profile, client, reference, layers_ready, opened_image, settings
        )
    # One per mount: limiter, demand, link estimate, budgets, and the
    # verified chunk tables kept beside the chunk cache.
    context = FetchContext(table_store=TableStore(cache.root), offload=offload)
    opened: list[OpenedLayer | None] = [None] * len(descs)

    async def open_one(i: int) -> None:
        desc, source = descs[i]
        opened[i] = await open_layer(i, desc, source, cache, settings, context)

    # One round trip for all chunk tables, not one per layer.
    async with trio.open_nursery() as nursery:
        for i in range(len(descs)):
            nursery.start_soon(open_one, i)
    mark("tables")
    from lazyfs.fetch.profile import DemandReads, ProfileRecorder, RecordingLayer

    kept = [result.layer for result in opened if result is not None]
    if not kept:
        raise FormatError(f"{redact_url(ref)}: no EROFS layers to mount")
    session.reads = DemandReads()
    session.recorder = ProfileRecorder(
        [(layer.desc.digest, _chunk_size(layer), layer.frames_total) for layer in kept]
    )
    image = Image(manifest, context, profile=session)
    n = 0
    for result in opened:
        if result is not None:
            file = RecordingLayer(result.layer, n, session.recorder, session.reads)
            image.layers.append(ImageLayer(file, result.layer.desc.digest, result.sidecar))  # type: ignore[arg-type]
            n += 1
    opened_image.append(image)
    layers_ready.set()
    return image


def _chunk_size(layer: Layer) -> int:
    table = getattr(layer, "table", None)
    return int(table.chunk_size) if table is not None else 0


async def _profile_task(
    session: ProfileSession,
    options: ProfileOptions,
    client: RegistryClient | None,
    reference: Reference | None,
    layers_ready: trio.Event,
    opened_image: list[Image],
    settings: ReadSettings,
) -> None:
    """Find the startup profile (a file, or the registry), then replay it
    once the layers are open, followed by the rest of the image when
    ``settings.prefetch`` (without a profile: the rest alone). Never
    raises: a profile is only a hint."""
    import trio

    from lazyfs.fetch.profile import (
        MAX_PROFILE_BYTES,
        MEDIA_TYPE_PROFILE,
        Profile,
        ProfileReplay,
        parse_profile,
        replay_targets,
    )
    from lazyfs.oci.referrers import find_artifact

    parsed = Profile(())
    source = None
    try:
        if options.file is None and not (options.lookup and client is not None):
            pass  # no profile wanted: only the rest of the image
        elif options.file is not None:
            source = f"file {options.file}"
            data = await trio.to_thread.run_sync(_read_capped, options.file, MAX_PROFILE_BYTES)
        else:
            assert client is not None and reference is not None and session.image_digest is not None
            with trio.fail_after(PROFILE_LOOKUP_TIMEOUT):
                artifact = await find_artifact(
                    client, reference, session.image_digest, MEDIA_TYPE_PROFILE, max_size=MAX_PROFILE_BYTES
                )
            if artifact is None:
                log.info("no startup profile in the registry for %s", session.image_digest)
                session.error = "none found in the registry"
            else:
                source = f"registry ({artifact.via}) {artifact.digest}"
                data = artifact.data
        if source is not None:
            parsed = await trio.to_thread.run_sync(lambda: parse_profile(data, name=f"startup profile from {source}"))
    except trio.TooSlowError:
        session.error = f"registry lookup took over {PROFILE_LOOKUP_TIMEOUT:g}s"
        log.warning("startup profile not used: %s", session.error)
        source, parsed = None, Profile(())
    except Exception as exc:  # any failure: mount on without the hint
        session.error = str(exc) or repr(exc)
        log.warning("startup profile not used: %s", session.error)
        source, parsed = None, Profile(())
    if source is None and not settings.prefetch:
        return
    await layers_ready.wait()
    image = opened_image[0]
    assert image.context is not None
    raw = [getattr(file, "wrapped", file) for file in image.files]
    replay = ProfileReplay(
        parsed, replay_targets(raw), image.context.demand, image.context.link, timeout=settings.read_timeout,
        reads=session.reads, rest=settings.prefetch, policy=settings.policy(), rest_after=session.mounted,
    )
    session.source = source
    session.replay = replay
    log.info(
        "startup profile from %s: replaying %d frames (%d ignored: unknown layers or past a layer's end)%s",
        source, replay.counts.planned, replay.counts.ignored, ", then the rest of the image" if settings.prefetch else "",
    )
    try:
        await replay.run()
    except Exception:  # a bug in a hint must not take the mount down
        log.exception("startup profile replay failed")


def _read_capped(path: str, limit: int) -> bytes:
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    return data  # parse_profile refuses it if it is over the limit


def stats(
    layers: Sequence[Layer],
    cache: ChunkCache,
    context: FetchContext | None = None,
    profile: ProfileSession | None = None,
) -> dict[str, object]:
    """The live counters of a mount (``.lazyerofs/stats.json``): totals over
    the layers, each layer's own, the chunk cache's and, given the mount's
    ``context``, how many chunk tables were fetched and how many read back
    from the table store; given its ``profile``, what the startup profile
    replay did (frames planned, fetched, used, wasted...)."""
    total = dict.fromkeys(_COUNTERS, 0)
    per_layer = []
    for i, layer in enumerate(layers):
        s = layer.stats
        entry: dict[str, object] = {"index": i, "digest": layer.desc.digest, "size": layer.size}
        for k in _COUNTERS:
            total[k] += getattr(s, k)
            entry[k] = getattr(s, k)
        if layer.frames_total:  # a plain layer has no frames to count
            entry["frames_present"] = layer.frames_present
            entry["frames_total"] = layer.frames_total
            entry["blob_size"] = layer.desc.size
        entry["verified"] = layer.verified
        per_layer.append(entry)
    out: dict[str, object] = dict(total)
    out["layers"] = per_layer
    if context is not None:
        out["chunk_tables"] = {"fetched": context.tables_fetched, "cached": context.tables_cached}
        link = context.link
        out["link"] = {
            "rtt_s": None if link.rtt is None else round(link.rtt, 4),
            "bandwidth_bps": None if link.bandwidth is None else int(link.bandwidth * 8),
            "bdp_bytes": link.bdp(),
            "filling": link.filling,
        }
        if context.offload is not None:
            out["fetch_workers"] = context.offload.statistics()
    if profile is not None:
        out["profile"] = profile.statistics()
    with contextlib.suppress(Exception):
        out["cache"] = asdict(cache.statistics())
    return out


def read_stats(mountpoint: str) -> dict[str, object]:
    """What ``stats`` said last, read through the mount (``lazyerofs stats``).

    Raises:
        MountError: not a lazyerofs mount, not ours to read, or its daemon gone.
    """
    path = os.path.join(mountpoint, STATS_PATH)
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError as exc:
        raise MountError(f"{mountpoint}: not a lazyerofs mount (no {path})") from exc
    except PermissionError as exc:
        raise MountError(f"{mountpoint}: permission denied: the mount is root's only unless mounted with --allow-other") from exc
    except OSError as exc:
        raise MountError(f"{mountpoint}: cannot read stats: {exc.strerror} (daemon gone? try 'lazyerofs umount')") from exc
    if not isinstance(data, dict):
        raise MountError(f"{mountpoint}: {path} is not a JSON object")
    return data


def read_profile_record(mountpoint: str) -> bytes:
    """What a live mount has recorded as its startup profile (``lazyerofs profile save``).

    Raises:
        MountError: not a lazyerofs mount (or one without profiles), not ours
            to read, or its daemon gone.
    """
    path = os.path.join(mountpoint, PROFILE_PATH)
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError as exc:
        if os.path.exists(os.path.join(mountpoint, STATS_PATH)):
            raise MountError(f"{mountpoint}: this mount's daemon records no startup profile (remount it)") from exc
        raise MountError(f"{mountpoint}: not a lazyerofs mount (no {path})") from exc
    except PermissionError as exc:
        raise MountError(f"{mountpoint}: permission denied: the mount is root's only unless mounted with --allow-other") from exc
    except OSError as exc:
        raise MountError(f"{mountpoint}: cannot read {PROFILE_PATH}: {exc.strerror} (daemon gone? try 'lazyerofs umount')") from exc


def write_touch_log(path: str, layers: Sequence[Layer]) -> None:
    """Write which frames were fetched, per framed layer (for benchmarks):
    digest, frame indexes and their blob spans (sorted), frame count."""
    data = []
    for layer in layers:
        if not layer.frames_total:
            continue
        touched = sorted(layer.touched())
        data.append(
            {
                "digest": layer.desc.digest,
                "frames": [i for i, _start, _end in touched],
                "spans": [[start, end] for _i, start, end in touched],
                "frame_count": layer.frames_total,
            }
        )
    Path(path).write_text(json.dumps(data))
