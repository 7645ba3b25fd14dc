"""Startup profiles without a network: the schema and its caps, hostile
input, recording, and the replay scheduler driven against fake frame stores."""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass, field

import pytest
import trio
import trio.testing

from lazyfs.errors import FetchError, FormatError, IntegrityError
from lazyfs.fetch import Demand, LinkEstimate
from lazyfs.fetch import profile as prof
from lazyfs.fetch.profile import (
    MAX_PROFILE_BYTES,
    MAX_PROFILE_FRAMES,
    MEDIA_TYPE_PROFILE,
    DemandReads,
    Profile,
    ProfileLayer,
    ProfileRecorder,
    ProfileReplay,
    RecordingLayer,
    ReplayTarget,
    dump_profile,
    parse_profile,
)
from lazyfs.oci.referrers import artifact_manifest, referrers_tag

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64
D3 = "sha256:" + "3" * 64


def doc(layers: list[dict], **extra: object) -> dict:
    return {"schema": "lazyerofs.profile", "version": 1, "layers": layers, **extra}


def raw(d: object) -> bytes:
    return json.dumps(d).encode()


# ------------------------------------------------------------------ schema


def test_profile_round_trips_through_dump_and_parse():
    p = Profile(
        (ProfileLayer(D1, (3, 0, 7), (0, 5, 120), 4096, 8), ProfileLayer(D2, (), (), 65536, 2)),
        image=D3,
        created="2024-05-01T12:00:00Z",
    )
    back = parse_profile(dump_profile(p))
    assert back == p
    assert back.frame_total == 3


def test_parse_keeps_a_frame_once_at_its_first_time_and_ignores_unknown_keys():
    p = parse_profile(raw(doc([{"digest": D1, "frames": [[4, 1], [2, 3], [4, 9]], "future": 1}], later={"x": 1})))
    assert p.layers[0].frames == (4, 2) and p.layers[0].times_ms == (1, 3)


@pytest.mark.parametrize(
    "data, message",
    [
        (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),  # nesting that would blow the stack
        (b"\xff\xfe not json", "not valid JSON"),
        (raw([1, 2]), "not a JSON object"),
        (raw({"schema": "something.else", "version": 1, "layers": []}), "not a lazyerofs profile"),
        (raw(doc([], version=2)), "version 2 is not supported"),
        (raw({"schema": "lazyerofs.profile", "version": True, "layers": []}), "not supported"),
        (raw(doc("nope")), "'layers' must be a list"),
        (raw(doc([{"digest": "sha256:../../etc", "frames": []}])), "digest"),
        (raw(doc([{"digest": D1, "frames": []}, {"digest": D1, "frames": []}])), "listed twice"),
        (raw(doc([{"digest": D1, "frames": [[-1, 0]]}])), "frame must be an integer"),
        (raw(doc([{"digest": D1, "frames": [[True, 0]]}])), "frame must be an integer"),
        (raw(doc([{"digest": D1, "frames": [[1.5, 0]]}])), "frame must be an integer"),
        (raw(doc([{"digest": D1, "frames": [[1 << 60, 0]]}])), "frame must be an integer"),
        (raw(doc([{"digest": D1, "frames": [[1]]}])), "[frame, milliseconds]"),
        (raw(doc([{"digest": D1, "frames": [[1, -5]]}])), "milliseconds"),
        (b'{"schema":"lazyerofs.profile","version":1,"layers":[{"digest":"' + D1.encode() + b'","frames":[[1,NaN]]}]}', "milliseconds"),
        (b'{"schema":"lazyerofs.profile","version":1,"layers":[{"digest":"' + D1.encode() + b'","frames":[[1,1e999]]}]}', "milliseconds"),
        (b'{"schema":"lazyerofs.profile","version":1,"layers":[{"digest":"' + D1.encode() + b'","frames":[[' + b"9" * 5000 + b',0]]}]}', "not valid JSON"),
        (raw(doc([{"digest": D1, "frames": [], "chunk_size": 0}])), "chunk_size"),
        (raw(doc([], image="latest")), "image"),
    ],
)
def test_parse_refuses_hostile_input_with_a_clear_error(data: bytes, message: str):
    with pytest.raises(FormatError) as err:
        parse_profile(data, name="hostile.json")
    assert message in str(err.value) and "hostile.json" in str(err.value)


def test_parse_refuses_a_profile_over_the_size_cap_before_parsing_it():
    data = raw(doc([{"digest": D1, "frames": []}], pad="x" * MAX_PROFILE_BYTES))
    with pytest.raises(FormatError, match=r"over the .*-byte limit"):
        parse_profile(data)


def test_parse_refuses_more_frames_than_the_cap():
    per = MAX_PROFILE_FRAMES // 2 + 1
    layers = [{"digest": d, "frames": [[i, 0] for i in range(per)]} for d in (D1, D2)]
    with pytest.raises(FormatError, match=f"more than {MAX_PROFILE_FRAMES} frames"):
        parse_profile(raw(doc(layers)).replace(b" ", b""))


def test_parse_refuses_too_many_layers():
    layers = [{"digest": f"sha256:{n:064x}", "frames": []} for n in range(prof.MAX_PROFILE_LAYERS + 1)]
    with pytest.raises(FormatError, match="layers, over the limit"):
        parse_profile(raw(doc(layers)))


# ------------------------------------------------------------------ recording


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Table:
    frame_count: int
    chunk_size: int = 1000
    compressed: int = 100

    @property
    def uncompressed_size(self) -> int:
        return self.frame_count * self.chunk_size

    def span(self, i: int) -> tuple[int, int]:
        return i * self.compressed, (i + 1) * self.compressed

    def frames_for(self, offset: int, size: int) -> range:
        end = min(offset + size, self.uncompressed_size)
        return range(offset // self.chunk_size, (end - 1) // self.chunk_size + 1)


@dataclass
class Desc:
    digest: str


@dataclass
class ReadLayer:
    table: Table | None
    desc: Desc
    reads: list[tuple[int, int]] = field(default_factory=list)
    marker: str = "inner"

    @property
    def frames_total(self) -> int:
        return self.table.frame_count if self.table else 0

    @property
    def size(self) -> int:
        return self.table.uncompressed_size + 500 if self.table else 10

    async def read(self, offset: int, size: int) -> bytes:
        self.reads.append((offset, size))
        return b"x" * size


def test_recorder_keeps_frames_in_first_read_order_with_ms_since_mount():
    clock = Clock()
    rec = ProfileRecorder([(D1, 1000, 10), (D2, 0, 0)], clock=clock)
    seekable = RecordingLayer(ReadLayer(Table(10), Desc(D1)), 0, rec)
    plain = RecordingLayer(ReadLayer(None, Desc(D2)), 1, rec)

    async def main() -> None:
        clock.now += 0.005
        await seekable.read(5500, 10)  # frame 5
        clock.now += 0.020
        await seekable.read(1999, 2001)  # frames 1, 2, 3
        await seekable.read(5000, 1)  # frame 5 again: its first time stays
        await seekable.read(10_100, 50)  # the dm-verity tail: no frame
        await plain.read(0, 10)

    trio.run(main)
    p = rec.profile(image=D3)
    assert [(layer.digest, layer.frames, layer.times_ms) for layer in p.layers] == [(D1, (5, 1, 2, 3), (5, 25, 25, 25))]
    assert p.layers[0].chunk_size == 1000 and p.layers[0].frame_count == 10
    assert seekable.marker == "inner" and seekable.wrapped.reads[-1] == (10_100, 50)  # passed through
    assert set(rec.touched(0)) == {1, 2, 3, 5}
    assert parse_profile(dump_profile(p)) == p


def test_recorder_stops_at_the_frame_cap_and_says_so(monkeypatch):
    monkeypatch.setattr(prof, "MAX_PROFILE_FRAMES", 3)
    rec = ProfileRecorder([(D1, 1000, 10)], clock=Clock())
    rec.touch(0, range(0, 5))
    p = rec.profile()
    assert p.layers[0].frames == (0, 1, 2) and p.truncated


# ------------------------------------------------------------------ replay


class FakeStore:
    """A frame store: ``frames`` takes ``delay`` seconds, notes its calls."""

    def __init__(self, log: list, name: int, *, cached: set[int] = frozenset(), delay: float = 0.0, fail: bool = False) -> None:
        self.log = log
        self.name = name
        self.cached = set(cached)
        self.delay = delay
        self.fail = fail
        self.in_flight = 0

    def known_present(self, i: int) -> bool:
        return i in self.cached

    async def is_cached(self, i: int) -> bool:
        await trio.lowlevel.checkpoint()
        return i in self.cached

    async def frames(self, frames: range) -> list[bytes]:
        self.log.append((self.name, frames))
        self.in_flight += 1
        try:
            await trio.sleep(self.delay)
            if self.fail:
                raise FetchError("registry gone")
            self.cached.update(frames)
            return [b""] * len(frames)
        finally:
            self.in_flight -= 1


def profile_of(*layers: tuple[str, list[tuple[int, int]]]) -> Profile:
    return Profile(tuple(ProfileLayer(d, tuple(f for f, _ in fs), tuple(t for _, t in fs)) for d, fs in layers))


def run_replay(replay: ProfileReplay) -> None:
    async def main() -> None:
        await replay.run()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_replay_ignores_unknown_layers_and_frames_past_a_layers_end():
    log: list = []
    targets = [ReplayTarget(D1, Table(4), FakeStore(log, 0)), None]
    p = profile_of((D1, [(1, 0), (9, 1), (3, 2)]), (D2, [(0, 0), (1, 0)]))
    replay = ProfileReplay(p, targets, Demand(), LinkEstimate(), max_requests=1)
    run_replay(replay)
    assert log == [(0, range(1, 2)), (0, range(3, 4))]
    stats = replay.statistics(lambda i: ())
    assert stats["frames"] == 2 and stats["ignored"] == 3 and stats["fetched"] == 2 and stats["done"]


def test_replay_follows_recorded_order_across_layers_and_merges_neighbours():
    log: list = []
    # Layer 1's frames were read between layer 0's frames 7 and 1; 8-10
    # follow 7 soon enough in the recording to join its request, 11 does not.
    far = [(100 + 2 * k, 31 + k) for k in range(prof.REPLAY_MERGE_WINDOW)]  # no neighbours
    p = profile_of((D1, [(7, 0), (8, 20), (9, 21), (10, 22), (1, 30), *far, (11, 2000)]), (D2, [(5, 10), (3, 25)]))
    targets = [ReplayTarget(D1, Table(400), FakeStore(log, 0)), ReplayTarget(D2, Table(20), FakeStore(log, 1))]
    replay = ProfileReplay(p, targets, Demand(), LinkEstimate(), max_requests=1)
    run_replay(replay)
    assert log[:4] == [(0, range(7, 11)), (1, range(5, 6)), (1, range(3, 4)), (0, range(1, 2))]
    assert (0, range(11, 12)) in log  # 11 was too far back in the recording to ride with 10


def test_replay_merges_no_more_than_run_bytes_and_skips_cached_frames():
    log: list = []
    store = FakeStore(log, 0, cached={2})
    targets = [ReplayTarget(D1, Table(10, compressed=100), store)]
    p = profile_of((D1, [(0, 0), (1, 1), (2, 2), (3, 3), (4, 4), (5, 5), (6, 6)]))
    replay = ProfileReplay(p, targets, Demand(), LinkEstimate(), run_bytes=250, max_requests=1)
    run_replay(replay)
    assert log == [(0, range(0, 2)), (0, range(3, 5)), (0, range(5, 7))]
    assert replay.counts.cached == 1


def test_replay_steps_aside_while_an_on_demand_read_is_in_progress():
    log: list = []
    demand = Demand()
    targets = [ReplayTarget(D1, Table(10), FakeStore(log, 0, delay=1.0))]
    replay = ProfileReplay(profile_of((D1, [(i, i) for i in range(6)])), targets, demand, LinkEstimate(), max_requests=1, run_bytes=100)
    seen: list[tuple[float, int]] = []

    async def main() -> None:
        async with trio.open_nursery() as n:
            n.start_soon(replay.run)
            await trio.sleep(1.5)  # request 0 done, request 1 in flight
            demand.begin()
            started = len(log)
            await trio.sleep(10)
            seen.append((trio.current_time(), len(log) - started))
            demand.end()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert seen[0][1] == 0  # nothing new went out in the 10 s the read was waiting
    assert len(log) == 6


def test_replay_goes_on_for_a_read_waiting_on_its_frames_and_steps_aside_for_any_other():
    log: list = []
    reads = DemandReads()
    store = FakeStore(log, 0, delay=1.0)
    targets = [ReplayTarget(D1, Table(10), store)]
    replay = ProfileReplay(
        profile_of((D1, [(i, i) for i in range(8)])), targets, Demand(), LinkEstimate(), max_requests=1, run_bytes=100, reads=reads
    )
    counts: list[int] = []

    async def main() -> None:
        async with trio.open_nursery() as n:
            n.start_soon(replay.run)
            await trio.sleep(0.5)  # frame 0 in flight
            token = reads.begin(0, range(0, 1))  # a read waits for the replay's frame 0
            await trio.sleep(2)
            counts.append(len(log))  # went on: frames 1 and 2 went out meanwhile
            reads.end(token)
            token = reads.begin(0, range(9, 10))  # a read of a frame the replay is not fetching
            before = len(log)
            await trio.sleep(10)
            counts.append(len(log) - before)
            reads.end(token)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert counts == [3, 0]
    assert len(log) == 8


def test_replay_keeps_several_requests_in_flight_and_follows_the_link():
    log: list = []
    store = FakeStore(log, 0, delay=0.5)
    targets = [ReplayTarget(D1, Table(200, compressed=1 << 20), store)]
    p = profile_of((D1, [(i, 0) for i in range(0, 200, 2)]))  # no neighbours: one frame a request
    link = LinkEstimate()
    replay = ProfileReplay(p, targets, Demand(), link)
    peaks: list[int] = []

    async def main() -> None:
        async with trio.open_nursery() as n:
            n.start_soon(replay.run)
            for _ in range(200):
                await trio.sleep(0.1)
                peaks.append(store.in_flight)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert peaks[0] == prof.REPLAY_INITIAL_REQUESTS  # link not measured yet
    # Each 1 MiB request takes 0.5 s and the round trip is 0.4 s: at the
    # rate measured, 1 + ceil(0.4 * goodput / 1 MiB) requests cover it.
    link.rtt = 0.4
    replay2 = ProfileReplay(p, [ReplayTarget(D1, Table(200, compressed=1 << 20), FakeStore([], 0, delay=0.5))], Demand(), link)
    replay2.counts.requests, replay2.counts.bytes, replay2._busy = 10, 10 << 20, 1.25  # 8 MiB/s
    assert replay2.target_requests() == 1 + 4
    link.rtt = 100.0
    assert replay2.target_requests() == prof.REPLAY_MAX_REQUESTS


def test_replay_gives_up_after_repeated_failures_and_never_raises():
    log: list = []
    targets = [ReplayTarget(D1, Table(50), FakeStore(log, 0, fail=True))]
    replay = ProfileReplay(profile_of((D1, [(i, i * 10) for i in range(0, 50, 2)])), targets, Demand(), LinkEstimate(), max_requests=1)
    run_replay(replay)
    assert len(log) == prof.REPLAY_MAX_FAILURES and replay.stopped and replay.counts.failed == prof.REPLAY_MAX_FAILURES


def test_replay_statistics_count_used_and_wasted_frames():
    log: list = []
    targets = [ReplayTarget(D1, Table(10), FakeStore(log, 0, cached={9}))]
    replay = ProfileReplay(profile_of((D1, [(0, 0), (4, 1), (6, 2), (9, 3)])), targets, Demand(), LinkEstimate())
    run_replay(replay)
    stats = replay.statistics(lambda i: {0, 6, 7})
    assert (stats["fetched"], stats["cached"], stats["used"], stats["wasted"]) == (3, 1, 2, 1)


# ------------------------------------------------------------------ artifacts


def test_artifact_manifest_refers_to_its_subject_and_carries_small_blobs_inline():
    blob = dump_profile(profile_of((D1, [(0, 0)])))
    subject = {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": D3, "size": 123, "extra": "dropped"}
    m = json.loads(artifact_manifest(MEDIA_TYPE_PROFILE, blob, subject, annotations={"a": "b"}))
    assert m["artifactType"] == MEDIA_TYPE_PROFILE and m["subject"] == {k: subject[k] for k in ("mediaType", "digest", "size")}
    assert m["config"]["mediaType"] == "application/vnd.oci.empty.v1+json" and m["config"]["size"] == 2
    layer = m["layers"][0]
    assert layer["digest"] == "sha256:" + hashlib.sha256(blob).hexdigest() and base64.b64decode(layer["data"]) == blob
    big = json.loads(artifact_manifest(MEDIA_TYPE_PROFILE, blob, subject, embed_limit=len(blob) - 1))
    assert "data" not in big["layers"][0]
    assert referrers_tag(D3) == "sha256-" + "3" * 64


def test_referrers_tag_refuses_a_digest_that_is_not_one():
    with pytest.raises(FormatError):
        referrers_tag("sha256:../../x")


def test_errors_from_a_bad_frame_are_the_stores_and_count_as_failed():
    log: list = []

    class Bad(FakeStore):
        async def frames(self, frames: range) -> list[bytes]:
            self.log.append(frames)
            raise IntegrityError("frame 0: checksum mismatch")

    targets = [ReplayTarget(D1, Table(4), Bad(log, 0))]
    replay = ProfileReplay(profile_of((D1, [(0, 0)])), targets, Demand(), LinkEstimate())
    run_replay(replay)
    assert replay.counts.failed == 1 and replay.counts.fetched == 0
