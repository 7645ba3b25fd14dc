"""Warm sequential read throughput through the FUSE mount vs the raw image file.

One run, side by side, so the ratio is meaningful on a shared machine:

* ``raw``: the raw EROFS image read from local disk (page cache dropped);
* ``fuse cold-cache``: ``layer.erofs`` through a fresh mount whose chunk
  cache is warm on disk but the kernel page cache is dropped (every read goes
  through the daemon: cache lookup, slice, FUSE reply);
* ``fuse page-cache``: the same file read again (served by the kernel page
  cache thanks to ``keep_cache``: the daemon is not involved).

Also a cold fetch from a local blob (no network) to show the verify +
decompress cost. Writes ``benchmarks/results/fuse_read.{json,md}``.

Usage: ``python -m benchmarks.fuse_read [--size-mib 256] [--chunk-size 4MiB]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cache import parse_size
from lazyfs.produce.mkfs import make_erofs

RESULTS = Path(__file__).resolve().parent / "results"
LAZYEROFS = str(Path(sys.executable).parent / "lazyerofs")
BLOCK = 1 << 20


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def read_all(path: Path) -> tuple[float, int]:
    started = time.perf_counter()
    total = 0
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(BLOCK):
            total += len(chunk)
    return time.perf_counter() - started, total


def lazy(*args: str) -> None:
    subprocess.run([LAZYEROFS, *args], check=True, capture_output=True, stdin=subprocess.DEVNULL)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=256, help="image payload size (default 256)")
    ap.add_argument("--chunk-size", default="4MiB", help="frame size (default 4MiB)")
    ap.add_argument("--repeat", type=int, default=3, help="repetitions per method (default 3)")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="lazyerofs-fuse-read-"))
    src = work / "src"
    src.mkdir()
    # Half random (incompressible), half text: a realistic mix for zstd.
    with open(src / "random.bin", "wb") as f:
        for _ in range(args.size_mib // 2):
            f.write(os.urandom(BLOCK))
    with open(src / "text.txt", "w") as f:
        line = "the quick brown fox jumps over the lazy erofs driver 0123456789\n"
        f.write(line * (args.size_mib // 2 * BLOCK // len(line)))
    image = work / "layer.erofs"
    make_erofs(src, image)
    blob = work / "layer.blob"
    lazy("build", str(image), "-o", str(blob), "--chunk-size", args.chunk_size)
    mnt = work / "mnt"
    mnt.mkdir()
    cache = work / "cache"
    size = image.stat().st_size
    rows: dict[str, list[float]] = {"raw": [], "fuse cold fetch (local blob)": [], "fuse, chunk cache warm": [], "fuse, page cache warm": []}
    try:
        for rep in range(args.repeat):
            print(f"repetition {rep + 1}/{args.repeat}", flush=True)
            drop_caches()
            rows["raw"].append(read_all(image)[0])
            # cold: empty chunk cache
            subprocess.run(["rm", "-rf", str(cache)], check=True)
            lazy("mount", "--descriptor", str(blob) + ".json", str(blob), str(mnt), "--cache-dir", str(cache))
            try:
                drop_caches()
                rows["fuse cold fetch (local blob)"].append(read_all(mnt / "layers/0/layer.erofs")[0])
            finally:
                lazy("umount", str(mnt))
            # warm chunk cache, new mount, page cache dropped
            lazy("mount", "--descriptor", str(blob) + ".json", str(blob), str(mnt), "--cache-dir", str(cache))
            try:
                drop_caches()
                rows["fuse, chunk cache warm"].append(read_all(mnt / "layers/0/layer.erofs")[0])
                rows["fuse, page cache warm"].append(read_all(mnt / "layers/0/layer.erofs")[0])
            finally:
                lazy("umount", str(mnt))
    finally:
        subprocess.run(["rm", "-rf", str(work)], check=False)

    raw_best = min(rows["raw"])
    result = {
        "image_bytes": size,
        "chunk_size": parse_size(args.chunk_size),
        "repeat": args.repeat,
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version()},
        "methods": {
            name: {
                "seconds": times,
                "best_mib_s": size / min(times) / BLOCK,
                "ratio_vs_raw": raw_best / min(times),
            }
            for name, times in rows.items()
        },
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "fuse_read.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# Sequential read of a {size / BLOCK:.0f} MiB layer, {args.chunk_size} frames, best of {args.repeat}",
        "",
        "| method | MiB/s | throughput vs raw file |",
        "|---|---:|---:|",
    ]
    for name, m in result["methods"].items():
        lines.append(f"| {name} | {m['best_mib_s']:.0f} | {m['ratio_vs_raw']:.2f}x |")
    (RESULTS / "fuse_read.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
