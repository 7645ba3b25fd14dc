"""Logs of failed or killed daemons are kept for a post-mortem, but not for
ever: a new mount prunes all but the newest KEPT_LOGS of them; a live mount's
log is never touched. (Hygiene, issue 17: the suite's crash tests left 130.)"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lazyfs.mount import state


def test_all_but_the_newest_kept_logs_go_and_a_live_mounts_log_stays(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(state, "RUN_DIR", tmp_path)
    for i in range(40):
        log = tmp_path / f"{i:016x}.log"
        log.write_text("failed\n")
        os.utime(log, (1000 + i, 1000 + i))
    live = tmp_path / "00000000000000ff.log"
    live.write_text("serving\n")
    os.utime(live, (1, 1))  # the oldest of all, but its mount is alive
    (tmp_path / "00000000000000ff").mkdir()
    (tmp_path / "notes.txt").write_text("not ours\n")

    assert state.prune_kept_logs(keep=32) == 8
    left = sorted(p.name for p in tmp_path.glob("*.log"))
    assert left == sorted([f"{i:016x}.log" for i in range(8, 40)] + [live.name])
    assert (tmp_path / "notes.txt").exists()
    assert state.prune_kept_logs(keep=32) == 0


def test_pruning_a_missing_run_dir_is_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(state, "RUN_DIR", tmp_path / "absent")
    assert state.prune_kept_logs() == 0
