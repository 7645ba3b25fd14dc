"""The read path against the raw image on local disk, all ratios from one run (issue 13).

One image (default 4 GiB: two big files, half random and half text, plus a
directory of small files), built with ``mkfs.erofs`` and pushed with
``lazyerofs push`` (4 MiB frames) to a ``docker-registry`` on loopback.
Every repetition (medians of ``--repeat``, default 3) measures, with the
page cache dropped before each step:

* sequential read of the whole layer file, 1 MiB reads: ``direct`` (the raw
  image file on local disk), ``passthrough`` (the same file through a trivial
  pyfuse3 passthrough, the ceiling of any pyfuse3 daemon, mounted with the
  same readahead), ``lazyerofs cold`` (empty chunk cache: every frame
  fetched from the registry, verified, decompressed) and ``lazyerofs warm``
  (a new mount on the now full chunk cache);
* random 4 KiB preads at 4 KiB-aligned offsets, 1 and 16 threads: direct,
  passthrough and lazyerofs warm;
* every file read through the kernel EROFS driver: the raw image mounted
  file-backed vs ``layer.erofs`` of a warm lazyerofs mount;
* the daemon's peak RSS (``VmHWM``) and CPU time over the cold and warm reads.

Then once: 64 readers (threads) of random ranges (4 KiB-256 KiB) of the first
``--readers-mib`` of the layer on a cold mount, each checked against the raw
image: exactness, frames fetched twice, latency percentiles, peak RSS.

Targets (issue 13): peak RSS <= 200 MB on the whole-layer read; warm
sequential >= 0.8x direct; warm random 4 KiB >= 0.25x direct; cold sequential
>= 0.5x direct. Writes ``benchmarks/results/fuse_read.{json,md}``.

Run as root: ``.venv/bin/python -m benchmarks.fuse_read [--size-mib 4096]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from cache import parse_size
from lazyfs.mount import kernel as kmount
from lazyfs.mount.state import load_state
from lazyfs.produce.mkfs import make_erofs
from tests.support.localregistry import LocalRegistry
from tests.support.system import drop_caches

RESULTS = Path(__file__).resolve().parent / "results"
LAZYEROFS = str(Path(sys.executable).parent / "lazyerofs")
MIB = 1 << 20
BLOCK = MIB
TARGETS = {"peak_rss_mb": 200, "warm_seq": 0.8, "warm_random": 0.25, "cold_seq": 0.5}
READAHEAD_KB = 4096


# -- helpers ---------------------------------------------------------------------------------




def _run_together(worker: Callable[[int], None], n: int, barrier: threading.Barrier) -> float:
    """Start ``n`` threads of ``worker`` (each waits on ``barrier``, which this
    thread joins too), return the seconds from their common start to the last end."""
    pool = [threading.Thread(target=worker, args=(k,)) for k in range(n)]
    for t in pool:
        t.start()
    barrier.wait()
    started = time.perf_counter()
    for t in pool:
        t.join()
    return time.perf_counter() - started


def lazy(*args: str) -> str:
    proc = subprocess.run([LAZYEROFS, *args], capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"lazyerofs {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout


def read_seq(path: Path) -> float:
    """MiB/s of one sequential read of ``path`` in 1 MiB reads."""
    started = time.perf_counter()
    total = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        while chunk := os.read(fd, BLOCK):
            total += len(chunk)
    finally:
        os.close(fd)
    return total / MIB / (time.perf_counter() - started)


def read_random(path: Path, size: int, threads: int, reads_per_thread: int, seed: int) -> float:
    """4 KiB preads per second at random 4 KiB-aligned offsets."""
    pages = size // 4096
    fd = os.open(path, os.O_RDONLY)
    barrier = threading.Barrier(threads + 1)
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        rnd = random.Random(seed * 1000 + k)
        offsets = [rnd.randrange(pages) * 4096 for _ in range(reads_per_thread)]
        barrier.wait()
        try:
            for off in offsets:
                if len(os.pread(fd, 4096, off)) != 4096:
                    raise RuntimeError("short read")
        except BaseException as exc:
            errors.append(exc)

    elapsed = _run_together(worker, threads, barrier)
    os.close(fd)
    if errors:
        raise errors[0]
    return threads * reads_per_thread / elapsed


def read_tree(root: Path) -> float:
    """MiB/s reading every file under ``root`` (walk order, 1 MiB reads)."""
    started = time.perf_counter()
    total = 0
    for d, _dirs, files in os.walk(root):
        for name in sorted(files):
            fd = os.open(os.path.join(d, name), os.O_RDONLY)
            try:
                while chunk := os.read(fd, BLOCK):
                    total += len(chunk)
            finally:
                os.close(fd)
    return total / MIB / (time.perf_counter() - started)


def set_readahead(mountpoint: Path, kib: int) -> None:
    device = kmount.device_of(str(mountpoint))
    if device is not None:
        with contextlib.suppress(OSError):
            Path(f"/sys/class/bdi/{device}/read_ahead_kb").write_text(f"{kib}\n")


def proc_status(pid: int) -> dict[str, float]:
    """Peak RSS (MB) and CPU seconds so far of process ``pid``."""
    out: dict[str, float] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmHWM:", "VmRSS:")):
                out[line.split(":")[0]] = int(line.split()[1]) / 1000  # kB -> MB
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    out["cpu_s"] = (int(fields[11]) + int(fields[12])) / tick
    return out


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


# -- the image -------------------------------------------------------------------------------


def make_tree(src: Path, size_mib: int) -> None:
    """Half random, half text (a realistic mix for zstd): two big files and
    ~1/16 of the size as small files of 1 KiB-1 MiB."""
    rnd = random.Random(13)
    small_total = size_mib * MIB // 16
    (src / "files").mkdir(parents=True)
    line = b"the quick brown fox jumps over the lazy erofs driver 0123456789\n"
    text_block = (line * (BLOCK // len(line) + 1))[:BLOCK]
    done = k = 0
    while done < small_total:
        n = int(2 ** rnd.uniform(10, 20))
        data = os.urandom(n) if k % 2 else (text_block * (n // BLOCK + 1))[:n]
        (src / "files" / f"{k // 100:03d}").mkdir(exist_ok=True)
        (src / "files" / f"{k // 100:03d}" / f"f{k}.bin").write_bytes(data)
        done += n
        k += 1
    big = (size_mib * MIB - small_total) // 2 // BLOCK
    with open(src / "random.bin", "wb") as f:
        for _ in range(big):
            f.write(os.urandom(BLOCK))
    with open(src / "text.txt", "wb") as f:
        for _ in range(big):
            f.write(text_block)


# -- the passthrough ceiling -------------------------------------------------------------------


def serve_passthrough(image: str, mountpoint: str) -> None:
    """A trivial pyfuse3 filesystem with one file, ``layer.erofs``, whose
    reads are a pread of ``image``: what any pyfuse3 daemon costs at least."""
    import errno
    import stat

    import pyfuse3
    import trio

    fd = os.open(image, os.O_RDONLY)
    size = os.fstat(fd).st_size
    file_inode = pyfuse3.ROOT_INODE + 1
    limiter = trio.CapacityLimiter(16)

    class Passthrough(pyfuse3.Operations):
        def _attr(self, inode: int) -> pyfuse3.EntryAttributes:
            a = pyfuse3.EntryAttributes()
            a.st_ino = inode
            a.st_mode = (stat.S_IFDIR | 0o555) if inode == pyfuse3.ROOT_INODE else (stat.S_IFREG | 0o444)
            a.st_size = 0 if inode == pyfuse3.ROOT_INODE else size
            a.st_blksize = 4096
            a.attr_timeout = a.entry_timeout = 3600
            return a

        async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
            return self._attr(inode)

        async def lookup(self, parent: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
            if parent != pyfuse3.ROOT_INODE or name != b"layer.erofs":
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self._attr(file_inode)

        async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
            return pyfuse3.FileInfo(fh=inode, keep_cache=True)

        async def read(self, fh: int, off: int, length: int) -> bytes:
            # From the page cache without a thread hop when it can; otherwise
            # in a thread, so reads from disk overlap (as a real daemon's would).
            buf = bytearray(length)
            try:
                got = os.preadv(fd, [buf], off, os.RWF_NOWAIT)
            except OSError:  # not in memory (EAGAIN), or cannot tell (EOPNOTSUPP)
                got = -1
            if got == length or (got >= 0 and off + got >= size):
                return buf[:got]
            return await trio.to_thread.run_sync(os.pread, fd, length, off, limiter=limiter)

    options = set(pyfuse3.default_options) | {"fsname=passthrough", "ro"}
    pyfuse3.init(Passthrough(), mountpoint, options)
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=True)


@contextlib.contextmanager
def passthrough(image: Path, mnt: Path) -> Iterator[Path]:
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.fuse_read", "--serve-passthrough", str(image), str(mnt)])
    try:
        deadline = time.monotonic() + 20
        while kmount.find_mount(str(mnt)) is None:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the passthrough filesystem did not come up")
            time.sleep(0.05)
        set_readahead(mnt, READAHEAD_KB)
        yield mnt / "layer.erofs"
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], check=False, capture_output=True)
        proc.terminate()
        proc.wait(timeout=20)


# -- lazyerofs mounts ------------------------------------------------------------------------


class Mount:
    def __init__(self, ref: str, mnt: Path, cache: Path, extra: list[str]) -> None:
        lazy("mount", ref, str(mnt), "--cache-dir", str(cache), *extra)
        self.mnt = mnt
        state = load_state(str(mnt))
        assert state is not None
        self.pid = int(state["pid"])
        self.layer = mnt / "layers/0/layer.erofs"

    def status(self) -> dict[str, float]:
        return proc_status(self.pid)

    def stats(self) -> dict[str, Any]:
        return json.loads((self.mnt / ".lazyerofs/stats.json").read_text())

    def worker_pids(self) -> list[int]:
        """The mount's fetch workers (lazyfs.fetch.offload)."""
        return list(self.stats().get("fetch_workers", {}).get("pids", []))

    def close(self) -> None:
        lazy("umount", str(self.mnt))


@contextlib.contextmanager
def mounted(ref: str, mnt: Path, cache: Path, extra: list[str]) -> Iterator[Mount]:
    m = Mount(ref, mnt, cache, extra)
    try:
        yield m
    finally:
        m.close()


@contextlib.contextmanager
def erofs(image: Path, target: Path) -> Iterator[Path]:
    km = kmount.mount_erofs(str(image), str(target))
    try:
        yield target
    finally:
        kmount.umount(str(target))
        if km.loop:
            kmount.detach_loop(km.loop)


def unmount_all(work: Path) -> None:
    """Take down whatever is still mounted under ``work`` (after a failure),
    deepest first, so removing ``work`` never reaches into a mount."""
    real = os.path.realpath(work)
    left = sorted((t for t, _fs, _src in kmount.mounts() if t.startswith(real + "/")), key=len, reverse=True)
    for target in left:
        if subprocess.run([LAZYEROFS, "umount", target], capture_output=True, check=False).returncode != 0:
            with contextlib.suppress(Exception):
                kmount.umount(target)


# -- 64 readers ---------------------------------------------------------------------------------


def many_readers(m: Mount, raw: Path, span: int, readers: int, reads_each: int) -> dict[str, Any]:
    """``readers`` threads of random reads of the first ``span`` bytes, each
    compared with the raw image."""
    raw_fd = os.open(raw, os.O_RDONLY)
    latencies: list[float] = []
    wrong: list[tuple[int, int]] = []
    lock = threading.Lock()
    barrier = threading.Barrier(readers + 1)

    def worker(k: int) -> None:
        rnd = random.Random(k)
        fd = os.open(m.layer, os.O_RDONLY)
        mine: list[float] = []
        bad: list[tuple[int, int]] = []
        barrier.wait()
        for _ in range(reads_each):
            size = rnd.randrange(1, 65) * 4096
            off = rnd.randrange(0, span - size)
            t0 = time.perf_counter()
            data = os.pread(fd, size, off)
            mine.append(time.perf_counter() - t0)
            if data != os.pread(raw_fd, size, off):
                bad.append((off, size))
        os.close(fd)
        with lock:
            latencies.extend(mine)
            wrong.extend(bad)

    elapsed = _run_together(worker, readers, barrier)
    os.close(raw_fd)
    latencies.sort()
    layer = m.stats()["layers"][0]
    return {
        "readers": readers,
        "reads": len(latencies),
        "span_mib": span // MIB,
        "seconds": elapsed,
        "wrong_reads": len(wrong),
        "frames_fetched": layer["frames_fetched"],
        "frames_present": layer["frames_present"],
        "frames_fetched_twice": layer["frames_fetched"] - layer["frames_present"],
        "p50_ms": latencies[len(latencies) // 2] * 1e3,
        "p99_ms": latencies[int(len(latencies) * 0.99)] * 1e3,
        "max_ms": latencies[-1] * 1e3,
        "peak_rss_mb": m.status()["VmHWM"],
    }


# -- the run ------------------------------------------------------------------------------------


def one_repetition(rep: int, args: argparse.Namespace, work: Path, image: Path, ref: str) -> dict[str, Any]:
    size = image.stat().st_size
    out: dict[str, Any] = {}
    rand_1 = (1, args.random_reads)
    rand_16 = (16, args.random_reads // 4)

    def step(name: str, fn: Callable[[], float]) -> float:
        drop_caches()
        value = fn()
        out[name] = value
        print(f"    {name}: {value:,.0f}", flush=True)
        return value

    step("seq_direct", lambda: read_seq(image))
    step("rand1_direct", lambda: read_random(image, size, *rand_1, seed=rep))
    step("rand16_direct", lambda: read_random(image, size, *rand_16, seed=rep))
    pmnt = work / f"pt-{rep}"
    pmnt.mkdir()
    with passthrough(image, pmnt) as pfile:
        step("seq_passthrough", lambda: read_seq(pfile))
        step("rand1_passthrough", lambda: read_random(pfile, size, *rand_1, seed=rep))
        step("rand16_passthrough", lambda: read_random(pfile, size, *rand_16, seed=rep))
    cache = work / f"cache-{rep}"
    mnt = work / f"mnt-{rep}"
    mnt.mkdir()
    extra = ["--memory-budget", args.memory_budget] if args.memory_budget else []
    if args.fetch_workers:
        extra += ["--fetch-workers", args.fetch_workers]
    # The same cold read with every fetch in the daemon's own process
    # (--fetch-workers 0, as before the fetch workers), on a cache of its own.
    inproc = work / f"cache-inproc-{rep}"
    with mounted(ref, mnt, inproc, [*extra, "--fetch-workers", "0"]) as m:
        before = m.status()
        step("seq_cold_inproc", lambda: read_seq(m.layer))
        out["cold_inproc_cpu_s"] = m.status()["cpu_s"] - before["cpu_s"]
    subprocess.run(["rm", "-rf", str(inproc)], check=False)
    with mounted(ref, mnt, cache, extra) as m:
        pids = m.worker_pids()
        before = m.status()
        workers_before = sum(proc_status(p)["cpu_s"] for p in pids)
        step("seq_cold", lambda: read_seq(m.layer))
        after = m.status()
        workers = [proc_status(p) for p in pids]
        out["fetch_workers"] = len(pids)
        out["cold_peak_rss_mb"] = after["VmHWM"]
        # Shared copy-on-write pages count in each process: an upper bound.
        out["cold_workers_peak_rss_mb"] = sum(w["VmHWM"] for w in workers)
        out["cold_cpu_s"] = after["cpu_s"] - before["cpu_s"]
        out["cold_workers_cpu_s"] = sum(w["cpu_s"] for w in workers) - workers_before
        layer = m.stats()["layers"][0]
        out["cold_requests"] = layer["requests"]
        out["cold_frames_fetched"] = layer["frames_fetched"]
        out["frames_total"] = layer["frames_total"]
    with mounted(ref, mnt, cache, extra) as m:
        before = m.status()
        step("seq_warm", lambda: read_seq(m.layer))
        after = m.status()
        out["warm_peak_rss_mb"] = after["VmHWM"]
        out["warm_cpu_s"] = after["cpu_s"] - before["cpu_s"]
        step("rand1_warm", lambda: read_random(m.layer, size, *rand_1, seed=rep))
        step("rand16_warm", lambda: read_random(m.layer, size, *rand_16, seed=rep))
        out["warm_frames_fetched"] = m.stats()["layers"][0]["frames_fetched"]
        emnt = work / f"erofs-{rep}"
        with erofs(image, emnt):
            step("tree_direct", lambda: read_tree(emnt))
        with erofs(m.layer, emnt):
            step("tree_warm", lambda: read_tree(emnt))
        out["tree_peak_rss_mb"] = m.status()["VmHWM"]
    subprocess.run(["rm", "-rf", str(cache)], check=False)
    return out


def summarize(reps: list[dict[str, Any]]) -> dict[str, Any]:
    keys = reps[0].keys()
    med = {k: median([r[k] for r in reps]) for k in keys}
    ratios = {
        "seq_passthrough": med["seq_passthrough"] / med["seq_direct"],
        "seq_cold": med["seq_cold"] / med["seq_direct"],
        "seq_cold_inproc": med["seq_cold_inproc"] / med["seq_direct"],
        "seq_warm": med["seq_warm"] / med["seq_direct"],
        "rand1_passthrough": med["rand1_passthrough"] / med["rand1_direct"],
        "rand1_warm": med["rand1_warm"] / med["rand1_direct"],
        "rand16_passthrough": med["rand16_passthrough"] / med["rand16_direct"],
        "rand16_warm": med["rand16_warm"] / med["rand16_direct"],
        "tree_warm": med["tree_warm"] / med["tree_direct"],
    }
    return {"median": med, "ratios": ratios}


def report(result: dict[str, Any]) -> str:
    med, ratio = result["summary"]["median"], result["summary"]["ratios"]
    m = result["machine"]
    t = TARGETS
    peak = max(med["cold_peak_rss_mb"], med["warm_peak_rss_mb"])

    def met(ok: bool) -> str:
        return "met" if ok else "**missed**"

    lines = [
        f"# The read path: a {result['image_bytes'] / (1 << 30):.2f} GiB layer ({result['chunk_size'] >> 20} MiB frames), "
        f"medians of {result['repeat']}, loopback registry",
        "",
        f"Kernel {m['kernel']}, {m['cpus']} CPUs, Python {m['python']}. Page cache dropped before every step;",
        "ratios are against the raw image on local disk measured in the same repetition. Memory budget: "
        f"{result['memory_budget'] or 'default'}.",
        "",
        "| | lazyerofs | trivial pyfuse3 passthrough (ceiling) | direct (raw image file) | lazyerofs / direct | passthrough / direct | target |",
        "|---|---:|---:|---:|---:|---:|---|",
        f"| cold sequential (MiB/s) | {med['seq_cold']:,.0f} | | {med['seq_direct']:,.0f} | {ratio['seq_cold']:.2f}x | "
        f"| >= {t['cold_seq']}x: {met(ratio['seq_cold'] >= t['cold_seq'])} |",
        f"| cold sequential, no fetch worker (MiB/s) | {med['seq_cold_inproc']:,.0f} | | {med['seq_direct']:,.0f} | "
        f"{ratio['seq_cold_inproc']:.2f}x | | |",
        f"| warm sequential (MiB/s) | {med['seq_warm']:,.0f} | {med['seq_passthrough']:,.0f} | {med['seq_direct']:,.0f} | "
        f"{ratio['seq_warm']:.2f}x | {ratio['seq_passthrough']:.2f}x | >= {t['warm_seq']}x: {met(ratio['seq_warm'] >= t['warm_seq'])} |",
        f"| warm random 4 KiB, 1 thread (reads/s) | {med['rand1_warm']:,.0f} | {med['rand1_passthrough']:,.0f} | "
        f"{med['rand1_direct']:,.0f} | {ratio['rand1_warm']:.2f}x | {ratio['rand1_passthrough']:.2f}x | "
        f">= {t['warm_random']}x: {met(ratio['rand1_warm'] >= t['warm_random'])} |",
        f"| warm random 4 KiB, 16 threads (reads/s) | {med['rand16_warm']:,.0f} | {med['rand16_passthrough']:,.0f} | "
        f"{med['rand16_direct']:,.0f} | {ratio['rand16_warm']:.2f}x | {ratio['rand16_passthrough']:.2f}x | "
        f">= {t['warm_random']}x: {met(ratio['rand16_warm'] >= t['warm_random'])} |",
        f"| warm, every file through kernel EROFS (MiB/s) | {med['tree_warm']:,.0f} | | {med['tree_direct']:,.0f} | "
        f"{ratio['tree_warm']:.2f}x | | |",
        f"| daemon peak RSS, whole-layer read (MB) | {peak:.0f} | | | | | <= {t['peak_rss_mb']}: {met(peak <= t['peak_rss_mb'])} |",
        "",
        f"Cold read: {med['cold_requests']:.0f} requests for {med['frames_total']:.0f} frames "
        f"({med['cold_frames_fetched']:.0f} fetched), {med['fetch_workers']:.0f} fetch worker(s); CPU: daemon "
        f"{med['cold_cpu_s']:.1f} s + workers {med['cold_workers_cpu_s']:.1f} s "
        f"({(med['cold_cpu_s'] + med['cold_workers_cpu_s']) / (result['image_bytes'] / MIB / med['seq_cold']):.2f} "
        f"cores busy; without workers {med['cold_inproc_cpu_s']:.1f} s); peak RSS daemon "
        f"{med['cold_peak_rss_mb']:.0f} MB + workers {med['cold_workers_peak_rss_mb']:.0f} MB (their shared pages "
        f"counted in each). Warm read: daemon CPU {med['warm_cpu_s']:.1f} s "
        f"({med['warm_cpu_s'] / (result['image_bytes'] / MIB / med['seq_warm']):.2f} cores), peak RSS "
        f"{med['warm_peak_rss_mb']:.0f} MB, frames fetched {med['warm_frames_fetched']:.0f}.",
    ]
    r = result.get("readers")
    if r:
        lines += [
            "",
            f"{r['readers']} readers on a cold mount, random 4-256 KiB reads of the first {r['span_mib']} MiB: "
            f"{r['reads']:,} reads in {r['seconds']:.1f} s, {r['wrong_reads']} wrong, "
            f"{r['frames_fetched']} frames fetched for {r['frames_present']} present "
            f"({r['frames_fetched_twice']} twice), latency p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, "
            f"max {r['max_ms']:.0f} ms; daemon peak RSS {r['peak_rss_mb']:.0f} MB.",
        ]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=4096, help="image payload size (default 4096)")
    ap.add_argument("--chunk-size", default="4MiB", help="frame size (default 4MiB)")
    ap.add_argument("--repeat", type=int, default=3, help="repetitions (default 3)")
    ap.add_argument("--random-reads", type=int, default=20000, help="4 KiB reads per single-thread run (default 20000)")
    ap.add_argument("--readers", type=int, default=64, help="concurrent readers of the last phase (0: skip)")
    ap.add_argument("--readers-mib", type=int, default=512, help="span the readers read (default 512)")
    ap.add_argument("--fetch-workers", default="", help="--fetch-workers of the mounts (default: lazyerofs's)")
    ap.add_argument("--memory-budget", default="", help="--memory-budget of the mounts (default: lazyerofs's)")
    ap.add_argument("--serve-passthrough", nargs=2, metavar=("IMAGE", "DIR"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_passthrough:
        serve_passthrough(*args.serve_passthrough)
        return 0
    if os.geteuid() != 0:
        print("fuse_read: needs root (FUSE, kernel EROFS mounts, drop_caches)", file=sys.stderr)
        return 1

    work = Path(tempfile.mkdtemp(prefix="lazyerofs-fuse-read-", dir=os.environ.get("BENCH_DIR")))
    registry = LocalRegistry(work / "registry")
    reps: list[dict[str, Any]] = []
    readers: dict[str, Any] | None = None
    try:
        t0 = time.monotonic()
        src = work / "src"
        make_tree(src, args.size_mib)
        image = work / "layer.erofs"
        make_erofs(src, image)
        subprocess.run(["rm", "-rf", str(src)], check=True)
        registry.start()
        ref = f"{registry.host}/bench/fuse-read:v1"
        lazy("push", "--chunk-size", args.chunk_size, str(image), ref)
        print(f"image of {image.stat().st_size / MIB:.0f} MiB built and pushed in {time.monotonic() - t0:.0f}s", flush=True)
        for rep in range(args.repeat):
            print(f"repetition {rep + 1}/{args.repeat}", flush=True)
            reps.append(one_repetition(rep, args, work, image, ref))
        if args.readers:
            print(f"{args.readers} readers", flush=True)
            mnt = work / "mnt-readers"
            mnt.mkdir()
            extra = ["--memory-budget", args.memory_budget] if args.memory_budget else []
            if args.fetch_workers:
                extra += ["--fetch-workers", args.fetch_workers]
            drop_caches()
            with mounted(ref, mnt, work / "cache-readers", extra) as m:
                span = min(args.readers_mib * MIB, image.stat().st_size)
                readers = many_readers(m, image, span, args.readers, 800)
            print(f"    {readers}", flush=True)
        size = image.stat().st_size
    finally:
        registry.stop()
        unmount_all(work)
        subprocess.run(["rm", "-rf", "--one-file-system", str(work)], check=False)

    result = {
        "image_bytes": size,
        "chunk_size": parse_size(args.chunk_size),
        "repeat": args.repeat,
        "memory_budget": args.memory_budget,
        "targets": TARGETS,
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version()},
        "repetitions": reps,
        "summary": summarize(reps),
        "readers": readers,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "fuse_read.json").write_text(json.dumps(result, indent=2) + "\n")
    md = report(result)
    (RESULTS / "fuse_read.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
