"""Fixtures for end-to-end mount tests: the real CLI, real FUSE, real kernel.

Every mount made through ``mounter`` is taken down in a finalizer, even when
the test fails: first ``lazyerofs umount``, then whatever is still there
(overlay, EROFS, FUSE) detached lazily, so no test leaves a mount behind.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from lazyfs.mount import kernel as kmount
from lazyfs.mount import state_dir

LAZYEROFS = str(Path(sys.executable).parent / "lazyerofs")


def lazyerofs(*args: str, check: bool = True, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    """Run the installed ``lazyerofs`` command, output captured as text."""
    proc = subprocess.run(
        [LAZYEROFS, *args], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, **kw
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"lazyerofs {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


@dataclass
class Mounted:
    dir: Path
    cache_dir: Path
    rootfs: Path | None = None
    stderr: str = ""

    def layer(self, i: int) -> Path:
        return self.dir / "layers" / str(i) / "layer.erofs"

    def stats(self) -> dict:
        return json.loads(lazyerofs("stats", str(self.dir)).stdout)


def force_cleanup(mountpoint: Path, rootfs: Path | None) -> None:
    """Detach anything left under our paths, top-down."""
    paths = {os.path.realpath(p) for p in (mountpoint, rootfs) if p is not None}
    state = str(state_dir(str(mountpoint)))
    for target, _fstype, source in reversed(kmount.mounts()):
        ours = target.startswith(state + "/") or any(target == p or source.startswith(p + "/") for p in paths)
        if ours and target != str(mountpoint):
            subprocess.run(["umount", "-l", target], capture_output=True)
    if kmount.find_mount(str(mountpoint)) is not None:
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True)
        subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True)


@dataclass
class Mounter:
    tmp: Path
    mounted: list[Mounted] = field(default_factory=list)
    count: int = 0

    def __call__(
        self,
        ref: str,
        *args: str,
        rootfs: bool = False,
        cache_dir: Path | None = None,
        expect_failure: bool = False,
    ) -> Mounted:
        self.count += 1
        d = self.tmp / f"mnt{self.count}"
        d.mkdir()
        m = Mounted(d, cache_dir or self.tmp / "cache")
        cmd = ["mount", ref, str(d), "--cache-dir", str(m.cache_dir), *args]
        if rootfs:
            m.rootfs = self.tmp / f"rootfs{self.count}"
            m.rootfs.mkdir()
            cmd += ["--rootfs", str(m.rootfs)]
        self.mounted.append(m)
        proc = lazyerofs(*cmd, check=not expect_failure)
        m.stderr = proc.stderr
        if expect_failure:
            assert proc.returncode != 0, f"mount unexpectedly succeeded: {proc.stderr}"
        return m

    def cleanup(self) -> None:
        for m in reversed(self.mounted):
            if kmount.find_mount(str(m.dir)) is not None or (m.rootfs and kmount.find_mount(str(m.rootfs))):
                lazyerofs("umount", str(m.dir), check=False, timeout=60)
            force_cleanup(m.dir, m.rootfs)


@pytest.fixture
def mounter(tmp_path: Path) -> Iterator[Mounter]:
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None:
        pytest.skip("needs root, /dev/fuse and fusermount3")
    m = Mounter(tmp_path)
    try:
        yield m
    finally:
        m.cleanup()


# --- an example tree, built three ways into three layers -------------------------------


def make_tree(root: Path, seed: int, *, big: int = 3 << 20) -> None:
    """Files of several sizes, modes, a symlink, an empty dir, a hard case or two."""
    import random

    rnd = random.Random(seed)
    (root / "etc").mkdir(parents=True, exist_ok=True)
    (root / "etc" / f"layer{seed}.conf").write_text(f"layer = {seed}\n")
    (root / "usr" / "bin").mkdir(parents=True, exist_ok=True)
    tool = root / "usr" / "bin" / f"tool{seed}"
    tool.write_bytes(rnd.randbytes(big))
    tool.chmod(0o755)
    (root / "usr" / "share").mkdir(parents=True, exist_ok=True)
    (root / "usr" / "share" / f"words{seed}.txt").write_text(
        "".join(f"{rnd.random():.12f} line {i}\n" for i in range(40_000))
    )
    secret = root / "etc" / f"secret{seed}"
    secret.write_text("shadow\n")
    secret.chmod(0o600)
    (root / f"empty{seed}").mkdir(exist_ok=True)
    link = root / f"link{seed}"
    if not link.is_symlink():
        os.symlink(f"usr/bin/tool{seed}", link)


def tree_listing(root: Path) -> dict[str, tuple]:
    """Everything ``diff -r`` looks at, plus modes and symlink targets."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            rel = str(p.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode))
            else:
                out[rel] = ("file", stat.S_IMODE(st.st_mode), st.st_size)
    return out
