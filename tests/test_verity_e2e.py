"""dm-verity layers through a real registry and the FUSE mount.

``veritysetup verify`` (cryptsetup's userspace check; this kernel has no
dm-verity target) reads ``layers/<i>/layer.erofs`` straight through FUSE.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from support.mount import Mounter, lazyerofs, make_tree

from lazyfs.format import seekable
from lazyfs.format.encode import encode_image, skippable_frame
from lazyfs.produce.mkfs import make_erofs

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("veritysetup") is None, reason="needs veritysetup (cryptsetup-bin)"),
]


def veritysetup_verify(path: Path, sidecar: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["veritysetup", "verify", f"--hash-offset={sidecar['hashoffset']}", str(path), str(path), sidecar["roothash"]],
        capture_output=True,
        text=True,
        timeout=120,
    )


def raw_image(tmp: Path, seed: int) -> Path:
    tree = tmp / f"tree{seed}"
    make_tree(tree, seed, big=1 << 20)
    image = tmp / f"layer{seed}.erofs"
    make_erofs(tree, image)
    return image


def blob_with_veritysetup_tree(tmp: Path, image: Path) -> Path:
    """A seekable blob whose verity payload was made by ``veritysetup format``
    (no salt, sha512, 4 KiB blocks, as containerd's converter does)."""
    blob = tmp / "vs.blob"
    result = encode_image(image, blob, chunk_size=64 << 10)
    hashfile = tmp / "vs.hash"
    proc = subprocess.run(
        ["veritysetup", "format", "--hash", "sha512", "--data-block-size", "4096", "--hash-block-size", "4096",
         "--salt", "-", str(image), str(hashfile)],
        capture_output=True, text=True, check=True,
    )
    root = re.search(r"Root hash:\s+([0-9a-f]+)", proc.stdout)
    assert root is not None, proc.stdout
    payload = hashfile.read_bytes()
    data = blob.read_bytes()
    verity_offset = len(data)
    data += skippable_frame(payload, magic=0x184D2A5B)
    blob.write_bytes(data)
    desc = dict(result.descriptor)
    desc["annotations"] = dict(desc["annotations"])
    desc["annotations"][seekable.ANNOTATION_VERITY_OFFSET] = str(verity_offset)
    desc["annotations"][seekable.ANNOTATION_VERITY_ROOT] = f"sha512:{root.group(1)}"
    desc["digest"] = "sha256:" + hashlib.sha256(data).hexdigest()
    desc["size"] = len(data)
    Path(str(blob) + ".json").write_text(json.dumps(desc))
    return blob


@pytest.fixture(scope="module")
def verity_image(module_registry, tmp_path_factory) -> tuple[str, list[Path], list[dict]]:
    tmp = tmp_path_factory.mktemp("verity")
    built_here = raw_image(tmp, 1)
    by_veritysetup = raw_image(tmp, 2)
    ours = tmp / "ours.blob"
    lazyerofs("build", str(built_here), "-o", str(ours), "--chunk-size", "64KiB", "--dm-verity")
    theirs = blob_with_veritysetup_tree(tmp, by_veritysetup)
    ref = f"{module_registry.host}/test/verity:v1"
    lazyerofs("push", str(ours), str(theirs), ref)
    descs = [json.loads(Path(str(b) + ".json").read_text()) for b in (ours, theirs)]
    return ref, [built_here, by_veritysetup], descs


@pytest.mark.parametrize("index", [0, 1], ids=["tree-built-here", "tree-from-veritysetup-format"])
def test_layer_file_through_fuse_passes_veritysetup_verify(mounter: Mounter, verity_image, index: int):
    ref, images, descs = verity_image
    m = mounter(ref)
    layer = m.layer(index)
    sidecar = json.loads((layer.parent / "layer.erofs.dmverity").read_text())
    # containerd's DmverityMetadata: plain hex root hash, hash offset = padded image size
    assert set(sidecar) == {"roothash", "hashoffset"}
    assert re.fullmatch(r"[0-9a-f]{128}", sidecar["roothash"])
    assert descs[index]["annotations"][seekable.ANNOTATION_VERITY_ROOT] == "sha512:" + sidecar["roothash"]
    raw = images[index].read_bytes()
    assert sidecar["hashoffset"] == -(-len(raw) // 4096) * 4096
    proc = veritysetup_verify(layer, sidecar)
    assert proc.returncode == 0, proc.stderr
    served = layer.read_bytes()
    assert served[: len(raw)] == raw
    assert served[len(raw) : sidecar["hashoffset"]] == bytes(sidecar["hashoffset"] - len(raw))


def test_tampered_hash_block_gives_eio_and_fails_veritysetup(mounter: Mounter, registry, tmp_path: Path):
    image = raw_image(tmp_path, 3)
    blob = tmp_path / "t.blob"
    lazyerofs("build", str(image), "-o", str(blob), "--dm-verity")
    desc = json.loads(Path(str(blob) + ".json").read_text())
    ref = f"{registry.host}/test/verity-tamper:v1"
    lazyerofs("push", str(blob), ref)
    stored = registry.blob_path(desc["digest"])
    data = bytearray(stored.read_bytes())
    verity_offset = int(desc["annotations"][seekable.ANNOTATION_VERITY_OFFSET])
    data[verity_offset + 8 + 4096 + 7] ^= 0xFF  # first tree block after the superblock
    stored.write_bytes(bytes(data))

    m = mounter(ref)
    sidecar = json.loads((m.layer(0).parent / "layer.erofs.dmverity").read_text())
    with open(m.layer(0), "rb") as f:
        f.seek(sidecar["hashoffset"] + 4096)
        with pytest.raises(OSError) as err:
            f.read(4096)
        assert err.value.errno == 5
        f.seek(0)
        assert f.read(4096) == image.read_bytes()[:4096]
    assert veritysetup_verify(m.layer(0), sidecar).returncode != 0
    # and the offline check names it too
    proc = lazyerofs("verify", ref, check=False)
    assert proc.returncode == 1
    assert "dm-verity" in proc.stderr


def test_verify_command_passes_a_good_registry_image(verity_image):
    ref, _, _ = verity_image
    proc = lazyerofs("verify", ref)
    assert proc.stdout.count("OK") == 2
    assert proc.stdout.count("dm-verity tree checked") == 2
