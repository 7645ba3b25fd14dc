"""The chunk cache as a hostile local user would meet it (issue 10).

Entries are private (0700 directories, 0600 files); a cache directory someone
else could write is refused; no symbolic link inside the root is followed, so
nothing outside it is served, written or removed; a cache path that is not
usable is one clear error line, not a traceback.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from cache import CacheError, ChunkCache
from cache._entry import HEADER_SIZE
from lazyfs.cli import main

NOBODY = 65534
ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown, setpriv)")


def key_of(i: int) -> bytes:
    return bytes([i]) * 64


def chunk(i: int, size: int = 4096) -> bytes:
    return bytes([i % 251 + 1]) * size


def entry_path(root: Path, key: bytes) -> Path:
    name = key.hex()
    return root / "chunks" / name[:2] / name


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture
def umask_022() -> Iterator[None]:
    """The usual umask, under which the old code made 0755 dirs and 0644 entries."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory outside the cache root with a file the cache must never touch."""
    d = tmp_path / "outside"
    d.mkdir()
    victim = d / "precious"
    victim.write_bytes(b"keep me")
    os.utime(victim, (1, 1))  # as old as a dead writer's temp file
    return d


# -- permissions -----------------------------------------------------------------


def test_new_cache_is_private_dirs_0700_files_0600(tmp_path: Path, umask_022: None) -> None:
    root = tmp_path / "parent" / "cache"
    with ChunkCache(root) as c:
        assert c.put(key_of(1), chunk(1))
    entry = entry_path(root, key_of(1))
    for d in (root, root / "chunks", root / "tmp", entry.parent):
        assert mode_of(d) == 0o700, d
    assert mode_of(entry) == 0o600
    assert mode_of(root / "lock") == 0o600


def test_existing_cache_readable_by_others_is_tightened_and_logged(
    tmp_path: Path, umask_022: None, caplog: pytest.LogCaptureFixture
) -> None:
    # What the old code left: 0755 directories, 0644 entries.
    root = tmp_path / "cache"
    (root / "chunks" / "ab").mkdir(parents=True, mode=0o755)
    (root / "tmp").mkdir(mode=0o755)
    os.chmod(root, 0o755)
    caplog.set_level(logging.WARNING, logger="cache")
    with ChunkCache(root):
        pass
    assert mode_of(root) == 0o700
    assert mode_of(root / "chunks") == 0o700
    assert mode_of(root / "tmp") == 0o700
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert f"tightened {root} from mode 0755 to 0700" in logged


def test_a_directory_holding_other_files_keeps_its_mode_but_entries_stay_private(
    tmp_path: Path, umask_022: None
) -> None:
    """Pointed at someone's directory (say /etc as root), the cache must not
    chmod it; its own chunks/ and tmp/ are still 0700."""
    root = tmp_path / "shared"
    root.mkdir(mode=0o755)
    (root / "notes.txt").write_text("not a cache")
    os.chmod(root, 0o755)
    with ChunkCache(root) as c:
        c.put(key_of(2), chunk(2))
    assert mode_of(root) == 0o755
    assert mode_of(root / "chunks") == 0o700
    assert mode_of(root / "tmp") == 0o700


@pytest.fixture
def traversable_dir() -> Iterator[Path]:
    """A 0755 directory outside pytest's private (0700) tree, so that only the
    cache's own modes stand between another user and its entries."""
    d = Path(tempfile.mkdtemp(prefix="lazyerofs-cache-sec-", dir="/tmp"))
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@ROOT_ONLY
def test_another_local_user_cannot_read_cached_chunks(traversable_dir: Path, umask_022: None) -> None:
    root = traversable_dir / "cache"
    secret = b"private image bytes " * 100
    with ChunkCache(root) as c:
        assert c.put(key_of(3), secret)
    entry = entry_path(root, key_of(3))
    as_nobody = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
    read = subprocess.run([*as_nobody, "cat", str(entry)], capture_output=True, check=False)
    assert read.returncode != 0 and secret not in read.stdout
    listing = subprocess.run([*as_nobody, "ls", str(root / "chunks")], capture_output=True, check=False)
    assert listing.returncode != 0


# -- trust: who may write the directory ------------------------------------------


@ROOT_ONLY
def test_root_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "theirs"
    root.mkdir(mode=0o700)
    os.chown(root, NOBODY, NOBODY)
    with pytest.raises(CacheError, match=rf"{root} is owned by uid {NOBODY}, not by this user"):
        ChunkCache(root)
    assert os.listdir(root) == []  # nothing created in it


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o1777, 0o702])
def test_root_writable_by_group_or_others_is_refused(tmp_path: Path, mode: int) -> None:
    root = tmp_path / "open"
    root.mkdir()
    os.chmod(root, mode)
    with pytest.raises(CacheError, match=rf"{root} is writable by .* refusing it"):
        ChunkCache(root)
    assert os.listdir(root) == []
    assert mode_of(root) == mode  # not "fixed" behind the user's back


@pytest.mark.parametrize("sub", ["chunks", "tmp"])
def test_chunks_or_tmp_writable_by_others_is_refused(tmp_path: Path, sub: str) -> None:
    root = tmp_path / "cache"
    with ChunkCache(root):
        pass
    os.chmod(root / sub, 0o777)
    with pytest.raises(CacheError, match=rf"{root}/{sub} is writable by"):
        ChunkCache(root)


@ROOT_ONLY
def test_chunks_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    with ChunkCache(root):
        pass
    os.chown(root / "chunks", NOBODY, NOBODY)
    with pytest.raises(CacheError, match=rf"{root}/chunks is owned by uid {NOBODY}"):
        ChunkCache(root)


def test_forged_entry_in_a_directory_others_can_write_is_never_served(tmp_path: Path) -> None:
    """The issue's case: a forged entry (valid header for its own bytes) in a
    group/other-writable cache was served even with verify_at_rest, whose
    check sits in the same entry. The directory is refused instead."""
    root = tmp_path / "cache"
    with ChunkCache(root) as c:
        c.put(key_of(4), chunk(4))  # an honest entry; pretend a stranger wrote it
    os.chmod(root, 0o777)
    with pytest.raises(CacheError):
        ChunkCache(root, memory_bytes=0, verify_at_rest=True)


# -- no symlink following --------------------------------------------------------


def test_symlinked_root_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    with ChunkCache(real):
        pass
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(CacheError, match=rf"{link} is a symbolic link"):
        ChunkCache(link)


def test_tmp_that_is_a_symlink_is_refused_and_its_target_left_alone(tmp_path: Path, outside: Path) -> None:
    root = tmp_path / "cache"
    with ChunkCache(root):
        pass
    (root / "tmp").rmdir()
    (root / "tmp").symlink_to(outside)
    with pytest.raises(CacheError, match=rf"{root}/tmp is a symbolic link"):
        ChunkCache(root)
    assert (outside / "precious").read_bytes() == b"keep me"


def test_tmp_swapped_for_a_symlink_while_open_gc_and_clear_leave_the_target_alone(
    tmp_path: Path, outside: Path
) -> None:
    root = tmp_path / "cache"
    with ChunkCache(root) as c:
        c.put(key_of(5), chunk(5))
        os.rename(root / "tmp", root / "tmp.old")
        (root / "tmp").symlink_to(outside)
        c.gc()
        c.put(key_of(6), chunk(6))  # writes through the directory it opened
        c.clear()
    assert sorted(os.listdir(outside)) == ["precious"]
    assert (outside / "precious").read_bytes() == b"keep me"


def test_entry_that_is_a_symlink_is_not_served_nor_followed(tmp_path: Path, outside: Path) -> None:
    root = tmp_path / "cache"
    data = chunk(7, 10_000)
    with ChunkCache(root) as c:
        c.put(key_of(7), data)
    entry = entry_path(root, key_of(7))
    # A perfectly valid entry, but outside the root, reached through a link.
    forged = outside / "entry"
    shutil.copyfile(entry, forged)
    entry.unlink()
    entry.symlink_to(forged)
    with ChunkCache(root, memory_bytes=0) as c:
        assert not c.contains(key_of(7), len(data))
        assert c.get(key_of(7), len(data)) is None
        assert c.statistics().damaged == 1
        assert not os.path.lexists(entry)  # the link went, not its target
        assert forged.stat().st_size == HEADER_SIZE + len(data)
        # A put replaces the name; it never writes through a link.
        entry.symlink_to(forged)
        assert c.put(key_of(7), data)
        assert not entry.is_symlink()
        assert c.get(key_of(7), len(data)) == data
    assert forged.read_bytes()[HEADER_SIZE:] == data
    assert (outside / "precious").read_bytes() == b"keep me"


def test_fanout_directory_that_is_a_symlink_is_not_served_written_or_emptied(
    tmp_path: Path, outside: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "cache"
    data = chunk(8)
    with ChunkCache(root) as c:
        c.put(key_of(8), data)
    sub = entry_path(root, key_of(8)).parent
    # chunks/08 now points outside, and what is there looks like valid entries.
    moved = outside / "fanout"
    os.rename(sub, moved)
    sub.symlink_to(moved)
    caplog.set_level(logging.WARNING, logger="cache")
    with ChunkCache(root, memory_bytes=0) as c:
        assert c.get(key_of(8), len(data)) is None
        assert c.entries() == []
        assert c.put(key_of(8), data) is False  # not written through the link
        c.gc(0)
        c.clear()
    assert sorted(os.listdir(moved)) == [key_of(8).hex()]
    assert (outside / "precious").exists()
    assert f"{sub} is" in caplog.text


def test_lock_that_is_a_symlink_is_refused(tmp_path: Path, outside: Path) -> None:
    root = tmp_path / "cache"
    with ChunkCache(root):
        pass
    (root / "lock").unlink()
    (root / "lock").symlink_to(outside / "precious")
    with pytest.raises(CacheError, match=r"lock file .* is a symbolic link"):
        ChunkCache(root)
    assert (outside / "precious").read_bytes() == b"keep me"


# -- paths that cannot be a cache ------------------------------------------------


def test_cache_path_that_is_a_file_is_a_clear_error(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(CacheError, match=rf"^cache directory {f} is not a directory$"):
        ChunkCache(f)


def test_cache_path_that_cannot_be_created_is_a_clear_error() -> None:
    with pytest.raises(CacheError, match=r"^cache directory /proc/lazyerofs-nope cannot be created: "):
        ChunkCache("/proc/lazyerofs-nope")


@pytest.mark.parametrize("sub", ["du", "ls", "gc", "clear"])
def test_cli_cache_dir_that_is_a_file_is_one_error_line(sub: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["cache", sub, "--cache-dir", "/etc/passwd"]) == 1
    err = capsys.readouterr().err
    assert err == "lazyerofs: error: cache directory /etc/passwd is not a directory\n"


@ROOT_ONLY
def test_cli_refuses_a_cache_owned_by_another_user(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "theirs"
    with ChunkCache(root):
        pass
    os.chown(root, NOBODY, NOBODY)
    assert main(["cache", "clear", "--cache-dir", str(root)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"lazyerofs: error: cache directory {root} is owned by uid {NOBODY}")
    assert err.count("\n") == 1


def test_cli_through_the_real_command_prints_no_traceback(tmp_path: Path) -> None:
    root = tmp_path / "open"
    with ChunkCache(root):
        pass
    os.chmod(root, 0o777)
    proc = subprocess.run(
        [sys.executable, "-m", "lazyfs.cli", "cache", "du", "--cache-dir", str(root)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"lazyerofs: error: cache directory {root} is writable by its group and others")
    assert "Traceback" not in proc.stderr


def test_mount_with_an_untrusted_cache_dir_is_one_error_line(tmp_path: Path) -> None:
    """The daemon turns the cache's refusal into ``lazyerofs: error: ...``.
    Fails on the cache side first, before any network or FUSE work."""
    root = tmp_path / "open"
    root.mkdir()
    os.chmod(root, 0o777)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "lazyfs.cli", "mount", "127.0.0.1:9/x/y:z", str(mnt), "--cache-dir", str(root), "-f"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert f"lazyerofs: error: cache directory {root} is writable by its group and others" in proc.stderr
