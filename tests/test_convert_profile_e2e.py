"""``lazyerofs convert --profile``: a start recorded on one conversion lays out
the next conversion of the same image (conversion is reproducible, so the
profile names its layers); the tree served is unchanged, the translated
profile is pushed next to the result, and a profile of something else changes
nothing but says so."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
from support.mount import Mounter, lazyerofs
from test_convert import entry, make_tar
from test_convert_e2e import GZ, mounted_tree, push_source

from lazyfs.fetch.profile import Profile, ProfileLayer, dump_profile

pytestmark = pytest.mark.e2e

rnd = random.Random(3)
BIG = rnd.randbytes(3 << 20)  # incompressible, several frames


def source(registry) -> str:
    base = make_tar([entry("usr/lib/big.so", data=BIG), entry("etc/cold", data=rnd.randbytes(2 << 20)),
                     entry("etc/hello", data=b"hello\n")])  # fmt: skip
    top = make_tar([entry("app/run", data=b"#!/bin/sh\necho hi\n", mode=0o755)])
    push_source(registry, "prof", [(base, GZ), (top, GZ)])
    return f"{registry.host}/src/prof:v1"


def record(mounter: Mounter, ref: str, tmp_path: Path) -> Path:
    """Mount ``ref``, read a little of it, save the profile."""
    m = mounter(ref, "--no-prefetch", "--no-profile", "--readahead", "4KiB", rootfs=True)
    assert m.rootfs is not None
    with open(m.rootfs / "usr/lib/big.so", "rb") as f:
        f.seek(1 << 20)
        assert f.read(8192) == BIG[1 << 20 : (1 << 20) + 8192]
    assert (m.rootfs / "etc/hello").read_bytes() == b"hello\n"
    saved = tmp_path / "start.profile.json"
    lazyerofs("profile", "save", str(m.dir), "-o", str(saved))
    lazyerofs("umount", str(m.dir))
    return saved


def test_convert_with_a_profile_lays_the_layers_out_and_serves_the_same_tree(
    module_registry, mounter: Mounter, tmp_path: Path
):
    src = source(module_registry)
    plain = f"{module_registry.host}/out/prof:plain"
    first = json.loads(lazyerofs("convert", "--chunk-size", "64KiB", "--json", src, plain).stdout)
    profile = record(mounter, plain, tmp_path)

    opt = f"{module_registry.host}/out/prof:opt"
    proc = lazyerofs("convert", "--chunk-size", "64KiB", "--json", "--profile", str(profile), src, opt)
    summary = json.loads(proc.stdout)
    layers = summary["optimized"]["layers"]
    # The recorded start read the base layer: that one is laid out again.
    assert layers[0]["relocated"] and layers[0]["source_digest"] == first["platforms"][0]["layers"][0]["digest"]
    assert layers[0]["digest"] != layers[0]["source_digest"]
    assert summary["optimized"]["profile_digest"]  # the translated profile went next to it
    assert summary["optimized"]["digest"] != first["platforms"][0]["digest"]

    a = mounter(plain, "--no-profile", rootfs=True)
    b = mounter(opt, "--no-profile", rootfs=True)
    assert a.rootfs is not None and b.rootfs is not None
    tree = mounted_tree(a.rootfs)
    assert tree == mounted_tree(b.rootfs) and b"usr/lib/big.so" in tree


def test_a_profile_naming_none_of_the_layers_changes_nothing_and_warns(module_registry, tmp_path: Path):
    src = source(module_registry)
    plain = json.loads(lazyerofs("convert", "--json", src, f"{module_registry.host}/out/prof:p2").stdout)
    stranger = tmp_path / "other.profile.json"
    layer = ProfileLayer("sha256:" + "ab" * 32, (0, 1), (0, 3), 65536, 4)
    stranger.write_bytes(dump_profile(Profile((layer,))))
    proc = lazyerofs("convert", "--profile", str(stranger), src, f"{module_registry.host}/out/prof:p3", check=False)
    assert proc.returncode == 0, proc.stderr
    assert "names none of the converted layers" in proc.stderr
    assert proc.stdout.strip() == plain["platforms"][0]["digest"]


def test_profile_with_all_platforms_is_refused_before_any_work(module_registry, tmp_path: Path):
    profile = tmp_path / "p.json"
    profile.write_text("{}")
    proc = lazyerofs("convert", "--all-platforms", "--profile", str(profile),
                     f"{module_registry.host}/src/none:v1", f"{module_registry.host}/out/none:v1", check=False)  # fmt: skip
    assert proc.returncode == 1 and "exclude each other" in proc.stderr and "Traceback" not in proc.stderr
    assert not os.path.exists(tmp_path / "staging")
