"""The mount side reads layers only through the ``lazyfs.fetch.Layer``
protocol, and the CLI hands the read settings over as typed values."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

from lazyfs import cli
from lazyfs.fetch import FetchAhead, LayerStats
from lazyfs.format import MEDIA_TYPE_PLAIN, LayerDescriptor, parse_descriptor
from lazyfs.mount import MountConfig
from lazyfs.mount.image import stats, write_touch_log


class _Cache:
    def statistics(self) -> object:
        raise RuntimeError("no cache statistics here")  # stats() leaves them out


@dataclass
class FakeLayer:
    """A layer of no class the mount knows: only the protocol's members."""

    name: str
    desc: LayerDescriptor
    frames: int
    fetched: list[tuple[int, int, int]]
    verified: bool = True
    stats: LayerStats = field(default_factory=LayerStats)

    @property
    def size(self) -> int:
        return 1000

    @property
    def frames_total(self) -> int:
        return self.frames

    @property
    def frames_present(self) -> int:
        return len(self.fetched)

    async def read(self, offset: int, size: int) -> bytes:
        return b""

    def start(self, nursery: trio.Nursery) -> None:
        pass

    async def prefetch(self) -> int:
        return 0

    def touched(self) -> list[tuple[int, int, int]]:
        return list(self.fetched)


def _desc(media_type: str, fill: str) -> LayerDescriptor:
    return parse_descriptor({"mediaType": media_type, "digest": "sha256:" + fill * 64, "size": 5000})


def _layers() -> list[FakeLayer]:
    framed = FakeLayer("layer 0", _desc(MEDIA_TYPE_PLAIN, "a"), 4, [(3, 300, 400), (1, 100, 200)])
    framed.stats.bytes_fetched, framed.stats.requests = 200, 2
    plain = FakeLayer("layer 1", _desc(MEDIA_TYPE_PLAIN, "b"), 0, [], verified=False)
    plain.stats.bytes_fetched, plain.stats.requests = 5000, 1
    return [framed, plain]


def test_stats_count_frames_of_any_layer_that_has_them_and_sum_every_layer():
    out = stats(_layers(), _Cache())  # type: ignore[arg-type]
    assert (out["bytes_fetched"], out["requests"]) == (5200, 3)
    framed, plain = out["layers"]  # type: ignore[misc]
    assert (framed["frames_present"], framed["frames_total"], framed["blob_size"]) == (2, 4, 5000)
    assert framed["verified"] is True and framed["digest"] == "sha256:" + "a" * 64
    assert "frames_total" not in plain and plain["verified"] is False
    assert "cache" not in out


def test_the_touch_log_lists_touched_frames_in_order_with_their_blob_spans(tmp_path: Path):
    path = tmp_path / "touch.json"
    write_touch_log(str(path), _layers())
    assert json.loads(path.read_text()) == [
        {"digest": "sha256:" + "a" * 64, "frames": [1, 3], "spans": [[100, 200], [300, 400]], "frame_count": 4}
    ]


@pytest.mark.parametrize(("given", "expected"), [("auto", "auto"), ("1MiB", 1 << 20), ("0", 0)])
def test_mount_passes_fetch_ahead_as_a_size_or_auto(monkeypatch: pytest.MonkeyPatch, given: str, expected: FetchAhead):
    seen: list[MountConfig] = []
    monkeypatch.setattr("lazyfs.cli.mount.run_mount", lambda cfg: seen.append(cfg) or 0)
    assert cli.main(["mount", "--fetch-ahead", given, "--prefetch", "--strict", "reg/app:v1", "/mnt/x"]) == 0
    (cfg,) = seen
    assert cfg.read.fetch_ahead == expected
    assert cfg.read.prefetch and cfg.read.strict and not cfg.read.insecure_skip_verify
