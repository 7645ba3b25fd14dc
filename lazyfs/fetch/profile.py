"""Startup profiles: which frames a mount read first, recorded, parsed and replayed.

A mount records, per layer blob digest, every frame of the layer's image in
the order it was first read (on-demand reads only: what a workload needed,
not what was fetched ahead for it) with the time since the mount opened.
Saved (``lazyerofs profile save``) and pushed next to the image
(``lazyerofs profile push``), it lets the next cold mount fetch those frames
in that order before they are asked for, with enough requests in flight to
fill the link, stepping aside for every on-demand read.

Schema, version 1 (JSON, UTF-8, at most :data:`MAX_PROFILE_BYTES`)::

    {
      "schema": "lazyerofs.profile",      required, exactly this
      "version": 1,                       required; another version is refused
      "image": "sha256:<hex>" | null,     the image manifest recorded from (informational)
      "created": "2024-05-01T12:00:00Z",  when it was saved (informational)
      "truncated": false,                 true if the recording hit MAX_PROFILE_FRAMES
      "layers": [                         one entry per layer blob, bottom first
        {
          "digest": "sha256:<hex>",       the layer blob's digest: the key a mount matches on
          "chunk_size": 4194304,          informational: uncompressed bytes per frame
          "frame_count": 52,              informational: frames of the layer's image
          "frames": [[0, 0], [7, 12], [1, 340]]
                                          [frame index, milliseconds since the mount opened],
                                          in first-read order, each frame once
        }
      ]
    }

Unknown keys are ignored (a later version 1 writer may add some). A profile
is a hint and never trusted: :func:`parse_profile` caps its size, layers and
frames and refuses what is malformed; a replay ignores layers the image
does not have and frames past a layer's end, and every frame it fetches is
verified exactly as an on-demand one (it only asks the layer's
:class:`~lazyfs.fetch.frames.FrameStore` for frames, it never serves a
byte). So a hostile or stale profile can cost bandwidth, never correctness.

Pieces: :class:`Profile` (+ :func:`parse_profile`, :func:`dump_profile`),
:class:`ProfileRecorder` and :class:`RecordingLayer` (the recording side),
:class:`ProfileReplay` (the scheduler) and :class:`DemandReads` (the
on-demand reads in progress it steps aside for).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from lazyfs.errors import FormatError, LazyErofsError
from lazyfs.format.digest import check_digest

__all__ = [
    "MAX_PROFILE_BYTES",
    "MAX_PROFILE_FRAMES",
    "MAX_PROFILE_LAYERS",
    "MEDIA_TYPE_PROFILE",
    "PROFILE_SCHEMA",
    "PROFILE_VERSION",
    "DemandReads",
    "Profile",
    "ProfileLayer",
    "ProfileRecorder",
    "ProfileReplay",
    "RecordingLayer",
    "dump_profile",
    "parse_profile",
]

log = logging.getLogger(__name__)

PROFILE_SCHEMA = "lazyerofs.profile"
PROFILE_VERSION = 1
# The OCI artifactType (and blob media type) of a pushed profile.
MEDIA_TYPE_PROFILE = "application/vnd.lazyerofs.profile.v1+json"
# Caps on what a profile may hold: a hint never costs more than this to read.
MAX_PROFILE_BYTES = 4 << 20
MAX_PROFILE_LAYERS = 1024
# About 18 bytes a frame in JSON: the largest recording still fits the byte cap.
MAX_PROFILE_FRAMES = 200_000
_MAX_FRAME_INDEX = 1 << 40  # far past any real table (MAX_TABLE_SIZE bounds those)
_MAX_MS = 1 << 40

# Replay: requests in flight before the link is measured, and the bounds.
REPLAY_INITIAL_REQUESTS = 4
REPLAY_MIN_REQUESTS = 2
REPLAY_MAX_REQUESTS = 16
# Compressed bytes per replay request (at least one frame): an on-demand read
# queued behind the requests in flight waits for little more than one of them.
REPLAY_RUN_BYTES = 1 << 20
# How far ahead in the recorded order a neighbouring frame may be pulled
# into the same request.
REPLAY_MERGE_WINDOW = 64
# Consecutive failed requests after which a replay gives up (a registry gone).
REPLAY_MAX_FAILURES = 3


# ----------------------------------------------------------------- the schema


@dataclass(frozen=True)
class ProfileLayer:
    """One layer's frames in first-read order, with milliseconds since mount."""

    digest: str
    frames: tuple[int, ...]
    times_ms: tuple[int, ...]
    chunk_size: int | None = None
    frame_count: int | None = None


@dataclass(frozen=True)
class Profile:
    layers: tuple[ProfileLayer, ...]
    image: str | None = None
    created: str | None = None
    truncated: bool = False

    @property
    def frame_total(self) -> int:
        return sum(len(layer.frames) for layer in self.layers)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": PROFILE_SCHEMA,
            "version": PROFILE_VERSION,
            "image": self.image,
            "created": self.created,
            "truncated": self.truncated,
            "layers": [
                {
                    "digest": layer.digest,
                    "chunk_size": layer.chunk_size,
                    "frame_count": layer.frame_count,
                    "frames": [[f, t] for f, t in zip(layer.frames, layer.times_ms, strict=True)],
                }
                for layer in self.layers
            ],
        }


def dump_profile(profile: Profile) -> bytes:
    """The profile as JSON bytes (compact: frames one pair each)."""
    return json.dumps(profile.to_dict(), separators=(",", ":")).encode() + b"\n"


def _int(value: object, what: str, *, low: int = 0, high: int = _MAX_FRAME_INDEX) -> int:
    # bool is an int in Python, not in JSON's meaning here.
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value < high:
        raise FormatError(f"{what} must be an integer in [{low}, {high}), not {str(value)[:40]!r}")
    return value


def parse_profile(data: bytes, *, name: str = "profile") -> Profile:
    """Parse and check a profile, within the caps; FormatError names what is wrong.

    Nothing here knows the image: unknown layers and out-of-range frames are
    the replay's to ignore. A frame listed twice counts once (its first time).
    """
    if len(data) > MAX_PROFILE_BYTES:
        raise FormatError(f"{name}: {len(data)} bytes, over the {MAX_PROFILE_BYTES}-byte limit of a profile")
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as exc:  # RecursionError: hostile nesting
        raise FormatError(f"{name}: not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(doc, dict):
        raise FormatError(f"{name}: not a JSON object")
    if doc.get("schema") != PROFILE_SCHEMA:
        raise FormatError(f"{name}: not a lazyerofs profile (schema {str(doc.get('schema'))[:60]!r})")
    version = doc.get("version")
    if version != PROFILE_VERSION or isinstance(version, bool):
        raise FormatError(f"{name}: profile version {str(version)[:20]} is not supported (this lazyerofs reads {PROFILE_VERSION})")
    image = doc.get("image")
    if image is not None:
        image = check_digest(image, what=f"{name}: image")
    created = doc.get("created")
    if created is not None and not (isinstance(created, str) and len(created) <= 64):
        raise FormatError(f"{name}: 'created' must be a short string")
    truncated = doc.get("truncated", False)
    if not isinstance(truncated, bool):
        raise FormatError(f"{name}: 'truncated' must be true or false")
    layers_doc = doc.get("layers")
    if not isinstance(layers_doc, list):
        raise FormatError(f"{name}: 'layers' must be a list")
    if len(layers_doc) > MAX_PROFILE_LAYERS:
        raise FormatError(f"{name}: {len(layers_doc)} layers, over the limit of {MAX_PROFILE_LAYERS}")
    layers: list[ProfileLayer] = []
    total = 0
    seen_digests: set[str] = set()
    for n, entry in enumerate(layers_doc):
        where = f"{name}: layers[{n}]"
        if not isinstance(entry, dict):
            raise FormatError(f"{where} is not an object")
        digest = check_digest(entry.get("digest"), what=f"{where}: digest")
        if digest in seen_digests:
            raise FormatError(f"{where}: layer {digest} is listed twice")
        seen_digests.add(digest)
        chunk_size = entry.get("chunk_size")
        if chunk_size is not None:
            chunk_size = _int(chunk_size, f"{where}: chunk_size", low=1)
        frame_count = entry.get("frame_count")
        if frame_count is not None:
            frame_count = _int(frame_count, f"{where}: frame_count")
        pairs = entry.get("frames")
        if not isinstance(pairs, list):
            raise FormatError(f"{where}: 'frames' must be a list")
        total += len(pairs)
        if total > MAX_PROFILE_FRAMES:
            raise FormatError(f"{name}: more than {MAX_PROFILE_FRAMES} frames")
        frames: list[int] = []
        times: list[int] = []
        seen: set[int] = set()
        for k, pair in enumerate(pairs):
            if not (isinstance(pair, list) and len(pair) == 2):
                raise FormatError(f"{where}: frames[{k}] must be [frame, milliseconds]")
            frame = _int(pair[0], f"{where}: frames[{k}] frame")
            ms = pair[1]
            if isinstance(ms, float) and math.isfinite(ms):
                ms = int(ms)
            ms = _int(ms, f"{where}: frames[{k}] milliseconds", high=_MAX_MS)
            if frame in seen:
                continue
            seen.add(frame)
            frames.append(frame)
            times.append(ms)
        layers.append(ProfileLayer(digest, tuple(frames), tuple(times), chunk_size, frame_count))
    return Profile(tuple(layers), image=image, created=created, truncated=truncated)


# ----------------------------------------------------------------- recording


class _FramedFile(Protocol):
    """What recording needs of a layer: its chunk table (seekable layers only)."""

    @property
    def table(self) -> Any: ...


class ProfileRecorder:
    """First reads of each layer's frames, in order, with ms since ``t0``.

    ``layers`` are (blob digest, chunk size, frame count) per layer index;
    a layer with no frames (plain) is never recorded.
    """

    def __init__(self, layers: Sequence[tuple[str, int, int]], *, clock: Callable[[], float] = time.monotonic) -> None:
        self._layers = list(layers)
        self._clock = clock
        self.t0 = clock()
        # frame -> ms, per layer index; a dict keeps first-insertion order.
        self._first: list[dict[int, int]] = [{} for _ in self._layers]
        self._count = 0
        self.truncated = False

    def touch(self, index: int, frames: range) -> None:
        """Note a read of ``frames`` of layer ``index`` (new frames only)."""
        first = self._first[index]
        ms = None
        for f in frames:
            if f in first:
                continue
            if self._count >= MAX_PROFILE_FRAMES:
                self.truncated = True
                return
            if ms is None:
                ms = min(round((self._clock() - self.t0) * 1000), _MAX_MS - 1)
            first[f] = ms
            self._count += 1

    def touched(self, index: int) -> Collection[int]:
        """Frames of layer ``index`` read so far."""
        return self._first[index].keys()

    def profile(self, *, image: str | None = None, created: str | None = None) -> Profile:
        layers = []
        for (digest, chunk_size, frame_count), first in zip(self._layers, self._first, strict=True):
            if not frame_count:
                continue
            layers.append(ProfileLayer(digest, tuple(first), tuple(first.values()), chunk_size, frame_count))
        return Profile(tuple(layers), image=image, created=created, truncated=self.truncated)


class DemandReads:
    """The on-demand reads in progress, by the frames they need (fed by
    :class:`RecordingLayer`): a replay steps aside only for a read that
    needs a frame the replay is not already fetching."""

    def __init__(self) -> None:
        self._reads: dict[int, tuple[int, range | None]] = {}
        self._next = 0
        self._changed = trio.Event()

    def begin(self, layer: int, frames: range | None) -> int:
        """A read of ``frames`` of layer ``layer`` starts (None: not frames,
        e.g. a plain layer or the dm-verity tail); returns its token."""
        self._next += 1
        self._reads[self._next] = (layer, frames)
        self._signal()
        return self._next

    def end(self, token: int) -> None:
        self._reads.pop(token, None)
        self._signal()

    def _signal(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_changed(self) -> None:
        await self._changed.wait()

    def active(self) -> list[tuple[int, range | None]]:
        return list(self._reads.values())


class RecordingLayer:
    """A layer whose reads are noted in a :class:`ProfileRecorder` (and, given
    ``reads``, in a :class:`DemandReads` while they run); everything else is
    the wrapped layer's (attribute access is passed through)."""

    def __init__(self, layer: Any, index: int, recorder: ProfileRecorder, reads: DemandReads | None = None) -> None:
        self._layer = layer
        self._index = index
        self._recorder = recorder
        self._reads = reads
        self._table = getattr(layer, "table", None) if layer.frames_total else None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._layer, name)

    @property
    def size(self) -> int:
        return int(self._layer.size)

    @property
    def wrapped(self) -> Any:
        return self._layer

    async def read(self, offset: int, size: int) -> bytes:
        table = self._table
        frames = None
        if table is not None and size > 0 and 0 <= offset < table.uncompressed_size:
            frames = table.frames_for(offset, size)
            self._recorder.touch(self._index, frames)
            if offset + size > table.uncompressed_size:
                frames = None  # also the verity tail: not the replay's to know
        if self._reads is None:
            return await self._layer.read(offset, size)
        token = self._reads.begin(self._index, frames)
        try:
            return await self._layer.read(offset, size)
        finally:
            self._reads.end(token)


# ----------------------------------------------------------------- replay


class _Table(Protocol):
    @property
    def frame_count(self) -> int: ...

    def span(self, i: int) -> tuple[int, int]: ...


class _Store(Protocol):
    """The public part of :class:`~lazyfs.fetch.frames.FrameStore` a replay uses."""

    def known_present(self, i: int) -> bool: ...

    async def is_cached(self, i: int) -> bool: ...

    async def frames(self, frames: range) -> list[bytes]: ...


class _Demand(Protocol):
    active: int

    async def wait_idle(self) -> None: ...


class _Link(Protocol):
    rtt: float | None


@dataclass
class ReplayTarget:
    """One layer a replay may fetch for: its digest, table and frame store."""

    digest: str
    table: _Table
    store: _Store


@dataclass
class _Counts:
    planned: int = 0
    ignored: int = 0
    cached: int = 0
    fetched: int = 0
    failed: int = 0
    requests: int = 0
    bytes: int = 0
    fetched_frames: list[set[int]] = field(default_factory=list)


class ProfileReplay:
    """Fetch a profile's frames ahead of the reads that will want them.

    Frames go in recorded order (all layers merged by time); a frame is
    skipped if already cached; neighbouring frames recorded within the next
    :data:`REPLAY_MERGE_WINDOW` entries join its request, up to
    ``run_bytes`` compressed. Before each request the replay waits until no
    on-demand read is in progress, so such a read always goes first; the
    number of requests in flight follows the link: ``1 + rtt * goodput /
    request size`` (the requests it takes to keep the link busy through one
    round trip), between :data:`REPLAY_MIN_REQUESTS` and ``max_requests``.
    A failed request is logged and skipped; after
    :data:`REPLAY_MAX_FAILURES` in a row the replay stops.
    """

    def __init__(
        self,
        profile: Profile,
        targets: Sequence[ReplayTarget | None],
        demand: _Demand,
        link: _Link,
        *,
        timeout: float = 60.0,
        run_bytes: int = REPLAY_RUN_BYTES,
        max_requests: int = REPLAY_MAX_REQUESTS,
        reads: DemandReads | None = None,
    ) -> None:
        self.targets = list(targets)
        self.demand = demand
        self.reads = reads
        self._in_flight_frames: set[tuple[int, int]] = set()
        self.link = link
        self.timeout = timeout
        self.run_bytes = run_bytes
        self.max_requests = max(1, max_requests)
        self.counts = _Counts(fetched_frames=[set() for _ in self.targets])
        self.order = self._plan(profile)
        self.counts.planned = len(self.order)
        self._pos = {entry: n for n, entry in enumerate(self.order)}
        self._taken: set[tuple[int, int]] = set()
        self._next = 0
        self.in_flight = 0
        self.peak_in_flight = 0
        self._lot = trio.lowlevel.ParkingLot()
        self._busy = 0.0
        self._busy_since: float | None = None
        self._failures_in_row = 0
        self.started: float | None = None
        self.finished: float | None = None
        self.stopped: str | None = None  # why it gave up, if it did

    def _plan(self, profile: Profile) -> list[tuple[int, int]]:
        """(layer index, frame) in recorded order; what the image lacks is counted as ignored."""
        by_digest: dict[str, int] = {}
        for i, target in enumerate(self.targets):
            if target is not None:
                by_digest.setdefault(target.digest, i)
        timed: list[tuple[int, int, int, int]] = []
        for layer in profile.layers:
            i = by_digest.get(layer.digest)
            if i is None:
                self.counts.ignored += len(layer.frames)
                continue
            target = self.targets[i]
            assert target is not None
            count = target.table.frame_count
            for f, ms in zip(layer.frames, layer.times_ms, strict=True):
                if f >= count:
                    self.counts.ignored += 1
                    continue
                timed.append((ms, len(timed), i, f))
        timed.sort()
        return [(i, f) for _ms, _seq, i, f in timed]

    # -- scheduling ------------------------------------------------------------

    def target_requests(self) -> int:
        """Requests to keep in flight: enough to cover one round trip at the
        rate this replay has been getting, within the bounds."""
        c = self.counts
        busy = self._busy_time()
        rtt = self.link.rtt
        if rtt is None or c.requests == 0 or busy <= 0 or c.bytes == 0:
            want = REPLAY_INITIAL_REQUESTS
        else:
            goodput = c.bytes / busy
            per_request = c.bytes / c.requests
            want = 1 + math.ceil(rtt * goodput / per_request)
        return max(min(REPLAY_MIN_REQUESTS, self.max_requests), min(want, self.max_requests))

    def _busy_time(self) -> float:
        busy = self._busy
        if self._busy_since is not None:
            busy += trio.current_time() - self._busy_since
        return busy

    async def _missing(self, i: int, f: int) -> bool:
        store = self.targets[i].store  # type: ignore[union-attr]
        if store.known_present(f) or await store.is_cached(f):
            self.counts.cached += 1
            return False
        return True

    async def next_run(self) -> tuple[int, range] | None:
        """The next request: a missing frame in recorded order and the
        missing neighbours after it that the profile wants soon."""
        while self._next < len(self.order):
            entry = self.order[self._next]
            self._next += 1
            if entry in self._taken:
                continue
            self._taken.add(entry)
            i, first = entry
            if not await self._missing(i, first):
                continue
            target = self.targets[i]
            assert target is not None
            table = target.table
            start = table.span(first)[0]
            last = first
            horizon = self._next + REPLAY_MERGE_WINDOW
            while last + 1 < table.frame_count:
                nxt = (i, last + 1)
                pos = self._pos.get(nxt)
                if pos is None or pos >= horizon or nxt in self._taken:
                    break
                if table.span(last + 1)[1] - start > self.run_bytes:
                    break
                self._taken.add(nxt)
                if not await self._missing(*nxt):
                    break
                last += 1
            return i, range(first, last + 1)
        return None

    async def run(self) -> None:
        """Replay to the end (or until it gives up); returns when the last request is done."""
        self.started = trio.current_time()
        try:
            async with trio.open_nursery() as nursery:
                while self.stopped is None:
                    await self._slot()
                    if self.stopped is not None:
                        break
                    run = await self.next_run()
                    if run is None:
                        break
                    self._begin()
                    nursery.start_soon(self._fetch, *run)
        finally:
            self.finished = trio.current_time()
        log.info(
            "profile replay done in %.3fs: %d frames fetched, %d cached, %d failed, %d ignored",
            self.finished - self.started, self.counts.fetched, self.counts.cached, self.counts.failed, self.counts.ignored,
        )

    async def _slot(self) -> None:
        """Wait until no on-demand read needs what the replay is not already
        fetching (without ``reads``: no on-demand read at all), and for a
        free request slot."""
        while True:
            if self.reads is None:
                await self.demand.wait_idle()
            elif self._foreign_miss():
                await self.reads.wait_changed()
                continue
            if self.in_flight < self.target_requests():
                return
            await self._lot.park()

    def _foreign_miss(self) -> bool:
        """True if an on-demand read in progress waits for a frame that is
        neither known present nor in one of the replay's requests: that read
        fetches it itself, and gets the link."""
        assert self.reads is not None
        for layer, frames in self.reads.active():
            target = self.targets[layer] if 0 <= layer < len(self.targets) else None
            if frames is None or target is None:
                return True
            for f in frames:
                if (layer, f) not in self._in_flight_frames and not target.store.known_present(f):
                    return True
        return False

    def _begin(self) -> None:
        if self.in_flight == 0:
            self._busy_since = trio.current_time()
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)

    def _end(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0 and self._busy_since is not None:
            self._busy += trio.current_time() - self._busy_since
            self._busy_since = None
        self._lot.unpark_all()

    async def _fetch(self, i: int, frames: range) -> None:
        target = self.targets[i]
        assert target is not None
        c = self.counts
        mine = {(i, f) for f in frames}
        self._in_flight_frames |= mine
        try:
            with trio.fail_after(self.timeout):
                await target.store.frames(frames)
        except (LazyErofsError, trio.TooSlowError) as exc:
            c.failed += len(frames)
            self._failures_in_row += 1
            log.warning("profile replay: frames %d-%d of layer %d not fetched: %s", frames[0], frames[-1], i, exc or "timed out")
            if self._failures_in_row >= REPLAY_MAX_FAILURES and self.stopped is None:
                self.stopped = f"{self._failures_in_row} requests failed in a row"
                log.warning("profile replay stopped: %s", self.stopped)
        else:
            self._failures_in_row = 0
            c.fetched += len(frames)
            c.requests += 1
            c.bytes += target.table.span(frames[-1])[1] - target.table.span(frames[0])[0]
            c.fetched_frames[i].update(frames)
        finally:
            self._in_flight_frames -= mine
            self._end()

    # -- reporting -------------------------------------------------------------

    @property
    def done(self) -> bool:
        return self.finished is not None

    def statistics(self, touched: Callable[[int], Collection[int]]) -> dict[str, object]:
        """Counters for ``lazyerofs stats``; ``touched(i)``: frames of layer
        ``i`` read on demand so far. ``used`` are frames the replay fetched
        that were then read; ``wasted`` the ones fetched and not (yet) read."""
        c = self.counts
        used = sum(len(fetched & set(touched(i))) for i, fetched in enumerate(c.fetched_frames) if fetched)
        end = self.finished if self.finished is not None else (trio.current_time() if self.started is not None else None)
        return {
            "frames": c.planned,
            "ignored": c.ignored,
            "cached": c.cached,
            "fetched": c.fetched,
            "failed": c.failed,
            "used": used,
            "wasted": c.fetched - used,
            "requests": c.requests,
            "bytes": c.bytes,
            "in_flight": self.in_flight,
            "peak_in_flight": self.peak_in_flight,
            "done": self.done,
            "stopped": self.stopped,
            "seconds": None if self.started is None or end is None else round(end - self.started, 3),
        }


def replay_targets(layers: Iterable[Any]) -> list[ReplayTarget | None]:
    """A :class:`ReplayTarget` per layer that has frames (seekable layers:
    ``.table`` and ``.store``), None for the others."""
    out: list[ReplayTarget | None] = []
    for layer in layers:
        table = getattr(layer, "table", None)
        store = getattr(layer, "store", None)
        if layer.frames_total and table is not None and store is not None:
            out.append(ReplayTarget(layer.desc.digest, table, store))
        else:
            out.append(None)
    return out
