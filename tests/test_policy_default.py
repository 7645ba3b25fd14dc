"""The background fetch of the rest of an image (issue 12, item 2): after
the profile (or without one), every layer's metadata frame first, then the
frames next to recent misses, then the rest, layer by layer; it steps aside
for an on-demand read, and ``--prefetch`` runs it in the mount's background
fetcher (the same scheduler as the profile replay)."""

from __future__ import annotations

import trio
import trio.testing
from test_replay_throughput import DemandReadsIdle, Store, Table, measured_link

from lazyfs.fetch import FetchPolicy, LinkEstimate
from lazyfs.fetch.profile import DemandReads, Profile, ProfileLayer, ProfileReplay, ReplayTarget

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64
MB = 1_000_000


def run(main) -> None:
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_rest_of_the_image_comes_metadata_first_then_layer_by_layer_in_requests_of_neighbours():
    a, b = Store(delay=0.1), Store(delay=0.1)
    targets = [ReplayTarget(D1, Table(10), a), None, ReplayTarget(D2, Table(4), b)]
    replay = ProfileReplay(Profile(()), targets, DemandReadsIdle(), LinkEstimate(), rest=True, run_bytes=300_000, max_requests=1)

    async def main() -> None:
        await replay.run()

    run(main)
    # Frame 0 of each layer alone first (their neighbours are taken by the next requests).
    assert a.requests[0] == range(0, 3) and b.requests[0] == range(0, 3)
    assert a.present == set(range(10)) and b.present == set(range(4))
    assert replay.counts.rest_frames == 14 and replay.counts.planned == 0


def test_rest_follows_the_profile_and_skips_what_it_fetched():
    a = Store(delay=0.1)
    profile = Profile((ProfileLayer(D1, (5, 6), (0, 1)),))
    replay = ProfileReplay(profile, [ReplayTarget(D1, Table(8), a)], DemandReadsIdle(), LinkEstimate(), rest=True, run_bytes=300_000, max_requests=1)

    async def main() -> None:
        await replay.run()

    run(main)
    assert a.requests[0] == range(5, 7)  # the profile first
    fetched = [f for r in a.requests for f in r]
    assert sorted(fetched) == list(range(8))  # then the rest, each frame once
    assert replay.counts.fetched == 2 and replay.counts.rest_frames == 6


def test_frames_next_to_a_miss_come_before_the_rest_of_the_image():
    a = Store(delay=0.5)
    reads = DemandReads()
    replay = ProfileReplay(
        Profile(()), [ReplayTarget(D1, Table(100), a)], DemandReadsIdle(), LinkEstimate(), rest=True,
        run_bytes=200_000, max_requests=1, reads=reads,
    )

    async def main() -> None:
        async with trio.open_nursery() as n:
            n.start_soon(replay.run)
            await trio.sleep(0.7)  # frame 0 done, the next request out
            token = reads.begin(0, range(50, 51))  # a reader misses frame 50
            await trio.sleep(0.01)
            a.present.add(50)
            reads.end(token)

    run(main)
    assert a.requests[2][0] == 51  # right after the miss, before 3, 4, ...
    assert sorted(f for r in a.requests for f in r) == [f for f in range(100) if f != 50]


def test_rest_of_the_image_steps_aside_for_a_read_waiting_on_the_link():
    a = Store(delay=0.2)
    link = measured_link(0.1, 10 * MB)
    reads = DemandReads()
    replay = ProfileReplay(
        Profile(()), [ReplayTarget(D1, Table(1000), a)], DemandReadsIdle(), link, rest=True, run_bytes=100_000, reads=reads
    )
    seen: dict[str, int] = {}

    async def main() -> None:
        async with trio.open_nursery() as n:
            n.start_soon(replay.run)
            await trio.sleep(1.05)
            seen["free"] = replay.bytes_in_flight
            token = reads.begin(0, range(999, 1000))
            await trio.sleep(0.25)  # the requests that were out are done by now
            seen["waiting"] = replay.bytes_in_flight
            reads.end(token)

    run(main)
    waiting = FetchPolicy().background_window(link, 100_000, demand_waiting=True)
    assert waiting is not None
    assert seen["waiting"] <= waiting + 100_000 < seen["free"]
    # Within one request's transfer: what is ahead of the read on the link
    # beyond the round trip is at most about one request.
    assert waiting - link.bdp() <= 100_000
