"""Seeds: real inputs the harness builds itself, once per process.

The blob comes from the project's own producer (``build_blob``: mkfs.erofs,
the encoder, dm-verity) and a second one from the independent test encoder
(``tests/support/blobtools``, containerd-style frames without a content
size); manifests, indexes and configs describe those blobs; tars come from
``tarfile`` with every entry kind convert handles, plus hand-made GNU
sparse and traversal attempts.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import io
import json
import os
import struct
import tarfile
import tempfile
from dataclasses import dataclass
from typing import Any

import zstandard

__all__ = ["SeedBlob", "real_blobs"]


@dataclass(frozen=True)
class SeedBlob:
    data: bytes
    descriptor: dict[str, Any]
    table_offset: int
    table_end: int
    verity_offset: int | None
    verity_root: str | None  # hex
    image_size: int
    chunk_size: int


def _tree(root: str) -> None:
    os.makedirs(os.path.join(root, "etc", "deep", "er"))
    os.makedirs(os.path.join(root, "bin"))
    for i in range(40):
        with open(os.path.join(root, "etc", f"f{i}"), "wb") as f:
            f.write(os.urandom(97 * i) + bytes(3000 * i))
    with open(os.path.join(root, "bin", "big"), "wb") as f:
        f.write(b"".join(hashlib.sha256(b"%d" % i).digest() for i in range(4000)))
    os.symlink("../etc/f1", os.path.join(root, "bin", "link"))


@functools.cache
def real_blobs() -> tuple[SeedBlob, ...]:
    """Two blobs from the project's producer (with and without dm-verity) and
    one from the independent test encoder."""
    from lazyfs.format.seekable import ANNOTATION_VERITY_OFFSET, parse_descriptor
    from lazyfs.produce.build import build_blob
    from tests.support.blobtools import make_blob

    out = []
    with tempfile.TemporaryDirectory(prefix="lazyerofs-fuzz-") as tmp:
        src = os.path.join(tmp, "src")
        _tree(src)
        for verity, chunk in ((True, 16 << 10), (False, 4096)):
            path = os.path.join(tmp, f"blob-{verity}")
            res = build_blob(src, path, chunk_size=chunk, dm_verity=verity, source_date_epoch=0)
            with open(path, "rb") as f:
                data = f.read()
            desc = parse_descriptor(res.descriptor)
            assert desc.table_offset is not None
            vo = res.descriptor["annotations"].get(ANNOTATION_VERITY_OFFSET)
            out.append(SeedBlob(
                data, res.descriptor, desc.table_offset, desc.table_end,
                int(vo) if vo else None, res.verity_root, res.uncompressed_size, chunk,
            ))  # fmt: skip
    raw = b"".join(hashlib.sha512(b"%d" % i).digest() + bytes(i % 300) for i in range(600))
    b = make_blob(raw, 8192)
    out.append(SeedBlob(b.data, b.descriptor, b.table_offset, len(b.data), None, None, len(raw), 8192))
    return tuple(out)


def frames() -> list[tuple[int, bytes]]:
    """(decompressed length, frame) of every frame of the seed blobs, plus
    frames with a content size, a dictionary-less empty frame and a skippable one."""
    from lazyfs.format.seekable import parse_chunk_table

    out = []
    for b in real_blobs():
        t = parse_chunk_table(b.data[b.table_offset : b.table_end], table_offset=b.table_offset,
                              blob_size=b.table_end, expected_digest=None, require_checksums=False)  # fmt: skip
        for i in range(min(t.frame_count, 12)):
            s, e = t.span(i)
            out.append((t.raw_length(i), b.data[s:e]))
    c = zstandard.ZstdCompressor(level=3, write_content_size=True, write_checksum=True)
    out.append((5000, c.compress(bytes(5000))))
    out.append((0, c.compress(b"")))
    out.append((4, struct.pack("<II", 0x184D2A50, 4) + b"abcd"))
    return out


# ---------------------------------------------------------------- OCI documents

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@functools.cache
def config_bytes() -> bytes:
    cfg = {
        "architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/usr/bin"], "Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + "ab" * 32]},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "lazyerofs build"}],
    }  # fmt: skip
    return json.dumps(cfg).encode()


@functools.cache
def manifests() -> tuple[bytes, ...]:
    """Image manifests (OCI and docker), then an OCI index and a docker list of them."""
    layers = [b.descriptor for b in real_blobs()]
    plain = {"mediaType": "application/vnd.erofs.layer.v1", "digest": "sha256:" + "0" * 64, "size": 4096}
    cfg = {"mediaType": OCI_CONFIG, "digest": _sha256(config_bytes()), "size": len(config_bytes())}
    oci = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": cfg, "layers": [*layers, plain],
           "annotations": {"org.opencontainers.image.created": "1970-01-01T00:00:00Z"}}  # fmt: skip
    docker = {
        "schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {**cfg, "mediaType": "application/vnd.docker.container.image.v1+json"},
        "layers": layers[:1],
    }  # fmt: skip
    bare = {"schemaVersion": 2, "layers": layers[1:]}  # no mediaType: the client infers it
    docs = [json.dumps(d).encode() for d in (oci, docker, bare)]
    entries = [
        {"mediaType": OCI_MANIFEST, "digest": _sha256(docs[0]), "size": len(docs[0]),
         "platform": {"os": "linux", "architecture": "amd64"}},
        {"mediaType": OCI_MANIFEST, "digest": _sha256(docs[2]), "size": len(docs[2]),
         "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
        {"mediaType": OCI_MANIFEST, "digest": _sha256(docs[1]), "size": len(docs[1]),
         "platform": {"os": "linux", "architecture": "arm", "variant": "v7"}},
    ]  # fmt: skip
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}
    dlist = {"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.list.v2+json",
             "manifests": entries[::-1]}  # fmt: skip
    return (*docs, json.dumps(index).encode(), json.dumps(dlist).encode())


MANIFEST_KEYS = (
    "schemaVersion", "mediaType", "config", "layers", "manifests", "platform", "digest", "size",
    "annotations", "os", "architecture", "variant", "urls", "subject", "artifactType",
    "dev.containerd.erofs.zstd.chunk_table_offset", "dev.containerd.erofs.zstd.chunk_digest",
    "dev.containerd.erofs.dmverity.offset", "dev.containerd.erofs.dmverity.root_digest",
)  # fmt: skip
MANIFEST_STRINGS = (
    OCI_MANIFEST, OCI_INDEX, OCI_CONFIG, "application/vnd.erofs.layer.v1+zstd",
    "application/vnd.erofs.layer.v1", "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json", "linux", "amd64", "arm64", "v8",
    "0", "1", "18446744073709551615", "99999999999999999999", "-1", "1e3", "0x10", "007",
)  # fmt: skip


def descriptors() -> list[bytes]:
    out = [json.dumps(b.descriptor, indent=2).encode() for b in real_blobs()]
    d = dict(real_blobs()[0].descriptor)
    d["annotations"] = {k: v for k, v in d["annotations"].items() if "dmverity" not in k}
    out.append(json.dumps(d).encode())
    return out


# ---------------------------------------------------------------- registry text

REFERENCES = (
    "ubuntu", "ubuntu:22.04", "library/ubuntu@sha256:" + "a" * 64,
    "localhost:5000/a/b@sha256:" + "0123456789abcdef" * 4, "[::1]:5000/x/y:tag",
    "registry.example.com/org/img:v1.2_3@sha512:" + "f" * 128, "docker.io/library/busybox",
    "index.docker.io/a.b-c/d__e/f-g:T", "127.0.0.1:65535/x", "my-registry.local/ns/repo:latest",
)  # fmt: skip
REFERENCE_TOKENS = tuple(t.encode() for t in (
    "/", ":", "@", "sha256:", "sha512:", "localhost", "[", "]", "::1", ".", "-", "_", "__",
    "docker.io", "0123456789abcdef" * 4, "://", " ", "\x00", "%", "A", "65536", "..", "é",
))  # fmt: skip

CHALLENGES = (
    'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/ubuntu:pull"',
    'Basic realm="Registry Realm"',
    'Bearer realm="http://127.0.0.1:5000/token",service="x",scope="repository:a:pull,push", Basic realm="r"',
    'Bearer realm=unquoted,error="insufficient_scope",error_description="a \\"quoted\\" word"',
    'bearer  Realm = "x" , Service="y"',
    "Negotiate, Bearer realm=\"r\"",
)  # fmt: skip
CHALLENGE_TOKENS = tuple(t.encode() for t in (
    "Bearer ", "Basic ", "realm=", '"', "\\", ",", "=", " ", "service=", "scope=", "\t", "error=",
    "\\\"", '""', "a" * 64, "\r\n",
))  # fmt: skip

TOKEN_ANSWERS = (
    b'{"token": "abc.def.ghi", "expires_in": 300, "issued_at": "2024-01-01T00:00:00Z"}',
    b'{"access_token": "xyz", "expires_in": 60}',
    b'{"token": "t"}',
)
TOKEN_KEYS = ("token", "access_token", "expires_in", "issued_at", "refresh_token")


def docker_configs() -> list[bytes]:
    auth = base64.b64encode(b"user:pass:word").decode()
    return [
        json.dumps({"auths": {"localhost:5000": {"auth": auth},
                              "https://index.docker.io/v1/": {"username": "u", "password": "p"},
                              "example.com": {"auth": "", "email": "x@y"}},
                    "credHelpers": {"gcr.io": "gcloud"}, "credsStore": "desktop"}).encode(),
        json.dumps({"auths": {"docker.io": {"auth": base64.b64encode(b"a:b").decode()}}}, indent="\t").encode(),
        b"{}",
    ]  # fmt: skip


DOCKER_CONFIG_KEYS = ("auths", "auth", "username", "password", "localhost:5000", "docker.io",
                      "https://index.docker.io/v1/", "example.com", "identitytoken", "credsStore")  # fmt: skip


# ---------------------------------------------------------------- tar


def _add(tf: tarfile.TarFile, name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", **kw: Any) -> None:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.size = len(data) if kind == tarfile.REGTYPE else 0
    ti.mode = kw.pop("mode", 0o755 if kind == tarfile.DIRTYPE else 0o644)
    ti.mtime = kw.pop("mtime", 1_700_000_000)
    for k, v in kw.items():
        setattr(ti, k, v)
    tf.addfile(ti, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def _tar(fmt: int, build: Any) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tf:
        build(tf)
    return out.getvalue()


def tars() -> list[bytes]:
    def rich(tf: tarfile.TarFile) -> None:
        _add(tf, "./", tarfile.DIRTYPE)
        _add(tf, "etc", tarfile.DIRTYPE, mode=0o1777)
        _add(tf, "etc/passwd", data=b"root:x:0:0::/root:/bin/sh\n" * 3, uid=1000, gid=1000, mode=0o4755)
        _add(tf, "etc/hard", tarfile.LNKTYPE, linkname="etc/passwd")
        _add(tf, "etc/sym", tarfile.SYMTYPE, linkname="../../outside/x")
        _add(tf, "etc/abs", tarfile.SYMTYPE, linkname="/etc/shadow")
        _add(tf, "dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3)
        _add(tf, "dev/loop", tarfile.BLKTYPE, devmajor=7, devminor=0)
        _add(tf, "run/fifo", tarfile.FIFOTYPE)
        _add(tf, "usr/.wh.gone", data=b"")
        _add(tf, "opt/.wh..wh..opq", data=b"")
        _add(tf, "var/x", data=b"payload" * 100,
             pax_headers={"SCHILY.xattr.user.comment": "hello", "LIBARCHIVE.xattr.user.b64": "aGk",
                          "SCHILY.xattr.security.capability": "\x01\x00\x00\x02"})  # fmt: skip
        _add(tf, "long/" + "n" * 150 + "/file", data=b"z")

    def tricky(tf: tarfile.TarFile) -> None:
        _add(tf, "a", tarfile.SYMTYPE, linkname="..")
        _add(tf, "a/escape", data=b"should not land outside")
        _add(tf, "b/../../outside/y", data=b"nope")
        _add(tf, "c", data=b"file")
        _add(tf, "c/d", data=b"under a file")
        _add(tf, "e", tarfile.LNKTYPE, linkname="../outside/x")
        _add(tf, ".wh.c", data=b"")
        _add(tf, "c", tarfile.DIRTYPE)

    def gnu(tf: tarfile.TarFile) -> None:
        _add(tf, "g/" + "L" * 120, data=b"long name")
        _add(tf, "g/lnk", tarfile.SYMTYPE, linkname="t" * 130)
        _add(tf, "g/big", data=bytes(2000))

    seeds = [_tar(tarfile.PAX_FORMAT, rich), _tar(tarfile.PAX_FORMAT, tricky),
             _tar(tarfile.GNU_FORMAT, gnu), _tar(tarfile.USTAR_FORMAT, tricky)]  # fmt: skip
    seeds.append(_gnu_sparse_pax())
    return seeds


def _gnu_sparse_pax() -> bytes:
    """A PAX 1.0 GNU sparse file (tarfile reads these but cannot write them)."""
    data_part = b"A" * 512 + b"B" * 512
    sparse_map = b"2\n0\n512\n8192\n512\n"
    body = sparse_map + bytes(-len(sparse_map) % 512) + data_part

    def rec(k: str, v: str) -> bytes:
        s = f" {k}={v}\n"
        n = len(s) + 2
        while len(str(n)) + len(s) != n:
            n += 1
        return f"{n}{s}".encode()

    recs = b"".join(rec(k, v) for k, v in (("GNU.sparse.major", "1"), ("GNU.sparse.minor", "0"),
                                          ("GNU.sparse.name", "sparse/file"), ("GNU.sparse.realsize", "9000")))  # fmt: skip
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        pax = tarfile.TarInfo("PaxHeaders/file")
        pax.type = tarfile.XHDTYPE
        pax.size = len(recs)
        tf.addfile(pax, io.BytesIO(recs))
        ti = tarfile.TarInfo("GNUSparseFile.0/file")
        ti.size = len(body)
        ti.mtime = 1
        tf.addfile(ti, io.BytesIO(body))
    return out.getvalue()
