"""One fuzz target per parser of bytes someone else wrote.

A target takes the fuzzed bytes, calls the project's parser the way the
project calls it, and uses what came back the way the project does. It lets
exceptions escape: the engine counts :class:`~lazyfs.errors.LazyErofsError`
as a refusal (fine) and anything else as a finding. Where a parser takes a
structured value (a decoded manifest), the target decodes the bytes first and
lets the JSON mutator shape them.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import os
import shutil
import struct
import tempfile
from array import array
from collections.abc import Callable
from dataclasses import dataclass

from . import seeds as S
from .mutate import Mutator, byte_mutator, json_mutator, tar_mutator, text_mutator

__all__ = ["TARGETS", "Target"]


@dataclass(frozen=True)
class Target:
    name: str
    run: Callable[[bytes], None]
    seeds: Callable[[], list[bytes]]
    mutator: Mutator
    what: str  # the parser, for the report
    weight: float = 1.0  # share of the input budget
    max_len: int = 1 << 20


TARGETS: dict[str, Target] = {}


def _target(name: str, what: str, seeds: Callable[[], list[bytes]], mutator: Mutator,
            weight: float = 1.0, max_len: int = 1 << 20) -> Callable[[Callable[[bytes], None]], Callable[[bytes], None]]:  # fmt: skip
    def register(fn: Callable[[bytes], None]) -> Callable[[bytes], None]:
        TARGETS[name] = Target(name, fn, seeds, mutator, what, weight, max_len)
        return fn

    return register


# ---------------------------------------------------------------- chunk table


def _table_seeds() -> list[bytes]:
    out = []
    for b in S.real_blobs():
        frame = b.data[b.table_offset : b.table_end]
        for flags in (0, 1, 2, 3):
            out.append(struct.pack("<QB", b.table_offset, flags) + frame)
    return out


@_target("chunk_table", "seekable.parse_chunk_table: skippable-frame header + chunk-table payload",
         _table_seeds, byte_mutator([struct.pack("<I", 0xCDE4EC67), struct.pack("<I", 0x184D2A5E)]))  # fmt: skip
def chunk_table(data: bytes) -> None:
    """Prefix: table_offset (u64), flags (bit 0: check a chunk_digest that
    matches the payload, as a consistent publisher would give; bit 1: allow
    hash_algo 0); then the frame as fetched from table_offset."""
    from lazyfs.format.seekable import parse_chunk_table

    if len(data) < 9:
        return
    table_offset, flags = struct.unpack_from("<QB", data)
    frame = data[9:]
    digest = None
    if flags & 1 and len(frame) >= 8:
        size = struct.unpack_from("<I", frame, 4)[0]
        digest = "sha512:" + hashlib.sha512(frame[8 : 8 + size]).hexdigest()
    t = parse_chunk_table(frame, table_offset=table_offset, blob_size=table_offset + len(frame),
                          expected_digest=digest, require_checksums=not flags & 2)  # fmt: skip
    # What the reader does with a table: spans, lengths, checksums, lookups.
    n = t.frame_count
    for i in {0, n // 2, n - 1} if n else ():
        start, end = t.span(i)
        assert start < end <= t.table_offset, (i, start, end)
        assert 0 < t.raw_length(i) <= t.chunk_size
        if t.hash_algo:
            assert len(t.checksums[i]) == 64
    assert len(t.frames_for(0, t.uncompressed_size)) == n
    _ = t.nbytes, t.compressed_size


# ---------------------------------------------------------------- descriptor


@functools.cache
def _scratch() -> str:
    return tempfile.mkdtemp(prefix="lazyerofs-fuzz-scratch-")


@_target("descriptor", "seekable.load_descriptor / parse_descriptor: descriptor JSON and its annotations",
         S.descriptors, json_mutator(S.MANIFEST_KEYS, S.MANIFEST_STRINGS))  # fmt: skip
def descriptor(data: bytes) -> None:
    from lazyfs.format.seekable import load_descriptor, parse_descriptor, table_read_size

    path = os.path.join(_scratch(), f"desc-{os.getpid()}.json")
    with open(path, "wb") as f:
        f.write(data)
    desc = parse_descriptor(load_descriptor(path))
    if desc.seekable:
        assert desc.table_offset is not None
        assert 0 < table_read_size(desc) <= desc.size
        assert desc.table_end <= desc.size
    json.dumps(desc.to_dict())


# ---------------------------------------------------------------- manifests


def _manifest_seeds() -> list[bytes]:
    return [*S.manifests(), S.config_bytes()]


@_target("manifest", "oci.media check_image_manifest / check_descriptor / pick_platform, "
         "seekable.parse_descriptor per layer (decoded manifest or index)",
         _manifest_seeds, json_mutator(S.MANIFEST_KEYS, S.MANIFEST_STRINGS))  # fmt: skip
def manifest(data: bytes) -> None:
    from lazyfs.errors import NotFoundError
    from lazyfs.format.seekable import parse_descriptor
    from lazyfs.oci.media import check_descriptor, check_image_manifest, pick_platform

    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        return  # the client refuses this before these checks (the client target covers it)
    if not isinstance(doc, dict):
        return  # likewise: the client only passes JSON objects on
    if "manifests" in doc:
        for want in (("linux", "amd64", None), ("linux", "arm64", None), ("linux", "arm", "v7")):
            try:
                chosen = pick_platform(doc, want, "fuzz")
            except NotFoundError:
                continue  # a refusal like any other; try the next platform
            assert isinstance(chosen["digest"], str) and isinstance(chosen["size"], int)
        return
    for i, layer in enumerate(check_image_manifest(doc, "fuzz")):
        parse_descriptor(layer, name=f"layer {i}")
    if doc.get("config") is not None:
        check_descriptor(doc["config"], "config")


def _client_seeds() -> list[bytes]:
    return list(S.manifests())


@_target("client_resolve", "oci.client RegistryClient.resolve over a mock registry: manifest/index "
         "bytes as a registry sends them (JSON, media type, digests, platform, config)",
         _client_seeds, json_mutator(S.MANIFEST_KEYS, S.MANIFEST_STRINGS), weight=0.25)  # fmt: skip
def client_resolve(data: bytes) -> None:
    import httpx
    import trio

    from lazyfs.oci.client import RegistryClient
    from lazyfs.oci.reference import parse_reference
    from lazyfs.oci.transport import RegistryOptions

    store = {S._sha256(d): d for d in S.manifests()}
    store[S._sha256(S.config_bytes())] = S.config_bytes()
    tag_body = data

    def handler(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        sel = path.rsplit("/", 1)[-1]
        if "/manifests/" in path:
            body = tag_body if sel == "fuzz" else store.get(sel)
            if body is None and sel == S._sha256(tag_body):
                body = tag_body
            if body is None:
                return httpx.Response(404, json={"errors": [{"code": "MANIFEST_UNKNOWN"}]})
            return httpx.Response(200, content=body, headers={"Docker-Content-Digest": S._sha256(body)})
        body = store.get(sel) if "/blobs/" in path else None
        if body is None:
            return httpx.Response(404)
        return httpx.Response(200, content=body)

    async def go() -> None:
        opts = RegistryOptions(retries=0, overall_timeout=5.0, platform="linux/amd64", plain_http=True)
        async with RegistryClient(opts, transport=httpx.MockTransport(handler)) as client:
            img = await client.resolve(parse_reference("localhost:5000/fuzz/img:fuzz"))
            assert isinstance(img.layers, list)

    trio.run(go)


@_target("config", "oci.client config blob parsing (_fetch_config: digest-checked bytes, JSON)",
         lambda: [S.config_bytes(), b"[]", b"null"], json_mutator(("architecture", "os", "config"), ()),
         weight=0.1)  # fmt: skip
def config(data: bytes) -> None:
    import httpx
    import trio

    from lazyfs.oci.client import RegistryClient
    from lazyfs.oci.reference import parse_reference
    from lazyfs.oci.transport import RegistryOptions

    desc = {"mediaType": S.OCI_CONFIG, "digest": S._sha256(data), "size": len(data)}

    def handler(request: httpx.Request) -> httpx.Response:
        rng = request.headers.get("range")
        return httpx.Response(206 if rng else 200, content=data,
                              headers={"Content-Range": f"bytes 0-{len(data) - 1}/{len(data)}"} if rng else {})  # fmt: skip

    async def go() -> None:
        opts = RegistryOptions(retries=0, overall_timeout=5.0, plain_http=True)
        async with RegistryClient(opts, transport=httpx.MockTransport(handler)) as client:
            cfg = await client._fetch_config(parse_reference("localhost:5000/fuzz/img:t"), desc)
            assert cfg is None or isinstance(cfg, dict)

    trio.run(go)


# ---------------------------------------------------------------- registry text


@_target("reference", "oci.reference.parse_reference (as from argv: UTF-8 with surrogateescape)",
         lambda: [r.encode() for r in S.REFERENCES], text_mutator(S.REFERENCE_TOKENS, 4096))  # fmt: skip
def reference(data: bytes) -> None:
    from lazyfs.oci.reference import is_loopback_host, parse_reference

    ref = parse_reference(data.decode("utf-8", "surrogateescape"))
    assert ref.tag is not None or ref.digest is not None
    assert parse_reference(str(ref)) == ref, f"{ref} does not round-trip"
    is_loopback_host(ref.registry)
    _ = ref.api_host, ref.selector, ref.name


@_target("www_authenticate", "oci.auth.parse_challenges (WWW-Authenticate, decoded latin-1 as httpx does)",
         lambda: [c.encode() for c in S.CHALLENGES], text_mutator(S.CHALLENGE_TOKENS, 16 << 10))  # fmt: skip
def www_authenticate(data: bytes) -> None:
    from lazyfs.oci.auth import parse_challenges

    for c in parse_challenges(data.decode("latin-1")):
        assert c.scheme == c.scheme.lower()
        _ = c.realm, c.params.get("service"), c.params.get("scope")


@_target("token_answer", "oci.auth AuthSession.answer: a 401 challenge answered by a token server "
         "that sends these bytes", lambda: list(S.TOKEN_ANSWERS), json_mutator(S.TOKEN_KEYS, ()),
         weight=0.1)  # fmt: skip
def token_answer(data: bytes) -> None:
    import httpx
    import trio

    from lazyfs.oci.auth import AuthSession
    from lazyfs.oci.transport import Counters, RegistryOptions

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=data)

    async def go() -> None:
        opts = RegistryOptions(retries=0, overall_timeout=5.0, plain_http=True,
                               docker_config=os.path.join(_scratch(), "none.json"))  # fmt: skip
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
            session = AuthSession(http, opts, Counters())
            await session.answer("localhost:5000", "repository:a:pull",
                                 'Bearer realm="http://localhost:5000/token",service="s"', None)  # fmt: skip
            assert session.authorization("localhost:5000", "repository:a:pull") is not None

    trio.run(go)


@_target("docker_config", "oci.credentials.load_docker_credentials (docker config.json)",
         S.docker_configs, json_mutator(S.DOCKER_CONFIG_KEYS, ("localhost:5000", "docker.io")))  # fmt: skip
def docker_config(data: bytes) -> None:
    from lazyfs.oci.credentials import load_docker_credentials

    path = os.path.join(_scratch(), f"config-{os.getpid()}.json")
    with open(path, "wb") as f:
        f.write(data)
    for registry in ("localhost:5000", "docker.io", "example.com"):
        creds = load_docker_credentials(path, registry)
        if creds is not None:
            assert creds.basic_header().startswith("Basic ")
            assert "pass" not in repr(creds.password)


# ---------------------------------------------------------------- dm-verity


def _verity_seeds() -> list[bytes]:
    out = []
    for b in S.real_blobs():
        if b.verity_offset is not None:
            payload = b.data[b.verity_offset + 8 :]
            out.append(struct.pack("<Q", b.image_size) + payload[:4096])
            out.append(struct.pack("<Q", b.image_size) + payload[:512])
    return out


@_target("verity_superblock", "format.verity_superblock.Superblock.parse + verity.HashTree.from_superblock "
         "(the payload's first hash block, as the verity tail reads it)",
         _verity_seeds, byte_mutator([b"verity\0\0", b"sha256\0", b"sha512\0", b"sha1\0"], 1 << 20))  # fmt: skip
def verity_superblock(data: bytes) -> None:
    """Prefix: the image size (u64) the tree must cover; then the block."""
    from lazyfs.format import verity

    if len(data) < 8:
        return
    image_size = struct.unpack_from("<Q", data)[0]
    block = data[8:]
    sb = verity.Superblock.parse(block[:512])
    root_hex = hashlib.new(sb.algorithm, block).hexdigest()
    tree = verity.HashTree.from_superblock(block, root_hex, image_size=image_size)
    # What the verity tail does next: the materialized offset, the sidecar, and
    # the blocks a read needs (first and last byte of the payload).
    verity.sidecar_json(root_hex, verity.materialized_hash_offset(image_size, sb.data_block_size))
    assert tree.blocks_needed(0, 1) == [0]
    last = tree.blocks_needed(tree.payload_size - 1, 1)
    assert len(last) <= verity.MAX_LEVELS + 1
    tree.verify_blocks({0: block[: sb.hash_block_size]})
    tree.data_hash_block(sb.data_blocks - 1)


# ---------------------------------------------------------------- frames


def _frame_seeds() -> list[bytes]:
    return [struct.pack("<I", n) + f for n, f in S.frames()]


@_target("zstd_frame", "seekable.decode_frame: a zstd frame against its table entry (checksum "
         "matching, so the frame reaches the decompressor)", _frame_seeds,
         byte_mutator([b"\x28\xb5\x2f\xfd", struct.pack("<I", 32 << 20)], 1 << 20))  # fmt: skip
def zstd_frame(data: bytes) -> None:
    """Prefix: the decompressed length the table promises (u32, capped at the
    largest chunk size a table may declare); then the frame."""
    from lazyfs.format.seekable import MAX_CHUNK_SIZE, ChunkTable, FrameChecksums, decode_frame

    if len(data) < 4:
        return
    expected = struct.unpack_from("<I", data)[0] % (MAX_CHUNK_SIZE + 1)
    frame = data[4:]
    table = ChunkTable(
        uncompressed_size=expected, chunk_size=max(expected, 1), hash_algo=1,
        offsets=array("Q", [0]), checksums=FrameChecksums(hashlib.sha512(frame).digest()),
        table_offset=max(len(frame), 1),
    )  # fmt: skip
    if not frame:
        return  # a table never has an empty span (offsets strictly increase)
    raw = decode_frame(table, 0, frame)
    assert len(raw) == expected


# ---------------------------------------------------------------- tar

SENTINEL = b"sentinel: must not change\n"


@functools.cache
def _tar_base() -> str:
    return tempfile.mkdtemp(prefix="lazyerofs-fuzz-tar-")


@_target("tar", "produce.tarstage.stage_tar: a layer tar staged into a temp dir "
         "(asserts nothing is written outside it)", S.tars, tar_mutator(1 << 20), weight=0.5)  # fmt: skip
def tar(data: bytes) -> None:
    from lazyfs.produce.tarstage import stage_tar

    base = os.path.join(_tar_base(), str(os.getpid()))
    root = os.path.join(base, "root")
    outside = os.path.join(base, "outside")
    if not os.path.isdir(outside):
        os.makedirs(outside)
        with open(os.path.join(outside, "x"), "wb") as f:
            f.write(SENTINEL)
    os.mkdir(root)
    try:
        stage_tar(io.BytesIO(data), root, layer="fuzz", max_layer_bytes=64 << 20)
    finally:
        problems = []
        if sorted(os.listdir(base)) != ["outside", "root"]:
            problems.append(f"new entries next to the staging dir: {sorted(os.listdir(base))}")
        if os.listdir(outside) != ["x"] or os.path.islink(os.path.join(outside, "x")):
            problems.append(f"outside dir changed: {os.listdir(outside)}")
        else:
            with open(os.path.join(outside, "x"), "rb") as f:
                if f.read() != SENTINEL:
                    problems.append("sentinel file outside the staging dir was modified")
            if os.stat(os.path.join(outside, "x")).st_nlink != 1:
                problems.append("sentinel file outside got a hard link")
        shutil.rmtree(root)
        if problems:
            shutil.rmtree(base)
            raise AssertionError("stage_tar wrote outside its root: " + "; ".join(problems))


@_target("tar_erofs", "produce.erofs_writer.write_erofs_from_tar: a layer tar written straight to an "
         "EROFS image (its own tar header parser; the image must pass fsck.erofs shape checks we can "
         "do in process: the superblock magic)", S.tars, tar_mutator(1 << 20), weight=0.5)  # fmt: skip
def tar_erofs(data: bytes) -> None:
    from lazyfs.produce.erofs_writer import write_erofs_from_tar
    from lazyfs.produce.mkfs import is_erofs_image

    out = os.path.join(_tar_base(), f"{os.getpid()}.erofs")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(out)
    try:
        write_erofs_from_tar(io.BytesIO(data), out, layer="fuzz", source_date_epoch=0, max_layer_bytes=64 << 20)
        assert is_erofs_image(out), "the writer finished without a valid superblock"
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(out)


# ---------------------------------------------------------------- profiles


def _profile_seeds() -> list[bytes]:
    from lazyfs.fetch.profile import Profile, ProfileLayer, dump_profile

    layers = tuple(
        ProfileLayer(b.descriptor["digest"], (0, 3, 1, 7), (0, 5, 9, 120), b.chunk_size, 40)
        for b in S.real_blobs()
    )
    return [dump_profile(Profile(layers, image="sha256:" + "ab" * 32, created="1970-01-01T00:00:00Z")),
            dump_profile(Profile((), truncated=True))]  # fmt: skip


@_target("profile", "fetch.profile.parse_profile (a startup profile, e.g. from a registry referrer)",
         _profile_seeds, json_mutator(("schema", "version", "image", "created", "truncated", "layers",
                                       "digest", "chunk_size", "frame_count", "frames"), ()))  # fmt: skip
def profile(data: bytes) -> None:
    from lazyfs.fetch.profile import dump_profile, parse_profile

    p = parse_profile(data, name="fuzz")
    assert parse_profile(dump_profile(p), name="again") == p, "a parsed profile does not round-trip"


# ---------------------------------------------------------------- registry error bodies


@_target("error_body", "oci.transport.raise_for_status: a registry's error answer (distribution error JSON)",
         lambda: [b'{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown","detail":{}}]}',
                  b"<html>not found</html>", b""],
         json_mutator(("errors", "code", "message", "detail"), ("MANIFEST_UNKNOWN", "\x1b[31m")),
         weight=0.1)  # fmt: skip
def error_body(data: bytes) -> None:
    import httpx
    import trio

    from lazyfs.oci.transport import raise_for_status

    async def go() -> None:
        for status in (404, 401, 400):
            resp = httpx.Response(status, content=data)
            try:
                await raise_for_status(resp, "fuzz")
            except Exception as exc:
                if not type(exc).__module__.startswith("lazyfs"):
                    raise
                assert str(exc).isprintable(), "registry text reaches the terminal unsanitized"
            else:
                raise AssertionError(f"HTTP {status} raised nothing")

    trio.run(go)
