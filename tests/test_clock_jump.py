"""The clock jumping under a live mount (issue 17).

The daemon runs under libfaketime (preloaded into ``lazyerofs mount``, so
its forked daemon has it), which moves the clock the daemon sees while
readers go through the kernel (EROFS + overlay over the FUSE layer files);
the machine's own clock is never touched. The registry wants bearer tokens
from a token server, so token expiry meets the jumps too.

What each clock drives in the daemon: CLOCK_MONOTONIC (``time.monotonic``,
``trio.current_time``) times read deadlines, retries and back-off, token
and redirect expiry, the link estimate and profile recording; the wall
clock (``time.time``) stamps the FUSE files' mtime (once, at mount), cache
entries' atime/mtime (LRU order) and the age of stale temp files, and log
lines. Every read must stay exact or EIO, none past its deadline, and after
each jump the daemon must be alive and serve every file exactly.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from support import soak
from support.registry import PASSWORD, USERNAME, TokenRegistry

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

DAY = soak.DAY


@pytest.fixture
def faketime() -> str:
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse") or shutil.which("docker-registry") is None:
        pytest.skip("needs root, /dev/fuse and docker-registry")
    library = soak.faketime_library()
    if library is None:
        pytest.skip("needs libfaketime (Debian package faketime) to move only the daemon's clock")
    return library


def test_wall_and_monotonic_clock_jumps_under_readers_give_exact_bytes_or_eio_and_the_daemon_recovers(
    faketime: str, token_registry: TokenRegistry, tmp_path: Path
):
    image = soak.build_image(
        token_registry, tmp_path / "image", "clock", files=40, max_size=1 << 20, credentials=(USERNAME, PASSWORD)
    )
    issued = token_registry.token_server
    plan = {"wall": [DAY, -DAY], "both": [DAY]}
    r = soak.run_clock_jump(
        token_registry.host, image, tmp_path, library=faketime, plan=plan, seconds=4.0, lead=1.0, read_timeout=3.0,
        cache_size="2MiB", tokens_issued=lambda: issued.issued,
    )  # fmt: skip
    for kind, mount in r["mounts"].items():
        assert mount["preloaded"], kind  # the daemon really ran under libfaketime
        assert len(mount["jumps"]) == len(plan[kind]), kind
        for jump in mount["jumps"]:
            where = (kind, jump["from_s"], jump["to_s"])
            during = jump["during"]
            assert jump["alive"], where
            assert jump["readers_finished"], where
            assert during["reads"] > 0, where
            assert during["wrong"] == 0, (where, during["wrong_samples"])
            assert during["overruns"] == 0, (where, during["overrun_samples"])
            assert jump["after"]["exact"] == len(image.files), (where, jump["after"])
            assert jump["stat_changed_count"] == 0, (where, jump["stat_changed"])
            # The jump reached the daemon: it stamps cache entries with its clock.
            assert jump["seen_offset_s"] is not None and abs(jump["seen_offset_s"] - jump["to_s"]) < 120, where
        assert mount["leftovers"] == [] and mount["umount_rc"] == 0, kind
    wall = r["mounts"]["wall"]
    # Token lifetimes run on the monotonic clock: a wall-clock jump neither
    # expires the token (no new one was needed) nor keeps a dead one alive.
    assert wall["tokens_at_mount"] >= 1
    assert [j["tokens_issued"] for j in wall["jumps"]] == [wall["tokens_at_mount"]] * 2
    # A day on the monotonic clock outlives the token: the daemon got a new
    # one (and the reads after the jump, checked above, used it).
    both = r["mounts"]["both"]
    assert both["jumps"][0]["tokens_issued"] > both["tokens_at_mount"]
