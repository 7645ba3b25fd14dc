"""Block-granular layout (lazyfs/produce/layout.py): a file the recorded start
read only part of is written chunk-based (one-block chunks), its read blocks
in the hot part in first-read order, the rest after; inodes and directories
the start did not read come after the hot data. The image stays fsck.erofs
clean and, mounted by the kernel, serves the same tree in every attribute."""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

import pytest
from test_layout import (
    EPOCH,
    fsck,
    kernel_tree,  # noqa: F401 (a fixture: pytest finds it here)
    make_tree,
    need,
)

from lazyfs.produce.layout import ErofsImage, hints_from_ranges, relocate_image
from lazyfs.produce.mkfs import make_erofs

B = 4096
CHUNK_BASED = 4


def chunky_tree(root: Path) -> Path:
    """make_tree's entries, plus what a partly read file may also be: hard
    linked, an extended inode (a 32-bit owner), holding zero blocks."""
    make_tree(root)
    os.link(root / "usr" / "bin" / "big", root / "usr" / "bin" / "big-again")
    ext = root / "usr" / "lib" / "libext.so"
    # no two blocks alike (mkfs --chunksize shares equal chunks)
    ext.write_bytes(b"".join(hashlib.sha256(i.to_bytes(4, "little")).digest() for i in range(3200)) + b"end")
    os.chown(ext, 70_000, 70_001)
    ext.chmod(0o711)
    os.setxattr(ext, "user.big", b"x" * 300)
    (root / "usr" / "lib" / "zeros").write_bytes(bytes(10 * B) + b"z")
    return root


@pytest.fixture
def plain(tmp_path: Path) -> Path:
    need("mkfs.erofs")
    image = tmp_path / "plain.erofs"
    make_erofs(chunky_tree(tmp_path / "tree"), image, source_date_epoch=EPOCH)
    return image


def by_path(image: Path) -> dict[str, object]:
    """Every name (hard links: each) -> its parsed inode."""
    return ErofsImage(image.read_bytes()).paths()  # type: ignore[return-value]


def blocks(inode: object, *which: int) -> list[tuple[int, int]]:
    """(start, end) byte ranges of some of a file's blocks."""
    return [(inode.blocks[i] * B, (inode.blocks[i] + 1) * B) for i in which]  # type: ignore[attr-defined]


def incompat(image: Path) -> int:
    return struct.unpack_from("<I", image.read_bytes(), 1024 + 80)[0]


def test_partly_read_files_become_chunk_based_fsck_clean_and_serve_the_same_tree(plain: Path, tmp_path: Path, kernel_tree):  # noqa: F811 (the fixture)
    old = by_path(plain)
    ranges = [
        *blocks(old["/usr/bin/big"], 3, 4, 5),
        *blocks(old["/usr/lib/libhot.so"], 1),
        *blocks(old["/usr/lib/libext.so"], 0, 1, 24),
        *blocks(old["/usr/lib/zeros"], 9),
    ]
    new = tmp_path / "new.erofs"
    report = relocate_image(plain, new, hints_from_ranges(ranges))
    assert report.chunked_files == 4 and report.hot_files == 4
    placed = by_path(new)
    for p in ("/usr/bin/big", "/usr/lib/libhot.so", "/usr/lib/libext.so", "/usr/lib/zeros"):
        assert placed[p].layout == CHUNK_BASED, p  # type: ignore[attr-defined]
    assert placed["/usr/bin/big-again"] is placed["/usr/bin/big"]  # still one inode, two names
    assert incompat(new) & 0x4  # EROFS_FEATURE_INCOMPAT_CHUNKED_FILE
    fsck(new)
    before, after = kernel_tree(plain), kernel_tree(new)
    assert before == after
    assert after["usr/bin/big-again"][-1] == after["usr/bin/big"][-1]
    assert after["usr/lib/libext.so"][1:3] == (70_000, 70_001)


def test_a_partly_read_files_read_blocks_lie_together_in_the_hot_part_in_first_read_order(plain: Path, tmp_path: Path):
    old = by_path(plain)
    big, hot = old["/usr/bin/big"], old["/usr/lib/libhot.so"]
    # first-read order: 4 blocks in the middle of big, 2 of libhot.so, then big's block 2
    ranges = [*blocks(big, 20, 21, 22, 23), *blocks(hot, 3, 4), *blocks(big, 2)]
    times = [10, 11, 12, 13, 20, 21, 30]
    new = tmp_path / "new.erofs"
    report = relocate_image(plain, new, hints_from_ranges(ranges, times))
    placed = by_path(new)
    nbig, nhot = placed["/usr/bin/big"], placed["/usr/lib/libhot.so"]
    m = report.metadata_bytes // B
    assert nbig.blocks[20:24] == [m, m + 1, m + 2, m + 3]  # type: ignore[attr-defined]
    assert nhot.blocks[3:5] == [m + 4, m + 5]  # type: ignore[attr-defined]
    assert nbig.blocks[2] == m + 6  # type: ignore[attr-defined]
    # only those 7 blocks are hot: the files' other blocks all lie after the hot part
    assert report.hot_end == (m + 7) * B and report.hot_bytes == 7 * B
    for inode, read in ((nbig, {2, 20, 21, 22, 23}), (nhot, {3, 4})):
        rest = [a for i, a in enumerate(inode.blocks) if i not in read]  # type: ignore[attr-defined]
        assert rest and min(rest) * B >= report.hot_end
    # the translated profile names those very blocks, first-read order, with their times
    assert report.new_ranges == [((m + i) * B, (m + i + 1) * B, ms) for i, ms in enumerate(times)]
    fsck(new)


def test_inodes_and_directories_the_start_did_not_read_come_after_the_hot_data(plain: Path, tmp_path: Path):
    old = by_path(plain)
    new = tmp_path / "new.erofs"
    report = relocate_image(plain, new, hints_from_ranges(blocks(old["/usr/lib/libhot.so"], 1)))
    placed = by_path(new)
    for p in ("/", "/usr", "/usr/lib", "/usr/lib/libhot.so"):  # the read file and its ancestors
        assert placed[p].offset < report.metadata_bytes, p  # type: ignore[attr-defined]
    many = placed["/usr/share/many"]
    assert many.offset >= report.hot_end and many.blkaddr * B >= report.hot_end  # type: ignore[attr-defined]
    assert all(i.offset >= report.hot_end for p, i in placed.items() if p.startswith("/usr/share/many/"))  # type: ignore[attr-defined]
    assert report.cold_metadata_bytes > 0 and report.hot_end <= 3 * B + report.hot_bytes
    fsck(new)


def test_a_chunk_based_image_from_mkfs_or_an_earlier_layout_is_laid_out_again(plain: Path, tmp_path: Path, kernel_tree):  # noqa: F811 (the fixture)
    chunked = tmp_path / "mkfs-chunked.erofs"
    make_erofs(tmp_path / "tree", chunked, extra_args=["--chunksize=8192"], source_date_epoch=EPOCH)
    first = tmp_path / "first.erofs"
    relocate_image(plain, first, hints_from_ranges(blocks(by_path(plain)["/usr/lib/libext.so"], 5, 6)))
    want = kernel_tree(plain)
    for n, src in enumerate((chunked, first)):
        src_ext = by_path(src)["/usr/lib/libext.so"]
        out = tmp_path / f"again{n}.erofs"
        report = relocate_image(src, out, hints_from_ranges(blocks(src_ext, 0, 20, 21)))
        assert report.chunked_files >= 1
        placed = by_path(out)["/usr/lib/libext.so"]
        m = report.metadata_bytes // B
        assert placed.blocks[0] == m and placed.blocks[20:22] == [m + 1, m + 2]  # type: ignore[attr-defined]
        fsck(out)
        assert kernel_tree(out) == want, src.name
