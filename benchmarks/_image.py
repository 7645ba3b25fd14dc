"""The benchmark image: a Debian minbase rootfs with python3, split into layers.

Why a real distribution and not a synthetic tree: cold start is dominated by
*which* blocks a real program touches (ELF loader, libc, the interpreter, the
stdlib's .pyc files scattered across the image) and a synthetic tree cannot
reproduce that access pattern. Building the rootfs takes minutes, so it is
cached under ``benchmarks/.work/`` and reused; the layer split and the EROFS
images are cached too, keyed by the split spec.

The split mimics a real image's layering (base OS / language runtime /
bulky data) so the mount has to stack several layers, each with its own
manifest entry and chunk table. Every non-directory path lands in exactly one
layer; directories are repeated wherever a layer needs them as parents, so
the overlay union is exactly the original tree.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lazyfs.produce.mkfs import make_erofs

__all__ = [
    "DEBIAN_MIRROR",
    "LAYER_SPEC",
    "LayerImage",
    "build_layers",
    "debian_mirror",
    "debian_rootfs",
    "split_tree",
]

DEBIAN_MIRROR = "http://deb.debian.org/debian"

# (name, path patterns relative to the root). First match wins; the first
# entry with no patterns takes everything not claimed. Order = bottom first.
LAYER_SPEC: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("base", ()),
    (
        "python3",
        (
            "usr/lib/python3*",
            "usr/bin/python3*",
            "usr/bin/py3*",
            "usr/bin/pydoc3*",
            "usr/lib/x86_64-linux-gnu/libpython3*",
            "usr/share/python3*",
            "usr/share/doc/python3*",
            "usr/share/doc/libpython3*",
            "usr/local/lib/python3*",
            "etc/python3*",
        ),
    ),
    (
        "extra",
        (
            "usr/share/doc",
            "usr/share/man",
            "usr/share/locale",
            "usr/share/info",
            "usr/share/zoneinfo",
            "usr/share/i18n",
            "usr/share/common-licenses",
            "usr/share/perl*",
            "usr/lib/x86_64-linux-gnu/perl*",
            "usr/bin/perl*",
            "var/cache",
            "var/lib/apt",
            "var/lib/dpkg",
            "var/log",
        ),
    ),
)
SPEC_VERSION = 2


def debian_mirror() -> str:
    """The Debian mirror this machine's apt uses (so debootstrap works offline-ish)."""
    for path in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        try:
            text = path.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            words = line.split()
            if line.startswith("URIs:") and len(words) > 1 and words[1].rstrip("/").endswith("/debian"):
                return words[1].rstrip("/")
            if words[:1] == ["deb"]:
                uri = next((w for w in words[1:] if "://" in w), "")
                if uri.rstrip("/").endswith("/debian"):
                    return uri.rstrip("/")
    return DEBIAN_MIRROR


def debian_rootfs(work: Path, *, suite: str = "bookworm") -> Path:
    """``work/rootfs``: debootstrap minbase + python3, built once and reused.

    Built into ``rootfs.tmp`` and renamed on success so an interrupted build
    is never mistaken for a finished one.
    """
    root = work / "rootfs"
    if (root / "usr/bin/python3").exists():
        _clean_like_docker(root)
        return root
    if shutil.which("debootstrap") is None:
        raise SystemExit("debootstrap not found (apt-get install debootstrap)")
    tmp = work / "rootfs.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    mirror = debian_mirror()
    print(f"[image] debootstrap --variant=minbase --include=python3 {suite} ({mirror}); takes a few minutes", flush=True)
    t0 = time.monotonic()
    with open(work / "debootstrap.log", "w") as log:
        proc = subprocess.run(
            ["debootstrap", "--variant=minbase", "--include=python3", suite, str(tmp), mirror],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    if proc.returncode != 0:
        raise SystemExit(f"debootstrap failed ({proc.returncode}); see {work / 'debootstrap.log'}")
    _clean_like_docker(tmp)
    tmp.rename(root)
    print(f"[image] rootfs ready in {time.monotonic() - t0:.0f}s", flush=True)
    return root


def _clean_like_docker(root: Path) -> None:
    """Drop apt's package cache and lists, as Debian's official images do.

    Leaving 90 MB of .deb files and package lists in would make the image
    unrealistically large and flatter the lazy strategy.
    """
    for pattern in ("var/cache/apt/archives/*.deb", "var/cache/apt/*.bin", "var/lib/apt/lists/*"):
        for p in root.glob(pattern):
            if p.is_file() or p.is_symlink():
                p.unlink()


def _layer_of(rel: str, spec: Sequence[tuple[str, tuple[str, ...]]]) -> int:
    parts = rel.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    default = 0
    for index, (_name, patterns) in enumerate(spec):
        if not patterns:
            default = index
            continue
        if any(fnmatch.fnmatchcase(p, pat) for p in prefixes for pat in patterns):
            return index
    return default


def split_tree(
    root: Path, out: Path, spec: Sequence[tuple[str, tuple[str, ...]]] = LAYER_SPEC
) -> list[Path]:
    """Copy ``root`` into one directory per layer under ``out``; return them bottom first.

    Uses tar with explicit path lists so owners, modes, device nodes,
    symlinks and xattrs survive exactly as in the rootfs.
    """
    lists: list[list[str]] = [[] for _ in spec]
    needed_dirs: list[set[str]] = [set() for _ in spec]
    total_files = 0
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            i = _layer_of(rel, spec)
            lists[i].append(rel)
            total_files += 1
            parent = os.path.dirname(rel)
            while parent:
                needed_dirs[i].add(parent)
                parent = os.path.dirname(parent)
        for name in dirnames:
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            if os.path.islink(os.path.join(dirpath, name)):
                continue
            # An empty directory belongs to the layer that owns its path.
            needed_dirs[_layer_of(rel, spec)].add(rel)
    # Parents of every kept directory must exist in that layer too.
    for dirs in needed_dirs:
        for d in list(dirs):
            parent = os.path.dirname(d)
            while parent:
                dirs.add(parent)
                parent = os.path.dirname(parent)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    dirs_out = []
    for i, (name, _patterns) in enumerate(spec):
        dest = out / f"{i}-{name}"
        dest.mkdir()
        shutil.copystat(root, dest)
        entries = sorted(needed_dirs[i]) + lists[i]
        listing = out / f"{i}-{name}.list"
        listing.write_bytes(b"".join(e.encode("utf-8", "surrogateescape") + b"\0" for e in entries))
        pack = subprocess.Popen(
            ["tar", "-C", str(root), "--null", "--no-recursion", "--xattrs", "--numeric-owner", "-T", str(listing), "-cf", "-"],
            stdout=subprocess.PIPE,
        )
        unpack = subprocess.run(
            ["tar", "-C", str(dest), "--xattrs", "--numeric-owner", "--same-owner", "-xpf", "-"], stdin=pack.stdout
        )
        assert pack.stdout is not None
        pack.stdout.close()
        if pack.wait() != 0 or unpack.returncode != 0:
            raise SystemExit(f"splitting {root} into {dest} failed")
        dirs_out.append(dest)
    copied = sum(len(x) for x in lists)
    if copied != total_files:
        raise SystemExit(f"layer split lost files: {copied} of {total_files}")
    return dirs_out


@dataclass(frozen=True)
class LayerImage:
    """One layer's raw EROFS image (bottom first)."""

    name: str
    path: Path
    size: int
    files: int


def build_layers(root: Path, work: Path, spec: Sequence[tuple[str, tuple[str, ...]]] = LAYER_SPEC) -> list[LayerImage]:
    """Raw EROFS images of the split rootfs, cached under ``work/layers``.

    The cache key is the split spec plus the rootfs's own python3 binary mtime,
    so a rebuilt rootfs or a changed split produces fresh images.
    """
    out = work / "layers"
    key = json.dumps(
        {"v": SPEC_VERSION, "spec": spec, "root": str(root), "mtime": (root / "usr/bin").stat().st_mtime_ns}
    )
    stamp = out / "stamp.json"
    if stamp.exists() and stamp.read_text() == key:
        meta = json.loads((out / "layers.json").read_text())
        return [LayerImage(m["name"], Path(m["path"]), m["size"], m["files"]) for m in meta]
    print("[image] splitting the rootfs into layers and building EROFS images", flush=True)
    t0 = time.monotonic()
    dirs = split_tree(root, out / "trees", spec)
    images = []
    for d in dirs:
        name = d.name.split("-", 1)[1]
        img = out / f"{d.name}.erofs"
        make_erofs(d, img)
        files = sum(len(f) for _p, _d, f in os.walk(d))
        images.append(LayerImage(name, img, img.stat().st_size, files))
        print(f"[image]   layer {d.name}: {img.stat().st_size / 2**20:.1f} MiB raw EROFS, {files} files", flush=True)
    shutil.rmtree(out / "trees")
    (out / "layers.json").write_text(
        json.dumps([{"name": m.name, "path": str(m.path), "size": m.size, "files": m.files} for m in images])
    )
    stamp.write_text(key)
    print(f"[image] layers built in {time.monotonic() - t0:.0f}s", flush=True)
    return images


if __name__ == "__main__":  # pragma: no cover - manual helper
    work = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / ".work"
    for layer in build_layers(debian_rootfs(work), work):
        print(layer)
