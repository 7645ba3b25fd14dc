"""``--chunk-size auto`` (lazyfs/produce/chunksize.py): the frame size measured
from the image and the reads of a start, for a stated link, and said why.

The model tests use a small synthetic image and stated touched ranges (no
mkfs needed); the CLI tests build real trees, kept small."""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
from pathlib import Path

import pytest
from support.mount import lazyerofs

from lazyfs.errors import FormatError
from lazyfs.format import encode_image, seekable
from lazyfs.produce.chunksize import (
    AUTO,
    Link,
    choose_chunk_size,
    default_touched,
    parse_chunk_size,
    parse_link,
)
from lazyfs.produce.mkfs import make_erofs
from lazyfs.units import format_size

KiB, MiB = 1 << 10, 1 << 20
CHEAP_SLOW = Link(rtt_ms=1, mbit=10)  # requests cost little, bytes cost much
DEFAULT = Link(rtt_ms=20, mbit=100)
FAR = Link(rtt_ms=200, mbit=100)  # every request costs a fifth of a second


def need(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"needs {tool} (run scripts/setup.sh)")


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 MiB that compresses about 2:1 (each 4 KiB: 2 KiB random, 2 KiB zeros)."""
    rng = random.Random(7)
    path = tmp_path_factory.mktemp("chunksize") / "image.raw"
    path.write_bytes(b"".join(rng.randbytes(2 * KiB) + bytes(2 * KiB) for _ in range(2048)))
    return path


SPARSE = [(k * 512 * KiB, k * 512 * KiB + 4 * KiB) for k in range(16)]  # 16 reads of 4 KiB, far apart
DENSE = [(0, 6 * MiB)]  # three quarters of the image, contiguous


def test_sparse_reads_on_a_link_with_cheap_requests_and_little_bandwidth_pick_small_frames(image: Path):
    choice = choose_chunk_size(image, touched=SPARSE, link=CHEAP_SLOW)
    assert choice.chunk_size == 64 * KiB
    small = choice.chosen
    assert small.touched_frames == 16
    # every larger candidate fetched more bytes for the same 16 reads
    assert all(c.fetched_bytes > small.fetched_bytes for c in choice.candidates if c.chunk_size > small.chunk_size)


def test_dense_reads_pick_large_frames(image: Path):
    choice = choose_chunk_size(image, touched=DENSE, link=DEFAULT)
    assert choice.chunk_size >= 1 * MiB
    assert choice.chosen.touched_frames <= 6


def test_a_high_rtt_link_picks_larger_frames_for_the_same_sparse_reads(image: Path):
    cheap = choose_chunk_size(image, touched=SPARSE, link=CHEAP_SLOW)
    far = choose_chunk_size(image, touched=SPARSE, link=FAR)
    assert far.chunk_size >= 1 * MiB > cheap.chunk_size
    # fewer requests is what it bought
    assert far.chosen.touched_frames < cheap.chosen.touched_frames


def test_measured_sizes_are_the_encoders_frames_and_table(image: Path, tmp_path: Path):
    """With every byte touched, a candidate's fetched bytes are the blob's
    frames and its table the blob's chunk-table frame, byte for byte."""
    size = image.stat().st_size
    choice = choose_chunk_size(image, touched=[(0, size)], candidates=(64 * KiB, 1 * MiB))
    for cand in choice.candidates:
        result = encode_image(image, tmp_path / f"{cand.chunk_size}.blob", chunk_size=cand.chunk_size, fsync=False)
        table_offset = int(result.descriptor["annotations"][seekable.ANNOTATION_TABLE_OFFSET])
        assert cand.fetched_bytes == table_offset
        assert cand.table_bytes == result.descriptor["size"] - table_offset
        assert cand.frames == cand.touched_frames == result.frame_count


def test_a_tie_goes_to_the_larger_frame(tmp_path: Path):
    tiny = tmp_path / "tiny.raw"
    tiny.write_bytes(random.Random(1).randbytes(10 * KiB))  # one frame whatever the size
    choice = choose_chunk_size(tiny, touched=[(0, 4 * KiB)])
    assert len({c.seconds for c in choice.candidates}) == 1
    assert choice.chunk_size == 4 * MiB


def test_candidates_whose_chunk_table_is_over_the_budget_are_not_chosen(image: Path):
    budget = 8 + 23 + 8 * 72  # the table of 8 frames: 1 MiB frames of this 8 MiB image
    choice = choose_chunk_size(image, touched=SPARSE, link=CHEAP_SLOW, table_budget=budget)
    assert choice.chunk_size >= 1 * MiB  # where 64 KiB wins without the bound
    assert [c.eligible for c in choice.candidates] == [c.chunk_size >= 1 * MiB for c in choice.candidates]
    with pytest.raises(FormatError, match="too large for --chunk-size auto"):
        choose_chunk_size(image, touched=SPARSE, table_budget=100)


def test_the_why_line_names_the_size_the_estimate_and_the_link(image: Path):
    why = choose_chunk_size(image, touched=SPARSE, basis="profile p.json, 64.0 KiB in 16 ranges", link=CHEAP_SLOW).why()
    assert why.startswith("chunk size auto: 64.0 KiB: est. ")
    assert "16 frames" in why and "chunk table" in why
    assert "1 ms/10 Mbit/s, 4 requests in flight" in why
    assert re.search(r"128\.0 KiB \d+\.\d\d s", why)  # the next candidate's estimate
    assert why.endswith("reads: profile p.json, 64.0 KiB in 16 ranges")


def test_without_a_profile_the_default_reads_are_stated(tmp_path: Path):
    need("mkfs.erofs")
    tree = tmp_path / "tree"
    (tree / "a" / "b").mkdir(parents=True)
    (tree / "a" / "b" / "big").write_bytes(random.Random(2).randbytes(2 * MiB))
    (tree / "small").write_text("x\n")
    img = tmp_path / "img.erofs"
    make_erofs(tree, img, source_date_epoch=0)
    ranges, basis = default_touched(img)
    assert ranges[0][0] == 0  # the superblock's block
    assert "no profile" in basis and "directories" in basis and "10% of the other" in basis
    touched = sum(e - s for s, e in ranges)
    assert 0.1 * img.stat().st_size <= touched < 0.2 * img.stat().st_size
    choice = choose_chunk_size(img)
    assert choice.basis == basis and choice.touched_bytes == touched


def test_link_and_chunk_size_arguments_parse_or_are_refused_by_name():
    assert parse_link("20/100") == Link(20.0, 100.0)
    assert parse_link("0.5/1000") == Link(0.5, 1000.0)
    for bad in ("20", "20/0", "-1/100", "a/b", "20/100/4", "nan/100"):
        with pytest.raises(argparse.ArgumentTypeError, match=re.escape(repr(bad))):
            parse_link(bad)
    assert parse_chunk_size("auto") == AUTO == parse_chunk_size("AUTO")
    assert parse_chunk_size("256KiB") == 256 * KiB


# ------------------------------------------------------------------ the CLI


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    rng = random.Random(3)
    src = tmp_path / "tree"
    (src / "bin").mkdir(parents=True)
    (src / "lib").mkdir()
    (src / "bin" / "prog").write_bytes(rng.randbytes(700_000))
    (src / "lib" / "libhot.so").write_bytes(rng.randbytes(300_000) * 2)
    (src / "README").write_text("read me\n" * 10_000)
    return src


def chosen(stderr: str) -> str:
    match = re.search(r"^chunk size auto: (\d+\.\d (?:KiB|MiB)): est\. \d+\.\d\d s", stderr, re.M)
    assert match, stderr
    return match.group(1)


def test_auto_build_makes_a_blob_that_inspects_with_the_size_it_names(tmp_path: Path, tree: Path):
    need("mkfs.erofs")
    blob = tmp_path / "layer.blob"
    proc = lazyerofs("build", str(tree), "-o", str(blob), "--chunk-size", "auto", "--link", "5/50", "-v",
                     "--source-date-epoch", "0")  # fmt: skip
    size = chosen(proc.stderr)
    assert "5 ms/50 Mbit/s" in proc.stderr and "reads: no profile" in proc.stderr
    assert re.search(rf"^\* +{re.escape(size)} ", proc.stderr, re.M)  # the table, chosen row starred
    assert f"frames of {size}" in proc.stdout
    report = json.loads(lazyerofs("inspect", str(blob), "--json").stdout)
    assert report["errors"] == []
    assert f"chunk size   {size}" in lazyerofs("inspect", str(blob)).stdout


def test_auto_build_is_reproducible(tmp_path: Path, tree: Path):
    need("mkfs.erofs")
    blobs, lines = [], []
    for i in range(2):
        blob = tmp_path / f"{i}.blob"
        proc = lazyerofs("build", str(tree), "-o", str(blob), "--chunk-size", "auto", "--source-date-epoch", "0")
        blobs.append(blob.read_bytes() + (tmp_path / f"{i}.blob.json").read_bytes())
        lines.append([line for line in proc.stderr.splitlines() if line.startswith("chunk size auto")])
    assert blobs[0] == blobs[1]
    assert lines[0] == lines[1] and len(lines[0]) == 1


def test_auto_build_with_a_profile_measures_the_profiles_reads(tmp_path: Path, tree: Path):
    need("mkfs.erofs")
    paths = tmp_path / "hot.txt"
    paths.write_text("/lib/libhot.so\n")
    blob = tmp_path / "opt.blob"
    proc = lazyerofs("build", str(tree), "-o", str(blob), "--chunk-size", "auto", "--profile", str(paths),
                     "--source-date-epoch", "0")  # fmt: skip
    size = chosen(proc.stderr)
    assert "reads: profile hot.txt, " in proc.stderr and "in 1 ranges" in proc.stderr
    assert "layout: " in proc.stderr
    assert json.loads(lazyerofs("inspect", str(blob), "--json").stdout)["errors"] == []
    assert f"frames of {size}" in proc.stdout


def test_a_bad_link_is_a_usage_error_naming_it(tmp_path: Path, tree: Path):
    proc = lazyerofs("build", str(tree), "-o", str(tmp_path / "x.blob"), "--chunk-size", "auto",
                     "--link", "fast", check=False)  # fmt: skip
    assert proc.returncode == 2
    assert "'fast' is not RTT_MS/MBIT" in proc.stderr


# ------------------------------------------------- push, convert, optimize


def test_push_with_auto_says_why_for_each_layer_and_the_image_inspects(registry, tmp_path: Path, tree: Path):
    need("mkfs.erofs")
    image = tmp_path / "layer1.erofs"
    make_erofs(tree, image, source_date_epoch=0)
    ref = f"{registry.host}/test/auto:v1"
    proc = lazyerofs("push", "--chunk-size", "auto", "--link", "50/20", str(tree), str(image), ref)
    lines = [line for line in proc.stderr.splitlines() if "chunk size auto: " in line]
    assert [line.split(": chunk size auto")[0] for line in lines] == [str(tree), str(image)]
    assert all("50 ms/20 Mbit/s" in line for line in lines)
    report = json.loads(lazyerofs("inspect", "--json", ref).stdout)
    assert report["errors"] == []
    named = [re.search(r"chunk size auto: (.+?): est\.", line).group(1) for line in lines]
    assert [format_size(layer["chunk_size"]) for layer in report["layers"]] == named


def test_convert_with_auto_reports_each_layers_choice_in_its_json(module_registry, tmp_path: Path):
    from test_convert import entry, make_tar
    from test_convert_e2e import GZ, push_source

    if os.geteuid() != 0:
        pytest.skip("convert needs root")
    need("mkfs.erofs")
    rng = random.Random(5)
    tar = make_tar([entry("usr/lib/big", data=rng.randbytes(600_000)), entry("etc/conf", data=b"c" * 5000)])
    push_source(module_registry, "auto", [(tar, GZ)])
    proc = lazyerofs("convert", "--json", "--chunk-size", "auto", "--workdir", str(tmp_path),
                     f"{module_registry.host}/src/auto:v1", f"{module_registry.host}/out/auto:v1")  # fmt: skip
    layer = json.loads(proc.stdout)["platforms"][0]["layers"][0]
    choice = layer["chunk_choice"]
    assert choice["why"] in proc.stderr and "reads: no profile" in choice["why"]
    assert choice["link"] == {"rtt_ms": 20.0, "mbit": 100.0, "parallelism": 4}
    assert [c["chunk_size"] for c in choice["candidates"]] == [64 * KiB << i for i in range(7)]
    report = json.loads(lazyerofs("inspect", "--json", f"{module_registry.host}/out/auto:v1").stdout)
    assert report["errors"] == [] and report["layers"][0]["chunk_size"] == choice["chunk_size"]


def test_optimize_with_auto_measures_each_new_layer_on_the_profiles_reads(registry, tmp_path: Path, tree: Path):
    need("mkfs.erofs")
    ref = f"{registry.host}/test/auto-opt:v1"
    lazyerofs("push", "--chunk-size", "64KiB", str(tree), ref)
    paths = tmp_path / "hot.txt"
    paths.write_text("/lib/libhot.so\n")
    dst = f"{registry.host}/test/auto-opt:opt"
    proc = lazyerofs("optimize", "--json", "--no-push-profile", "--profile", str(paths), "--chunk-size", "auto",
                     "-v", ref, dst)  # fmt: skip
    layer = json.loads(proc.stdout)["layers"][0]
    choice = layer["chunk_choice"]
    assert "reads: profile hot.txt" in choice["why"] and choice["why"] in proc.stderr
    assert re.search(r"^\* ", proc.stderr, re.M)  # -v: the table
    report = json.loads(lazyerofs("inspect", "--json", dst).stdout)
    assert report["errors"] == [] and report["layers"][0]["chunk_size"] == choice["chunk_size"]
