"""``lazyerofs status``: live mounts, their daemons and their health.

End to end with a real registry, FUSE and the kernel: a live mount is listed
healthy, a killed daemon's mount stale (with the umount hint), a stopped one
hung (within the deadline), an unmounted one not at all. The state files
themselves are untrusted input: a private run directory with stray and
broken entries shows only what is a mount's state.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from support.mount import LAZYEROFS, Mounted, Mounter, lazyerofs, make_tree

from lazyfs.mount import load_state
from lazyfs.produce.mkfs import make_erofs


def status(*args: str, env: dict[str, str] | None = None) -> dict:
    proc = lazyerofs("status", "--json", *args, env=env, timeout=60)
    return json.loads(proc.stdout)


def listed(m: Mounted, *args: str) -> dict | None:
    entries = [e for e in status(*args)["mounts"] if e["mountpoint"] == str(m.dir)]
    assert len(entries) <= 1, entries
    return entries[0] if entries else None


def daemon_pid(m: Mounted) -> int:
    state = load_state(str(m.dir))
    assert state is not None and isinstance(state["pid"], int)
    return state["pid"]


@pytest.fixture(scope="module")
def image_ref(module_registry, tmp_path_factory) -> str:
    tmp = tmp_path_factory.mktemp("status-img")
    make_tree(tmp / "tree", 0, big=256 << 10)
    make_erofs(tmp / "tree", tmp / "layer.erofs")
    ref = f"{module_registry.host}/test/status:v1"
    lazyerofs("push", str(tmp / "layer.erofs"), ref)
    return ref


@pytest.mark.e2e
def test_a_live_mount_is_listed_healthy_then_stale_after_kill_9_then_gone_after_umount(
    mounter: Mounter, image_ref: str
) -> None:
    m = mounter(image_ref, rootfs=True)
    assert (m.rootfs / "etc" / "layer0.conf").read_text() == "layer = 0\n"
    pid = daemon_pid(m)

    live = listed(m)
    assert live is not None
    assert live["health"] == "healthy", live
    assert (live["daemon"], live["pid"], live["fuse_mounted"]) == ("running", pid, True)
    assert live["ref"] == image_ref and live["rootfs"] == str(m.rootfs)
    assert live["kernel_mounts"] >= 1 and live["kernel_mounts_present"] == live["kernel_mounts"]
    assert (live["read_errors"], live["verify_failures"]) == (0, 0)
    text = lazyerofs("status").stdout
    assert f"{m.dir}: healthy" in text and f"pid {pid} (running)" in text

    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
        time.sleep(0.05)
    dead = listed(m)
    assert dead is not None
    assert (dead["health"], dead["daemon"], dead["pid"]) == ("stale", "dead", pid)
    assert f"lazyerofs umount {m.dir}" in dead["detail"]
    text = lazyerofs("status").stdout
    assert f"{m.dir}: stale" in text and f"lazyerofs umount {m.dir}" in text

    lazyerofs("umount", str(m.dir))
    assert listed(m) is None


@pytest.mark.e2e
def test_a_stopped_daemon_is_reported_hung_within_the_deadline(mounter: Mounter, image_ref: str) -> None:
    m = mounter(image_ref)
    pid = daemon_pid(m)
    os.kill(pid, signal.SIGSTOP)  # alive, ours, answering nothing
    try:
        started = time.monotonic()
        entry = listed(m, "--timeout", "1")
        took = time.monotonic() - started
    finally:
        os.kill(pid, signal.SIGCONT)
    assert entry is not None
    assert (entry["health"], entry["daemon"]) == ("hung", "running"), entry
    assert took < 30, took
    # Answering again once it runs: hung was the daemon, not the listing.
    assert listed(m)["health"] == "healthy"


def test_status_needs_root_and_says_so() -> None:
    as_nobody = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"] if os.geteuid() == 0 else []
    proc = subprocess.run([*as_nobody, LAZYEROFS, "status"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "lazyerofs: error: status needs root" in proc.stderr


def test_only_mount_states_are_listed_and_a_gone_or_reused_pid_is_stale(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    run = tmp_path / "run"
    run.mkdir(mode=0o700)

    def put(name: str, body: str) -> None:
        (run / name).mkdir()
        (run / name / "state.json").write_text(body)

    dead = subprocess.Popen(["true"])
    dead.wait()
    put("a" * 16, json.dumps({"pid": dead.pid, "start_time": 1, "mountpoint": "/x/dead", "ref": "r/a:1"}))
    # Our own pid with another start time: a reused pid, never signalled.
    put("b" * 16, json.dumps({"pid": os.getpid(), "start_time": 1, "mountpoint": "/x/reused", "ref": "r/b:1"}))
    put("c" * 16, "{not json")
    put("d" * 16, "[1, 2]")
    (run / ("e" * 16 + ".log")).write_text("a daemon's log\n")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "state.json").write_text(json.dumps({"pid": 1, "mountpoint": "/x/link"}))
    (run / ("f" * 16)).symlink_to(tmp_path / "elsewhere")

    env = {**os.environ, "LAZYEROFS_RUN_DIR": str(run)}
    mounts = {e["mountpoint"]: e for e in status(env=env)["mounts"]}
    assert set(mounts) == {"/x/dead", "/x/reused"}
    assert (mounts["/x/dead"]["health"], mounts["/x/dead"]["daemon"]) == ("stale", "dead")
    assert (mounts["/x/reused"]["health"], mounts["/x/reused"]["daemon"]) == ("stale", "pid reused")

    empty = tmp_path / "empty"
    empty.mkdir(mode=0o700)
    assert status(env={**os.environ, "LAZYEROFS_RUN_DIR": str(empty)}) == {"mounts": []}
    proc = lazyerofs("status", env={**os.environ, "LAZYEROFS_RUN_DIR": str(empty)})
    assert proc.stdout == "no lazyerofs mounts\n"

