"""``lazyerofs optimize`` end to end: an image in a real registry, a profile
recorded on a real mount, the optimized image pushed, mounted cold with
--rootfs (its translated profile replayed) and compared with the original,
path by path and attribute by attribute."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from support.mount import Mounted, Mounter, lazyerofs
from support.mount import make_tree as small_tree
from test_layout import EPOCH, make_tree, need, snapshot

from lazyfs.fetch.profile import parse_profile
from lazyfs.produce.layout import ErofsImage
from lazyfs.produce.mkfs import make_erofs

pytestmark = pytest.mark.e2e


def manifest(host: str, repo: str, tag: str) -> dict:
    out = subprocess.run(
        ["curl", "-sf", "-H", "Accept: application/vnd.oci.image.manifest.v1+json", f"http://{host}/v2/{repo}/manifests/{tag}"],
        capture_output=True, check=True,
    ).stdout  # fmt: skip
    return json.loads(out)


def wait_replay(m: Mounted, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        stats = m.stats()
        profile = stats.get("profile", {})
        if profile.get("done") or "error" in profile or time.monotonic() > deadline:
            return stats
        time.sleep(0.1)


def test_optimized_image_serves_the_same_rootfs_and_puts_the_hot_files_first(mounter: Mounter, registry, tmp_path: Path):
    need("mkfs.erofs")
    images = []
    for i, fill in enumerate((make_tree, lambda root: small_tree(root, 7))):
        tree = tmp_path / f"tree{i}"
        fill(tree)
        image = tmp_path / f"layer{i}.erofs"
        make_erofs(tree, image, source_date_epoch=EPOCH)
        images.append(str(image))
    ref = f"{registry.host}/test/layout:v1"
    lazyerofs("push", "--chunk-size", "4KiB", *images, ref)

    # Record: a start that reads one library and the head of a tool.
    m1 = mounter(ref, "--no-profile", "--readahead", "4KiB", rootfs=True)
    assert m1.rootfs is not None
    (m1.rootfs / "usr/lib/libhot.so").read_bytes()
    with open(m1.rootfs / "usr/bin/tool7", "rb") as f:
        f.read(100)
    saved = tmp_path / "start.profile.json"
    lazyerofs("profile", "save", str(m1.dir), "-o", str(saved))
    before = snapshot(m1.rootfs)  # after the save: it reads every file

    dst = f"{registry.host}/test/layout:opt"
    out_profile = tmp_path / "opt.profile.json"
    proc = lazyerofs("optimize", "--plain-http", "--profile", str(saved), "--profile-out", str(out_profile),
                     "--chunk-size", "16KiB", ref, dst)  # fmt: skip
    assert "pushed the translated profile" in proc.stderr
    old_layers = manifest(registry.host, "test/layout", "v1")["layers"]
    new_layers = manifest(registry.host, "test/layout", "opt")["layers"]
    assert len(new_layers) == 2 and all(a["digest"] != b["digest"] for a, b in zip(old_layers, new_layers, strict=True))
    translated = parse_profile(out_profile.read_bytes())
    assert [layer.digest for layer in translated.layers] == [d["digest"] for d in new_layers]

    # Cold mount of the optimized image: its profile replayed, the same tree served.
    m2 = mounter(dst, rootfs=True, cache_dir=tmp_path / "cold-cache")
    assert m2.rootfs is not None
    stats = wait_replay(m2)
    assert stats["profile"]["source"] and stats["profile"]["failed"] == 0
    after = snapshot(m2.rootfs)
    assert after == before

    # The hot library's data now follows the metadata in layer 0's image.
    img = ErofsImage((m2.dir / "layers/0/layer.erofs").read_bytes())
    by_path = {i.path: i for i in img.inodes.values()}
    data_start = min(i.blkaddr for i in img.inodes.values() if i.nblocks and not i.is_dir)
    assert by_path["/usr/lib/libhot.so"].blkaddr == data_start
    # Its inode and its directories' come before it (inodes the start never read may follow the hot data).
    assert all(by_path[p].offset < data_start * img.block for p in ("/", "/usr", "/usr/lib", "/usr/lib/libhot.so"))


def test_optimize_with_a_profile_of_another_image_fails_clearly(registry, tmp_path: Path):
    need("mkfs.erofs")
    tree = tmp_path / "tree"
    small_tree(tree, 3)
    image = tmp_path / "layer.erofs"
    make_erofs(tree, image, source_date_epoch=EPOCH)
    ref = f"{registry.host}/test/layout-other:v1"
    lazyerofs("push", "--chunk-size", "4KiB", str(image), ref)
    prof = tmp_path / "p.json"
    prof.write_text(json.dumps({"schema": "lazyerofs.profile", "version": 1, "layers": [
        {"digest": "sha256:" + "b" * 64, "chunk_size": 4096, "frames": [[0, 0]]}]}))  # fmt: skip
    proc = lazyerofs("optimize", "--profile", str(prof), ref, f"{registry.host}/test/layout-other:opt", check=False)
    assert proc.returncode == 1 and "names none of the layers" in proc.stderr
