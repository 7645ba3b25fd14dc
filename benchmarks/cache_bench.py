"""Chunk cache read cost against the floor: plain ``os.pread`` of the same bytes.

What it answers: how much does serving a chunk from the cache directory cost
on top of reading those bytes from one big file, with the page cache warm (the
steady state of a busy daemon)? The cache pays an open, an fstat, a header
read, a utime for recency and a close per chunk; this puts a number on it.

Every method reads the same chunks in the same shuffled order, interleaved
chunk by chunk (alternating which goes first), so both see the same machine
state; ratios come from one run, never from numbers of different runs.

Run: ``.venv/bin/python -m benchmarks.cache_bench`` (about a minute). Writes
``benchmarks/results/cache_bench.json`` and ``benchmarks/results/cache_bench.md``.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cache import ChunkCache, format_size, parse_size

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
WORK = HERE / ".work" / "cache_bench"

Reader = Callable[[int], bytes]


def _chunks(count: int, size: int) -> list[bytes]:
    # Incompressible and distinct, like decompressed frames of real layers
    # (the content does not matter to a copy, only the length).
    seed = os.urandom(size)
    return [hashlib.sha512(i.to_bytes(4, "little")).digest() + seed[64:] for i in range(count)]


def _summary(latencies: list[float], chunk_size: int) -> dict[str, float]:
    ordered = sorted(latencies)
    total = sum(latencies)

    def pct(p: float) -> float:
        return ordered[min(int(p * len(ordered)), len(ordered) - 1)] * 1e6

    return {
        "ops": len(latencies),
        "median_us": statistics.median(latencies) * 1e6,
        "p90_us": pct(0.90),
        "p99_us": pct(0.99),
        "mean_us": total / len(latencies) * 1e6,
        "throughput_MiBps": len(latencies) * chunk_size / total / (1 << 20),
    }


def _interleaved(readers: dict[str, Reader], order: list[int], rounds: int, expect: list[bytes]) -> dict[str, list[float]]:
    names = list(readers)
    times: dict[str, list[float]] = {n: [] for n in names}
    clock = time.perf_counter
    for r in range(rounds):
        for j, i in enumerate(order):
            # Rotate who goes first so no method always follows another's
            # cache-warming footsteps.
            k = (r + j) % len(names)
            for name in names[k:] + names[:k]:
                read = readers[name]
                t0 = clock()
                data = read(i)
                t1 = clock()
                times[name].append(t1 - t0)
                if len(data) != len(expect[i]):
                    raise AssertionError(f"{name}: short read of chunk {i}")
                # Free the buffer outside the timed span: munmap of 4 MiB is
                # tens of µs and would land on whichever method runs next.
                del data
    return times


def bench_chunk_size(chunk_size: int, count: int, rounds: int, work: Path) -> dict[str, Any]:
    chunks = _chunks(count, chunk_size)
    keys = [hashlib.sha512(c).digest() for c in chunks]
    work.mkdir(parents=True, exist_ok=True)
    flat_path = work / f"flat-{chunk_size}.bin"
    with open(flat_path, "wb") as f:
        for c in chunks:
            f.write(c)

    # Put cost, for the record: a fresh directory, every key new.
    cache_root = work / f"cache-{chunk_size}"
    shutil.rmtree(cache_root, ignore_errors=True)
    disk = ChunkCache(cache_root, max_bytes=1 << 40, memory_bytes=0)
    put_times = []
    for key, c in zip(keys, chunks, strict=True):
        t0 = time.perf_counter()
        if not disk.put(key, c):
            raise RuntimeError("benchmark put failed (disk full?)")
        put_times.append(time.perf_counter() - t0)
    checked = ChunkCache(cache_root, max_bytes=1 << 40, memory_bytes=0, verify_at_rest=True)
    memory = ChunkCache(cache_root, max_bytes=1 << 40, memory_bytes=2 * count * chunk_size)

    fd = os.open(flat_path, os.O_RDONLY)
    flat = str(flat_path)

    def pread_open_fd(i: int) -> bytes:
        return os.pread(fd, chunk_size, i * chunk_size)

    def open_pread_close(i: int) -> bytes:
        f = os.open(flat, os.O_RDONLY)
        try:
            return os.pread(f, chunk_size, i * chunk_size)
        finally:
            os.close(f)

    def cache_disk(i: int) -> bytes:
        data = disk.get(keys[i], chunk_size)
        assert data is not None
        return data

    def cache_disk_verified(i: int) -> bytes:
        data = checked.get(keys[i], chunk_size)
        assert data is not None
        return data

    def cache_memory(i: int) -> bytes:
        data = memory.get(keys[i], chunk_size)
        assert data is not None
        return data

    readers: dict[str, Reader] = {
        "pread (fd kept open)": pread_open_fd,
        "open+pread+close": open_pread_close,
        "cache disk hit": cache_disk,
        "cache disk hit, verify_at_rest": cache_disk_verified,
        "cache memory hit": cache_memory,
    }
    if rounds < 1:
        raise ValueError("rounds must be at least 1")
    order = list(range(count))
    random.Random(42).shuffle(order)
    # Warm-up: page cache full, memory LRU filled, code paths hot.
    _interleaved(readers, order, 1, chunks)
    before = memory.statistics()
    gc.collect()
    gc.disable()
    try:
        times = _interleaved(readers, order, rounds, chunks)
    finally:
        gc.enable()
    os.close(fd)
    # The interleaved memory hit runs right after 4 MiB copies have flushed
    # the CPU caches; a tight loop shows the hit with the interpreter hot.
    tight = []
    clock = time.perf_counter
    for _ in range(rounds):
        for i in order:
            t0 = clock()
            cache_memory(i)
            tight.append(clock() - t0)
    times["cache memory hit, tight loop"] = tight
    after_memory, after_disk = memory.statistics(), disk.statistics()
    for c in (disk, checked, memory):
        c.close()
    # Each method must have been served by the tier it claims to measure.
    if after_disk.memory_hits or after_memory.disk_hits != before.disk_hits:
        raise AssertionError("a method was served from the wrong tier")

    base = _summary(times["pread (fd kept open)"], chunk_size)
    methods = {}
    for name, lat in times.items():
        s = _summary(lat, chunk_size)
        s["median_vs_pread"] = s["median_us"] / base["median_us"]
        s["throughput_vs_pread"] = s["throughput_MiBps"] / base["throughput_MiBps"]
        methods[name] = s
    return {
        "chunk_size": chunk_size,
        "chunks": count,
        "rounds": rounds,
        "methods": methods,
        "put": _summary(put_times, chunk_size),
    }


def _fs_type(path: Path) -> str:
    out = subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True, check=False)
    return out.stdout.strip() or "unknown"


def _markdown(result: dict[str, Any]) -> str:
    env = result["environment"]
    lines = [
        "# Chunk cache read cost vs plain pread",
        "",
        f"Run {result['date']} on {env['cpus']} CPUs, Linux {env['kernel']}, Python {env['python']}, "
        f"work dir on {env['filesystem']}. Page cache warm; disk-hit methods run with the memory "
        "LRU off. All methods measured interleaved in one run; ratios are against "
        "`pread (fd kept open)` of the same bytes from one flat file. The interleaved "
        "memory hit follows other methods' copies that flushed the CPU caches; the tight "
        "loop repeats only memory hits. A memory hit returns the cached object, no copy.",
        "",
        "Produced by `.venv/bin/python -m benchmarks.cache_bench`.",
    ]
    for run in result["runs"]:
        lines += [
            "",
            f"## {format_size(run['chunk_size'])} chunks "
            f"({run['chunks']} chunks x {run['rounds']} rounds per method)",
            "",
            "| method | median µs | p90 µs | p99 µs | MiB/s | median vs pread | throughput vs pread |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for name, s in run["methods"].items():
            lines.append(
                f"| {name} | {s['median_us']:.1f} | {s['p90_us']:.1f} | {s['p99_us']:.1f} | "
                f"{s['throughput_MiBps']:.0f} | {s['median_vs_pread']:.3g}x | {s['throughput_vs_pread']:.3g}x |"
            )
        p = run["put"]
        lines += [
            "",
            f"put (new key: hash, write temp, rename): median {p['median_us']:.0f} µs, "
            f"{p['throughput_MiBps']:.0f} MiB/s, no fsync.",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cache_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--chunk-sizes", default="4MiB,64KiB", help="comma-separated (default: 4MiB,64KiB)")
    parser.add_argument("--data", type=parse_size, default=parse_size("256MiB"), help="bytes of chunks per size (default: 256MiB)")
    parser.add_argument("--rounds", type=int, default=10, help="passes over all chunks per method (default: 10)")
    parser.add_argument("--work", type=Path, default=WORK, help=f"scratch directory (default: {WORK})")
    parser.add_argument("--results", type=Path, default=RESULTS, help=f"output directory (default: {RESULTS})")
    args = parser.parse_args(argv)

    runs = []
    for text in args.chunk_sizes.split(","):
        size = parse_size(text)
        count = max(args.data // size, 8)
        print(f"{format_size(size)} chunks: {count} x {args.rounds} rounds ...", flush=True)
        runs.append(bench_chunk_size(size, count, args.rounds, args.work))
    result = {
        "benchmark": "cache_bench",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "environment": {
            "cpus": os.cpu_count(),
            "kernel": platform.release(),
            "python": platform.python_version(),
            "filesystem": _fs_type(args.work),
        },
        "runs": runs,
    }
    shutil.rmtree(args.work, ignore_errors=True)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "cache_bench.json").write_text(json.dumps(result, indent=2) + "\n")
    md = _markdown(result)
    (args.results / "cache_bench.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
