"""``convert``'s pure parts: staging one layer's tar (whiteouts in overlayfs form,
hostile tars refused with nothing written outside) and streaming a blob with its
digest checked. Also the tar-writing helpers the end-to-end tests share."""

from __future__ import annotations

import hashlib
import io
import os
import stat
import tarfile
from pathlib import Path

import httpx
import pytest

from lazyfs.errors import FormatError, IntegrityError
from lazyfs.oci import RegistryClient, RegistryOptions, parse_reference
from lazyfs.produce import stage_tar

CAP_NET_RAW = bytes.fromhex("0100000200200000000000000000000000000000")


# ------------------------------------------------------------------ tar helpers


def entry(name: str, kind: str = "file", *, data: bytes = b"", mode: int | None = None,
          uid: int = 0, gid: int = 0, link: str = "", dev: tuple[int, int] = (0, 0),
          xattrs: dict[str, bytes] | None = None) -> tuple[tarfile.TarInfo, bytes]:  # fmt: skip
    """One tar member and its data."""
    types = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE,
             "hardlink": tarfile.LNKTYPE, "chr": tarfile.CHRTYPE, "fifo": tarfile.FIFOTYPE}  # fmt: skip
    ti = tarfile.TarInfo(name)
    ti.type = types[kind]
    ti.mode = mode if mode is not None else (0o755 if kind == "dir" else 0o644)
    ti.uid, ti.gid = uid, gid
    ti.mtime = 1_700_000_000
    ti.linkname = link
    ti.devmajor, ti.devminor = dev
    ti.size = len(data) if kind == "file" else 0
    if xattrs:
        ti.pax_headers = {
            f"SCHILY.xattr.{k}": v.decode("utf-8", "surrogateescape") for k, v in xattrs.items()
        }
    return ti, data


def sparse_entry(
    name: str, realsize: int, segments: list[tuple[int, bytes]]
) -> tuple[tarfile.TarInfo, bytes]:
    """A GNU PAX 1.0 sparse member (what ``tar -S --format=pax`` writes)."""
    table = [*segments, (realsize, b"")]
    sparse_map = f"{len(table)}\n" + "".join(f"{off}\n{len(d)}\n" for off, d in table)
    head = sparse_map.encode()
    head += b"\0" * (-len(head) % 512)
    payload = head + b"".join(d for _, d in segments)
    directory, base = os.path.split(name)
    ti = tarfile.TarInfo(
        f"{directory}/GNUSparseFile.0/{base}" if directory else f"GNUSparseFile.0/{base}"
    )
    ti.size = len(payload)
    ti.mode = 0o644
    ti.pax_headers = {
        "GNU.sparse.major": "1", "GNU.sparse.minor": "0",
        "GNU.sparse.name": name, "GNU.sparse.realsize": str(realsize),
    }  # fmt: skip
    return ti, payload


def make_tar(entries: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT, encoding="utf-8",
                      errors="surrogateescape") as tar:  # fmt: skip
        for ti, data in entries:
            tar.addfile(ti, io.BytesIO(data) if ti.isreg() else None)
    return buf.getvalue()


# ------------------------------------------------------------------ staging


@pytest.fixture
def area(tmp_path: Path) -> tuple[Path, Path]:
    """A staging dir and, beside it, an ``outside`` dir with a file nobody may touch."""
    if os.geteuid() != 0:
        pytest.skip("staging keeps owners and device nodes: needs root")
    stage = tmp_path / "stage"
    stage.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("untouched\n")
    return stage, outside


def snapshot(d: Path) -> dict[str, tuple]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(d):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            out[str(p.relative_to(d))] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return out


def stage(data: bytes, root: Path, **kw) -> None:
    stage_tar(io.BytesIO(data), root, layer="layer 1/1 sha256:test", **kw)


def test_whiteouts_become_overlayfs_whiteouts_and_opaque_dirs(area):
    root, _ = area
    stage(make_tar([
        entry("gone/", "dir"), entry("gone/.wh.file"), entry(".wh.olddir"),
        entry("opq/", "dir"), entry("opq/.wh..wh..opq"), entry("opq/new", data=b"n"),
        entry("own/", "dir"), entry("own/kept", data=b"k"), entry(".wh.own"),
    ]), root)  # fmt: skip
    for path in ("gone/file", "olddir"):
        st = (root / path).lstat()
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0 and (st.st_uid, st.st_gid) == (0, 0)
    assert os.getxattr(root / "opq", "trusted.overlay.opaque") == b"y"
    assert (root / "opq" / "new").read_bytes() == b"n"
    assert not (root / "opq" / ".wh..wh..opq").exists()
    # A whiteout of this layer's own directory keeps it, opaque over lower layers.
    assert (root / "own" / "kept").read_bytes() == b"k"
    assert os.getxattr(root / "own", "trusted.overlay.opaque") == b"y"
    assert not any(
        name.startswith(".wh.") for _, dirs, files in os.walk(root) for name in dirs + files
    )


def test_entries_keep_owner_mode_xattrs_links_devices_and_odd_names(area):
    root, _ = area
    long_name = "n" * 200
    odd = b"caf\xe9-\xff.txt".decode("utf-8", "surrogateescape")
    stage(make_tar([
        entry("bin/", "dir"), entry("sbin/", "dir"), entry("tmp/", "dir", mode=0o1777),
        entry("bin/ping", data=b"ELF", mode=0o755, xattrs={"security.capability": CAP_NET_RAW,
                                                          "user.note": b"\x00\xffbin"}),
        entry("bin/su", data=b"su", mode=0o4755), entry("bin/wall", data=b"w", mode=0o2755, gid=5),
        entry("sbin/su2", "hardlink", link="bin/su"),
        entry("bin/sh", "symlink", link="/bin/../usr/bin/dash"),
        entry("null", "chr", dev=(1, 3), mode=0o666), entry("pipe", "fifo", mode=0o600),
        entry(f"{long_name}/{long_name}", data=b"deep", uid=1000, gid=1001),
        entry(odd, data=b"latin1"), entry("empty"),
        sparse_entry("holes", 3 << 20, [(1 << 20, b"hello")]),
    ]), root)  # fmt: skip
    ping = root / "bin" / "ping"
    assert os.getxattr(ping, "security.capability") == CAP_NET_RAW
    assert os.getxattr(ping, "user.note") == b"\x00\xffbin"
    assert stat.S_IMODE((root / "bin" / "su").lstat().st_mode) == 0o4755
    wall = (root / "bin" / "wall").lstat()
    assert (stat.S_IMODE(wall.st_mode), wall.st_gid) == (0o2755, 5)
    assert stat.S_IMODE((root / "tmp").lstat().st_mode) == 0o1777
    assert (root / "sbin" / "su2").lstat().st_ino == (root / "bin" / "su").lstat().st_ino
    assert os.readlink(root / "bin" / "sh") == "/bin/../usr/bin/dash"
    null = (root / "null").lstat()
    assert (
        stat.S_ISCHR(null.st_mode) and os.major(null.st_rdev) == 1 and os.minor(null.st_rdev) == 3
    )
    assert stat.S_ISFIFO((root / "pipe").lstat().st_mode)
    deep = (root / long_name / long_name).lstat()
    assert (deep.st_uid, deep.st_gid) == (1000, 1001)
    assert (root / os.fsdecode(b"caf\xe9-\xff.txt")).read_bytes() == b"latin1"
    assert (root / "empty").read_bytes() == b""
    holes = (root / "holes").read_bytes()
    assert len(holes) == 3 << 20 and holes[1 << 20 : (1 << 20) + 5] == b"hello"
    assert holes.count(0) == len(holes) - 5


def test_later_entries_replace_earlier_ones_without_writing_through_them(area):
    root, outside = area
    stage(make_tar([
        entry("x", "symlink", link=str(outside / "secret")), entry("x", data=b"file now"),
        entry("d/", "dir"), entry("d/child", data=b"c"), entry("d", data=b"was a dir"),
    ]), root)  # fmt: skip
    assert (root / "x").read_bytes() == b"file now" and not (root / "x").is_symlink()
    assert (root / "d").read_bytes() == b"was a dir"
    assert (outside / "secret").read_text() == "untouched\n"


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([entry("../outside/pwned", data=b"x")], "climbs out of the layer root"),
        ([entry("a/../../outside/pwned", data=b"x")], "climbs out of the layer root"),
        (
            [entry("esc", "symlink", link="../outside"), entry("esc/pwned", data=b"x")],
            "'esc' is a symlink, not a directory",
        ),
        (
            [entry("esc", "symlink", link="/"), entry("esc/tmp/pwned", data=b"x")],
            "'esc' is a symlink, not a directory",
        ),
        (
            [
                entry("esc", "symlink", link="../outside"),
                entry("hl", "hardlink", link="esc/secret"),
            ],
            "'esc' is a symlink, not a directory",
        ),
        ([entry("hl", "hardlink", link="../outside/secret")], "climbs out of the layer root"),
        (
            [entry("dev", "chr", dev=(1, 3)), entry("dev/x", data=b"x")],
            "'dev' is a character device, not a directory",
        ),
        ([entry("f", data=b"x"), entry("f/x", data=b"x")], "'f' is a file, not a directory"),
        ([entry("hl", "hardlink", link="missing")], "'missing' is not in this layer"),
        ([sparse_entry("huge", 10 << 30, [(0, b"x")])], "past its cap of 8.0 GiB"),
        (
            [entry("f", data=b"x", xattrs={"trusted.overlay.redirect": b"/etc"})],
            "reserved for overlayfs",
        ),
        ([entry("d/", "dir"), entry("d/.wh...")], "whiteout of an empty"),
        ([entry("f", "dir"), entry("g", "hardlink", link="f")], "hard link to a directory"),
    ],
)
def test_hostile_tars_are_refused_naming_the_entry_and_touch_nothing_outside(
    area, entries, message
):
    root, outside = area
    before = snapshot(outside.parent / "outside")
    with pytest.raises(FormatError) as err:
        stage(make_tar(entries), root)
    assert message in str(err.value)
    assert "layer 1/1 sha256:test: entry" in str(err.value)
    assert snapshot(outside) == before
    assert (outside / "secret").read_text() == "untouched\n"


def test_layer_cap_counts_every_file(area):
    root, _ = area
    data = make_tar([entry("a", data=b"x" * 600), entry("b", data=b"y" * 600)])
    with pytest.raises(FormatError, match=r"entry 'b'.*--max-layer-size"):
        stage(data, root, max_layer_bytes=1000)


def test_a_stream_that_is_not_a_tar_is_a_format_error(area):
    root, _ = area
    with pytest.raises(FormatError, match="not a tar archive"):
        stage(b"\x01" * 4096, root)


# ------------------------------------------------------------------ streaming a blob


def _serving(blob: bytes, *, cut_first_at: int | None = None) -> tuple[httpx.MockTransport, list]:
    """A registry serving ``blob``; the first full GET is cut short at ``cut_first_at``."""
    seen: list[str] = []

    async def stream_body(data: bytes):
        for i in range(0, len(data), 1000):
            yield data[i : i + 1000]

    def handler(request: httpx.Request) -> httpx.Response:
        rng = request.headers.get("range", "")
        seen.append(rng)
        if rng:
            first = int(rng.split("=")[1].split("-")[0])
            return httpx.Response(206, headers={"Content-Range": f"bytes {first}-{len(blob) - 1}/{len(blob)}"},
                                  content=stream_body(blob[first:]))  # fmt: skip
        if cut_first_at is not None and len(seen) == 1:

            async def cut():
                yield blob[:cut_first_at]
                raise httpx.ReadError("connection reset")

            return httpx.Response(200, content=cut())
        return httpx.Response(200, content=stream_body(blob))

    return httpx.MockTransport(handler), seen


async def _stream(blob: bytes, digest: str, transport: httpx.MockTransport) -> list[bytes]:
    got: list[bytes] = []

    async def sink(piece: bytes) -> None:
        got.append(piece)

    ref = parse_reference("127.0.0.1:5000/x/y:v1")
    async with RegistryClient(RegistryOptions(retries=2), transport=transport) as client:
        remote = client.blob(ref, {"digest": digest, "size": len(blob), "mediaType": "x"})
        try:
            await remote.stream(sink, piece_size=4096)
        finally:
            got.append(b"<end>")
    return got


async def test_stream_holds_back_the_last_piece_until_the_digest_matches():
    blob = os.urandom(50_000)
    transport, _ = _serving(blob)
    good = "sha256:" + hashlib.sha256(blob).hexdigest()
    assert b"".join((await _stream(blob, good, transport))[:-1]) == blob
    bad = "sha256:" + hashlib.sha256(b"other").hexdigest()
    received: list[bytes] = []
    with pytest.raises(IntegrityError, match="content hashes to"):

        async def sink(piece: bytes) -> None:
            received.append(piece)

        ref = parse_reference("127.0.0.1:5000/x/y:v1")
        async with RegistryClient(RegistryOptions(), transport=transport) as client:
            await client.blob(ref, {"digest": bad, "size": len(blob), "mediaType": "x"}).stream(
                sink, piece_size=4096
            )
    assert 0 < sum(map(len, received)) < len(blob)  # the end never reached the consumer


async def test_stream_resumes_a_cut_transfer_with_a_range_request():
    blob = os.urandom(30_000)
    transport, seen = _serving(blob, cut_first_at=12_345)
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    got = await _stream(blob, digest, transport)
    assert b"".join(got[:-1]) == blob
    assert seen == ["", "bytes=12345-29999"]


def test_a_directory_replaced_and_made_again_gets_its_new_entries(area):
    """Entries under a directory that went and came back land in the new one, not the deleted."""
    root, _ = area
    stage(make_tar([
        entry("a/", "dir"), entry("a/b/", "dir"), entry("a/b/x", data=b"x"),
        entry("a", data=b"now a file"), entry("a/", "dir"), entry("a/b/c", data=b"c"),
    ]), root)  # fmt: skip
    assert sorted(os.listdir(root / "a" / "b")) == ["c"]
    assert (root / "a" / "b" / "c").read_bytes() == b"c"
