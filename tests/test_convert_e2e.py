"""lazyerofs convert, end to end: OCI and Docker images written here with ``tarfile``,
pushed to a real registry, converted, mounted with ``lazyerofs mount --rootfs``,
and the mounted tree compared with the union the OCI image spec defines (each tar
extracted in order, whiteouts applied)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import stat
import subprocess
import tarfile
import time
from pathlib import Path

import pytest
import trio
import zstandard
from support.mount import Mounter, lazyerofs
from test_convert import CAP_NET_RAW, entry, make_tar, sparse_entry

from lazyfs.oci import RegistryClient, RegistryOptions, parse_reference

pytestmark = pytest.mark.e2e

GZ = "application/vnd.oci.image.layer.v1.tar+gzip"
ZST = "application/vnd.oci.image.layer.v1.tar+zstd"
TAR = "application/vnd.oci.image.layer.v1.tar"
DOCKER_GZ = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
ODD = b"caf\xe9".decode("utf-8", "surrogateescape")
LONG = "l" * 150 + "/" + "m" * 200


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def compress(tar: bytes, media_type: str) -> bytes:
    if media_type.endswith("gzip"):
        return gzip.compress(tar, mtime=0)
    if media_type.endswith("zstd"):
        return zstandard.ZstdCompressor().compress(tar)
    return tar


def push_source(registry, name: str, layers: list[tuple[bytes, str]], *, docker: bool = False,
                platform: tuple[str, str] = ("linux", "amd64"), tag: str | None = "v1") -> tuple[str, int]:  # fmt: skip
    """Push an image of the given (tar, media type) layers; returns (digest, size) of its manifest."""
    blobs = [compress(tar, mt) for tar, mt in layers]
    config = json.dumps({
        "architecture": platform[1], "os": platform[0], "config": {"Env": ["PATH=/usr/bin"]},
        "rootfs": {"type": "layers", "diff_ids": [_sha(tar) for tar, _ in layers]},
        "history": [{"created_by": f"step {i}"} for i in range(len(layers))],
    }).encode()  # fmt: skip
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": DOCKER_MANIFEST if docker else "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": DOCKER_CONFIG if docker else "application/vnd.oci.image.config.v1+json",
                   "digest": _sha(config), "size": len(config)},
        "layers": [{"mediaType": mt, "digest": _sha(b), "size": len(b)} for b, (_, mt) in zip(blobs, layers, strict=True)],
        **({} if docker else {"annotations": {"org.opencontainers.image.title": name}}),
    }).encode()  # fmt: skip
    ref = parse_reference(f"{registry.host}/src/{name}:{tag or 'unused'}")

    async def go() -> None:
        async with RegistryClient(RegistryOptions()) as client:
            for blob in [*blobs, config]:
                await client.push_blob(ref, blob, _sha(blob), len(blob))
            target = (
                ref if tag else ref.__class__(ref.registry, ref.repository, None, _sha(manifest))
            )
            await client.push_manifest(
                target,
                manifest,
                DOCKER_MANIFEST if docker else "application/vnd.oci.image.manifest.v1+json",
            )

    trio.run(go)
    return _sha(manifest), len(manifest)


# ------------------------------------------------------------------ the OCI union, by the spec


def _norm(name: str) -> bytes:
    return b"/".join(p for p in os.fsencode(name).split(b"/") if p not in (b"", b"."))


def oci_union(tars: list[bytes]) -> dict[bytes, tuple]:
    """Extract each tar in order applying whiteouts (OCI image spec, "Applying changesets")."""
    tree: dict[bytes, tuple] = {}

    def drop(path: bytes, keep: set[bytes]) -> None:
        for key in [k for k in tree if (k == path or k.startswith(path + b"/")) and k not in keep]:
            del tree[key]

    for data in tars:
        added: set[bytes] = set()
        with tarfile.open(
            fileobj=io.BytesIO(data), encoding="utf-8", errors="surrogateescape"
        ) as tar:
            for m in tar:
                path = _norm(m.name)
                parent, _, base = path.rpartition(b"/")
                if base == b".wh..wh..opq":
                    for key in [k for k in tree if k.startswith(parent + b"/") and k not in added]:
                        del tree[key]
                    continue
                if base.startswith(b".wh."):
                    drop((parent + b"/" if parent else b"") + base[4:], added)
                    continue
                xattrs = tuple(sorted(
                    (k[len("SCHILY.xattr."):], v.encode("utf-8", "surrogateescape"))
                    for k, v in m.pax_headers.items() if k.startswith("SCHILY.xattr.")
                ))  # fmt: skip
                if m.islnk():
                    node = tree[_norm(m.linkname)]
                elif m.isdir():
                    node = ("dir", m.mode, m.uid, m.gid, None, xattrs)
                elif m.isreg():
                    content = tar.extractfile(m).read()  # sparse holes read as zeros
                    node = (
                        "file",
                        m.mode,
                        m.uid,
                        m.gid,
                        hashlib.sha256(content).hexdigest(),
                        xattrs,
                    )
                elif m.issym():
                    node = ("symlink", 0o777, m.uid, m.gid, os.fsencode(m.linkname), xattrs)
                elif m.ischr():
                    node = ("chr", m.mode, m.uid, m.gid, (m.devmajor, m.devminor), xattrs)
                elif m.isfifo():
                    node = ("fifo", m.mode, m.uid, m.gid, None, xattrs)
                else:
                    raise AssertionError(f"test tar has an unexpected member {m.name}")
                if not (m.isdir() and tree.get(path, ("",))[0] == "dir"):
                    drop(path, set())
                tree[path] = node
                added.add(path)
    return tree


def mounted_tree(root: Path) -> dict[bytes, tuple]:
    out: dict[bytes, tuple] = {}
    broot = os.fsencode(root)
    for dirpath, dirnames, filenames in os.walk(broot):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            xattrs = tuple(sorted(
                (k, os.getxattr(p, k, follow_symlinks=False))
                for k in os.listxattr(p, follow_symlinks=False) if not k.startswith("trusted.overlay.")
            ))  # fmt: skip
            mode = stat.S_IMODE(st.st_mode)
            if stat.S_ISDIR(st.st_mode):
                node = ("dir", mode, st.st_uid, st.st_gid, None, xattrs)
            elif stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    digest = hashlib.file_digest(f, "sha256").hexdigest()
                node = ("file", mode, st.st_uid, st.st_gid, digest, xattrs)
            elif stat.S_ISLNK(st.st_mode):
                node = ("symlink", 0o777, st.st_uid, st.st_gid, os.readlink(p), xattrs)
            elif stat.S_ISCHR(st.st_mode):
                node = (
                    "chr",
                    mode,
                    st.st_uid,
                    st.st_gid,
                    (os.major(st.st_rdev), os.minor(st.st_rdev)),
                    xattrs,
                )
            elif stat.S_ISFIFO(st.st_mode):
                node = ("fifo", mode, st.st_uid, st.st_gid, None, xattrs)
            else:
                node = ("other", mode, st.st_uid, st.st_gid, None, xattrs)
            out[os.path.relpath(p, broot)] = node
    return out


def layer_tars() -> list[tuple[bytes, str]]:
    d = lambda name, **kw: entry(name, "dir", **kw)  # noqa: E731
    base = make_tar([
        d("etc/"), d("usr/"), d("usr/bin/"), d("sbin/"), d("data/"), d("opq/"), d("opq/sub/"),
        d("gone/"), d("keep/"), d("keep2/"), d("tmp/", mode=0o1777), d("dev/"), d("olddir/"),
        d("l" * 150 + "/"),
        entry("etc/passwd", data=b"root:x:0:0:root:/root:/bin/sh\n"),
        entry("usr/bin/ping", data=b"\x7fELF ping", mode=0o755,
              xattrs={"security.capability": CAP_NET_RAW, "user.note": b"\x00\xffnote"}),
        entry("usr/bin/su", data=b"\x7fELF su", mode=0o4755),
        entry("usr/bin/wall", data=b"\x7fELF wall", mode=0o2755, gid=5),
        entry("sbin/su-hard", "hardlink", link="usr/bin/su"),
        entry("data/a.txt", data=b"first a\n", mode=0o640, uid=1000, gid=1000),
        entry("keep/a-hard", "hardlink", link="data/a.txt"),
        entry("data/rel-link", "symlink", link="a.txt"),
        entry("data/abs-link", "symlink", link="/etc/passwd"),
        entry("data/willgo-link", "symlink", link="nowhere"),
        entry("dev/null", "chr", dev=(1, 3), mode=0o666),
        entry("dev/fifo", "fifo", mode=0o600),
        entry("opq/old1", data=b"old1"), entry("opq/sub/old2", data=b"old2"),
        entry("gone/file", data=b"gone"), entry("gone/stay", data=b"stay"),
        entry("keep2/child", data=b"child"), entry("olddir/x", data=b"x"),
        entry(LONG, data=b"long name"), entry(f"data/{ODD}", data=b"latin-1 name"),
        entry("data/empty"),
        sparse_entry("data/sparse", 3 << 20, [(1 << 20, b"hello"), ((2 << 20) + 7, b"world")]),
        entry("data/big", data=os.urandom(2 << 20) + b"tail", uid=33, gid=44),
    ])  # fmt: skip
    middle = make_tar([
        d("gone/"), entry("gone/.wh.file"), entry(".wh.olddir"),
        d("opq/", mode=0o700, uid=7), entry("opq/.wh..wh..opq"), entry("opq/new", data=b"new"),
        d("data/", xattrs={"user.dir": b"d"}),
        entry("data/a.txt", data=b"second a\n", mode=0o600, uid=1000, gid=1000),
    ])  # fmt: skip
    top = make_tar([
        d("data/", xattrs={"user.dir": b"d2"}), entry("data/.wh.willgo-link"),
        d("data/empty/"), entry("data/empty/inside", data=b"in"),
        entry("keep2", data=b"now a file"), entry(".wh.nonexistent"),
        entry("new2", data=b"added"), entry(".wh.new2"),
    ])  # fmt: skip
    return [(base, GZ), (middle, ZST), (top, TAR)]


def test_converted_image_mounts_as_the_oci_union_of_its_layers(
    module_registry, mounter: Mounter, tmp_path: Path
):
    layers = layer_tars()
    push_source(module_registry, "union", layers)
    src, dst = f"{module_registry.host}/src/union:v1", f"{module_registry.host}/out/union:v1"
    proc = lazyerofs(
        "convert", "--chunk-size", "64KiB", "--json", "--workdir", str(tmp_path), src, dst
    )
    summary = json.loads(proc.stdout)
    assert [layer["tar_bytes"] for layer in summary["platforms"][0]["layers"]] == [
        len(t) for t, _ in layers
    ]
    assert os.listdir(tmp_path) == []  # staging, images and blobs all gone
    m = mounter(dst, rootfs=True)
    assert m.rootfs is not None
    got, want = mounted_tree(m.rootfs), oci_union([t for t, _ in layers])
    assert {k: v for k, v in got.items() if v != want.get(k)} == {}
    assert set(want) - set(got) == set()
    # Spot checks of what the comparison covers, so a vacuous pass shows.
    assert b"gone/file" not in got and b"olddir" not in got and b"opq/old1" not in got
    assert got[b"usr/bin/ping"][5] == (
        ("security.capability", CAP_NET_RAW),
        ("user.note", b"\x00\xffnote"),
    )
    assert got[b"usr/bin/su"][1] == 0o4755 and got[b"opq"][1:4] == (0o700, 7, 0)
    su, hard = os.lstat(m.rootfs / "usr/bin/su"), os.lstat(m.rootfs / "sbin/su-hard")
    assert (su.st_ino, su.st_nlink) == (hard.st_ino, 2)


def test_docker_index_converts_every_platform_into_an_index(module_registry, tmp_path: Path):
    tar = make_tar([entry("hello", data=b"hi\n", mode=0o755)])
    plats = [("linux", "amd64"), ("linux", "arm64")]
    children = [push_source(module_registry, "multi", [(tar, DOCKER_GZ)], docker=True, platform=p, tag=None)
                for p in plats]  # fmt: skip
    attestation = push_source(
        module_registry, "multi", [(tar, GZ)], platform=("unknown", "unknown"), tag=None
    )
    index = json.dumps({
        "schemaVersion": 2, "mediaType": DOCKER_LIST,
        "manifests": [{"mediaType": DOCKER_MANIFEST, "digest": dg, "size": n,
                       "platform": {"os": p[0], "architecture": p[1]}} for (dg, n), p in zip(children, plats, strict=True)]
        + [{"mediaType": DOCKER_MANIFEST, "digest": attestation[0], "size": attestation[1],
            "platform": {"os": "unknown", "architecture": "unknown"}}],
    }).encode()  # fmt: skip
    ref = parse_reference(f"{module_registry.host}/src/multi:v1")

    async def push_index() -> None:
        async with RegistryClient(RegistryOptions()) as client:
            await client.push_manifest(ref, index, DOCKER_LIST)

    trio.run(push_index)
    dst = f"{module_registry.host}/out/multi:v1"
    summary = json.loads(lazyerofs("convert", "--all-platforms", "--json", str(ref), dst).stdout)
    assert summary["media_type"] == "application/vnd.oci.image.index.v1+json"
    assert [p["platform"] for p in summary["platforms"]] == ["linux/amd64", "linux/arm64"]
    assert len(summary["skipped"]) == 1 and "unknown/unknown" in summary["skipped"][0]
    out = json.loads(subprocess.run(
        ["curl", "-sf", "-H", "Accept: application/vnd.oci.image.index.v1+json",
         f"http://{module_registry.host}/v2/out/multi/manifests/v1"], capture_output=True, check=True).stdout)  # fmt: skip
    assert [e["platform"]["architecture"] for e in out["manifests"]] == ["amd64", "arm64"]
    # The new config's diff_id is the sha256 of the raw EROFS image the blob decompresses to.
    layer = summary["platforms"][1]["layers"][0]
    blob = subprocess.run(["curl", "-sf", f"http://{module_registry.host}/v2/out/multi/blobs/{layer['digest']}"],
                          capture_output=True, check=True).stdout  # fmt: skip
    raw = (
        zstandard.ZstdDecompressor().stream_reader(io.BytesIO(blob), read_across_frames=True).read()
    )
    assert _sha(raw) == layer["diff_id"] and raw[1024:1028] == bytes.fromhex("e2e1f5e0")


def test_hostile_image_is_refused_and_nothing_outside_staging_is_touched(
    module_registry, tmp_path: Path
):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("untouched\n")
    work = tmp_path / "work"
    work.mkdir()
    hostile = make_tar(
        [entry("esc", "symlink", link=str(outside)), entry("esc/secret", data=b"pwned")]
    )
    push_source(module_registry, "hostile", [(hostile, GZ)])
    proc = lazyerofs("convert", "--workdir", str(work), f"{module_registry.host}/src/hostile:v1",
                     f"{module_registry.host}/out/hostile:v1", check=False)  # fmt: skip
    assert proc.returncode == 1
    assert "lazyerofs: error:" in proc.stderr and "layer 1/1" in proc.stderr
    assert "entry 'esc/secret': 'esc' is a symlink, not a directory" in proc.stderr
    assert (outside / "secret").read_text() == "untouched\n" and os.listdir(outside) == ["secret"]
    assert os.listdir(work) == []


def test_a_layer_blob_that_fails_its_digest_is_refused(module_registry, tmp_path: Path):
    tar = make_tar([entry("f", data=b"genuine" * 1000)])
    push_source(module_registry, "tampered", [(tar, GZ)])
    stored = module_registry.blob_path(_sha(gzip.compress(tar, mtime=0)))
    data = bytearray(Path(stored).read_bytes())
    data[-12] ^= 1  # inside the deflate stream's tail
    Path(stored).write_bytes(bytes(data))
    proc = lazyerofs("convert", "--workdir", str(tmp_path), f"{module_registry.host}/src/tampered:v1",
                     f"{module_registry.host}/out/tampered:v1", check=False)  # fmt: skip
    assert proc.returncode == 1 and "content hashes to" in proc.stderr, proc.stderr


def test_converting_the_same_image_twice_gives_the_same_blobs(module_registry, tmp_path: Path, monkeypatch):
    """No SOURCE_DATE_EPOCH: the build time is the source config's "created",
    so staging times (the layer root, implicit dirs, whiteouts) never leak in."""
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    tar = make_tar([entry("a/deep/file", data=b"x" * 5000), entry("b.txt", data=b"b")])
    push_source(module_registry, "twice", [(tar, GZ), (make_tar([entry("c", data=b"c")]), GZ)])
    src = f"{module_registry.host}/src/twice:v1"
    first = json.loads(lazyerofs("convert", "--json", src, f"{module_registry.host}/out/twice:a").stdout)
    time.sleep(1.1)  # staging times would differ now
    second = json.loads(lazyerofs("convert", "--json", src, f"{module_registry.host}/out/twice:b").stdout)
    digests = [[layer["digest"] for layer in p["layers"]] for p in (first["platforms"][0], second["platforms"][0])]
    assert digests[0] == digests[1]
    assert first["platforms"][0]["digest"] == second["platforms"][0]["digest"]
