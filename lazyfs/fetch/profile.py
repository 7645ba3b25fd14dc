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
from collections import deque
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from lazyfs.errors import FormatError, LazyErofsError
from lazyfs.fetch.policy import FetchPolicy
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

# Replay: requests in flight before the link is measured, and the bounds
# (once it is, the bytes in flight follow its bandwidth-delay product).
REPLAY_INITIAL_REQUESTS = 4
REPLAY_MIN_REQUESTS = 2
REPLAY_MAX_REQUESTS = 32
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


class Pulse:
    """Wakes every task waiting at the moment it fires (a trio.Event that
    renews itself): for "something changed, look again" loops."""

    def __init__(self) -> None:
        self._event = trio.Event()

    def fire(self) -> None:
        self._event.set()
        self._event = trio.Event()

    async def wait(self) -> None:
        await self._event.wait()


class DemandReads:
    """The on-demand reads in progress, by the frames they need (fed by
    :class:`RecordingLayer`): a replay steps aside only for a read that
    needs a frame the replay is not already fetching."""

    def __init__(self) -> None:
        self._reads: dict[int, tuple[int, range | None]] = {}
        self._next = 0
        self._changed = Pulse()

    def begin(self, layer: int, frames: range | None) -> int:
        """A read of ``frames`` of layer ``layer`` starts (None: not frames,
        e.g. a plain layer or the dm-verity tail); returns its token."""
        self._next += 1
        self._reads[self._next] = (layer, frames)
        self._changed.fire()
        return self._next

    def end(self, token: int) -> None:
        self._reads.pop(token, None)
        self._changed.fire()

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

    def expect(self, frames: Iterable[int]) -> None: ...


class _Demand(Protocol):
    active: int

    async def wait_idle(self) -> None: ...


class _Link(Protocol):
    rtt: float | None

    def bdp(self) -> int: ...


@dataclass
class ReplayTarget:
    """One layer a replay may fetch for: its digest, table and frame store.
    ``background``: the store is a real :class:`~lazyfs.fetch.frames.FrameStore`
    (``frames(priority=)``, ``in_flight(i)``), not a stand-in."""

    digest: str
    table: _Table
    store: _Store
    background: bool = False


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
    rest_frames: int = 0  # frames of the rest of the image fetched after the profile
    rest_requests: int = 0
    rest_bytes: int = 0
    resyncs: int = 0  # times the replay jumped to where a reader was


class ProfileReplay:
    """Fetch a profile's frames ahead of the reads that will want them, and
    (``rest``) then the rest of the image: the background fetcher of a mount.

    Frames go in recorded order (all layers merged by time); a frame is
    skipped if already cached; neighbouring frames recorded within the next
    :data:`REPLAY_MERGE_WINDOW` entries join its request, up to ``run_bytes``
    compressed (by default the policy's size for the measured link).

    How much is in flight follows the link (:meth:`FetchPolicy.background_window`):
    once the link is measured, enough compressed bytes to cover its
    bandwidth-delay product plus one request; before that,
    :meth:`target_requests` requests. An on-demand read always goes first:
    while one waits for a frame that is neither present nor in one of the
    replay's requests, the replay keeps only the bandwidth-delay product in
    flight (so at most about one of its requests is ahead of that read on
    the link; with the link unmeasured, or without ``reads``, nothing new
    goes out), and its fetches yield memory to readers. Such a read also
    shows where the workload is: when it wants a frame further on in the
    recording, the replay jumps there (what it skipped comes in a second
    pass), and with ``rest`` the frames just after it are fetched before
    the rest of the image.

    The rest of the image (``rest``): the first frame of every layer (where
    EROFS keeps its superblock and most metadata), then frames next to the
    recent misses, then everything else, layer by layer. A failed request is
    logged and skipped; after :data:`REPLAY_MAX_FAILURES` in a row the
    replay stops.
    """

    def __init__(
        self,
        profile: Profile,
        targets: Sequence[ReplayTarget | None],
        demand: _Demand,
        link: _Link,
        *,
        timeout: float = 60.0,
        run_bytes: int | None = None,
        max_requests: int = REPLAY_MAX_REQUESTS,
        reads: DemandReads | None = None,
        rest: bool = False,
        policy: FetchPolicy | None = None,
        rest_after: trio.Event | None = None,
    ) -> None:
        self.targets = list(targets)
        self.demand = demand
        self.reads = reads
        self._in_flight_frames: set[tuple[int, int]] = set()
        self.link = link
        self.timeout = timeout
        self.fixed_run_bytes = run_bytes
        self.policy = policy or FetchPolicy()
        self.rest = rest
        self.rest_after = rest_after  # the rest waits for this (the mount being ready)
        self.max_requests = max(1, max_requests)
        self.counts = _Counts(fetched_frames=[set() for _ in self.targets])
        self.order = self._plan(profile)
        self.counts.planned = len(self.order)
        for i, target in enumerate(self.targets):
            if target is not None and target.background:
                # The store stops guessing past what the profile lists.
                target.store.expect(f for layer, f in self.order if layer == i)
        self._pos = {entry: n for n, entry in enumerate(self.order)}
        self._taken: set[tuple[int, int]] = set()
        self._next = 0
        self._second_pass = False
        self._noted: set[tuple[int, int]] = set()
        self._near: deque[tuple[int, int]] = deque()
        self._rest = self._rest_order()
        self.in_flight = 0
        self.bytes_in_flight = 0
        self.peak_in_flight = 0
        self.peak_bytes_in_flight = 0
        self._wake = Pulse()
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

    def _rest_order(self) -> Iterator[tuple[int, int]]:
        """The rest of the image: every layer's first frame (metadata), then all, layer by layer."""
        layers = [(i, t) for i, t in enumerate(self.targets) if t is not None]
        for i, t in layers:
            if t.table.frame_count:
                yield i, 0
        for i, t in layers:
            for f in range(1, t.table.frame_count):
                yield i, f

    # -- scheduling ------------------------------------------------------------

    def run_bytes(self) -> int:
        """Compressed bytes a request may hold (at least one frame)."""
        if self.fixed_run_bytes is not None:
            return self.fixed_run_bytes
        return self.policy.background_run_bytes(self.link)  # type: ignore[arg-type]

    def target_requests(self) -> int:
        """Requests to keep in flight while the link is not measured: enough
        to cover one round trip at the rate this replay has been getting,
        within the bounds."""
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

    def _may_start(self, waiting: bool) -> bool:
        """True if one more request may go out now (``waiting``: an on-demand
        read waits for a frame nobody is fetching)."""
        if self.in_flight >= self.max_requests:
            return False
        window = self.policy.background_window(self.link, self.run_bytes(), demand_waiting=waiting)  # type: ignore[arg-type]
        if window is None:
            return not waiting and self.in_flight < self.target_requests()
        return self.bytes_in_flight < window

    async def _missing(self, i: int, f: int, *, count: bool = True) -> bool:
        target = self.targets[i]
        assert target is not None
        store = target.store
        if target.background and store.in_flight(f):  # type: ignore[attr-defined]
            return False  # a reader's fetch already has it
        if store.known_present(f) or await store.is_cached(f):
            if count:
                self.counts.cached += 1
            return False
        return True

    async def next_run(self) -> tuple[int, range] | None:
        """The next request: a missing frame in recorded order and the
        missing neighbours after it that the profile wants soon; once the
        profile is done (and with ``rest``), the rest of the image."""
        while True:
            run = await self._next_profile_run()
            if run is not None:
                return run
            if self._second_pass or not self.counts.resyncs:
                break
            # Frames skipped when the replay jumped ahead: one more pass.
            self._second_pass = True
            self._next = 0
        if self.rest:
            if self.rest_after is not None:
                await self.rest_after.wait()
            return await self._next_rest_run()
        return None

    async def _next_profile_run(self) -> tuple[int, range] | None:
        run_bytes = self.run_bytes()
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
                if table.span(last + 1)[1] - start > run_bytes:
                    break
                self._taken.add(nxt)
                if not await self._missing(*nxt):
                    break
                last += 1
            return i, range(first, last + 1)
        return None

    async def _next_rest_run(self) -> tuple[int, range] | None:
        run_bytes = self.run_bytes()
        while True:
            entry = self._near.popleft() if self._near else next(self._rest, None)
            if entry is None:
                return None
            if entry in self._taken:
                continue
            self._taken.add(entry)
            i, first = entry
            if not await self._missing(i, first, count=False):
                continue
            target = self.targets[i]
            assert target is not None
            table = target.table
            start = table.span(first)[0]
            last = first
            while last + 1 < table.frame_count:
                nxt = (i, last + 1)
                if nxt in self._taken or table.span(last + 1)[1] - start > run_bytes:
                    break
                self._taken.add(nxt)
                if not await self._missing(*nxt, count=False):
                    break
                last += 1
            return i, range(first, last + 1)

    async def run(self) -> None:
        """Replay to the end (or until it gives up); returns when the last request is done."""
        self.started = trio.current_time()
        try:
            async with trio.open_nursery() as nursery:
                if self.reads is not None:
                    nursery.start_soon(self._watch_reads)
                while self.stopped is None:
                    await self._slot()
                    if self.stopped is not None:
                        break
                    run = await self.next_run()
                    if run is None:
                        break
                    i, frames = run
                    target = self.targets[i]
                    assert target is not None
                    size = target.table.span(frames[-1])[1] - target.table.span(frames[0])[0]
                    in_profile = (i, frames[0]) in self._pos
                    self._begin(size)
                    nursery.start_soon(self._fetch, i, frames, size, in_profile)
                while self.in_flight:
                    await self._wake.wait()
                nursery.cancel_scope.cancel()  # the watcher
        finally:
            self.finished = trio.current_time()
        c = self.counts
        log.info(
            "background fetch done in %.3fs: profile %d frames fetched, %d cached, %d failed, %d ignored; "
            "rest %d frames in %d requests; peak %d requests, %d bytes in flight",
            self.finished - self.started, c.fetched, c.cached, c.failed, c.ignored,
            c.rest_frames, c.rest_requests, self.peak_in_flight, self.peak_bytes_in_flight,
        )

    async def _watch_reads(self) -> None:
        assert self.reads is not None
        while True:
            await self.reads.wait_changed()
            self._wake.fire()

    async def _slot(self) -> None:
        """Wait until one more request may go out: room in the window the
        link allows, which shrinks while an on-demand read waits for a frame
        the replay is not fetching."""
        while self.stopped is None:
            if self.reads is None:
                waiting = self.demand.active > 0
                if waiting and self.policy.background_window(self.link, self.run_bytes(), demand_waiting=True) is None:  # type: ignore[arg-type]
                    await self.demand.wait_idle()
                    continue
            else:
                waiting = self._foreign_miss()
            if self._may_start(waiting):
                return
            await self._wake.wait()

    def _foreign_miss(self) -> bool:
        """True if an on-demand read in progress waits for a frame that is
        neither known present nor in one of the replay's requests: that read
        fetches it itself, and gets the link. Such a frame also tells where
        the workload is (:meth:`_note_miss`)."""
        assert self.reads is not None
        foreign = False
        for layer, frames in self.reads.active():
            target = self.targets[layer] if 0 <= layer < len(self.targets) else None
            if frames is None or target is None:
                foreign = True
                continue
            for f in frames:
                if (layer, f) not in self._in_flight_frames and not target.store.known_present(f):
                    foreign = True
                    self._note_miss(layer, f)
                    break
        return foreign

    def _note_miss(self, layer: int, f: int) -> None:
        """A reader missed frame ``f`` of ``layer``: jump the profile there if
        it is further on, and (``rest``) put the frames after it first."""
        if (layer, f) in self._noted:
            return
        self._noted.add((layer, f))
        pos = self._pos.get((layer, f))
        if pos is not None and pos > self._next:
            self._next = pos
            self.counts.resyncs += 1
        if self.rest:
            target = self.targets[layer]
            assert target is not None
            table = target.table
            start = table.span(f)[0]
            near = []
            k = f + 1
            while k < table.frame_count and table.span(k)[1] - start <= 2 * self.run_bytes():
                near.append((layer, k))
                k += 1
            self._near.extendleft(reversed(near))

    def _begin(self, size: int) -> None:
        if self.in_flight == 0:
            self._busy_since = trio.current_time()
        self.in_flight += 1
        self.bytes_in_flight += size
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        self.peak_bytes_in_flight = max(self.peak_bytes_in_flight, self.bytes_in_flight)

    def _end(self, size: int) -> None:
        self.in_flight -= 1
        self.bytes_in_flight -= size
        if self.in_flight == 0 and self._busy_since is not None:
            self._busy += trio.current_time() - self._busy_since
            self._busy_since = None
        self._wake.fire()

    async def _fetch(self, i: int, frames: range, size: int, in_profile: bool) -> None:
        target = self.targets[i]
        assert target is not None
        c = self.counts
        mine = {(i, f) for f in frames}
        self._in_flight_frames |= mine
        try:
            with trio.fail_after(self.timeout):
                if target.background:
                    await target.store.fill(frames, priority="background")  # type: ignore[attr-defined]
                else:
                    await target.store.frames(frames)
        except (LazyErofsError, trio.TooSlowError) as exc:
            c.failed += len(frames)
            self._failures_in_row += 1
            log.warning("background fetch: frames %d-%d of layer %d not fetched: %s", frames[0], frames[-1], i, exc or "timed out")
            if self._failures_in_row >= REPLAY_MAX_FAILURES and self.stopped is None:
                self.stopped = f"{self._failures_in_row} requests failed in a row"
                log.warning("background fetch stopped: %s", self.stopped)
        else:
            self._failures_in_row = 0
            if in_profile:
                c.fetched += len(frames)
                c.requests += 1
                c.bytes += size
                c.fetched_frames[i].update(frames)
            else:
                c.rest_frames += len(frames)
                c.rest_requests += 1
                c.rest_bytes += size
        finally:
            self._in_flight_frames -= mine
            self._end(size)

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
            "peak_bytes_in_flight": self.peak_bytes_in_flight,
            "resyncs": c.resyncs,
            "rest_frames": c.rest_frames,
            "rest_requests": c.rest_requests,
            "rest_bytes": c.rest_bytes,
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
            out.append(ReplayTarget(layer.desc.digest, table, store, background=True))
        else:
            out.append(None)
    return out
