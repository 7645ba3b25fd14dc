"""The cold-start benchmark harness runs end to end on a tiny image.

Why: the full sweep takes many minutes and runs rarely, so a broken harness
would otherwise be found only when someone needs the numbers. This runs the
real harness (registry, network emulator, eager pull, lazy mounts with and
without prefetch, report writer) on a small mkfs.erofs tree at one sweep
point, in well under a minute, and checks the outputs are complete and that nothing stays mounted.
It asserts no timings: performance is the benchmark's job, not a test's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import require_root_tools

from lazyfs.mount import kernel as kmount

pytestmark = [pytest.mark.e2e]

ROOT = Path(__file__).resolve().parent.parent


def _tree(root: Path) -> None:
    """A few files in each of the harness's three layers, one spanning several frames."""
    files = {
        "etc/hostname": b"bench\n",
        "usr/lib/python3.11/mod.py": b"print('hello')\n" * 2000,
        "usr/share/doc/readme.txt": b"documentation\n" * 500,
        "usr/bin/tool": os.urandom(600 << 10),  # incompressible: several 256 KiB frames
    }
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


def test_coldstart_harness_runs_one_point_and_writes_every_output(tmp_path: Path) -> None:
    require_root_tools("mkfs.erofs", "docker-registry", "fusermount3")
    tree = tmp_path / "tree"
    _tree(tree)
    results = tmp_path / "results"
    cmd = [
        sys.executable, "-m", "benchmarks.coldstart",
        "--tree", str(tree),
        "--rtt-ms", "5", "--mbit", "1000", "--chunk-sizes", "256KiB",
        "--workload", "read=cat {root}/etc/hostname {root}/usr/bin/tool > /dev/null",
        "--work", str(tmp_path / "work"), "--results", str(results), "--name", "smoke",
        "--no-plot",
    ]  # fmt: skip
    before = {m[0] for m in kmount.mounts()}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    leftover = [m for m in kmount.mounts() if m[0] not in before and str(tmp_path) in m[0] + m[2]]
    assert leftover == [], leftover

    data = json.loads((results / "smoke.json").read_text())
    assert data["meta"]["failures"] == [], data["meta"]["failures"]
    strategies = {m["strategy"] for m in data["measurements"]}
    assert strategies == {"eager", "lazy", "lazy-warm", "lazy-ondemand", "lazy+profile", "lazy+optimized"}
    for m in data["measurements"]:
        assert 0 < m["ready_s"] <= m["done_s"]
    eager = next(m for m in data["measurements"] if m["strategy"] == "eager")
    lazy = next(m for m in data["measurements"] if m["strategy"] == "lazy")
    assert eager["bytes_fetched"] >= eager["detail"]["blob_bytes"]
    assert lazy["detail"]["touch_log"], "the daemon wrote no touch log"
    # The workload read the 600 KiB file: at least three 256 KiB frames.
    assert data["touched"][0]["touched_frames"] >= 3
    assert [r for r in data["rows"] if r["strategy"] == "limit"]
    md = (results / "smoke.md").read_text()
    assert "| 256.0 KiB |" in md
