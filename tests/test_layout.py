"""Profile-guided layout (lazyfs/produce/layout.py): an mkfs.erofs image rewritten
with metadata first, then the hinted files' data in first-use order. The
rewritten image is fsck.erofs clean and, mounted by the kernel, serves the
same tree in every attribute; same inputs give the same bytes."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import stat
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.mount import lazyerofs

from lazyfs.errors import FormatError
from lazyfs.fetch.profile import Profile, ProfileLayer, dump_profile, parse_profile
from lazyfs.produce.layout import (
    ErofsImage,
    hints_from_paths,
    hints_from_ranges,
    layout_profile_layer,
    read_hints,
    relocate_image,
)
from lazyfs.produce.mkfs import make_erofs

EPOCH = 1_700_000_000


def need(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"needs {tool} (run scripts/setup.sh)")


def make_tree(root: Path) -> Path:
    """Every kind of entry mkfs.erofs writes: big, block-exact, inline-tailed and
    empty files, a directory large enough for several blocks, symlinks, a hard
    link, a fifo, inline and shared xattrs, odd modes and owners."""
    (root / "usr" / "bin").mkdir(parents=True)
    (root / "usr" / "lib").mkdir(parents=True)
    (root / "etc").mkdir()
    (root / "empty").mkdir()
    data = hashlib.sha512(b"seed").digest()
    (root / "usr" / "bin" / "big").write_bytes(data * 3000 + b"tail")  # 192 KiB + a tail
    (root / "usr" / "bin" / "big").chmod(0o755)
    (root / "usr" / "lib" / "exact").write_bytes(data * 128)  # exactly 2 blocks
    (root / "usr" / "lib" / "libhot.so").write_bytes(hashlib.sha512(b"hot").digest() * 1000)
    (root / "etc" / "zero").write_bytes(b"")
    (root / "etc" / "small").write_text("small\n")
    secret = root / "etc" / "secret"
    secret.write_text("shadow\n")
    secret.chmod(0o4640)
    os.chown(secret, 123, 456)
    many = root / "usr" / "share" / "many"
    many.mkdir(parents=True)
    for i in range(400):  # several directory blocks of entries
        (many / f"entry-with-a-longish-name-{i:04d}").write_text(f"{i}\n" * (i % 7))
    os.symlink("bin/big", root / "usr" / "link")
    os.symlink("x" * 300, root / "longlink")
    os.link(root / "etc" / "small", root / "usr" / "hardlink")
    os.mkfifo(root / "fifo")
    for p in ("etc/small", "usr/lib/exact", "usr/bin/big", "usr/share/many"):
        os.setxattr(root / p, "user.shared", b"same value")  # repeated: shared xattr
        os.setxattr(root / p, "trusted.t", b"t" * 40)
    os.setxattr(root / "usr" / "lib" / "libhot.so", "user.own", b"v" * 200)
    return root


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path's content hash, mode, owner, mtime, xattrs, link target,
    and which paths are the same inode."""
    out: dict[str, tuple] = {}
    inodes: dict[tuple[int, int], str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [".", *dirnames, *filenames] if dirpath == str(root) else [*dirnames, *filenames]:
            p = Path(dirpath) / name
            st = p.lstat()
            rel = os.path.normpath(str(p.relative_to(root)))
            xattrs = tuple(sorted((k, os.getxattr(p, k, follow_symlinks=False)) for k in os.listxattr(p, follow_symlinks=False)))
            if stat.S_ISLNK(st.st_mode):
                body: object = os.readlink(p)
            elif stat.S_ISREG(st.st_mode):
                body = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                body = None
            # Hard links: the first path of the same inode (only where nlink > 1:
            # overlayfs may give files of different layers the same st_ino).
            link_to = inodes.setdefault((st.st_dev, st.st_ino), rel) if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode) else rel
            out[rel] = (st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, st.st_size, st.st_nlink, xattrs, body, link_to)
    return out


@pytest.fixture
def kernel_tree(tmp_path: Path) -> Iterator:
    """Mount an image with the kernel EROFS driver and snapshot it; unmounted in the finalizer."""
    if os.geteuid() != 0:
        pytest.skip("needs root for a kernel mount")
    mounted: list[Path] = []

    def take(image: Path) -> dict[str, tuple]:
        mnt = tmp_path / f"mnt{len(mounted)}"
        mnt.mkdir()
        subprocess.run(["mount", "-t", "erofs", "-o", "loop,ro", str(image), str(mnt)], check=True)
        mounted.append(mnt)
        return snapshot(mnt)

    yield take
    for mnt in mounted:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fsck(image: Path) -> None:
    need("fsck.erofs")
    proc = subprocess.run(["fsck.erofs", str(image)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.fixture
def plain(tmp_path: Path) -> Path:
    need("mkfs.erofs")
    image = tmp_path / "plain.erofs"
    make_erofs(make_tree(tmp_path / "tree"), image, source_date_epoch=EPOCH)
    return image


def data_order(image: Path) -> list[tuple[int, str]]:
    """(start block, path) of every inode with data blocks, by block."""
    img = ErofsImage(image.read_bytes())
    return sorted((i.blkaddr, i.path) for i in img.inodes.values() if i.nblocks)


# ------------------------------------------------------------------ the tree is unchanged


def test_relocated_image_is_fsck_clean_and_serves_the_same_tree(plain: Path, tmp_path: Path, kernel_tree):
    new = tmp_path / "new.erofs"
    report = relocate_image(plain, new, hints_from_paths(["/usr/lib/libhot.so", "/usr/bin/big", "/etc/small"]))
    fsck(new)
    assert new.read_bytes() != plain.read_bytes()
    assert report.hot_files == 2  # /etc/small is all inline: no data blocks to move
    before, after = kernel_tree(plain), kernel_tree(new)
    assert before == after
    assert len(after) > 400 and after["usr/hardlink"][-1] == after["etc/small"][-1]


def test_without_hints_metadata_still_comes_first_and_the_tree_is_unchanged(plain: Path, tmp_path: Path, kernel_tree):
    new = tmp_path / "new.erofs"
    report = relocate_image(plain, new)
    fsck(new)
    assert report.hot_files == 0 and report.hot_end == report.metadata_bytes
    assert kernel_tree(plain) == kernel_tree(new)
    img = ErofsImage(new.read_bytes())
    meta_end = report.metadata_bytes // img.block
    for inode in img.inodes.values():
        # every inode and every directory block before every file's data
        assert inode.offset < report.metadata_bytes
        if inode.nblocks:
            assert (inode.blkaddr < meta_end) == inode.is_dir, inode.path


# ------------------------------------------------------------------ the order


def test_hinted_files_follow_the_metadata_in_first_use_order(plain: Path, tmp_path: Path):
    new = tmp_path / "new.erofs"
    order = ["/usr/lib/exact", "/usr/bin/big", "/usr/lib/libhot.so"]
    report = relocate_image(plain, new, hints_from_paths(order))
    placed = data_order(new)
    files = [p for blk, p in placed if blk * 4096 >= report.metadata_bytes]
    assert files[:3] == order
    first = min(blk for blk, p in placed if p == order[0])
    assert first * 4096 == report.metadata_bytes  # right after the metadata, no gap
    moved = {i.path: i for i in ErofsImage(new.read_bytes()).inodes.values()}
    assert report.hot_end == report.metadata_bytes + sum(moved[p].nblocks * 4096 for p in order)
    # back to back: each starts where the one before ends
    for a, b in itertools.pairwise(order):
        assert moved[a].blkaddr + moved[a].nblocks == moved[b].blkaddr


def test_profile_ranges_pick_the_files_whose_blocks_were_read_in_that_order(plain: Path, tmp_path: Path):
    img = ErofsImage(plain.read_bytes())
    by_path = {i.path: i for i in img.inodes.values()}
    hot, big = by_path["/usr/lib/libhot.so"], by_path["/usr/bin/big"]
    # libhot.so's second block read first, then one block in the middle of big
    ranges = [((hot.blkaddr + 1) * 4096, (hot.blkaddr + 2) * 4096), ((big.blkaddr + 10) * 4096, (big.blkaddr + 11) * 4096)]
    new = tmp_path / "new.erofs"
    report = relocate_image(plain, new, hints_from_ranges(ranges, [5, 9]))
    assert report.hot_files == 2
    # Those very blocks (not the whole files: see test_layout_chunked.py) right
    # after the metadata, in read order; the reads translated there, with their times.
    moved = {i.path: i for i in ErofsImage(new.read_bytes()).inodes.values()}
    m = report.metadata_bytes // 4096
    assert moved["/usr/lib/libhot.so"].blocks[1] == m and moved["/usr/bin/big"].blocks[10] == m + 1
    assert report.new_ranges == [(m * 4096, (m + 1) * 4096, 5), ((m + 1) * 4096, (m + 2) * 4096, 9)]
    frames, times = layout_profile_layer(report, "sha256:" + "0" * 64, 4096)
    assert frames == [m, m + 1] and times == [5, 9]


# ------------------------------------------------------------------ profiles, reproducibility, bad input


def profile_file(path: Path, frames: list[int], chunk: int, image_size: int, digest: str = "sha256:" + "a" * 64) -> Path:
    layer = ProfileLayer(digest, tuple(frames), tuple(range(len(frames))), chunk, -(-image_size // chunk))
    path.write_bytes(dump_profile(Profile((layer,))))
    return path


def test_a_profile_naming_frames_past_the_end_and_missing_paths_still_builds(plain: Path, tmp_path: Path, kernel_tree):
    size = plain.stat().st_size
    prof = profile_file(tmp_path / "p.json", [2, 10_000, 1], 4096, size)
    hints, digest = read_hints(prof, size)
    assert digest == "sha256:" + "a" * 64
    new = tmp_path / "new.erofs"
    report = relocate_image(plain, new, hints)
    assert report.ignored_ranges == 1  # frame 10000
    paths = tmp_path / "paths.txt"
    paths.write_text("/no/such/file\n\n# a comment\n/usr/bin/big\nalso/missing\n")
    new2 = tmp_path / "new2.erofs"
    report2 = relocate_image(plain, new2, read_hints(paths, size)[0])
    assert report2.missing_paths == ["/no/such/file", "/also/missing"] and report2.hot_files == 1
    fsck(new2)
    assert kernel_tree(plain) == kernel_tree(new) == kernel_tree(new2)


def test_a_profile_recorded_on_another_image_is_refused_by_name(plain: Path, tmp_path: Path):
    prof = profile_file(tmp_path / "p.json", [0], 4096, 50 * plain.stat().st_size)
    with pytest.raises(FormatError, match="not the same image"):
        read_hints(prof, plain.stat().st_size)


def test_build_with_a_profile_is_reproducible_and_writes_the_translated_profile(tmp_path: Path):
    need("mkfs.erofs")
    tree = make_tree(tmp_path / "tree")
    paths = tmp_path / "paths.txt"
    paths.write_text("/usr/lib/libhot.so\n/missing\n")
    env = {**os.environ, "SOURCE_DATE_EPOCH": str(EPOCH)}
    outs = []
    for n in range(2):
        blob = tmp_path / f"{n}.blob"
        proc = lazyerofs("build", str(tree), "-o", str(blob), "--chunk-size", "16KiB", "--profile", str(paths),
                         "--profile-out", str(tmp_path / f"{n}.profile.json"), env=env)  # fmt: skip
        assert "1 listed paths not in the image" in proc.stderr
        outs.append((blob.read_bytes(), Path(f"{blob}.json").read_bytes(), (tmp_path / f"{n}.profile.json").read_bytes()))
    assert outs[0] == outs[1]
    plain = tmp_path / "plain.blob"
    lazyerofs("build", str(tree), "-o", str(plain), "--chunk-size", "16KiB", env=env)
    assert plain.read_bytes() != outs[0][0]
    desc = json.loads(outs[0][1])
    translated = parse_profile(outs[0][2])
    assert [layer.digest for layer in translated.layers] == [desc["digest"]]
    assert translated.layers[0].frames[0] == 0  # the hot part starts the image


def test_hot_level_is_checked_and_needs_a_profile(tmp_path: Path):
    need("mkfs.erofs")
    tree = make_tree(tmp_path / "tree")
    paths = tmp_path / "paths.txt"
    paths.write_text("/usr/lib/libhot.so\n")
    blob = tmp_path / "out.blob"
    alone = lazyerofs("build", str(tree), "-o", str(blob), "--hot-level", "19", check=False)
    assert alone.returncode != 0 and "need --profile" in alone.stderr
    bad = lazyerofs("build", str(tree), "-o", str(blob), "--profile", str(paths), "--hot-level", "99", check=False)
    assert bad.returncode != 0 and "--hot-level must be between" in bad.stderr
    assert not blob.exists()
    # The hot part at level 19 makes a smaller blob than at level 3.
    sizes = {}
    for level in ("3", "19"):
        out = tmp_path / f"{level}.blob"
        lazyerofs("build", str(tree), "-o", str(out), "--chunk-size", "16KiB", "--profile", str(paths), "--hot-level", level)
        sizes[level] = json.loads(Path(f"{out}.json").read_text())
    assert sizes["19"]["size"] < sizes["3"]["size"]


def test_a_compressed_image_is_refused_with_a_clear_error(tmp_path: Path):
    need("mkfs.erofs")
    tree = make_tree(tmp_path / "tree")
    image = tmp_path / "lz4.erofs"
    make_erofs(tree, image, extra_args=["-zlz4"], source_date_epoch=EPOCH)
    with pytest.raises(FormatError, match="not supported by the layout rewriter"):
        relocate_image(image, tmp_path / "out.erofs")
    assert not (tmp_path / "out.erofs").exists()


def test_a_corrupt_directory_gives_a_format_error_not_a_crash(plain: Path, tmp_path: Path):
    data = bytearray(plain.read_bytes())
    img = ErofsImage(bytes(data))
    many = next(i for i in img.inodes.values() if i.path == "/usr/share/many")
    at = many.blkaddr * img.block
    struct.pack_into("<H", data, at + 8, 7)  # first name offset not a multiple of 12
    bad = tmp_path / "bad.erofs"
    bad.write_bytes(bytes(data))
    with pytest.raises(FormatError, match="/usr/share/many: bad directory block"):
        relocate_image(bad, tmp_path / "out.erofs")
    data = bytearray(plain.read_bytes())
    struct.pack_into("<Q", data, at + 2 * 12, 1 << 40)  # a child entry's nid far past the image
    bad.write_bytes(bytes(data))
    with pytest.raises(FormatError, match="past the end of the image"):
        relocate_image(bad, tmp_path / "out.erofs")
