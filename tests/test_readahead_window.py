"""The FUSE readahead window: the kernel's own 128 KiB while frames are
missing (a larger one makes the kernel read ahead into frames nobody asked
for, and each is a fetch), ``--readahead`` once every frame is cached: at
once on a warm mount, after the last fetch on a cold one. A window below the
kernel's applies from the start."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pytest
from support.blobtools import make_blob
from support.mount import Mounter
from support.registry import push_descriptors

from lazyfs.mount import kernel as kmount

pytestmark = pytest.mark.e2e

FRAME = 64 << 10
RAW = random.Random(5).randbytes(2 << 20)  # 32 frames


def window_kb(mountpoint: Path) -> int:
    device = kmount.device_of(str(mountpoint))
    assert device is not None
    return int(Path(f"/sys/class/bdi/{device}/read_ahead_kb").read_text())


def wait_window(mountpoint: Path, want: int, seconds: float = 10.0) -> int:
    deadline = time.monotonic() + seconds
    while (got := window_kb(mountpoint)) != want and time.monotonic() < deadline:
        time.sleep(0.1)
    return got


def pread(path: Path, size: int, offset: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)


def test_cold_mount_keeps_the_kernels_window_until_every_frame_is_cached(mounter: Mounter, registry):
    blob = make_blob(RAW, FRAME)
    ref = push_descriptors(registry, "readahead", [(blob.data, blob.descriptor)])
    m = mounter(ref, "--no-prefetch", "--no-profile", "--readahead", "2MiB")
    # The first frame (read at mount) is cached, the other 31 are not.
    assert pread(m.layer(0), 4096, FRAME) == RAW[FRAME : FRAME + 4096]
    time.sleep(1.5)
    assert window_kb(m.dir) == 128
    assert m.stats()["frames_fetched"] < 32
    assert pread(m.layer(0), len(RAW) + 1, 0) == RAW
    assert wait_window(m.dir, 2048) == 2048

    # Warm: the same cache, every frame there: the window is raised at once.
    warm = mounter(ref, "--no-prefetch", "--no-profile", "--readahead", "2MiB", cache_dir=m.cache_dir)
    assert wait_window(warm.dir, 2048, seconds=3.0) == 2048
    assert warm.stats()["frames_fetched"] == 0


def test_a_window_below_the_kernels_applies_from_the_start(mounter: Mounter, registry):
    blob = make_blob(RAW, FRAME)
    ref = push_descriptors(registry, "readahead-small", [(blob.data, blob.descriptor)])
    m = mounter(ref, "--no-prefetch", "--no-profile", "--readahead", "16KiB")
    assert window_kb(m.dir) == 16
