"""EROFS images written straight from a tar stream (lazyfs.produce.erofs_writer):
hand-made tars of every kind, each image checked by fsck.erofs (every file
read back) and mounted by the kernel's EROFS driver; the same tree as the
staging + mkfs.erofs road; the same bytes for the same tar; the same refusals
of hostile tars as the staging road, naming the entry."""

from __future__ import annotations

import hashlib
import io
import os
import random
import shutil
import stat
import subprocess
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support.mount import Mounter, lazyerofs
from test_convert import CAP_NET_RAW, entry, make_tar, sparse_entry
from test_convert_e2e import layer_tars, mounted_tree, oci_union, push_source

from lazyfs.errors import FormatError
from lazyfs.format import encode_image
from lazyfs.produce import make_erofs, stage_tar
from lazyfs.produce.erofs_writer import StreamingEncoder, _Headers, _Input, write_erofs_from_tar

EPOCH = 1_750_000_000
LAYER = "layer 1/1 sha256:test"


def need(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed")


def write(data: bytes, path: Path, **kw) -> Path:
    kw.setdefault("source_date_epoch", EPOCH)
    write_erofs_from_tar(io.BytesIO(data), path, layer=LAYER, **kw)
    return path


def fsck(image: Path, tmp_path: Path) -> None:
    """fsck.erofs, extracting every file (so every byte of every file is read)."""
    need("fsck.erofs")
    out = tmp_path / f"fsck-{image.name}"
    proc = subprocess.run(["fsck.erofs", f"--extract={out}", str(image)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    shutil.rmtree(out, ignore_errors=True)


@pytest.fixture
def mount(tmp_path: Path) -> Iterator[Callable[[Path], Path]]:
    """Mount an image with the kernel EROFS driver; unmounted in the finalizer."""
    if os.geteuid() != 0:
        pytest.skip("needs root for a kernel mount")
    mounted: list[Path] = []

    def do(image: Path) -> Path:
        mnt = tmp_path / f"mnt{len(mounted)}"
        mnt.mkdir()
        subprocess.run(["mount", "-t", "erofs", "-o", "loop,ro", str(image), str(mnt)], check=True)
        mounted.append(mnt)
        return mnt

    yield do
    for mnt in mounted:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def image_of(entries: list, tmp_path: Path, mount: Callable[[Path], Path], name: str = "img", **kw) -> Path:
    image = write(make_tar(entries), tmp_path / f"{name}.erofs", **kw)
    fsck(image, tmp_path)
    return mount(image)


def snapshot(root: Path) -> dict[bytes, tuple]:
    """Every path's type, mode, owner, size, links, mtime, device, xattrs and content."""
    out: dict[bytes, tuple] = {}
    broot = os.fsencode(root)
    for dirpath, dirnames, filenames in os.walk(broot):
        for name in [b".", *dirnames, *filenames] if dirpath == broot else dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            xattrs = tuple(sorted((k, os.getxattr(p, k, follow_symlinks=False)) for k in os.listxattr(p, follow_symlinks=False)))
            body: object = None
            if stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    body = hashlib.sha256(f.read()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                body = os.readlink(p)
            size = 0 if stat.S_ISDIR(st.st_mode) else st.st_size
            out[os.path.relpath(p, broot)] = (
                st.st_mode, st.st_uid, st.st_gid, size, st.st_nlink, st.st_mtime_ns, st.st_rdev, xattrs, body,
            )  # fmt: skip
    return out


def timed(ti_data: tuple[tarfile.TarInfo, bytes], mtime: float) -> tuple[tarfile.TarInfo, bytes]:
    ti, data = ti_data
    ti.mtime = mtime
    if isinstance(mtime, float):
        ti.pax_headers = {**ti.pax_headers, "mtime": repr(mtime)}
    return ti, data


ODD = b"caf\xe9-\xff.txt".decode("utf-8", "surrogateescape")
N255 = "n" * 255


# ------------------------------------------------------------------ entry kinds


def test_every_kind_of_entry_mounts_with_its_metadata(tmp_path, mount):
    big = random.Random(1).randbytes(300_000)
    root = image_of([
        entry("bin/", "dir"), entry("sbin/", "dir"), entry("tmp/", "dir", mode=0o1777),
        entry("bin/ping", data=b"ELF", mode=0o755,
              xattrs={"security.capability": CAP_NET_RAW, "user.note": b"\x00\xffbin", "trusted.x": b"t"}),
        entry("bin/su", data=b"su", mode=0o4755), entry("bin/wall", data=b"w", mode=0o2755, gid=5),
        entry("sbin/su2", "hardlink", link="bin/su"), entry("su3", "hardlink", link="./bin/su"),
        entry("bin/sh", "symlink", link="/bin/../usr/bin/dash"),
        entry("null", "chr", dev=(1, 3), mode=0o666), entry("sda", "chr", dev=(259, 70000)),
        entry("pipe", "fifo", mode=0o600),
        entry(f"{N255}/{N255}", data=b"deep", uid=1000, gid=1001),
        entry(ODD, data=b"latin1"), entry("empty"), entry("big", data=big, uid=70_000, gid=80_000),
        entry("block", data=b"b" * 8192), entry("block-and-a-bit", data=b"c" * 8193),
        timed(entry("old", data=b"o"), 1_000_000_000), timed(entry("nanos", data=b"n"), 1_600_000_000.25),
        timed(entry("future", data=b"f"), EPOCH + 1000),
    ], tmp_path, mount)  # fmt: skip
    ping = root / "bin" / "ping"
    assert os.getxattr(ping, "security.capability") == CAP_NET_RAW
    assert os.getxattr(ping, "user.note") == b"\x00\xffbin"
    assert os.getxattr(ping, "trusted.x") == b"t"
    assert ping.read_bytes() == b"ELF" and stat.S_IMODE(ping.lstat().st_mode) == 0o755
    su = (root / "bin" / "su").lstat()
    assert stat.S_IMODE(su.st_mode) == 0o4755 and su.st_nlink == 3
    for other in ("sbin/su2", "su3"):
        assert (root / other).lstat().st_ino == su.st_ino and (root / other).read_bytes() == b"su"
    wall = (root / "bin" / "wall").lstat()
    assert (stat.S_IMODE(wall.st_mode), wall.st_gid) == (0o2755, 5)
    assert stat.S_IMODE((root / "tmp").lstat().st_mode) == 0o1777
    assert os.readlink(root / "bin" / "sh") == "/bin/../usr/bin/dash"
    null, sda = (root / "null").lstat(), (root / "sda").lstat()
    assert stat.S_ISCHR(null.st_mode) and (os.major(null.st_rdev), os.minor(null.st_rdev)) == (1, 3)
    assert stat.S_IMODE(null.st_mode) == 0o666
    assert (os.major(sda.st_rdev), os.minor(sda.st_rdev)) == (259, 70000)
    assert stat.S_ISFIFO((root / "pipe").lstat().st_mode)
    deep = (root / N255 / N255).lstat()
    assert (deep.st_uid, deep.st_gid) == (1000, 1001) and (root / N255 / N255).read_bytes() == b"deep"
    assert (root / os.fsdecode(b"caf\xe9-\xff.txt")).read_bytes() == b"latin1"
    assert (root / "empty").read_bytes() == b"" and (root / "empty").lstat().st_size == 0
    bigst = (root / "big").lstat()
    assert (root / "big").read_bytes() == big and (bigst.st_uid, bigst.st_gid) == (70_000, 80_000)
    assert (root / "block").read_bytes() == b"b" * 8192
    assert (root / "block-and-a-bit").read_bytes() == b"c" * 8193
    # mtimes as mkfs.erofs keeps them with SOURCE_DATE_EPOCH: kept below it, clamped at or after.
    assert (root / "old").lstat().st_mtime_ns == 1_000_000_000 * 10**9
    assert (root / "nanos").lstat().st_mtime_ns == 1_600_000_000_250_000_000
    assert (root / "future").lstat().st_mtime_ns == EPOCH * 10**9
    # The root and implied directories: 0755 root-owned, at the epoch.
    for d in (root, root / N255):
        st = d.lstat()
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime) == (0o755, 0, 0, EPOCH)
    assert root.lstat().st_nlink == 2 + 4  # "." and its name, and 4 subdirectories' ".."


def test_whiteouts_become_overlayfs_whiteouts_and_opaque_dirs(tmp_path, mount):
    root = image_of([
        entry("gone/", "dir"), entry("gone/.wh.file"), entry(".wh.olddir"),
        entry("opq/", "dir"), entry("opq/.wh..wh..opq"), entry("opq/new", data=b"n"),
        entry("own/", "dir"), entry("own/kept", data=b"k"), entry(".wh.own"),
        entry(".wh.refilled"), entry("refilled/inside", data=b"i"),
        entry(".wh.redir"), entry("redir/", "dir", mode=0o700),
        entry(".wh.refile"), entry("refile", data=b"file again"),
        entry(".wh..wh.aufs-metadata"),
    ], tmp_path, mount)  # fmt: skip
    for path in ("gone/file", "olddir"):
        st = (root / path).lstat()
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0 and (st.st_uid, st.st_gid) == (0, 0)
    assert os.getxattr(root / "opq", "trusted.overlay.opaque") == b"y"
    assert os.listdir(root / "opq") == ["new"]
    # A whiteout of this layer's own directory keeps it, opaque over lower layers.
    assert (root / "own" / "kept").read_bytes() == b"k"
    assert os.getxattr(root / "own", "trusted.overlay.opaque") == b"y"
    # A deleted path filled again: a new, opaque directory (implied or listed), or a file.
    for d in ("refilled", "redir"):
        assert (root / d).is_dir() and os.getxattr(root / d, "trusted.overlay.opaque") == b"y"
    assert stat.S_IMODE((root / "redir").lstat().st_mode) == 0o700
    assert (root / "refile").read_bytes() == b"file again"
    assert not any(n.startswith(".wh.") for _, ds, fs in os.walk(root) for n in ds + fs)
    with pytest.raises(OSError):
        os.getxattr(root / "gone", "trusted.overlay.opaque")


def test_later_entries_replace_earlier_ones_as_extraction_would(tmp_path, mount):
    root = image_of([
        entry("x", "symlink", link="/etc/passwd"), entry("x", data=b"file now"),
        entry("d/", "dir"), entry("d/child", data=b"c"), entry("d", data=b"was a dir"),
        entry("a", data=b"first"), entry("b", "hardlink", link="a"), entry("a", data=b"second"),
        entry("e/", "dir", mode=0o700, xattrs={"user.one": b"1"}), entry("e/kept", data=b"k"),
        entry("e/", "dir", mode=0o750, uid=3, xattrs={"user.two": b"2"}),
        entry("m/", "dir"), entry("m/n/", "dir"), entry("m/n/old", data=b"o"),
        entry("m", data=b"file"), entry("m/", "dir"), entry("m/n/new", data=b"n"),
    ], tmp_path, mount)  # fmt: skip
    assert (root / "x").read_bytes() == b"file now" and not (root / "x").is_symlink()
    assert (root / "d").read_bytes() == b"was a dir"
    # The hard link kept the inode it named; the name "a" got a new one.
    assert (root / "a").read_bytes() == b"second" and (root / "b").read_bytes() == b"first"
    assert (root / "a").lstat().st_nlink == 1 and (root / "b").lstat().st_nlink == 1
    # A directory listed again keeps its entries; its metadata is the later entry's, xattrs added.
    e = (root / "e").lstat()
    assert (stat.S_IMODE(e.st_mode), e.st_uid) == (0o750, 3) and os.listdir(root / "e") == ["kept"]
    assert os.getxattr(root / "e", "user.one") == b"1" and os.getxattr(root / "e", "user.two") == b"2"
    assert os.listdir(root / "m" / "n") == ["new"]


def test_a_directory_of_thousands_spans_blocks_and_every_name_is_found(tmp_path, mount):
    rnd = random.Random(7)
    names = sorted({("-" if i % 17 == 0 else "") + f"f{i}-" + "x" * rnd.randint(0, 200) for i in range(4000)})
    rnd.shuffle(names)  # tar order is not name order
    root = image_of([entry(f"big/{n}", data=n.encode()[:50]) for n in names], tmp_path, mount)
    assert (root / "big").lstat().st_size > 20 * 4096  # many directory blocks
    assert sorted(os.listdir(root / "big")) == sorted(names)
    for n in names:  # each found by the kernel's binary search over blocks and names
        assert (root / "big" / n).read_bytes() == n.encode()[:50]
    for missing in ("", "-", "f", "zzz", names[0] + "y"):
        assert not (root / "big" / f"{missing}~").exists()


def test_a_big_sparse_file_reads_as_its_data_and_zeros_and_stays_sparse(tmp_path, mount):
    size = 256 << 20
    segments = [(4096 * 3 + 5, b"head"), (100 << 20, b"middle" * 1000), (size - 7, b"the end")]
    image = tmp_path / "sparse.erofs"
    write(make_tar([sparse_entry("s/sparse", size, segments), entry("after", data=b"after")]), image)
    assert image.stat().st_blocks * 512 < 4 << 20  # the holes are holes of the image file too
    fsck(image, tmp_path)
    root = mount(image)
    with open(root / "s" / "sparse", "rb") as f:
        assert os.fstat(f.fileno()).st_size == size
        for off, data in segments:
            f.seek(off - 10)
            assert f.read(len(data) + 10) == b"\0" * 10 + data
        f.seek(50 << 20)
        assert f.read(1 << 20) == b"\0" * (1 << 20)
    assert (root / "after").read_bytes() == b"after"


def test_tails_past_the_budget_and_big_xattrs_go_to_blocks_of_their_own(tmp_path, mount):
    files = [entry(f"f{i}", data=bytes([i]) * (i * 911)) for i in range(1, 40)]
    files += [entry("bigx", data=b"z" * 5000, xattrs={"user.big": b"v" * 3500}),
              entry("link", "symlink", link="t" * 4000)]  # fmt: skip
    plain = image_of(files, tmp_path, mount, "plain", tail_budget=0)
    packed = image_of(files, tmp_path, mount, "packed")
    assert snapshot(plain) == snapshot(packed)
    assert (packed / "bigx").read_bytes() == b"z" * 5000 and os.getxattr(packed / "bigx", "user.big") == b"v" * 3500
    assert os.readlink(packed / "link") == "t" * 4000
    assert (tmp_path / "plain.erofs").stat().st_size > (tmp_path / "packed.erofs").stat().st_size


def test_an_empty_layer_is_an_empty_root(tmp_path, mount):
    root = image_of([], tmp_path, mount)
    assert os.listdir(root) == [] and root.lstat().st_mtime == EPOCH


def test_gnu_and_ustar_headers_parse_as_tarfile_parses_them(tmp_path, mount):
    long = "d" * 120 + "/" + "f" * 90
    members = [entry(long, data=b"long"), entry("l", "symlink", link="t" * 150), entry("h", "hardlink", link=long)]
    for fmt in (tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT, tarfile.PAX_FORMAT):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
            for ti, data in members if fmt != tarfile.USTAR_FORMAT else members[:1]:
                tar.addfile(ti, io.BytesIO(data) if ti.isreg() else None)
        data = buf.getvalue()
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            want = [(m.name, m.type, m.size, m.linkname, m.offset_data) for m in tar]
        inp = _Input(io.BytesIO(data).read1, "t", hash_stream=False)
        headers, got = _Headers(inp, "t"), []
        while True:
            if inp.tell() < headers.shim.offset:
                inp.skip(headers.shim.offset - inp.tell())
            try:
                m = headers.member()
            except tarfile.EOFHeaderError:
                break
            got.append((m.name, m.type, m.size, m.linkname, m.offset_data))
        assert got == want, fmt
        root = mount(write(data, tmp_path / f"fmt{fmt}.erofs"))
        assert (root / long).read_bytes() == b"long"
        if fmt != tarfile.USTAR_FORMAT:
            assert os.readlink(root / "l") == "t" * 150 and (root / "h").lstat().st_nlink == 2


# ------------------------------------------------------------------ against the mkfs road


def test_the_tree_is_the_one_staging_and_mkfs_erofs_make(tmp_path, mount):
    """Same paths, types, modes, owners, sizes, link counts, mtimes (nanoseconds
    too), device numbers, xattrs and contents as stage_tar + make_erofs give.
    (mkfs.erofs 1.5 cannot take 255-byte names: 200 here.)"""
    need("mkfs.erofs")
    rnd = random.Random(3)
    tar = make_tar([
        entry("etc/", "dir"), entry("etc/passwd", data=b"root:x:0:0\n"),
        entry("usr/bin/ping", data=rnd.randbytes(70_000), mode=0o4755,
              xattrs={"security.capability": CAP_NET_RAW}),
        entry("usr/sbin/ping", "hardlink", link="usr/bin/ping"), entry("usr/lib/x", "symlink", link="../bin/ping"),
        entry("dev/null", "chr", dev=(1, 3), mode=0o666), entry("dev/fifo", "fifo"),
        entry("home/u/", "dir", uid=1000, gid=1000, mode=0o700), entry(f"{'n' * 200}/{ODD}", data=b"odd"),
        entry("gone/", "dir"), entry("gone/.wh.x"), entry("o/", "dir"), entry("o/.wh..wh..opq"),
        timed(entry("t/nanos", data=b"n" * 5000), 1_600_000_000.5), timed(entry("t/late", data=b"l"), EPOCH + 5),
        sparse_entry("t/sparse", 3 << 20, [(1 << 20, b"hello"), ((2 << 20) + 7, b"x" * 5000)]),
        *[entry(f"many/f{i:04d}-" + "q" * (i % 150), data=rnd.randbytes(i * 7), uid=i % 3) for i in range(1500)],
    ])  # fmt: skip
    stage = tmp_path / "stage"
    stage.mkdir()
    os.chmod(stage, 0o755)
    stage_tar(io.BytesIO(tar), stage, layer=LAYER)
    make_erofs(stage, tmp_path / "mkfs.erofs", source_date_epoch=EPOCH)
    direct = write(tar, tmp_path / "direct.erofs")
    fsck(direct, tmp_path)
    assert snapshot(mount(tmp_path / "mkfs.erofs")) == snapshot(mount(direct))
    # About the same size: data tails packed after the inodes, as mkfs.erofs packs them.
    assert direct.stat().st_size <= (tmp_path / "mkfs.erofs").stat().st_size * 1.02 + 8192


# ------------------------------------------------------------------ reproducible


def test_the_same_tar_gives_the_same_bytes_however_it_is_cut(tmp_path):
    rnd = random.Random(5)
    tar = make_tar([entry(f"d{i % 5}/f{i}", data=rnd.randbytes(rnd.randint(0, 20_000))) for i in range(200)])
    a = write(tar, tmp_path / "a")
    pieces = iter([tar[i : i + 333] for i in range(0, len(tar), 333)])
    write_erofs_from_tar(lambda: next(pieces, b""), tmp_path / "b", layer=LAYER, source_date_epoch=EPOCH)
    assert a.read_bytes() == (tmp_path / "b").read_bytes()
    # Another epoch, or another source (seed): another image, and another UUID.
    c = write(tar, tmp_path / "c", source_date_epoch=EPOCH + 1)
    d = write(tar, tmp_path / "d", uuid_seed=b"sha256:other")
    uuids = {p.read_bytes()[1024 + 48 : 1024 + 64] for p in (a, c, d)}
    assert len(uuids) == 3 and a.read_bytes() != c.read_bytes()


# ------------------------------------------------------------------ encoding while writing


def _mixed_tar(seed: int) -> bytes:
    rnd = random.Random(seed)
    return make_tar([
        entry(f"d{i % 9}/f{i}", data=rnd.randbytes(rnd.choice([0, 10, 5000, 70_000, 300_000])))
        for i in range(120)
    ] + [sparse_entry("holes", 5 << 20, [(1 << 20, b"x" * 9000), (4 << 20, b"y")])])  # fmt: skip


def test_what_the_writer_calls_final_never_changes_afterwards(tmp_path):
    image = tmp_path / "img"
    seen: list[tuple[int, int, bytes]] = []
    last = [4096]

    def on_final(upto: int) -> None:
        assert upto >= last[0]  # only forward
        with open(image, "rb") as f:
            f.seek(last[0])
            seen.append((last[0], upto, hashlib.sha256(f.read(upto - last[0])).digest()))
        last[0] = upto

    write(_mixed_tar(1), image, on_final=on_final)
    data = image.read_bytes()
    assert len(seen) > 10 and last[0] > len(data) // 2
    for start, end, digest in seen:
        assert hashlib.sha256(data[start:end]).digest() == digest, (start, end)


@pytest.mark.parametrize(("chunk", "verity"), [(65536, False), (4096 * 3, True), (4 << 20, False)])
def test_the_streamed_blob_is_the_one_encode_image_makes(tmp_path, chunk, verity):
    """Frames compressed while the image was written, frame 0 and the metadata's
    at the end: byte for byte the blob of encoding the finished image."""
    image = tmp_path / "img"
    encoder = StreamingEncoder(image, chunk_size=chunk, scratch_dir=tmp_path)
    try:
        write(_mixed_tar(2), image, on_final=encoder.final)
        assert encoder._next > 2 or chunk > 1 << 20  # frames went out before the end
        got = encoder.finish(tmp_path / "streamed.blob", dm_verity=verity)
    finally:
        encoder.close()
    want = encode_image(image, tmp_path / "whole.blob", chunk_size=chunk, dm_verity=verity, fsync=False)
    assert got == want
    assert (tmp_path / "streamed.blob").read_bytes() == (tmp_path / "whole.blob").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img", "streamed.blob", "whole.blob"]


# ------------------------------------------------------------------ hostile tars


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([entry("../outside/pwned", data=b"x")], "climbs out of the layer root"),
        ([entry("a/../../outside/pwned", data=b"x")], "climbs out of the layer root"),
        ([entry("esc", "symlink", link="../outside"), entry("esc/pwned", data=b"x")],
         "'esc' is a symlink, not a directory"),
        ([entry("esc", "symlink", link="/"), entry("esc/tmp/pwned", data=b"x")],
         "'esc' is a symlink, not a directory"),
        ([entry("esc", "symlink", link="../outside"), entry("hl", "hardlink", link="esc/secret")],
         "'esc' is a symlink, not a directory"),
        ([entry("hl", "hardlink", link="../outside/secret")], "climbs out of the layer root"),
        ([entry("dev", "chr", dev=(1, 3)), entry("dev/x", data=b"x")], "'dev' is a character device, not a directory"),
        ([entry("f", data=b"x"), entry("f/x", data=b"x")], "'f' is a file, not a directory"),
        ([entry("hl", "hardlink", link="missing")], "'missing' is not in this layer"),
        ([entry("hl", "hardlink", link="nodir/missing")], "'nodir' is not in this layer"),
        ([entry(".wh.gone"), entry("hl", "hardlink", link="gone")], "which this layer deletes"),
        ([sparse_entry("huge", 10 << 30, [(0, b"x")])], "past its cap of 8.0 GiB"),
        ([entry("f", data=b"x", xattrs={"trusted.overlay.redirect": b"/etc"})], "reserved for overlayfs"),
        ([entry("d/", "dir"), entry("d/.wh...")], "whiteout of an empty"),
        ([entry("f", "dir"), entry("g", "hardlink", link="f")], "hard link to a directory"),
        ([entry("n" * 256, data=b"x")], "over 255"),
        ([entry("f", data=b"x", xattrs={"system.nfs4_acl": b"x"})], "EROFS stores only"),
    ],
)  # fmt: skip
def test_hostile_tars_are_refused_like_the_staging_road_refuses_them(tmp_path, entries, message):
    image = tmp_path / "img.erofs"
    with pytest.raises(FormatError) as err:
        write(make_tar(entries), image)
    assert message in str(err.value)
    assert f"{LAYER}: entry" in str(err.value)
    assert not image.exists()  # nothing left behind


def test_the_size_cap_counts_every_file(tmp_path):
    data = make_tar([entry("a", data=b"x" * 600), entry("b", data=b"y" * 600)])
    with pytest.raises(FormatError, match=r"entry 'b'.*--max-layer-size"):
        write(data, tmp_path / "img", max_layer_bytes=1000)


def test_a_stream_that_is_not_a_tar_or_ends_inside_data_is_a_format_error(tmp_path):
    with pytest.raises(FormatError, match="not a tar archive"):
        write(b"\x01" * 4096, tmp_path / "a")
    with pytest.raises(FormatError, match="not a tar archive"):
        write(b"", tmp_path / "b")
    cut = make_tar([entry("f", data=b"x" * 100_000)])[:50_000]
    with pytest.raises(FormatError, match="entry 'f': the tar ends inside this file's data"):
        write(cut, tmp_path / "c")
    # A header claiming more than the stream holds, for an entry whose data is skipped.
    ti, _ = entry(".wh.x")
    ti.type, ti.size = tarfile.REGTYPE, 1 << 40
    with pytest.raises(FormatError, match="the tar ends inside an entry's data"):
        write(ti.tobuf(tarfile.PAX_FORMAT) + b"\0" * 4096, tmp_path / "d")
    assert not any(tmp_path.iterdir())


# ------------------------------------------------------------------ convert, both roads


@pytest.mark.e2e
def test_convert_writes_the_same_tree_directly_and_via_mkfs(module_registry, mounter: Mounter, tmp_path: Path):
    """``lazyerofs convert`` (direct writer, the default) and ``--via-mkfs``:
    both mount as the OCI union of the layers, every attribute compared."""
    layers = layer_tars()
    push_source(module_registry, "roads", layers)
    src = f"{module_registry.host}/src/roads:v1"
    trees = []
    work = tmp_path / "work"
    work.mkdir()
    for road in ("direct", "mkfs"):
        dst = f"{module_registry.host}/out/roads:{road}"
        extra = ["--via-mkfs"] if road == "mkfs" else []
        lazyerofs("convert", "--chunk-size", "64KiB", "--workdir", str(work), *extra, src, dst)
        assert os.listdir(work) == []  # images, scratch frames and blobs all gone
        m = mounter(dst, rootfs=True)
        assert m.rootfs is not None
        trees.append(mounted_tree(m.rootfs))
    assert trees[0] == trees[1] == oci_union([t for t, _ in layers])
