"""Reproducible builds: the same tree and options give the same blob and descriptor."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import time
import uuid as uuid_mod
from pathlib import Path

import pytest
from support.mount import lazyerofs

from lazyfs.format import verity, verity_build
from lazyfs.produce.mkfs import image_uuid, make_erofs, newest_mtime

EPOCH = 1_700_000_000


def need(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"needs {tool} (run scripts/setup.sh)")


def make_tree(root: Path) -> Path:
    """A small tree with the kinds of entry mkfs.erofs orders and stamps."""
    (root / "usr" / "bin").mkdir(parents=True)
    (root / "usr" / "bin" / "tool").write_bytes(hashlib.sha256(b"x").digest() * 20_000)
    (root / "usr" / "bin" / "tool").chmod(0o755)
    for name in ("b", "a", "c", "zz", "0"):  # created out of order on purpose
        (root / "etc").mkdir(exist_ok=True)
        (root / "etc" / name).write_text(f"{name}\n" * 100)
    (root / "empty").mkdir()
    os.symlink("usr/bin/tool", root / "link")
    os.link(root / "etc" / "a", root / "etc" / "hard")
    return root


def build(tree: Path, blob: Path, *args: str, env: dict[str, str] | None = None) -> tuple[bytes, bytes]:
    full = {k: v for k, v in os.environ.items() if k != "SOURCE_DATE_EPOCH"}
    full.update(env or {})
    lazyerofs("build", str(tree), "-o", str(blob), "--chunk-size", "64KiB", *args, env=full)
    return blob.read_bytes(), Path(str(blob) + ".json").read_bytes()


def raw_image(blob: Path) -> bytes:
    return subprocess.run(["zstd", "-d", "-c", str(blob)], capture_output=True, check=True).stdout


def fsck(image: Path) -> None:
    need("fsck.erofs")
    proc = subprocess.run(["fsck.erofs", str(image)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def kernel_mtimes(image: Path, mnt: Path) -> dict[str, int]:
    """Mount the image with the kernel's EROFS driver; every path's mtime in ns."""
    if os.geteuid() != 0:
        pytest.skip("needs root for a loop mount")
    mnt.mkdir()
    subprocess.run(["mount", "-t", "erofs", "-o", "loop,ro", str(image), str(mnt)], check=True)
    try:
        out = {".": mnt.lstat().st_mtime_ns}
        for dirpath, dirnames, filenames in os.walk(mnt):
            for name in dirnames + filenames:
                p = Path(dirpath) / name
                out[str(p.relative_to(mnt))] = p.lstat().st_mtime_ns
        return out
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def tree_mtimes(root: Path) -> dict[str, int]:
    out = {".": root.lstat().st_mtime_ns}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            out[str(p.relative_to(root))] = p.lstat().st_mtime_ns
    return out


@pytest.mark.parametrize("verity_args", [(), ("--dm-verity",)], ids=["plain", "dm-verity"])
def test_same_tree_built_twice_a_second_apart_is_byte_identical(tmp_path: Path, verity_args: tuple[str, ...]):
    tree = make_tree(tmp_path / "tree")
    first = build(tree, tmp_path / "one.blob", *verity_args)
    time.sleep(1.1)  # mkfs.erofs would stamp a new build time
    second = build(tree, tmp_path / "two.blob", *verity_args)
    assert first[0] == second[0]
    assert first[1] == second[1]
    desc = json.loads(first[1])
    assert desc["digest"] == "sha256:" + hashlib.sha256(first[0]).hexdigest()
    assert ("dev.containerd.erofs.dmverity.root_digest" in desc["annotations"]) == bool(verity_args)


def test_fresh_copies_of_a_tree_match_under_source_date_epoch(tmp_path: Path):
    one = make_tree(tmp_path / "one")
    time.sleep(1.1)
    two = make_tree(tmp_path / "two")  # same content, newer mtimes and ctimes
    env = {"SOURCE_DATE_EPOCH": str(EPOCH)}
    a = build(one, tmp_path / "a.blob", "--dm-verity", env=env)
    b = build(two, tmp_path / "b.blob", "--dm-verity", env=env)
    assert a == b
    # without an epoch the mtimes are content and are kept, so the copies differ
    assert build(one, tmp_path / "c.blob")[0] != build(two, tmp_path / "d.blob")[0]


def test_source_date_epoch_changes_the_digest_and_the_flag_overrides_it(tmp_path: Path):
    tree = make_tree(tmp_path / "tree")
    a = build(tree, tmp_path / "a.blob", env={"SOURCE_DATE_EPOCH": str(EPOCH)})
    b = build(tree, tmp_path / "b.blob", env={"SOURCE_DATE_EPOCH": str(EPOCH + 1)})
    assert json.loads(a[1])["digest"] != json.loads(b[1])["digest"]
    c = build(tree, tmp_path / "c.blob", "--source-date-epoch", str(EPOCH), env={"SOURCE_DATE_EPOCH": "5"})
    assert c == a


@pytest.mark.parametrize("value", ["soon", "-1", "1.5", "0x10"])
def test_a_malformed_source_date_epoch_fails_the_build_naming_it(tmp_path: Path, value: str):
    tree = make_tree(tmp_path / "tree")
    env = {**os.environ, "SOURCE_DATE_EPOCH": value}
    proc = lazyerofs("build", str(tree), "-o", str(tmp_path / "x.blob"), env=env, check=False)
    assert proc.returncode == 1
    assert "SOURCE_DATE_EPOCH" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "x.blob").exists()


def test_without_an_epoch_every_mtime_is_kept_exactly_and_the_image_mounts(tmp_path: Path):
    tree = make_tree(tmp_path / "tree")
    os.utime(tree / "etc" / "b", ns=(0, 1_234_567_890_123_456_789))  # nanoseconds too
    os.utime(tree / "link", ns=(0, 1_000_000_000), follow_symlinks=False)
    build(tree, tmp_path / "l.blob")
    image = tmp_path / "l.erofs"
    image.write_bytes(raw_image(tmp_path / "l.blob"))
    fsck(image)
    assert kernel_mtimes(image, tmp_path / "mnt") == tree_mtimes(tree)


def test_an_epoch_clamps_newer_mtimes_and_keeps_older_ones(tmp_path: Path):
    tree = make_tree(tmp_path / "tree")
    os.utime(tree / "etc" / "b", ns=(0, 1_000_000_000 * 1000 + 5))  # older than the epoch
    build(tree, tmp_path / "e.blob", env={"SOURCE_DATE_EPOCH": str(EPOCH)})
    image = tmp_path / "e.erofs"
    image.write_bytes(raw_image(tmp_path / "e.blob"))
    fsck(image)
    seen = kernel_mtimes(image, tmp_path / "mnt")
    assert seen.pop("etc/b") == 1_000_000_000 * 1000 + 5
    assert set(seen.values()) == {EPOCH * 1_000_000_000}


def test_derived_uuid_gives_the_bytes_mkfs_erofs_itself_writes_with_that_uuid(tmp_path: Path):
    need("mkfs.erofs")
    tree = make_tree(tmp_path / "tree")
    fs_uuid = make_erofs(tree, tmp_path / "ours.img")
    assert fs_uuid.version == 4 and fs_uuid != uuid_mod.UUID(int=0)
    assert image_uuid(tmp_path / "ours.img") == fs_uuid
    env = {**os.environ, "SOURCE_DATE_EPOCH": str(newest_mtime(tree))}
    subprocess.run(
        ["mkfs.erofs", "--quiet", "-U", str(fs_uuid), str(tmp_path / "theirs.img"), str(tree)],
        check=True, env=env, capture_output=True,
    )  # fmt: skip
    assert (tmp_path / "ours.img").read_bytes() == (tmp_path / "theirs.img").read_bytes()
    fsck(tmp_path / "ours.img")
    # a different tree gets a different UUID
    (tree / "etc" / "a").write_text("changed\n")
    assert make_erofs(tree, tmp_path / "other.img") != fs_uuid


def test_verity_uuid_is_the_image_sha256_as_a_v4_uuid_and_the_tree_verifies(tmp_path: Path):
    tree = make_tree(tmp_path / "tree")
    blob_bytes, desc_bytes = build(tree, tmp_path / "v.blob", "--dm-verity")
    desc = json.loads(desc_bytes)
    offset = int(desc["annotations"]["dev.containerd.erofs.dmverity.offset"])
    payload = blob_bytes[offset + 8 :]
    image = raw_image(tmp_path / "v.blob")
    sb = verity.Superblock.parse(payload)
    assert sb.uuid == verity_build.content_uuid(hashlib.sha256(image).digest())
    assert uuid_mod.UUID(bytes=sb.uuid).version == 4 and sb.salt == b""
    root = desc["annotations"]["dev.containerd.erofs.dmverity.root_digest"].removeprefix("sha512:")
    assert verity_build.verify_image(io.BytesIO(image), len(image), payload, root) == []
