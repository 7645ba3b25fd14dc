"""dm-verity payloads: byte interop with veritysetup, lazy path checks, bad input."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import random
import shutil
import struct
import subprocess
import uuid as uuid_mod
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lazyfs.errors import FormatError, IntegrityError
from lazyfs.format import verity, verity_build
from lazyfs.produce.mkfs import make_erofs

UUID = bytes(range(16))
K = 4096


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"needs {tool} (run scripts/setup.sh)")
    return path


def veritysetup(
    *args: str | os.PathLike[str], check: bool = True
) -> subprocess.CompletedProcess[str]:
    need("veritysetup")
    proc = subprocess.run(["veritysetup", *map(str, args)], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"veritysetup {args} failed: {proc.stdout}{proc.stderr}")
    return proc


def root_of(output: str) -> str:
    for line in output.splitlines():
        if line.startswith("Root hash:"):
            return line.split()[-1]
    raise AssertionError(f"no root hash in {output!r}")


def build(data: bytes, **kw) -> tuple[bytes, str]:
    kw.setdefault("uuid", UUID)
    return verity_build.build_payload(io.BytesIO(data), len(data), **kw)


def materialize(path: Path, image: bytes, payload: bytes, block_size: int = K) -> int:
    """containerd's layer.erofs: [image][zeros to a data block][payload]."""
    off = verity.materialized_hash_offset(len(image), block_size)
    path.write_bytes(image + bytes(off - len(image)) + payload)
    return off


def blocks_of(payload: bytes, bs: int) -> dict[int, bytes]:
    return {i: payload[i * bs : (i + 1) * bs] for i in range(len(payload) // bs)}


@pytest.fixture(scope="module")
def erofs_image(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    need("mkfs.erofs")
    tmp = tmp_path_factory.mktemp("erofs")
    src = tmp / "src"
    (src / "etc").mkdir(parents=True)
    (src / "etc" / "hostname").write_text("lazyerofs\n")
    (src / "big.bin").write_bytes(random.Random(7).randbytes(3 << 20))
    (src / "text.txt").write_bytes(b"erofs " * 100_000)
    os.symlink("etc/hostname", src / "link")
    image = tmp / "layer.erofs"
    make_erofs(src, image)
    return image.read_bytes()


# -- interop with veritysetup ------------------------------------------------


@pytest.mark.parametrize(
    ("size", "block", "algorithm", "salt"),
    [
        (1, K, "sha512", b""),  # one block: no tree, root = digest of the block
        (K, K, "sha512", b""),
        (100 * K + 123, K, "sha512", b""),  # not a block multiple
        (65 * K, K, "sha512", b"\x01\x02salt"),  # two levels
        (70 * 512 + 7, 512, "sha512", b""),  # 512-byte blocks: 8 digests each, 3 levels
        (300 * K + 1, K, "sha256", bytes(32)),
        (130 * K, K, "sha1", b"abc"),  # 20-byte digests padded to 32
    ],
)
def test_payload_is_byte_identical_to_veritysetup_format(
    tmp_path: Path, size: int, block: int, algorithm: str, salt: bytes
):
    data = random.Random(size).randbytes(size)
    payload, root = build(data, block_size=block, algorithm=algorithm, salt=salt)
    (tmp_path / "data").write_bytes(data + bytes(-size % block))
    out = veritysetup(
        "format", tmp_path / "data", tmp_path / "hash",
        "--hash", algorithm, "--data-block-size", block, "--hash-block-size", block,
        "--salt", salt.hex() or "-", "--uuid", uuid_mod.UUID(bytes=UUID),
    )  # fmt: skip
    assert root == root_of(out.stdout)
    assert (tmp_path / "hash").read_bytes() == payload


def test_veritysetup_payload_parses_and_verifies_with_hashtree(tmp_path: Path):
    data = random.Random(3).randbytes(200 * K)
    (tmp_path / "data").write_bytes(data)
    salt = bytes.fromhex("00112233445566778899")
    out = veritysetup(
        "format", tmp_path / "data", tmp_path / "hash", "--hash", "sha512",
        "--data-block-size", K, "--hash-block-size", K, "--salt", salt.hex(),
    )  # fmt: skip
    theirs = (tmp_path / "hash").read_bytes()
    sb = verity.Superblock.parse(theirs)
    assert (sb.version, sb.hash_type, sb.algorithm) == (1, 1, "sha512")
    assert (sb.data_block_size, sb.hash_block_size, sb.data_blocks) == (K, K, 200)
    assert sb.salt == salt
    assert sb.to_bytes() == theirs[:512]

    ours, root = build(data, salt=salt, uuid=sb.uuid)
    assert root == root_of(out.stdout)
    assert ours == theirs

    tree = verity.HashTree.from_superblock(theirs[:K], root, image_size=len(data))
    assert tree.payload_size == len(theirs)
    tree.verify_blocks(blocks_of(theirs, K))
    assert verity_build.verify_image(io.BytesIO(data), len(data), theirs, root) == []


def test_materialized_erofs_layer_passes_veritysetup_verify(tmp_path: Path, erofs_image: bytes):
    payload, root = verity_build.build_payload(io.BytesIO(erofs_image), len(erofs_image))
    layer = tmp_path / "layer.erofs"
    off = materialize(layer, erofs_image, payload)
    assert off % K == 0 and off >= len(erofs_image)
    veritysetup("verify", f"--hash-offset={off}", layer, layer, root)
    tree = verity.HashTree.from_superblock(payload[:K], root, image_size=len(erofs_image))
    tree.verify_blocks(blocks_of(payload, K))
    assert (
        verity_build.verify_image(io.BytesIO(erofs_image), len(erofs_image), io.BytesIO(payload), root)
        == []
    )
    meta = json.loads(verity.sidecar_json(root, off))
    assert meta == {"roothash": root, "hashoffset": off}


def test_one_block_image_has_no_tree_and_veritysetup_agrees(tmp_path: Path):
    data = b"tiny image"
    payload, root = build(data)
    assert len(payload) == K
    assert root == hashlib.sha512(data + bytes(K - len(data))).hexdigest()
    layer = tmp_path / "layer.erofs"
    off = materialize(layer, data, payload)
    assert off == K
    veritysetup("verify", f"--hash-offset={off}", layer, layer, root)
    tree = verity.HashTree.from_superblock(payload, root, image_size=len(data))
    assert (tree.levels, tree.payload_size) == (0, K)
    assert tree.blocks_needed(0, K) == [0]
    tree.verify_blocks({0: payload})
    assert tree.data_hash_block(0) is None
    tree.verify_data_block(0, data, b"")
    with pytest.raises(IntegrityError, match="data block 0"):
        tree.verify_data_block(0, b"tiny imagE", b"")
    assert verity_build.verify_image(io.BytesIO(b"tiny imagE"), len(data), payload, root) == [0]


# -- tampering -----------------------------------------------------------------


def test_tampered_tree_block_is_refused_by_verify_blocks_and_veritysetup(tmp_path: Path):
    data = random.Random(5).randbytes(5000 * K)  # 3 levels: 79 + 2 + 1 blocks
    payload, root = build(data)
    tree = verity.HashTree.from_superblock(payload[:K], root, image_size=len(data))
    assert tree.levels == 3
    for victim in (1, 2, tree.payload_size // K - 1):  # top, middle, bottom level
        bad = bytearray(payload)
        bad[victim * K + 100] ^= 0x40
        with pytest.raises(IntegrityError, match=f"block {victim} "):
            tree.verify_blocks(blocks_of(bytes(bad), K))
        needed = tree.blocks_needed(victim * K, 1)
        with pytest.raises(IntegrityError, match=f"block {victim} "):
            tree.verify_blocks({b: bytes(bad[b * K : (b + 1) * K]) for b in needed})
        with pytest.raises(IntegrityError):
            verity_build.verify_image(io.BytesIO(data), len(data), bytes(bad), root)
        layer = tmp_path / "layer.erofs"
        off = materialize(layer, data, bytes(bad))
        assert (
            veritysetup(
                "verify", f"--hash-offset={off}", layer, layer, root, check=False
            ).returncode
            != 0
        )


def test_tampered_block_padding_is_refused(tmp_path: Path):
    # Slack after the last digest of a level is covered by the block's hash too.
    data = random.Random(6).randbytes(65 * K)
    payload, root = build(data)
    tree = verity.HashTree.from_superblock(payload[:K], root, image_size=len(data))
    last = tree.payload_size // K - 1
    bad = bytearray(payload)
    bad[(last + 1) * K - 1] = 1
    with pytest.raises(IntegrityError, match=f"block {last} "):
        tree.verify_blocks(blocks_of(bytes(bad), K))


def test_wrong_root_is_refused_at_the_top_block():
    data = random.Random(8).randbytes(10 * K)
    payload, root = build(data)
    other = ("0" if root[0] != "0" else "1") + root[1:]
    tree = verity.HashTree.from_superblock(payload[:K], other, image_size=len(data))
    with pytest.raises(IntegrityError, match="root hash"):
        tree.verify_blocks(blocks_of(payload, K))


def test_a_different_superblock_block_is_refused():
    data = random.Random(9).randbytes(10 * K)
    payload, root = build(data)
    tree = verity.HashTree.from_superblock(payload[:K], root, image_size=len(data))
    other, _ = build(data, uuid=bytes(16))
    with pytest.raises(IntegrityError, match="block 0"):
        tree.verify_blocks({0: other[:K]})
    with pytest.raises(FormatError, match="padding after the superblock"):
        tree.verify_blocks({0: payload[:512] + b"\x01" + payload[513:K]})


def test_missing_ancestor_is_refused_not_trusted():
    data = random.Random(10).randbytes(100 * K)
    payload, root = build(data)
    tree = verity.HashTree.from_superblock(payload[:K], root, image_size=len(data))
    blocks = blocks_of(payload, K)
    last = tree.payload_size // K - 1
    with pytest.raises(IntegrityError, match="parent block 1 was not given"):
        tree.verify_blocks({last: blocks[last]})
    with pytest.raises(IntegrityError, match="expected 4096"):
        tree.verify_blocks({1: blocks[1][:-1]})


def test_tampered_data_blocks_are_found_by_verify_image(tmp_path: Path, erofs_image: bytes):
    payload, root = verity_build.build_payload(io.BytesIO(erofs_image), len(erofs_image))
    bad = bytearray(erofs_image)
    victims = [0, 17, len(erofs_image) // K - 1]
    for v in victims:
        bad[v * K + 5] ^= 0xFF
    assert verity_build.verify_image(io.BytesIO(bytes(bad)), len(bad), payload, root) == victims
    layer = tmp_path / "layer.erofs"
    off = materialize(layer, bytes(bad), payload)
    assert (
        veritysetup("verify", f"--hash-offset={off}", layer, layer, root, check=False).returncode
        != 0
    )


def test_verify_data_block_against_a_level0_block():
    data = random.Random(11).randbytes(130 * K + 10)
    payload, root = build(data)
    tree = verity.HashTree.from_superblock(payload[:K], root, image_size=len(data))
    for index in (0, 63, 64, 130):
        hb = tree.data_hash_block(index)
        assert hb is not None and hb in tree.level_ranges[0]
        level0 = payload[hb * K : (hb + 1) * K]
        block = data[index * K : (index + 1) * K]
        tree.verify_data_block(index, block, level0)  # last one short: zero-padded
        with pytest.raises(IntegrityError, match=f"data block {index} "):
            tree.verify_data_block(index, b"\0" + block[1:], level0)
    with pytest.raises(IntegrityError, match="bytes, expected"):
        tree.verify_data_block(3, data[3 * K : 4 * K - 1], payload[K : 2 * K])


# -- blocks_needed ---------------------------------------------------------------


def test_blocks_needed_small_tree_is_block_and_top():
    data = random.Random(12).randbytes(100 * K)  # sha512: 2 level-0 blocks, 1 top
    payload, root = build(data)
    tree = verity.HashTree.from_superblock(payload[:K], root, image_size=len(data))
    assert tree.levels == 2
    assert [list(r) for r in tree.level_ranges] == [[2, 3], [1]]
    assert tree.blocks_needed(0, 512) == [0]
    assert tree.blocks_needed(K - 1, 2) == [0, 1]
    assert tree.blocks_needed(3 * K + 7, 100) == [1, 3]
    assert tree.blocks_needed(0, tree.payload_size) == [0, 1, 2, 3]
    assert tree.blocks_needed(5, 0) == []
    assert (tree.parent(1), tree.parent(2), tree.parent(3)) == (None, 1, 1)
    with pytest.raises(ValueError):
        tree.parent(0)
    with pytest.raises(ValueError):
        tree.blocks_needed(tree.payload_size - 1, 2)


@pytest.mark.parametrize(
    ("mib", "levels", "counts"),
    [(16, 2, [64, 1]), (20, 3, [80, 2, 1])],  # 64 sha512 digests per 4K block
)
def test_blocks_needed_multi_level_tree_is_path_to_root(mib: int, levels: int, counts: list[int]):
    data = bytes(mib << 20)
    payload, root = build(data)
    tree = verity.HashTree.from_superblock(payload[:K], root, image_size=len(data))
    assert tree.levels == levels
    assert [len(r) for r in tree.level_ranges] == counts
    assert tree.payload_size == (1 + sum(counts)) * K == len(payload)
    last = tree.payload_size // K - 1
    path = tree.blocks_needed(last * K + 10, 20)
    assert len(path) == levels and path[0] == 1 and path[-1] == last
    for child, parent in zip(path[:0:-1], path[-2::-1], strict=True):
        assert tree.parent(child) == parent
    tree.verify_blocks({b: payload[b * K : (b + 1) * K] for b in path})
    if levels == 3:
        # First level-0 block: under the first middle block (2), then top (1).
        assert tree.blocks_needed(4 * K, 1) == [1, 2, 4]
        assert tree.blocks_needed(tree.level_ranges[0][-1] * K, 1) == [1, 3, last]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data_blocks=st.integers(1, 700),
    tail=st.integers(0, 511),
    algorithm=st.sampled_from(["sha512", "sha256", "sha1"]),
    salt=st.binary(max_size=40),
    start=st.floats(0, 1),
    length=st.integers(0, 5000),
)
def test_blocks_needed_is_closed_under_parents_and_verifies(
    data_blocks: int, tail: int, algorithm: str, salt: bytes, start: float, length: int
):
    size = max(1, (data_blocks - 1) * 512 + tail)
    data = random.Random(size).randbytes(size)
    payload, root = build(data, block_size=512, algorithm=algorithm, salt=salt)
    tree = verity.HashTree.from_superblock(payload[:512], root, image_size=size)
    assert tree.payload_size == len(payload)
    offset = int(start * (tree.payload_size - 1))
    length = min(length, tree.payload_size - offset)
    needed = tree.blocks_needed(offset, length)
    touched = set(range(offset // 512, (offset + length - 1) // 512 + 1)) if length else set()
    assert touched <= set(needed) and needed == sorted(set(needed))
    for b in needed:
        if b > 0 and (p := tree.parent(b)) is not None:
            assert p in needed
    tree.verify_blocks({b: payload[b * 512 : (b + 1) * 512] for b in needed})
    assert verity_build.verify_image(io.BytesIO(data), size, payload, root) == []


# -- malformed superblocks -------------------------------------------------------


def _good_sb() -> bytes:
    return build(b"x" * (3 * K), salt=b"salty")[0][:512]


def _put(offset: int, raw: bytes) -> Callable[[bytes], bytes]:
    return lambda sb: sb[:offset] + raw + sb[offset + len(raw) :]


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (_put(0, b"verify\0\0"), "signature"),
        (_put(8, struct.pack("<I", 2)), "version"),
        (_put(12, struct.pack("<I", 0)), "hash_type"),
        (_put(32, b"md5\0\0\0\0"), "algorithm"),
        (_put(32, b"sha512\0x"), "algorithm name"),
        (_put(32, b"s" * 32), "algorithm name"),
        (_put(64, struct.pack("<I", 3000)), "data_block_size"),
        (_put(68, struct.pack("<I", 256)), "hash_block_size"),
        (_put(68, struct.pack("<I", 1 << 20)), "hash_block_size"),
        (_put(72, struct.pack("<Q", 0)), "data_blocks"),
        (_put(80, struct.pack("<H", 257)), "salt_size"),
        (_put(88 + 5, b"\x01"), "salt padding"),
        (_put(82, b"\x01"), "reserved padding"),
        (_put(511, b"\x01"), "reserved padding"),
        (lambda sb: sb[:511], "bytes, need 512"),
    ],
)
def test_malformed_superblock_raises_format_error_naming_the_check(
    mutate: Callable[[bytes], bytes], match: str
):
    good = _good_sb()
    verity.Superblock.parse(good)
    with pytest.raises(FormatError, match=match):
        verity.Superblock.parse(mutate(good))


def test_from_superblock_checks_padding_size_and_root():
    data = random.Random(13).randbytes(10 * K + 1)
    payload, root = build(data)
    block = payload[:K]
    verity.HashTree.from_superblock(block, root, image_size=len(data))
    with pytest.raises(FormatError, match="padding after the superblock"):
        verity.HashTree.from_superblock(block[:-1] + b"\x01", root, image_size=len(data))
    with pytest.raises(FormatError, match="data_blocks 11"):
        verity.HashTree.from_superblock(block, root, image_size=12 * K)
    with pytest.raises(FormatError, match="data_blocks 11"):
        verity.HashTree.from_superblock(block, root, image_size=10 * K)
    with pytest.raises(FormatError, match="superblock block is"):
        verity.HashTree.from_superblock(block[:1024], root, image_size=len(data))
    with pytest.raises(FormatError, match="hex digits"):
        verity.HashTree.from_superblock(block, root[:64], image_size=len(data))
    with pytest.raises(FormatError, match="not hex"):
        verity.HashTree.from_superblock(block, "zz" + root[2:], image_size=len(data))


def test_superblock_round_trips_and_validates_on_construction():
    sb = verity.Superblock.parse(_good_sb())
    assert verity.Superblock.parse(sb.to_bytes()) == sb
    assert sb.salt == b"salty" and sb.uuid == UUID and sb.data_blocks == 3
    with pytest.raises(FormatError, match="salt_size"):
        dataclasses.replace(sb, salt=bytes(300))
    with pytest.raises(FormatError, match="algorithm"):
        dataclasses.replace(sb, algorithm="crc32")


# -- builder details -------------------------------------------------------------


def test_build_defaults_match_containerd_no_salt_random_uuid():
    data = random.Random(14).randbytes(3 * K)
    a, root_a = verity_build.build_payload(io.BytesIO(data), len(data))
    b, root_b = verity_build.build_payload(io.BytesIO(data), len(data))
    sa, sb = verity.Superblock.parse(a), verity.Superblock.parse(b)
    assert root_a == root_b  # the UUID is not hashed
    assert sa.uuid != sb.uuid and uuid_mod.UUID(bytes=sa.uuid).version == 4
    assert (sa.algorithm, sa.salt, sa.data_block_size, sa.hash_block_size) == ("sha512", b"", K, K)


def test_build_reads_only_data_size_and_refuses_a_short_image():
    data = random.Random(15).randbytes(5 * K)
    stream = io.BytesIO(data + b"trailing junk")
    payload, root = verity_build.build_payload(stream, len(data), uuid=UUID)
    assert (payload, root) == build(data)
    with pytest.raises(FormatError, match="image ended after"):
        verity_build.build_payload(io.BytesIO(data[:-1]), len(data))
    with pytest.raises(FormatError, match="must be positive"):
        verity_build.build_payload(io.BytesIO(b""), 0)
    with pytest.raises(FormatError, match="data_block_size"):
        verity_build.build_payload(io.BytesIO(data), len(data), block_size=1000)


def test_verify_image_refuses_a_short_payload():
    data = random.Random(16).randbytes(100 * K)
    payload, root = build(data)
    with pytest.raises(FormatError, match="tree needs"):
        verity_build.verify_image(io.BytesIO(data), len(data), payload[:-K], root)


# -- materialized layout helpers -------------------------------------------------


def test_materialized_hash_offset_rounds_up_to_the_data_block():
    assert verity.materialized_hash_offset(1, K) == K
    assert verity.materialized_hash_offset(K, K) == K
    assert verity.materialized_hash_offset(K + 1, K) == 2 * K
    assert verity.materialized_hash_offset(1000, 512) == 1024


def test_sidecar_json_is_go_marshalindent_of_dmveritymetadata():
    root = "ab" * 64
    assert verity.sidecar_json(root.upper(), 4489216) == (
        b'{\n  "roothash": "' + root.encode() + b'",\n  "hashoffset": 4489216\n}\n'
    )
    with pytest.raises(FormatError):
        verity.sidecar_json("sha512:" + root, 4096)
