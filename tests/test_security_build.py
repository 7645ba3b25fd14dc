"""``lazyerofs build``: clear one-line errors, and no write through a planted symlink.

Run in-process through ``lazyfs.cli.main`` so the temporary name the old
encoder used (``BLOB.tmp.<pid>``) is predictable here, as it was to any
local user who could write the output directory.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from lazyfs import cli
from lazyfs.format import seekable
from lazyfs.produce.mkfs import make_erofs

VICTIM_TEXT = "precious data, not to be overwritten\n"


@pytest.fixture
def image(tmp_path: Path) -> Path:
    if shutil.which("mkfs.erofs") is None:
        pytest.skip("needs mkfs.erofs (erofs-utils)")
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "file").write_bytes(os.urandom(300_000))
    img = tmp_path / "layer.erofs"
    make_erofs(tree, img)
    return img


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    path = tmp_path / "victim"
    path.write_text(VICTIM_TEXT)
    return path


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lazyerofs: error: "), err
    return lines[0]


@pytest.mark.parametrize("size", ["0", "1GiB"])
def test_build_with_an_unusable_chunk_size_says_so_in_one_line(
    image: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], size: str
):
    out = tmp_path / "x.blob"
    assert cli.main(["build", str(image), "-o", str(out), "--chunk-size", size]) == 1
    assert "--chunk-size must be between" in one_line_error(capsys)
    assert not out.exists()


def test_build_with_a_bad_zstd_level_says_so_in_one_line(
    image: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    assert cli.main(["build", str(image), "-o", str(tmp_path / "x.blob"), "--level", "99"]) == 1
    assert "--level must be between" in one_line_error(capsys)


@pytest.mark.parametrize("src_kind", ["image", "directory"])
def test_build_into_a_missing_directory_says_so_in_one_line(
    image: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], src_kind: str
):
    src = image if src_kind == "image" else tmp_path / "tree"
    out = tmp_path / "missing" / "dir" / "x.blob"
    assert cli.main(["build", str(src), "-o", str(out)]) == 1
    assert "output directory" in one_line_error(capsys)


def test_build_does_not_write_through_a_symlink_at_the_temporary_name(
    image: Path, tmp_path: Path, victim: Path
):
    out = tmp_path / "layer.blob"
    planted = Path(f"{out}.tmp.{os.getpid()}")  # the old, predictable name
    planted.symlink_to(victim)
    assert cli.main(["build", str(image), "-o", str(out), "--chunk-size", "64KiB"]) == 0
    assert victim.read_text() == VICTIM_TEXT
    assert not out.is_symlink()
    assert seekable.parse_descriptor(json.loads(Path(f"{out}.json").read_text())).size == (
        out.stat().st_size
    )
    leftovers = [p.name for p in tmp_path.iterdir() if ".tmp." in p.name and p != planted]
    assert leftovers == []


def test_build_replaces_a_symlink_at_the_descriptor_name_instead_of_following_it(
    image: Path, tmp_path: Path, victim: Path
):
    out = tmp_path / "layer.blob"
    desc = Path(f"{out}.json")
    desc.symlink_to(victim)
    assert cli.main(["build", str(image), "-o", str(out), "--chunk-size", "64KiB"]) == 0
    assert victim.read_text() == VICTIM_TEXT
    assert not desc.is_symlink()
    assert json.loads(desc.read_text())["size"] == out.stat().st_size
    assert desc.stat().st_mode & 0o777 == 0o644 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
