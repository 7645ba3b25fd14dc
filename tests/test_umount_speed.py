"""``umount`` returns as soon as everything is down, and cleans up its log.

The daemon is reparented to init, which may reap it late (here: 1.5 s after
it exited); a process that has exited is gone for our purposes even while
a zombie, so umount waits on a pidfd (readable at exit) instead of polling
``kill(pid, 0)``, which succeeds on a zombie. Timings themselves are the
benchmark's (``benchmarks/mount_scale.py``); these pin down the behaviour.

Logs: one per mount id in RUN_DIR, removed when the daemon exits cleanly,
kept (and its path told) when the daemon was killed or the mount failed.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from support.mount import Mounter, lazyerofs, make_tree

from lazyfs.mount import state as mount_state
from lazyfs.produce.mkfs import make_erofs

pytestmark = pytest.mark.e2e


def zombie() -> subprocess.Popen[bytes]:
    """A child that has exited and that nobody has reaped yet."""
    child = subprocess.Popen(["true"])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with open(f"/proc/{child.pid}/stat", "rb") as f:
            if f.read().rpartition(b")")[2].split()[0] == b"Z":
                return child
        time.sleep(0.01)
    raise AssertionError("the child did not exit")


@pytest.mark.parametrize("pidfd", [True, False], ids=["pidfd", "proc"])
def test_a_process_that_exited_but_is_not_reaped_counts_as_gone(monkeypatch: pytest.MonkeyPatch, pidfd: bool):
    if not pidfd:
        monkeypatch.setattr(mount_state, "open_pidfd", lambda pid: None)
    child = zombie()
    try:
        assert mount_state.wait_gone(child.pid, 5)
        assert child.poll() is not None  # only now reaped: it was a zombie throughout
    finally:
        child.wait()


def test_a_running_process_is_not_gone(monkeypatch: pytest.MonkeyPatch):
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        assert not mount_state.wait_gone(sleeper.pid, 0.2)
        monkeypatch.setattr(mount_state, "open_pidfd", lambda pid: None)
        assert not mount_state.wait_gone(sleeper.pid, 0.2)
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.fixture(scope="module")
def small_image(module_registry, tmp_path_factory) -> str:
    tmp = tmp_path_factory.mktemp("small")
    images = []
    for i in range(2):
        make_tree(tmp / f"tree{i}", i, big=100_000)
        make_erofs(tmp / f"tree{i}", tmp / f"layer{i}.erofs")
        images.append(str(tmp / f"layer{i}.erofs"))
    ref = f"{module_registry.host}/test/small:v1"
    lazyerofs("push", "--chunk-size", "64KiB", *images, ref)
    return ref


def daemon_pid(mountpoint: Path) -> int:
    state = json.loads((mount_state.state_dir(str(mountpoint)) / "state.json").read_text())
    return state["pid"]


def logs_of(mountpoint: Path) -> list[Path]:
    """Every log in RUN_DIR that belongs to this mount id."""
    mid = mount_state.mount_id(str(mountpoint))
    return sorted(p for p in mount_state.RUN_DIR.iterdir() if p.name.startswith(mid) and p.is_file())


def test_a_clean_umount_removes_the_daemon_log(mounter: Mounter, small_image: str):
    m = mounter(small_image, rootfs=True)
    log = mount_state.log_path(str(m.dir))
    assert logs_of(m.dir) == [log]
    out = lazyerofs("umount", str(m.dir))
    assert out.stderr == ""
    assert logs_of(m.dir) == []


def test_a_killed_daemons_log_is_kept_and_named_then_one_log_per_mount_id(mounter: Mounter, small_image: str):
    m = mounter(small_image)
    log = mount_state.log_path(str(m.dir))
    pid = daemon_pid(m.dir)
    os.kill(pid, signal.SIGKILL)
    out = lazyerofs("umount", str(m.dir))
    assert str(log) in out.stderr and "kept" in out.stderr
    assert log.exists()

    # The same directory mounted again: the same one log, gone at a clean umount.
    again = lazyerofs("mount", small_image, str(m.dir), "--cache-dir", str(m.cache_dir))
    assert again.returncode == 0
    assert logs_of(m.dir) == [log]
    lazyerofs("umount", str(m.dir))
    assert logs_of(m.dir) == []


def test_a_failed_mount_keeps_its_log_and_says_where(module_registry, tmp_path: Path):
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        pytest.skip("needs root and /dev/fuse")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    log = mount_state.log_path(str(mnt))
    try:
        out = lazyerofs("mount", f"{module_registry.host}/test/no-such-image:v1", str(mnt),
                        "--cache-dir", str(tmp_path / "cache"), check=False)
        assert out.returncode == 1
        assert f"log is kept at {log}" in out.stderr
        assert "no-such-image" in log.read_text()
    finally:
        with contextlib.suppress(FileNotFoundError):
            log.unlink()
