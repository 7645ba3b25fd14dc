"""``lazyerofs push`` and ``lazyerofs inspect REF`` against a real registry."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import trio
from support.localregistry import LocalRegistry
from support.mount import LAZYEROFS, lazyerofs

from lazyfs.format import seekable
from lazyfs.oci import RegistryClient, parse_reference
from lazyfs.produce.mkfs import make_erofs

pytestmark = pytest.mark.skipif(
    shutil.which("mkfs.erofs") is None, reason="needs mkfs.erofs (erofs-utils)"
)


def make_tree(root: Path, seed: int) -> Path:
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "tool").write_bytes(os.urandom(300_000 + seed))
    (root / "etc").mkdir()
    (root / "etc" / "motd").write_text(f"layer {seed}\n" * 1000)
    return root


def resolve(ref: str):
    async def go():
        async with RegistryClient() as client:
            return await client.resolve(parse_reference(ref))

    return trio.run(go)


def test_push_of_a_directory_an_image_and_a_blob_makes_a_manifest_that_inspects(
    registry: LocalRegistry, tmp_path: Path
):
    tree = make_tree(tmp_path / "tree0", 0)
    image = tmp_path / "layer1.erofs"
    make_erofs(make_tree(tmp_path / "tree1", 1), image)
    blob = tmp_path / "layer2.blob"
    lazyerofs(
        "build", str(make_tree(tmp_path / "tree2", 2)), "-o", str(blob), "--chunk-size", "32KiB"
    )
    ref = f"{registry.host}/test/pushed:v1"

    proc = lazyerofs("push", "--chunk-size", "64KiB", str(tree), str(image), str(blob), ref)
    digest = proc.stdout.strip()
    assert digest.startswith("sha256:") and len(digest) == 71

    resolved = resolve(ref)
    assert resolved.digest == digest
    assert [d["mediaType"] for d in resolved.layers] == [seekable.MEDIA_TYPE_SEEKABLE] * 3
    assert resolved.layers[2] == json.loads((tmp_path / "layer2.blob.json").read_text())
    for desc in resolved.layers:
        seekable.parse_descriptor(desc)  # annotations survived the trip
    diff_ids = resolved.config["rootfs"]["diff_ids"]
    assert diff_ids[1] == "sha256:" + hashlib.sha256(image.read_bytes()).hexdigest()
    raw2 = subprocess.run(["zstd", "-d", "-c", str(blob)], capture_output=True, check=True).stdout
    assert diff_ids[2] == "sha256:" + hashlib.sha256(raw2).hexdigest()

    text = lazyerofs("inspect", ref).stdout
    assert digest in text
    assert "frames of 64.0 KiB" in text and "frames of 32.0 KiB" in text
    report = json.loads(lazyerofs("inspect", "--json", ref).stdout)
    assert report["errors"] == []
    assert [layer["chunk_size"] for layer in report["layers"]] == [65536, 65536, 32768]
    # Only manifest, config and tables: far less than the blobs themselves.
    assert 0 < report["fetched"]["bytes"] < sum(d["size"] for d in resolved.layers) // 10


def test_pushing_the_same_layers_again_uploads_nothing_new(registry: LocalRegistry, tmp_path: Path):
    image = tmp_path / "layer.erofs"
    make_erofs(make_tree(tmp_path / "tree", 0), image)
    ref = f"{registry.host}/test/again:v1"
    first = lazyerofs("push", str(image), ref)
    second = lazyerofs("push", str(image), f"{registry.host}/test/again:v2")
    assert "pushed" in first.stderr and "exists" in second.stderr
    assert first.stdout == second.stdout  # same manifest, same digest


def test_push_with_dm_verity_carries_the_annotations(registry: LocalRegistry, tmp_path: Path):
    ref = f"{registry.host}/test/verity:v1"
    lazyerofs("push", "--dm-verity", str(make_tree(tmp_path / "tree", 0)), ref)
    layer = resolve(ref).layers[0]
    parsed = seekable.parse_descriptor(layer)
    assert parsed.verity_offset is not None and parsed.verity_root is not None
    assert "dm-verity at" in lazyerofs("inspect", ref).stdout


def test_push_refuses_a_blob_whose_descriptor_does_not_match(
    registry: LocalRegistry, tmp_path: Path
):
    blob = tmp_path / "layer.blob"
    lazyerofs("build", str(make_tree(tmp_path / "tree", 0)), "-o", str(blob))
    desc = json.loads((tmp_path / "layer.blob.json").read_text())
    desc["digest"] = "sha256:" + "0" * 64
    (tmp_path / "layer.blob.json").write_text(json.dumps(desc))
    proc = lazyerofs("push", str(blob), f"{registry.host}/test/bad:v1", check=False)
    assert proc.returncode == 1
    assert "descriptor digest" in proc.stderr


def test_push_refuses_a_file_that_is_neither_image_nor_blob(
    registry: LocalRegistry, tmp_path: Path
):
    junk = tmp_path / "junk"
    junk.write_bytes(b"\0" * 5000)
    proc = lazyerofs("push", str(junk), f"{registry.host}/test/bad:v1", check=False)
    assert proc.returncode == 1 and "no junk.json descriptor" in proc.stderr


def test_inspect_of_a_missing_image_fails_with_a_clear_message(registry: LocalRegistry):
    proc = lazyerofs("inspect", f"{registry.host}/test/missing:v1", check=False)
    assert proc.returncode == 1
    assert "not found" in proc.stderr


def test_push_with_basic_auth_reads_the_password_from_stdin(auth_registry, tmp_path: Path):
    image = tmp_path / "layer.erofs"
    make_erofs(make_tree(tmp_path / "tree", 0), image)
    ref = f"{auth_registry.host}/test/auth:v1"
    env = {**os.environ, "DOCKER_CONFIG": str(tmp_path / "no-docker-config")}
    args = ["push", "--username", auth_registry.username, "--password-stdin", str(image), ref]
    proc = subprocess.run(
        [LAZYEROFS, *args],
        input=auth_registry.password + "\n",
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    denied = lazyerofs("inspect", ref, check=False, env=env)
    assert denied.returncode == 1 and "requires credentials" in denied.stderr
    assert auth_registry.password not in denied.stderr
