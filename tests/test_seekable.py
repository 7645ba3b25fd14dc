"""The seekable format: encoder interop, the reader's checks, round trips."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
from pathlib import Path

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.blobtools import make_blob, stream_frame

from lazyfs.errors import FormatError, IntegrityError
from lazyfs.format import seekable
from lazyfs.format.encode import encode_image
from lazyfs.produce.mkfs import is_erofs_image, make_erofs

TABLE_OFFSET = seekable.ANNOTATION_TABLE_OFFSET
CHUNK_DIGEST = seekable.ANNOTATION_CHUNK_DIGEST


def _table(data: bytes, descriptor: dict, *, verify: bool = True) -> seekable.ChunkTable:
    desc = seekable.parse_descriptor(descriptor)
    assert desc.table_offset is not None
    return seekable.read_chunk_table(data[desc.table_offset : desc.table_end], desc, verify=verify)


def decode_all(data: bytes, descriptor: dict, *, verify: bool = True) -> bytes:
    table = _table(data, descriptor, verify=verify)
    return b"".join(
        seekable.decode_frame(table, i, data[slice(*table.span(i))]) for i in range(table.frame_count)
    )


def parse(blob) -> seekable.ChunkTable:
    desc = seekable.parse_descriptor(blob.descriptor)
    assert desc.table_offset is not None
    return seekable.read_chunk_table(blob.data[desc.table_offset :], desc)


def sample_raw(size: int, seed: int = 1) -> bytes:
    rnd = random.Random(seed)
    # Half compressible text, half noise: frames of very different sizes.
    text = b"".join(b"line %d of the image\n" % i for i in range(size // 20 + 1))
    return bytes(a if i % 2 else b for i, (a, b) in enumerate(zip(text[:size], rnd.randbytes(size), strict=True)))


@pytest.fixture
def erofs_image(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    (src / "etc").mkdir(parents=True)
    (src / "etc" / "hostname").write_text("lazyerofs\n")
    (src / "big.bin").write_bytes(os.urandom(5 << 20))
    (src / "text.txt").write_bytes(b"erofs " * 300_000)
    os.symlink("etc/hostname", src / "link")
    image = tmp_path / "layer.erofs"
    make_erofs(src, image)
    return image


def test_blob_decompresses_with_plain_zstd_cli_to_the_exact_image(tmp_path: Path, erofs_image: Path):
    blob = tmp_path / "layer.blob"
    result = encode_image(erofs_image, blob, chunk_size=1 << 20)
    out = tmp_path / "out.erofs"
    subprocess.run(["zstd", "-d", "-q", "-f", str(blob), "-o", str(out)], check=True)
    assert out.read_bytes() == erofs_image.read_bytes()
    assert is_erofs_image(out)
    assert result.diff_id == "sha256:" + hashlib.sha256(erofs_image.read_bytes()).hexdigest()
    assert result.descriptor["digest"] == "sha256:" + hashlib.sha256(blob.read_bytes()).hexdigest()
    assert result.descriptor["size"] == blob.stat().st_size


def test_encoder_output_decodes_frame_by_frame(tmp_path: Path, erofs_image: Path):
    blob = tmp_path / "layer.blob"
    result = encode_image(erofs_image, blob, chunk_size=300_000)
    assert decode_all(blob.read_bytes(), result.descriptor) == erofs_image.read_bytes()
    assert result.frame_count == -(-erofs_image.stat().st_size // 300_000)


def test_hot_frames_are_compressed_at_the_hot_level_and_the_rest_as_before(tmp_path: Path):
    # Compressible, non-trivial bytes: levels 1 and 19 give different frames.
    rng = random.Random(7)
    words = [bytes(rng.choices(range(97, 123), k=rng.randint(3, 9))) for _ in range(300)]
    raw = b" ".join(rng.choice(words) for _ in range(120_000))[: 8 * 65536]
    image = tmp_path / "img"
    image.write_bytes(raw)
    plain = encode_image(image, tmp_path / "plain", chunk_size=65536, level=1)
    hot = encode_image(image, tmp_path / "hot", chunk_size=65536, level=1, hot_bytes=3 * 65536 - 1, hot_level=19)
    encode_image(image, tmp_path / "again", chunk_size=65536, level=1, hot_bytes=3 * 65536 - 1, hot_level=19)
    assert (tmp_path / "hot").read_bytes() == (tmp_path / "again").read_bytes()  # still reproducible
    blobs = {name: (tmp_path / name).read_bytes() for name in ("plain", "hot")}
    tables = {k: _table(blobs[k], r.descriptor) for k, r in (("plain", plain), ("hot", hot))}
    frames = {k: [blobs[k][slice(*t.span(i))] for i in range(t.frame_count)] for k, t in tables.items()}
    # The three frames that start in the hot part are smaller; every later one is the same bytes.
    assert all(len(frames["hot"][i]) < len(frames["plain"][i]) for i in range(3))
    assert frames["hot"][3:] == frames["plain"][3:]
    assert decode_all(blobs["hot"], hot.descriptor) == raw
    # Still plain zstd frames to any other reader.
    subprocess.run(["zstd", "-d", "-q", "-f", str(tmp_path / "hot"), "-o", str(tmp_path / "out")], check=True)
    assert (tmp_path / "out").read_bytes() == raw


def test_independent_encoder_blob_without_content_size_parses_and_decodes():
    raw = sample_raw(1_000_003)
    blob = make_blob(raw, 77_777, magic=0x184D2A5E)  # odd chunk size, non-default magic
    assert zstandard.get_frame_parameters(blob.data).content_size == zstandard.CONTENTSIZE_UNKNOWN
    assert decode_all(blob.data, blob.descriptor) == raw


def test_frames_for_maps_byte_ranges_to_covering_frames():
    table = parse(make_blob(sample_raw(1000), 100))
    assert list(table.frames_for(0, 1)) == [0]
    assert list(table.frames_for(99, 2)) == [0, 1]
    assert list(table.frames_for(950, 500)) == [9]
    assert list(table.frames_for(1000, 10)) == []
    assert list(table.frames_for(5, 0)) == []


# --- descriptor and annotation checks ------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("digest", "sha256:abc", "not a valid"),
        ("digest", "sha256:" + "A" * 64, "not a valid"),
        ("digest", "md5:" + "0" * 32, "not a valid"),
        ("digest", "sha256:../../" + "0" * 58, "not a valid"),
        ("size", -1, "size"),
        ("size", "12", "size"),
    ],
)
def test_descriptor_with_bad_field_is_refused(field, value, message):
    blob = make_blob(sample_raw(500), 100)
    blob.descriptor[field] = value
    with pytest.raises(FormatError, match=message):
        seekable.parse_descriptor(blob.descriptor)


@pytest.mark.parametrize("value", ["-5", "0x10", " 12", "12 ", "1e3", "+7", "", "012", "1_000"])
def test_table_offset_annotation_must_be_plain_decimal(value):
    blob = make_blob(sample_raw(500), 100)
    blob.annotations[TABLE_OFFSET] = value
    with pytest.raises(FormatError, match="plain decimal"):
        seekable.parse_descriptor(blob.descriptor)


def test_chunk_digest_must_be_sha512_hex():
    blob = make_blob(sample_raw(500), 100)
    blob.annotations[CHUNK_DIGEST] = "sha256:" + "0" * 64
    with pytest.raises(FormatError, match=CHUNK_DIGEST):
        seekable.parse_descriptor(blob.descriptor)


def test_table_offset_past_the_blob_is_refused_before_reading():
    blob = make_blob(sample_raw(500), 100)
    blob.annotations[TABLE_OFFSET] = str(len(blob.data) - 10)
    with pytest.raises(FormatError, match="no room"):
        seekable.parse_descriptor(blob.descriptor)


def test_missing_chunk_digest_is_refused_unless_verification_is_off():
    raw = sample_raw(500)
    blob = make_blob(raw, 100)
    del blob.annotations[CHUNK_DIGEST]
    with pytest.raises(IntegrityError, match="cannot be verified"):
        parse(blob)
    assert decode_all(blob.data, blob.descriptor, verify=False) == raw


# --- chunk table checks ------------------------------------------------------------------


def expect_table_error(blob, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        parse(blob)


RAW = sample_raw(1000)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"table_magic": 0xDEADBEEF}, "table magic"),
        ({"version": 2}, "unsupported table version 2"),
        ({"reserved": 1}, "reserved field is 1"),
        ({"declared_chunk_size": 0}, "chunk_size is 0"),
        ({"declared_chunk_size": 1 << 30}, "exceeds the limit"),
        ({"hash_algo": 7}, "unknown hash_algo 7"),
        ({"extra_payload": b"\0" * 8}, "payload size"),
        ({"declared_size": 900}, "payload size"),
        ({"declared_size": 1 << 40}, "cannot fit"),
        ({"offsets": [0, 100, 100, 200, 300, 400, 500, 600, 700, 800]}, "not above"),
        ({"offsets": [0, 50, 40, 200, 300, 400, 500, 600, 700, 800]}, "not above"),
    ],
)
def test_malformed_table_is_refused_naming_the_check(kwargs, message):
    expect_table_error(make_blob(RAW, 100, **kwargs), FormatError, message)


def test_frame_offset_at_table_offset_is_refused():
    good = make_blob(RAW, 100)
    offsets = list(good.frame_offsets)
    offsets[-1] = good.table_offset
    expect_table_error(make_blob(RAW, 100, offsets=offsets), FormatError, "at or past the table")


def test_hash_algo_none_is_refused_when_verifying():
    expect_table_error(make_blob(RAW, 100, hash_algo=0), IntegrityError, "hash_algo 0")


def test_table_not_in_a_skippable_frame_is_refused():
    expect_table_error(make_blob(RAW, 100, magic=0x12345678), FormatError, "not a zstd skippable")


def test_table_payload_size_past_blob_end_is_refused_before_allocating():
    blob = make_blob(RAW, 100)
    data = bytearray(blob.data)
    data[blob.table_offset + 4 : blob.table_offset + 8] = (0xFFFFFFF0).to_bytes(4, "little")
    blob.data = bytes(data)
    expect_table_error(blob, FormatError, "runs past the end")


def test_tampered_table_fails_its_digest():
    blob = make_blob(RAW, 100)
    data = bytearray(blob.data)
    data[-1] ^= 0xFF
    blob.data = bytes(data)
    expect_table_error(blob, IntegrityError, "does not match chunk_digest")


# --- frame checks ------------------------------------------------------------------------


def test_tampered_frame_fails_sha512_before_decompression():
    blob = make_blob(RAW, 100)
    table = parse(blob)
    start, end = table.span(3)
    frame = bytearray(blob.data[start:end])
    frame[len(frame) // 2] ^= 1
    with pytest.raises(IntegrityError, match=r"frame 3 .*SHA-512 mismatch"):
        seekable.decode_frame(table, 3, bytes(frame))


def test_truncated_frame_is_refused():
    blob = make_blob(RAW, 100)
    table = parse(blob)
    start, end = table.span(0)
    with pytest.raises(IntegrityError, match="span is"):
        seekable.decode_frame(table, 0, blob.data[start : end - 1])


@pytest.mark.parametrize("delta", [-1, +1])
def test_frame_decompressing_to_wrong_length_is_refused(delta):
    # Checksums match (the table vouches for these frames), lengths do not.
    frames = [stream_frame(RAW[i : i + 100]) for i in range(0, 1000, 100)]
    frames[2] = stream_frame(RAW[200 : 300 + delta])
    blob = make_blob(RAW, 100, frames=frames)
    table = parse(blob)
    with pytest.raises(IntegrityError, match="frame 2"):
        seekable.decode_frame(table, 2, blob.data[slice(*table.span(2))])


def test_decompression_bomb_is_capped_not_buffered():
    # 64 MiB of zeros compresses to a few KiB; the table says 1 MiB.
    chunk = 1 << 20
    raw = bytes(chunk)
    frames = [stream_frame(bytes(64 << 20))]
    blob = make_blob(raw, chunk, frames=frames)
    table = parse(blob)
    with pytest.raises(IntegrityError, match="frame 0"):
        seekable.decode_frame(table, 0, blob.data[slice(*table.span(0))])


def test_frame_declaring_a_huge_window_is_refused():
    params = zstandard.ZstdCompressionParameters.from_level(1, window_log=30, write_checksum=True)
    obj = zstandard.ZstdCompressor(compression_params=params).compressobj()
    frame = obj.compress(RAW[:100]) + obj.flush()
    assert zstandard.get_frame_parameters(frame).window_size == 1 << 30
    frames = [frame] + [stream_frame(RAW[i : i + 100]) for i in range(100, 1000, 100)]
    blob = make_blob(RAW, 100, frames=frames)
    table = parse(blob)
    with pytest.raises(IntegrityError, match="frame 0"):
        seekable.decode_frame(table, 0, blob.data[slice(*table.span(0))])


def test_frame_with_trailing_garbage_is_refused():
    frames = [stream_frame(RAW[i : i + 100]) for i in range(0, 1000, 100)]
    frames[1] += b"\x00junk"
    blob = make_blob(RAW, 100, frames=frames)
    table = parse(blob)
    with pytest.raises(IntegrityError, match="frame 1"):
        seekable.decode_frame(table, 1, blob.data[slice(*table.span(1))])


# --- round trips ---------------------------------------------------------------------------


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(min_size=1, max_size=20_000), chunk_size=st.integers(1, 5_000))
def test_encoder_round_trips_random_images(tmp_path_factory, raw: bytes, chunk_size: int):
    d = tmp_path_factory.mktemp("rt")
    (d / "img").write_bytes(raw)
    result = encode_image(d / "img", d / "blob", chunk_size=chunk_size, workers=2)
    data = (d / "blob").read_bytes()
    assert decode_all(data, result.descriptor) == raw
    # and the independent encoder's blob of the same image decodes the same
    other = make_blob(raw, chunk_size)
    assert decode_all(other.data, other.descriptor) == raw


def test_encoder_holds_memory_bounded_for_a_large_image(tmp_path: Path):
    # A sparse 1 GiB image: peak RSS growth must stay far below the image size.
    import resource

    image = tmp_path / "big.img"
    with open(image, "wb") as f:
        f.truncate(1 << 30)
        f.seek(512 << 20)
        f.write(os.urandom(1 << 20))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = encode_image(image, tmp_path / "big.blob", chunk_size=4 << 20)
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert result.uncompressed_size == 1 << 30
    assert grown_kib < 200 * 1024, f"encoder grew RSS by {grown_kib} KiB for a 1 GiB image"


def test_insecure_mode_accepts_hash_algo_none_but_still_checks_the_table_digest():
    blob = make_blob(RAW, 100, hash_algo=0)
    assert decode_all(blob.data, blob.descriptor, verify=False) == RAW
    data = bytearray(blob.data)
    data[-1] ^= 0xFF
    with pytest.raises(IntegrityError, match="does not match chunk_digest"):
        decode_all(bytes(data), blob.descriptor, verify=False)


def test_encoder_reports_progress_up_to_the_whole_image(tmp_path: Path):
    (tmp_path / "img").write_bytes(sample_raw(50_000))
    seen: list[tuple[int, int]] = []
    encode_image(tmp_path / "img", tmp_path / "blob", chunk_size=7_000, progress=lambda d, t: seen.append((d, t)))
    assert len(seen) == 8
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert seen[-1] == (50_000, 50_000)
