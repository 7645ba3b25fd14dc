"""Images of many layers stack as a rootfs, up to overlayfs' own limit.

mount(2) passes overlay options in one page: about 100 absolute lower paths
overflow it, so the stack goes through fsconfig's ``lowerdir+`` (one call
per layer), or on older kernels through mount(2) with paths relative to the
layers' common parent. Both ways are checked on plain directories at 500
lowers, and the real thing end to end: an image of N tiny layers pushed to
a registry and mounted with ``--rootfs``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.mount import Mounter, lazyerofs

from lazyfs.errors import MountError
from lazyfs.mount import kernel as kmount
from lazyfs.mount import state as mount_state

pytestmark = pytest.mark.e2e


def layer_dirs(root: Path, count: int) -> list[Path]:
    """Layer i holds ``layers/<i>.txt`` and its own ``top.txt``; the topmost wins."""
    dirs = []
    for i in range(count):
        d = root / f"l{i}"
        (d / "layers").mkdir(parents=True)
        (d / "layers" / f"{i}.txt").write_text(f"layer {i}\n")
        (d / "top.txt").write_text(f"{i}\n")
        dirs.append(d)
    return dirs


def ours_left(*paths: Path) -> list[str]:
    real = [os.path.realpath(p) for p in paths]
    return [t for t, _fs, _src in kmount.mounts() if any(t == p or t.startswith(p + "/") for p in real)]


def mount_options(target: str) -> set[str]:
    found: set[str] = set()
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split(" - ", 1)[0].split()
            if fields[4] == target:
                found = set(fields[5].split(","))
    return found


@pytest.mark.parametrize("count", [100, 500])
def test_an_image_of_many_layers_mounts_as_a_rootfs_with_upper_layers_on_top(
    mounter: Mounter, module_registry, tmp_path: Path, count: int
):
    ref = f"{module_registry.host}/test/layers{count}:v1"
    dirs = layer_dirs(tmp_path / "trees", count)
    lazyerofs("push", "--chunk-size", "64KiB", *map(str, dirs), ref, timeout=300)

    m = mounter(ref, rootfs=True)
    assert m.rootfs is not None
    assert kmount.find_mount(str(m.rootfs))[0] == "overlay"
    # Still an untrusted image: read-only, no setuid, no device nodes.
    assert {"ro", "nosuid", "nodev"} <= mount_options(os.path.realpath(m.rootfs))
    assert sorted(os.listdir(m.rootfs / "layers")) == sorted(f"{i}.txt" for i in range(count))
    for i in range(count):
        assert (m.rootfs / "layers" / f"{i}.txt").read_text() == f"layer {i}\n"
    assert (m.rootfs / "top.txt").read_text() == f"{count - 1}\n"
    state = mount_state.state_dir(str(m.dir))
    log = mount_state.log_path(str(m.dir))

    lazyerofs("umount", str(m.dir), timeout=120)
    assert ours_left(m.dir, m.rootfs, state) == []
    assert not state.exists()
    assert not log.exists()


@pytest.fixture
def lowers() -> Iterator[tuple[Path, list[str]]]:
    """500 plain lower dirs (bottom first) under a parent whose path is long
    enough that their absolute paths fill several pages."""
    if os.geteuid() != 0:
        pytest.skip("needs root for overlay mounts")
    base = Path(tempfile.mkdtemp(prefix="lazyerofs-lowers-" + "x" * 80))
    dirs = []
    for i in range(kmount.OVERLAY_MAX_LOWERS):
        d = base / "lowers" / f"{i:03d}"
        d.mkdir(parents=True)
        (d / f"{i}.txt").write_text(f"{i}\n")
        (d / "top.txt").write_text(f"{i}\n")
        dirs.append(str(d))
    assert len(":".join(dirs)) > 4 * os.sysconf("SC_PAGE_SIZE")
    try:
        yield base, dirs
    finally:
        for target, _fs, _src in reversed(kmount.mounts()):
            if target.startswith(str(base) + "/"):
                kmount.umount(target, lazy_after=0)
        if not ours_left(base):
            shutil.rmtree(base, ignore_errors=True)


@pytest.mark.parametrize("api", ["auto", "fsconfig", "legacy"])
def test_overlay_stacks_500_lowers_whose_paths_overflow_a_page(lowers: tuple[Path, list[str]], api: str):
    base, dirs = lowers
    target = base / f"stack-{api}"
    kmount.mount_overlay(list(reversed(dirs)), str(target), api=api)
    try:
        assert kmount.find_mount(str(target))[0] == "overlay"
        assert {"ro", "nosuid", "nodev"} <= mount_options(str(target))
        assert len(os.listdir(target)) == len(dirs) + 1
        assert (target / "0.txt").read_text() == "0\n"
        assert (target / "top.txt").read_text() == f"{len(dirs) - 1}\n"
    finally:
        kmount.umount(str(target))
    assert kmount.find_mount(str(target)) is None


def test_more_lowers_than_overlayfs_takes_is_refused_with_the_limit(lowers: tuple[Path, list[str]]):
    base, dirs = lowers
    with pytest.raises(MountError, match="at most 500"):
        kmount.mount_overlay([*dirs, dirs[0]], str(base / "too-many"))


def test_a_missing_lower_dir_is_named_in_the_error(lowers: tuple[Path, list[str]]):
    base, dirs = lowers
    missing = str(base / "lowers" / "gone")
    with pytest.raises(MountError, match="gone"):
        kmount.mount_overlay([dirs[1], missing, dirs[0]], str(base / "missing"), api="fsconfig")
    assert kmount.find_mount(str(base / "missing")) is None


def test_legacy_overlay_of_long_paths_without_a_common_parent_is_a_clear_error(lowers: tuple[Path, list[str]]):
    base, dirs = lowers
    elsewhere = base / "other"
    elsewhere.mkdir()
    with pytest.raises(MountError, match="share no parent"):
        kmount.mount_overlay([str(elsewhere), *dirs[:200]], str(base / "mixed"), api="legacy")
