"""A sequential reader inside the frames a replayed startup profile lists is
not fetched ahead past them (issue 14: an optimized image's hot part is read
in order and ends where the profile does; guessing past it only spent the
link). A reader that leaves the profile gets the usual window."""

from __future__ import annotations

import os
from pathlib import Path

from test_cold_pipeline import make, read_sequentially

from lazyfs.fetch import FetchPolicy
from lazyfs.fetch.policy import Stream

KIB = 1 << 10
MIB = 1 << 20


class _Layout:
    frame_count = 64

    def span(self, i: int) -> tuple[int, int]:
        return i * 1000, (i + 1) * 1000

    def raw_length(self, i: int) -> int:
        return MIB


def _stream_at(frame: int, streamed: int) -> Stream:
    return Stream(pos=frame * MIB + MIB // 2, streamed=streamed)


def test_window_inside_the_profile_ends_at_its_first_unlisted_frame() -> None:
    policy = FetchPolicy()
    stream = _stream_at(3, 16 * MIB)
    assert policy.stream_window(stream, _Layout(), MIB) == range(4, 20)
    assert policy.stream_window(stream, _Layout(), MIB, frozenset(range(10))) == range(4, 10)


def test_window_of_a_reader_outside_the_profile_is_the_usual_one() -> None:
    policy = FetchPolicy()
    stream = _stream_at(30, 16 * MIB)
    assert policy.stream_window(stream, _Layout(), MIB, frozenset(range(10))) == range(31, 47)


async def test_sequential_reader_of_the_profiled_frames_fetches_nothing_past_them(tmp_path: Path) -> None:
    chunk = 256 * KIB
    raw = os.urandom(64 * chunk)
    layer, _source = make(tmp_path, raw, chunk, delay=0.01)
    layer.store.expect(range(12))
    assert await read_sequentially(layer, 12 * chunk, 128 * KIB) == raw[: 12 * chunk]
    assert sorted(layer.stats.fetched_frames) == list(range(12))

    # Without a profile the same reader has frames well past 12 fetched ahead.
    other, _ = make(tmp_path / "plain", raw, chunk, delay=0.01)
    assert await read_sequentially(other, 12 * chunk, 128 * KIB) == raw[: 12 * chunk]
    assert max(other.stats.fetched_frames) > 12
