"""Reliability in a short form for CI: the fault soak and the crash loop of
``python -m benchmarks.reliability``, through real FUSE, kernel EROFS and
overlayfs, against a real registry behind the fault proxy.

Every read is checked byte for byte against the source tree (see
``support.soak``): it must be exact or fail (EIO), never wrong or short.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import soak
from support.localregistry import LocalRegistry
from support.netproxy import FAULT_KINDS

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

# Higher than the full run's rates, so every kind fires within 45 s. The
# trickle has a test of its own (below): it pins its frame for good.
SOAK_KINDS = [kind for kind in FAULT_KINDS if kind != "trickle"]
SHORT_FAULTS = {kind: (0.02 if kind == "stall" else 0.05) for kind in SOAK_KINDS}


@pytest.fixture(scope="module")
def soak_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRegistry]:
    """A registry of this module's own: the restart test stops and starts it."""
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse") or shutil.which("docker-registry") is None:
        pytest.skip("needs root, /dev/fuse and docker-registry")
    reg = LocalRegistry(tmp_path_factory.mktemp("soak-registry") / "storage")
    try:
        reg.start()
        yield reg
    finally:
        reg.stop()


@pytest.fixture(scope="module")
def image(soak_registry: LocalRegistry, tmp_path_factory: pytest.TempPathFactory) -> soak.SoakImage:
    return soak.build_image(soak_registry, tmp_path_factory.mktemp("soak-image"), "soak", files=50, max_size=1 << 20)


def _no_wrong(reads: dict) -> None:
    assert reads["wrong"] == 0, reads["wrong_samples"]
    assert reads["overruns"] == 0, reads["overrun_samples"]


def test_fault_soak_serves_only_exact_bytes_or_eio_and_all_exact_once_faults_stop(
    soak_registry: LocalRegistry, image: soak.SoakImage, tmp_path: Path
):
    r = soak.run_soak(
        soak_registry, image, tmp_path, seconds=45, min_reads=200, processes=2, threads=2,
        read_timeout=3.0, warmup=10, faults=SHORT_FAULTS,
    )  # fmt: skip
    _no_wrong(r["reads"])
    assert r["readers_finished"]
    assert r["reads"]["reads"] >= 200 and r["reads"]["exact"] > 0
    assert all(r["faults_injected"][kind] > 0 for kind in SOAK_KINDS), (r["faults_injected"], r["proxy_requests"], r["stats_during"])
    assert r["after_faults"]["exact"] == len(image.files), r["after_faults"]
    assert r["leftovers"] == [] and r["umount_rc"] == 0
    # 45 s is too short to judge a slow leak; this only catches a gross one.
    assert r["rss"]["growth_pct"] < 50, r["rss"]


def test_daemon_killed_under_readers_fails_them_promptly_leaves_nothing_and_keeps_the_cache(
    soak_registry: LocalRegistry, image: soak.SoakImage, tmp_path: Path
):
    r = soak.run_crashes(soak_registry, image, tmp_path, iterations=5, read_timeout=3.0, hang_after=30)
    _no_wrong(r["reads"])
    assert r["hangs"] == 0
    assert r["kill_to_end_s"]["max"] < r["deadline_s"], r["kill_to_end_s"]
    assert r["leftovers"] == [] and r["umount_failures"] == []
    assert r["cache_check"]["damaged"] == 0, r["cache_check"]
    first, second = r["reuse"]["reuse-a"], r["reuse"]["reuse-b"]
    assert first["exact"] == second["exact"] == len(image.files)
    assert second["bytes_fetched"] == 0, second


def _readers_then_everything_exact(r: dict, image: soak.SoakImage) -> None:
    """Readers ran through the fault and saw nothing wrong; afterwards every file reads exactly."""
    _no_wrong(r["during"])
    assert r["during"]["reads"] > 0 and r["readers_finished"]
    assert r["after"]["exact"] == len(image.files), r["after"]


def _taken_down_cleanly(r: dict) -> None:
    assert r["leftovers"] == [] and r["umount_rc"] == 0


def test_cache_directory_deleted_under_a_live_mount_never_serves_wrong_bytes(
    soak_registry: LocalRegistry, image: soak.SoakImage, tmp_path: Path
):
    r = soak.run_cache_deleted(soak_registry, image, tmp_path, seconds=8, read_timeout=3.0)
    _readers_then_everything_exact(r, image)
    _taken_down_cleanly(r)


def test_cache_file_system_filled_under_a_live_mount_still_serves_exact_bytes(
    soak_registry: LocalRegistry, image: soak.SoakImage, tmp_path: Path
):
    r = soak.run_cache_filled(soak_registry, image, tmp_path, read_timeout=3.0)
    for part in ("before", "while_full", "after"):
        _no_wrong(r[part])
        assert r[part]["exact"] == r[part]["reads"], (part, r[part])
    _taken_down_cleanly(r)


def test_registry_restarted_mid_read_gives_exact_bytes_or_eio_then_recovers(
    soak_registry: LocalRegistry, image: soak.SoakImage, tmp_path: Path
):
    r = soak.run_registry_restart(soak_registry, image, tmp_path, down=3.0, read_timeout=3.0)
    _readers_then_everything_exact(r, image)
    _taken_down_cleanly(r)


def test_a_trickled_fetch_does_not_keep_its_frame_unreadable_after_the_network_heals(
    soak_registry: LocalRegistry, image: soak.SoakImage, tmp_path: Path
):
    r = soak.run_trickle(soak_registry, image, tmp_path, read_timeout=3.0)
    first = r["attempts"][0]
    assert r["fired"] >= 1 and first["requests_sent"] >= 1, r["attempts"]
    assert first["outcome"] == "EIO" and first["seconds"] <= soak.deadline_of(3.0), first
    _taken_down_cleanly(r)
    # The trickled request is given up by the low-speed limit (5 s), retried, and
    # the frame reads again: within that plus a read deadline or two.
    assert r["recovered"], r["attempts"]
    assert r["recovered_after_s"] <= 5 + 2 * 3.0 + 5, r["attempts"]
