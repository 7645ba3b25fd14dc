"""Fault soak and crash harness: many readers, every byte checked, through the kernel.

Used in a short form by ``tests/test_reliability_short.py`` (CI) and in the
full form by ``python -m benchmarks.reliability``. Everything runs against
real parts: Debian's ``docker-registry``, the fault proxy
(:class:`support.netproxy.NetProxy`), the real ``lazyerofs`` CLI, FUSE, the
kernel EROFS driver and overlayfs.

* :func:`build_image`: a random two-layer tree pushed with small frames, and
  the merged tree the rootfs must equal.
* :class:`Mount`: one ``lazyerofs mount --rootfs`` made and taken down with
  the CLI (``force_cleanup`` after it, whatever happened).
* :class:`ReadTally` / :func:`reader_loop` / :class:`Workload`: readers (threads
  in this process and in child processes) reading random ranges and whole
  files of the rootfs and comparing every byte with the source tree.
* :func:`run_soak`, :func:`run_crashes`, :func:`run_cache_deleted`,
  :func:`run_cache_filled`, :func:`run_registry_restart`,
  :func:`run_clock_jump`: the scenarios; each returns a JSON-able dict of
  what it counted.
* :class:`FakeClock`: the clock one daemon sees, moved under libfaketime
  while it serves (the machine's clock is never touched).

A read is one ``(file, offset, length)`` request served by a loop of
``os.pread`` calls (a syscall may legally return fewer bytes; the loop goes
on). Its verdict: *exact* (every byte equals the source, all of it
delivered), *EIO* (an error; bytes delivered before it are still checked),
or *wrong* (a byte differs, or the file ended early: a short or
zero-filled read presented as success). Each syscall (open included) is
timed against ``deadline``; one over it is an overrun.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import multiprocessing
import os
import queue
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lazyfs.mount import kernel as kmount
from lazyfs.mount.state import load_state, state_dir

from .localregistry import LocalRegistry
from .mount import force_cleanup
from .netproxy import NetProxy
from .system import drop_caches

__all__ = [
    "FakeClock",
    "Mount",
    "ReadTally",
    "SoakImage",
    "Workload",
    "build_image",
    "deadline_of",
    "drop_caches",
    "faketime_library",
    "leftovers",
    "read_everything",
    "reader_loop",
    "run_cache_deleted",
    "run_cache_filled",
    "run_clock_jump",
    "run_crashes",
    "run_registry_restart",
    "run_soak",
    "run_trickle",
]

LAZYEROFS = str(Path(sys.executable).parent / "lazyerofs")
CHUNK = "256KiB"
# Faults per kind while the soak runs: the chance that a blob request gets it
# (rules are tried in this order; the first that fires wins). A stall costs
# the read it hits a whole --read-timeout, so it is rarer. The trickle is
# left out: one trickled fetch pins its frame for good (see run_trickle),
# which would turn the rest of a soak into EIO for that frame.
SOAK_FAULTS: dict[str, float] = {
    "reset": 0.04,
    "503": 0.04,
    "429": 0.03,
    "truncate": 0.04,
    "corrupt": 0.04,
    "ignore-range": 0.02,
    "stall": 0.015,
}
BLOBS = r"/blobs/sha256:"


def log(msg: str) -> None:
    print(f"[reliability] {msg}", file=sys.stderr, flush=True)


def lazyerofs(
    *args: str, check: bool = True, timeout: float = 120, env: dict[str, str] | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """Run the CLI; ``env`` replaces the environment (a mount under libfaketime),
    ``stdin`` is sent to it (a --password-stdin)."""
    proc = subprocess.run(
        [LAZYEROFS, *args], capture_output=True, text=True, timeout=timeout, env=env,
        **({"input": stdin} if stdin is not None else {"stdin": subprocess.DEVNULL}),
    )  # fmt: skip
    if check and proc.returncode != 0:
        raise RuntimeError(f"lazyerofs {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc




def rss_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


# --------------------------------------------------------------------------
# The image


def make_random_tree(root: Path, seed: int, *, files: int, max_size: int) -> None:
    """``files`` files under a few nested directories, sizes log-uniform up
    to ``max_size``, contents a mix of random (incompressible), text and
    runs of zeros, so frames compress very differently. Seeds 0 and 1 share
    some paths: the upper layer's file must win in the overlay."""
    rnd = random.Random(seed)
    dirs = ["", "bin", "lib", "lib/deep/er", "share/doc", "share/data", "etc"]
    for i in range(files):
        shared = i % 7 == 0  # same path in every layer
        name = f"{dirs[i % len(dirs)]}/f{i}{'' if shared else f'-l{seed}'}".lstrip("/")
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        size = int(2 ** rnd.uniform(0, max_size.bit_length() - 1)) if i % 11 else 0
        kind = rnd.random()
        if kind < 0.5:
            data = rnd.randbytes(size)
        elif kind < 0.8:
            line = f"{seed} {i} lorem ipsum {rnd.random():.9f}\n".encode()
            data = (line * (size // len(line) + 1))[:size]
        else:
            data = bytes(size // 2) + rnd.randbytes(size - size // 2)
        path.write_bytes(data)


@dataclass
class SoakImage:
    """An image in the registry and the tree its rootfs must equal."""

    repo: str  # path in the registry, e.g. "test/soak:v1"
    merged: Path
    files: list[tuple[str, int]]  # every regular file of the merged tree, with its size
    layer_sizes: list[int]
    chunk: str = CHUNK

    def ref(self, host: str) -> str:
        return f"{host}/{self.repo}"

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)


def build_image(
    registry: LocalRegistry, work: Path, name: str, *, layers: int = 2, files: int = 120,
    max_size: int = 2 << 20, chunk: str = CHUNK, credentials: tuple[str, str] | None = None,
) -> SoakImage:  # fmt: skip
    """Random trees made into seekable EROFS layers with ``chunk`` frames and
    pushed (as ``credentials`` (user, password) when given)."""
    work.mkdir(parents=True, exist_ok=True)
    merged = work / f"{name}-merged"
    trees = []
    for i in range(layers):
        tree = work / f"{name}-layer{i}"
        make_random_tree(tree, i, files=files, max_size=max_size)
        make_random_tree(merged, i, files=files, max_size=max_size)
        trees.append(str(tree))
    repo = f"test/{name}:v1"
    login = ("--username", credentials[0], "--password-stdin") if credentials else ()
    lazyerofs("push", "--chunk-size", chunk, *login, *trees, f"{registry.host}/{repo}", timeout=600,
              stdin=f"{credentials[1]}\n" if credentials else None)  # fmt: skip
    listing = []
    for dirpath, _dirs, names in os.walk(merged):
        for n in names:
            p = Path(dirpath) / n
            listing.append((str(p.relative_to(merged)), p.stat().st_size))
    sizes = [sum(f.stat().st_size for f in Path(t).rglob("*") if f.is_file()) for t in trees]
    return SoakImage(repo, merged, sorted(listing), sizes, chunk)


# --------------------------------------------------------------------------
# Mounts


class Mount:
    """``lazyerofs mount --rootfs`` under ``work``; :meth:`close` takes it down
    with ``lazyerofs umount`` and then detaches anything left, always."""

    def __init__(
        self, ref: str, work: Path, name: str, *, cache_dir: Path, args: tuple[str, ...] = (), rootfs: bool = True,
        env: dict[str, str] | None = None,
    ) -> None:  # fmt: skip
        self.ref = ref
        self.dir = work / f"{name}-mnt"
        self.rootfs = work / f"{name}-rootfs"
        self.with_rootfs = rootfs
        self.cache_dir = cache_dir
        self.log = work / f"{name}.log"  # named, so the daemon keeps it after umount
        self.args = (*args, "--log-file", str(self.log))
        self.env = env  # of `lazyerofs mount` only: its forked daemon inherits it
        self.mounted = False

    def open(self) -> Mount:
        for d in (self.dir, self.rootfs):
            d.mkdir(parents=True, exist_ok=True)
        self.mounted = True
        try:
            rootfs = ("--rootfs", str(self.rootfs)) if self.with_rootfs else ()
            lazyerofs("mount", self.ref, str(self.dir), *rootfs, "--cache-dir", str(self.cache_dir), *self.args,
                      env=self.env)  # fmt: skip
        except BaseException:
            self.close()
            raise
        return self

    def __enter__(self) -> Mount:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def pid(self) -> int:
        state = load_state(str(self.dir))
        if state is None or not isinstance(state.get("pid"), int):
            raise RuntimeError(f"no daemon state for {self.dir}")
        return int(state["pid"])  # type: ignore[call-overload]

    def stats(self) -> dict[str, Any]:
        return json.loads(lazyerofs("stats", str(self.dir), timeout=30).stdout)

    def umount(self, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        proc = lazyerofs("umount", str(self.dir), check=False, timeout=timeout)
        self.mounted = False
        return proc

    def take_down(self) -> dict[str, Any]:
        """``lazyerofs umount`` as a user would, then :meth:`close`; returns
        what umount exited with and what it left behind (for the reports)."""
        proc = self.umount() if self.mounted else None
        self.close()
        return {"umount_rc": proc.returncode if proc else None, "leftovers": leftovers(self)}

    def close(self) -> None:
        if self.mounted:
            with contextlib.suppress(Exception):
                self.umount()
        force_cleanup(self.dir, self.rootfs)
        self.mounted = False


def leftovers(m: Mount) -> list[str]:
    """What is still there of a mount after umount: kernel mounts under its
    paths or its state dir, and the state dir itself."""
    paths = [str(m.dir), str(m.rootfs), str(state_dir(str(m.dir)))]
    left = [
        f"mount {target} ({fstype} from {source})"
        for target, fstype, source in kmount.mounts()
        if any(target == p or target.startswith(p + "/") or source.startswith(p + "/") for p in paths)
    ]
    if state_dir(str(m.dir)).exists():
        left.append(f"state dir {state_dir(str(m.dir))}")
    return left


# --------------------------------------------------------------------------
# Readers


@dataclass
class ReadTally:
    """What readers saw. ``syscall_seconds`` keeps every syscall's duration
    only when asked (for percentiles); the max is always kept."""

    reads: int = 0
    exact: int = 0
    eio: int = 0
    other_errors: dict[str, int] = field(default_factory=dict)
    wrong: int = 0
    wrong_samples: list[str] = field(default_factory=list)
    short_syscalls: int = 0  # a pread that returned less than asked, before the end (the loop went on)
    bytes_checked: int = 0
    whole_files: int = 0
    syscalls: int = 0
    overruns: int = 0
    overrun_samples: list[str] = field(default_factory=list)
    max_syscall_seconds: float = 0.0
    syscall_seconds: list[float] = field(default_factory=list)

    def add(self, other: ReadTally | dict[str, Any]) -> None:
        o = other if isinstance(other, ReadTally) else ReadTally(**other)
        for k in ("reads", "exact", "eio", "wrong", "short_syscalls", "bytes_checked", "whole_files", "syscalls", "overruns"):
            setattr(self, k, getattr(self, k) + getattr(o, k))
        for k, v in o.other_errors.items():
            self.other_errors[k] = self.other_errors.get(k, 0) + v
        self.wrong_samples = (self.wrong_samples + o.wrong_samples)[:20]
        self.overrun_samples = (self.overrun_samples + o.overrun_samples)[:20]
        self.max_syscall_seconds = max(self.max_syscall_seconds, o.max_syscall_seconds)
        self.syscall_seconds += o.syscall_seconds

    @property
    def errors(self) -> int:
        return self.eio + sum(self.other_errors.values())

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        times = sorted(d.pop("syscall_seconds"))
        if times:
            d["syscall_p50_seconds"] = times[len(times) // 2]
            d["syscall_p99_seconds"] = times[min(len(times) - 1, len(times) * 99 // 100)]
        return d


class _Timed:
    def __init__(self, tally: ReadTally, deadline: float, what: str, keep_times: bool) -> None:
        self.tally, self.deadline, self.what, self.keep = tally, deadline, what, keep_times

    def __enter__(self) -> None:
        self.t0 = time.monotonic()

    def __exit__(self, *exc: object) -> None:
        dt = time.monotonic() - self.t0
        t = self.tally
        t.syscalls += 1
        t.max_syscall_seconds = max(t.max_syscall_seconds, dt)
        if self.keep:
            t.syscall_seconds.append(dt)
        if dt > self.deadline:
            t.overruns += 1
            if len(t.overrun_samples) < 20:
                began = time.strftime("%H:%M:%S", time.localtime(time.time() - dt))
                t.overrun_samples.append(f"{self.what}: {dt:.1f}s from {began}")


def read_one(
    rootfs: str, source: str, rel: str, size: int, offset: int, length: int, tally: ReadTally,
    *, deadline: float, keep_times: bool = False,
) -> bool:  # fmt: skip
    """One checked read of ``rel`` [offset, offset+length); True if exact."""
    tally.reads += 1
    whole = offset == 0 and length >= size
    tally.whole_files += whole
    want = max(0, min(length, size - offset))
    path = os.path.join(rootfs, rel)
    got = 0
    try:
        with _Timed(tally, deadline, f"open {rel}", keep_times):
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            with open(os.path.join(source, rel), "rb") as src:
                src.seek(offset)
                expect = src.read(want)
            while got < want:
                n = min(want - got, 1 << 20)
                with _Timed(tally, deadline, f"pread {rel} @{offset + got}+{n}", keep_times):
                    data = os.pread(fd, n, offset + got)
                if data != expect[got : got + len(data)]:
                    bad = next(i for i in range(len(data)) if i >= len(expect) - got or data[i] != expect[got + i])
                    _wrong(tally, f"{rel} @{offset + got + bad}: byte differs (read {len(data)} at {offset + got})")
                    return False
                if not data:
                    _wrong(tally, f"{rel}: end of file at {offset + got}, expected {offset + want} (size {size})")
                    return False
                tally.short_syscalls += len(data) < n
                got += len(data)
                tally.bytes_checked += len(data)
            if whole:  # the end is where it should be
                with _Timed(tally, deadline, f"pread {rel} @eof", keep_times):
                    tail = os.pread(fd, 1, size)
                if tail:
                    _wrong(tally, f"{rel}: bytes past its size {size}")
                    return False
        finally:
            os.close(fd)
    except OSError as exc:
        if exc.errno == errno.EIO:
            tally.eio += 1
        else:
            name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
            tally.other_errors[name] = tally.other_errors.get(name, 0) + 1
        return False
    tally.exact += 1
    return True


def _wrong(tally: ReadTally, what: str) -> None:
    tally.wrong += 1
    if len(tally.wrong_samples) < 20:
        tally.wrong_samples.append(what)


def reader_loop(
    rootfs: str, source: str, files: list[tuple[str, int]], tally: ReadTally, *, seed: int,
    deadline: float, should_stop: Callable[[], bool], stop_on_error: bool = False,
    whole_share: float = 0.2, max_length: int = 1 << 20, keep_times: bool = False,
    on_read: Callable[[], None] | None = None,
) -> None:  # fmt: skip
    """Random reads until ``should_stop()`` (or the first error with ``stop_on_error``)."""
    rnd = random.Random(seed)
    while not should_stop():
        rel, size = rnd.choice(files)
        if rnd.random() < whole_share or size == 0:
            offset, length = 0, size
        else:
            offset = rnd.randrange(size)
            length = max(1, int(2 ** rnd.uniform(0, max_length.bit_length() - 1)))
        before = tally.errors
        read_one(rootfs, source, rel, size, offset, length, tally, deadline=deadline, keep_times=keep_times)
        if on_read is not None:
            on_read()
        if stop_on_error and tally.errors > before:
            return


def _process_main(
    rootfs: str, source: str, files: list[tuple[str, int]], threads: int, seed: int, deadline: float,
    stop_on_error: bool, stop: Any, counter: Any, min_reads: int, end_at: float, keep_times: bool,
    results: Any,
) -> None:  # fmt: skip
    """A child process: ``threads`` readers; their merged tally goes to ``results``."""
    tallies = [ReadTally() for _ in range(threads)]

    def should_stop() -> bool:
        return stop.is_set() or (time.time() >= end_at and counter.value >= min_reads)

    def count() -> None:
        with counter.get_lock():
            counter.value += 1

    def run(i: int) -> None:
        with contextlib.suppress(Exception):
            reader_loop(rootfs, source, files, tallies[i], seed=seed * 1000 + i, deadline=deadline,
                        should_stop=should_stop, stop_on_error=stop_on_error, keep_times=keep_times,
                        on_read=count)  # fmt: skip

    ts = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    total = ReadTally()
    for t in tallies:
        total.add(t)
    results.put(asdict(total))


class Workload:
    """Readers in ``processes`` child processes (``threads`` each) and
    ``threads`` threads here, until ``seconds`` have passed and ``min_reads``
    reads were made, or :meth:`stop`, or (``stop_on_error``) each reader's
    first error. :meth:`wait` returns the merged tally."""

    def __init__(
        self, rootfs: Path, image: SoakImage, *, processes: int, threads: int, seed: int, deadline: float,
        seconds: float = 1e9, min_reads: int = 0, stop_on_error: bool = False, keep_times: bool = False,
    ) -> None:  # fmt: skip
        ctx = multiprocessing.get_context("spawn")
        self.stop_event = ctx.Event()
        self.counter = ctx.Value("q", 0)
        self.results = ctx.Queue()
        end_at = time.time() + seconds
        self.end_at = end_at
        self.min_reads = min_reads
        args = (str(rootfs), str(image.merged), image.files, threads)
        self.procs = [
            ctx.Process(
                target=_process_main,
                args=(*args, seed + p, deadline, stop_on_error, self.stop_event, self.counter, min_reads,
                      end_at, keep_times, self.results),
                daemon=True,
            )
            for p in range(processes)
        ]
        self.tallies = [ReadTally() for _ in range(threads)]
        self.threads = [
            threading.Thread(
                target=self._thread_main,
                args=(str(rootfs), str(image.merged), image.files, i, seed, deadline, stop_on_error, keep_times),
                daemon=True,
            )
            for i in range(threads)
        ]
        self.started = time.monotonic()

    def _should_stop(self) -> bool:
        return self.stop_event.is_set() or (time.time() >= self.end_at and self.counter.value >= self.min_reads)

    def _count(self) -> None:
        with self.counter.get_lock():
            self.counter.value += 1

    def _thread_main(self, rootfs: str, source: str, files: list[tuple[str, int]], i: int, seed: int,
                     deadline: float, stop_on_error: bool, keep_times: bool) -> None:  # fmt: skip
        reader_loop(rootfs, source, files, self.tallies[i], seed=seed * 7919 + i, deadline=deadline,
                    should_stop=self._should_stop, stop_on_error=stop_on_error, keep_times=keep_times,
                    on_read=self._count)  # fmt: skip

    def start(self) -> Workload:
        for p in self.procs:
            p.start()
        for t in self.threads:
            t.start()
        self.started = time.monotonic()
        return self

    @property
    def reads(self) -> int:
        return int(self.counter.value)

    def stop(self) -> None:
        self.stop_event.set()

    def wait(self, timeout: float) -> tuple[ReadTally, bool]:
        """(merged tally, finished in time). Stragglers are killed after
        ``timeout`` (threads cannot be: they are reported as not finished)."""
        deadline = time.monotonic() + timeout
        total = ReadTally()
        pending = len(self.procs)
        finished = True
        while pending:
            try:
                total.add(self.results.get(timeout=0.5))
                pending -= 1
                continue
            except queue.Empty:
                pass
            # A child that died without reporting (or a hang) ends the wait.
            if time.monotonic() >= deadline or not any(p.is_alive() for p in self.procs):
                finished = False
                break
        for p in self.procs:
            p.join(max(0.0, deadline - time.monotonic()) if finished else 0.1)
            if p.is_alive():
                finished = False
                p.kill()
                p.join(5)
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
            finished = finished and not t.is_alive()
        for t in self.tallies:
            total.add(t)
        return total, finished


def read_everything(rootfs: Path, image: SoakImage, *, deadline: float) -> ReadTally:
    """Every file of the image read whole, in order, each byte checked."""
    tally = ReadTally()
    for rel, size in image.files:
        read_one(str(rootfs), str(image.merged), rel, size, 0, size, tally, deadline=deadline)
    return tally


@contextlib.contextmanager
def periodic(every: float, fn: Callable[[], None]) -> Iterator[None]:
    """Call ``fn`` every ``every`` seconds in a thread while the block runs."""
    done = threading.Event()

    def loop() -> None:
        while not done.wait(every):
            with contextlib.suppress(Exception):
                fn()

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    try:
        yield
    finally:
        done.set()
        t.join(30)


def _loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def deadline_of(read_timeout: float) -> float:
    """The deadline of one syscall, see :func:`deadline_note`."""
    return 6 * read_timeout + 10


def deadline_note(read_timeout: float) -> str:
    return (
        f"one syscall (open or pread) may take at most 6 x --read-timeout + 10 s = {deadline_of(read_timeout):g} s. "
        "The daemon bounds each FUSE read by --read-timeout, but the kernel chains several of them for one "
        "syscall: a failed readahead is retried synchronously, at the EROFS file's page cache and again at "
        "the FUSE layer file's, and a read spanning several extents meets each in turn. Measured with every "
        "fetch failing (all blob requests stalled or trickled, --read-timeout 3): one pread of up to 1 MiB "
        "through the rootfs waited for up to 6 daemon reads in series (18 s), a pread of the layer file "
        "itself for 2 (6 s). 10 s covers queueing behind the other readers on a loaded 2-core machine"
    )


# --------------------------------------------------------------------------
# Part 2: the fault soak


def run_soak(
    registry: LocalRegistry, image: SoakImage, work: Path, *, seconds: float, min_reads: int,
    processes: int = 3, threads: int = 3, read_timeout: float = 4.0, warmup: float = 30.0,
    drop_every: float = 5.0, cache_size: str = "4MiB", memory_cache: str = "1MiB",
    faults: dict[str, float] | None = None, seed: int = 2,
) -> dict[str, Any]:  # fmt: skip
    """Readers under fault injection for ``seconds`` and ``min_reads``, then
    with faults cleared every file whole. Returns counts and RSS samples."""
    faults = SOAK_FAULTS if faults is None else faults
    deadline = deadline_of(read_timeout)
    cache = work / "soak-cache"
    result: dict[str, Any] = {
        "read_timeout_s": read_timeout, "deadline_s": deadline, "deadline_rule": deadline_note(read_timeout),
        "processes": processes, "threads_per_process": threads, "threads_in_parent": threads,
        "cache_size": cache_size, "memory_cache": memory_cache, "drop_caches_every_s": drop_every,
        "fault_probability": faults, "image_files": len(image.files), "image_bytes": image.total_bytes,
        "chunk": image.chunk, "load_start": _loadavg(),
    }  # fmt: skip
    with NetProxy(registry.url, seed=seed) as proxy:
        proxy.stall_seconds = read_timeout * 3
        args = ("--read-timeout", f"{read_timeout:g}", "--timeout", f"{max(1.0, read_timeout / 2):g}",
                "--retries", "3", "--cache-size", cache_size, "--memory-cache", memory_cache)  # fmt: skip
        m = Mount(image.ref(proxy.host), work, "soak", cache_dir=cache, args=args)
        try:
            m.open()
            pid = m.pid
            rules = {kind: proxy.add_fault(kind, probability=p, path=BLOBS) for kind, p in faults.items()}
            samples: list[tuple[float, int]] = []
            t0 = time.monotonic()

            def sample() -> None:
                rss = rss_of(pid)
                if rss is not None:
                    samples.append((time.monotonic() - t0, rss))

            log(f"soak: {seconds:g}s, >= {min_reads} reads, {processes}x{threads} + {threads} readers, deadline {deadline:g}s")
            work_load = Workload(m.rootfs, image, processes=processes, threads=threads, seed=seed,
                                 deadline=deadline, seconds=seconds, min_reads=min_reads, keep_times=True)  # fmt: skip
            progress_at = [time.monotonic()]

            def progress() -> None:
                sample()
                if time.monotonic() - progress_at[0] >= 60:
                    progress_at[0] = time.monotonic()
                    fired = {k: r.fired for k, r in rules.items()}
                    log(f"soak: {time.monotonic() - t0:.0f}s, {work_load.reads} reads, rss {samples[-1][1] >> 20} MiB, faults {fired}")

            with periodic(drop_every, drop_caches), periodic(2.0, progress):
                sample()
                work_load.start()
                # A hard cap: min_reads must not keep a slow machine busy for ever.
                tally, finished = work_load.wait(timeout=max(seconds * 3, seconds + 600))
            sample()
            elapsed = time.monotonic() - t0
            result["faults_injected"] = {k: r.fired for k, r in rules.items()}
            proxy.clear_faults()
            result["proxy_requests"] = proxy.requests
            result["seconds"] = round(elapsed, 1)
            result["readers_finished"] = finished
            result["reads"] = tally.summary()
            after = [rss for t, rss in samples if t >= warmup] or [rss for _, rss in samples]
            window = max(1, len(after) // 10)  # mean of the first and last tenth of the samples
            rss_start = sum(after[:window]) // window
            rss_end = sum(after[-window:]) // window
            result["rss"] = {
                "warmup_s": warmup, "samples": len(samples), "start": rss_start, "end": rss_end,
                "max": max(after), "min": min(after),
                "growth_pct": round(100 * (rss_end - rss_start) / rss_start, 1),
                "how": "VmRSS of the daemon every 2 s; start = mean of the first tenth of the samples "
                       "after warm-up, end = mean of the last tenth",
            }  # fmt: skip
            result["stats_during"] = _counters(m.stats())
            # Faults stop: every file must now read exactly.
            time.sleep(0.5)
            drop_caches()
            final = read_everything(m.rootfs, image, deadline=deadline)
            result["after_faults"] = final.summary()
            result["stats_end"] = _counters(m.stats())
        finally:
            result.update(m.take_down())
    result["load_end"] = _loadavg()
    return result


def _counters(stats: dict[str, Any]) -> dict[str, Any]:
    keys = ("bytes_fetched", "requests", "frames_fetched", "cache_hits", "cache_misses", "verify_failures", "read_errors")
    out = {k: stats.get(k) for k in keys}
    cache = stats.get("cache") or {}
    for k in ("evictions", "write_failures", "damaged", "puts"):
        if k in cache:
            out[f"cache_{k}"] = cache[k]
    return out


# --------------------------------------------------------------------------
# Part 3: crashes


def run_crashes(
    registry: LocalRegistry, image: SoakImage, work: Path, *, iterations: int, processes: int = 2,
    threads: int = 2, read_timeout: float = 5.0, cache_size: str = "8MiB", mbit: float = 200.0,
    hang_after: float = 60.0, seed: int = 3,
) -> dict[str, Any]:  # fmt: skip
    """``iterations`` times: mount, start readers, SIGKILL the daemon at a
    random moment, time the readers' end, umount, look for leftovers. The
    cache is shared by every iteration (and small, so entries keep being
    written and evicted, also at the kill). Then two mounts with a full
    budget read everything: the second must fetch nothing."""
    deadline = deadline_of(read_timeout)
    cache = work / "crash-cache"
    rnd = random.Random(seed)
    kill_to_end: list[float] = []
    hangs = 0
    leftover_list: list[str] = []
    umount_failures: list[str] = []
    tally = ReadTally()
    log(f"crashes: {iterations} iterations, {processes}x{threads} + {threads} readers")
    with NetProxy(registry.url, bandwidth_bps=mbit * 1e6) as proxy:
        args = ("--read-timeout", f"{read_timeout:g}", "--cache-size", cache_size, "--memory-cache", "1MiB")
        for it in range(iterations):
            m = Mount(image.ref(proxy.host), work, f"crash{it % 2}", cache_dir=cache, args=args)
            try:
                m.open()
                pid = m.pid
                drop_caches()
                wl = Workload(m.rootfs, image, processes=processes, threads=threads, seed=seed * 100 + it,
                              deadline=deadline, stop_on_error=True).start()  # fmt: skip
                time.sleep(rnd.uniform(0.3, 2.0))
                killed = time.monotonic()
                os.kill(pid, signal.SIGKILL)
                # Pages already read stay readable from the page cache after the
                # daemon is gone (as they should); drop them so every reader must
                # go through the dead mount: it has to fail, promptly.
                drop_caches()
                got, finished = wl.wait(timeout=hang_after)
                kill_to_end.append(time.monotonic() - killed)
                hangs += not finished
                tally.add(got)
                proc = m.umount()
                if proc.returncode != 0:
                    umount_failures.append(f"iteration {it}: {proc.stderr.strip()[-300:]}")
                left = leftovers(m)
                leftover_list += [f"iteration {it}: {x}" for x in left]
            finally:
                m.close()
            if (it + 1) % 10 == 0:
                log(f"crashes: {it + 1}/{iterations}, kill-to-end max {max(kill_to_end):.2f}s, reads {tally.reads}, wrong {tally.wrong}")
        cache_check = _check_cache(cache)
        # Reuse: a mount with room for everything reads it all; the next fetches 0 bytes.
        reuse: dict[str, Any] = {}
        big = ("--read-timeout", f"{read_timeout:g}", "--cache-size", "1GiB")
        for name in ("reuse-a", "reuse-b"):
            m = Mount(image.ref(proxy.host), work, name, cache_dir=cache, args=big)
            try:
                m.open()
                drop_caches()
                t = read_everything(m.rootfs, image, deadline=deadline)
                tally.add(t)
                reuse[name] = {"reads": t.reads, "exact": t.exact, "wrong": t.wrong, "eio": t.eio,
                               **_counters(m.stats())}  # fmt: skip
            finally:
                m.close()
    times = sorted(kill_to_end)
    return {
        "iterations": iterations, "read_timeout_s": read_timeout, "deadline_s": deadline,
        "readers": f"{processes} processes x {threads} threads + {threads} threads, each stops at its first error",
        "kill_to_end_s": {"max": round(times[-1], 3), "p50": round(times[len(times) // 2], 3),
                          "min": round(times[0], 3)} if times else {},
        "hangs": hangs, "hang_after_s": hang_after, "reads": tally.summary(),
        "leftovers": leftover_list, "umount_failures": umount_failures,
        "cache_check": cache_check, "reuse": reuse,
    }  # fmt: skip


def _check_cache(cache: Path) -> dict[str, Any]:
    """Re-hash every cache entry (``ChunkCache.verify``): a torn entry left
    by a kill would be counted damaged. Also count leftover temp files."""
    from cache import ChunkCache

    tmp = cache / "tmp"
    tmp_files = sum(1 for _ in tmp.iterdir()) if tmp.is_dir() else 0
    with ChunkCache(cache, max_bytes=1 << 40, memory_bytes=0) as c:
        entries = len(c.entries())
        damaged = c.verify()
    return {"entries": entries, "damaged": damaged, "tmp_files": tmp_files}


def _scenario_readers(m: Mount, image: SoakImage, deadline: float, seed: int) -> Workload:
    return Workload(m.rootfs, image, processes=2, threads=2, seed=seed, deadline=deadline).start()


def run_cache_deleted(registry: LocalRegistry, image: SoakImage, work: Path, *, seconds: float = 10,
                      read_timeout: float = 5.0) -> dict[str, Any]:  # fmt: skip
    """Delete the cache directory under a live mount while readers run; the
    reads stay exact or EIO, and afterwards everything reads exactly."""
    deadline = deadline_of(read_timeout)
    cache = work / "deleted-cache"
    m = Mount(image.ref(registry.host), work, "deleted", cache_dir=cache,
              args=("--read-timeout", f"{read_timeout:g}", "--memory-cache", "1MiB"))  # fmt: skip
    try:
        m.open()
        read_everything(m.rootfs, image, deadline=deadline)  # fill the cache
        drop_caches()
        wl = _scenario_readers(m, image, deadline, 41)
        time.sleep(seconds / 2)
        # The daemon keeps writing entries while we delete: go on until it is gone.
        for _ in range(100):
            shutil.rmtree(cache, ignore_errors=True)
            if not cache.exists():
                break
        with periodic(1.0, drop_caches):
            time.sleep(seconds / 2)
        wl.stop()
        during, finished = wl.wait(60)
        drop_caches()
        after = read_everything(m.rootfs, image, deadline=deadline)
        stats = _counters(m.stats())
    finally:
        down = m.take_down()
    return {"during": during.summary(), "readers_finished": finished, "after": after.summary(), "stats": stats,
            **down}  # fmt: skip


def run_cache_filled(registry: LocalRegistry, image: SoakImage, work: Path, *, read_timeout: float = 5.0) -> dict[str, Any]:
    """The cache's file system fills up under a live mount (a small tmpfs
    and a file grown until ENOSPC): reads stay exact; after the space comes
    back, still exact."""
    deadline = deadline_of(read_timeout)
    fs = work / "filled-fs"
    fs.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,mode=0700", "tmpfs", str(fs)], check=True)
    m = Mount(image.ref(registry.host), work, "filled", cache_dir=fs / "cache",
              args=("--read-timeout", f"{read_timeout:g}", "--memory-cache", "1MiB"))  # fmt: skip
    try:
        m.open()
        half = image.files[: len(image.files) // 2]
        t1 = ReadTally()
        for rel, size in half:
            read_one(str(m.rootfs), str(image.merged), rel, size, 0, size, t1, deadline=deadline)
        with open(fs / "filler", "wb") as f, contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * (1 << 20))
        drop_caches()
        full = read_everything(m.rootfs, image, deadline=deadline)
        (fs / "filler").unlink()
        drop_caches()
        after = read_everything(m.rootfs, image, deadline=deadline)
        stats = _counters(m.stats())
    finally:
        down = m.take_down()
        subprocess.run(["umount", "-l", str(fs)], check=False)
    return {"before": t1.summary(), "while_full": full.summary(), "after": after.summary(), "stats": stats,
            **down}  # fmt: skip


def run_registry_restart(registry: LocalRegistry, image: SoakImage, work: Path, *, down: float = 3.0,
                         read_timeout: float = 5.0) -> dict[str, Any]:  # fmt: skip
    """Stop and restart the registry (same port and storage) while readers
    run on a cold cache: reads exact or EIO, then everything exact."""
    deadline = deadline_of(read_timeout)
    cache = work / "restart-cache"
    m = Mount(image.ref(registry.host), work, "restart", cache_dir=cache,
              args=("--read-timeout", f"{read_timeout:g}", "--cache-size", "4MiB", "--memory-cache", "1MiB"))  # fmt: skip
    try:
        m.open()
        with periodic(1.0, drop_caches):
            wl = _scenario_readers(m, image, deadline, 43)
            time.sleep(2.0)
            registry.stop()
            stopped = time.monotonic()
            try:
                time.sleep(down)
            finally:
                registry.start()
            down_for = time.monotonic() - stopped
            time.sleep(3.0)
            wl.stop()
            during, finished = wl.wait(60)
        drop_caches()
        after = read_everything(m.rootfs, image, deadline=deadline)
        stats = _counters(m.stats())
    finally:
        down = m.take_down()
    return {"down_s": round(down_for, 1), "during": during.summary(), "readers_finished": finished,
            "after": after.summary(), "stats": stats, **down}  # fmt: skip


def run_trickle(registry: LocalRegistry, image: SoakImage, work: Path, *, read_timeout: float = 3.0) -> dict[str, Any]:
    """One blob request answered at 1 byte/s, then the network heals: are
    the frames of that request readable again?

    Mounts without a rootfs (so nothing but each layer's first frame is
    fetched at mount) and reads ``layers/1/layer.erofs`` directly, 4 KiB at
    frame 2's start: the first read meets the trickle (every blob request
    trickles then); three more follow after the rule is cleared.
    """
    with NetProxy(registry.url) as proxy:
        m = Mount(image.ref(proxy.host), work, "trickle", cache_dir=work / "trickle-cache",
                  args=("--read-timeout", f"{read_timeout:g}"), rootfs=False)  # fmt: skip
        attempts: list[dict[str, Any]] = []
        try:
            m.open()
            offset = 2 * (256 << 10)
            rule = proxy.add_fault("trickle", path=BLOBS)
            fd = os.open(m.dir / "layers" / "1" / "layer.erofs", os.O_RDONLY | os.O_CLOEXEC)
            try:
                healed_at = None
                for i in range(8):
                    if i > 0 and healed_at is None:
                        healed_at = time.monotonic()
                    before = proxy.requests
                    t0 = time.monotonic()
                    try:
                        outcome = f"{len(os.pread(fd, 4096, offset))} bytes"
                    except OSError as exc:
                        outcome = errno.errorcode.get(exc.errno or 0, str(exc.errno))
                    attempts.append({"healed": i > 0, "outcome": outcome, "seconds": round(time.monotonic() - t0, 1),
                                     "since_healed": round(time.monotonic() - healed_at, 1) if healed_at else None,
                                     "requests_sent": proxy.requests - before})  # fmt: skip
                    if i >= 3 and all(a["outcome"].endswith("bytes") for a in attempts[-2:]):
                        break
                    if i == 0:
                        proxy.clear_faults()
            finally:
                os.close(fd)
            fired = rule.fired
        finally:
            down = m.take_down()
    healed = [a for a in attempts if a["healed"]]
    ok = [a["outcome"].endswith("bytes") for a in healed]
    # Recovered: once a read succeeds after the network healed, every later one does
    # (the request that met the trickle may still be in flight for a while: it is
    # given up by the client's low-speed limit, then retried).
    first_ok = ok.index(True) if True in ok else None
    return {"fired": fired, "attempts": attempts, "read_timeout_s": read_timeout,
            "recovered": first_ok is not None and all(ok[first_ok:]),
            "recovered_after_s": healed[first_ok]["since_healed"] if first_ok is not None else None,
            **down}  # fmt: skip


# --------------------------------------------------------------------------
# Part 3: the clock jumping (under libfaketime, the machine's clock untouched)

# Where Debian's package ``faketime`` (libfaketime 0.9.10) puts the library;
# the MT build because the daemon has threads (hashing, zstd, disk I/O).
FAKETIME_GLOBS = (
    "/usr/lib/*/faketime/libfaketimeMT.so.1",
    "/usr/lib/faketime/libfaketimeMT.so.1",
    "/usr/local/lib/faketime/libfaketimeMT.so.1",
)
DAY = 86400.0
# The default plan: a mount whose wall clock alone jumps (true monotonic
# clock), and a mount whose wall and monotonic clocks jump forward together.
CLOCK_PLAN: dict[str, list[float]] = {"wall": [0.0, DAY, -DAY, 0.0], "both": [DAY, 2 * DAY]}


def faketime_library() -> str | None:
    """libfaketime's thread-safe build, if installed (Debian: ``faketime``)."""
    for pattern in FAKETIME_GLOBS:
        for path in sorted(glob.glob(pattern)):
            return path
    return None


class FakeClock:
    """The clock one daemon sees, moved while it runs; the machine's clock is
    never touched (other jobs share it).

    libfaketime is preloaded (``LD_PRELOAD``) into ``lazyerofs mount``, so its
    forked daemon has it too. The offset from the true time lives in a file
    the library rereads at every clock reading (``FAKETIME_TIMESTAMP_FILE``
    with ``FAKETIME_NO_CACHE=1``). With ``monotonic=False`` CLOCK_MONOTONIC
    is left alone (``FAKETIME_DONT_FAKE_MONOTONIC``): only the wall clock
    jumps, as under an NTP step or ``date -s``. With ``monotonic=True``
    libfaketime 0.9.10 reports CLOCK_MONOTONIC as the faked wall time, so
    both jump together; only forward moves of that are real-world (a VM
    resumed after a long pause): the kernel's monotonic clock never goes back.
    """

    def __init__(self, path: Path, library: str, *, monotonic: bool) -> None:
        self.path, self.library, self.monotonic = path, library, monotonic
        self.offset = 0.0
        self.set(0.0)

    def set(self, offset: float) -> None:
        # Written aside and renamed: the daemon reads the file at every clock
        # reading and must never see it empty or half written.
        tmp = self.path.with_name(self.path.name + ".new")
        tmp.write_text(f"{offset:+.0f}\n")
        os.replace(tmp, self.path)
        self.offset = offset

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["LD_PRELOAD"] = " ".join(x for x in (self.library, env.get("LD_PRELOAD", "")) if x)
        env["FAKETIME_TIMESTAMP_FILE"] = str(self.path)
        env["FAKETIME_NO_CACHE"] = "1"
        env.pop("FAKETIME", None)  # it would win over the file
        if not self.monotonic:
            env["FAKETIME_DONT_FAKE_MONOTONIC"] = "1"
            # Python's GIL waits (pthread_cond_timedwait) on a CLOCK_MONOTONIC
            # condition. libfaketime 0.9.10 measures that deadline against its
            # faked clock even when it leaves CLOCK_MONOTONIC alone, so every
            # wait ends at once and the daemon's threads thrash for the GIL
            # (reads 20-40x slower, some past --read-timeout with no jump at
            # all). A fixed wait of 5 ms, Python's own switch interval, instead.
            env["FAKETIME_WAIT_MS"] = "5"
        return env


def _faketime_shm() -> set[str]:
    return set(glob.glob("/dev/shm/faketime_shm_*") + glob.glob("/dev/shm/sem.faketime_sem_*"))


def remove_faketime_leftovers(before: set[str]) -> list[str]:
    """libfaketime makes a semaphore and a shared memory object named after
    the pid of each process that starts with it and removes them at exit,
    which ``lazyerofs mount`` (``os._exit`` once its daemon is ready) never
    reaches. Remove those made since ``before`` whose process is gone."""
    removed = []
    for path in sorted(_faketime_shm() - before):
        pid = path.rsplit("_", 1)[-1]
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            with contextlib.suppress(OSError):
                os.unlink(path)
                removed.append(path)
    return removed


def seen_offset(cache: Path) -> float | None:
    """The wall-clock offset of the daemon at its last cache write or touch:
    it stamps entries with its own clock (mtime), the kernel stamps the change
    with the true one (ctime). None when it has written nothing."""
    newest: os.stat_result | None = None
    for p in (cache / "chunks").rglob("*"):
        with contextlib.suppress(OSError):
            st = p.stat()
            if p.is_file() and (newest is None or st.st_ctime_ns > newest.st_ctime_ns):
                newest = st
    return None if newest is None else round((newest.st_mtime_ns - newest.st_ctime_ns) / 1e9)


def stat_snapshot(m: Mount, image: SoakImage) -> dict[str, Any]:
    """What ``stat`` says of every rootfs file and every FUSE file of the mount."""
    out: dict[str, Any] = {}
    paths = [m.rootfs / rel for rel, _ in image.files]
    paths += sorted(p for p in m.dir.glob("layers/*/*") if p.name != "stats.json")
    paths.append(m.dir / "manifest.json")
    for p in paths:
        try:
            st = os.stat(p)
            out[str(p)] = [st.st_mode, st.st_size, st.st_uid, st.st_gid, st.st_nlink, st.st_ino,
                           st.st_mtime_ns, st.st_ctime_ns, st.st_atime_ns]  # fmt: skip
        except OSError as exc:
            out[str(p)] = f"error {errno.errorcode.get(exc.errno or 0, exc.errno)}"
    return out


_STAT_FIELDS = ("mode", "size", "uid", "gid", "nlink", "ino", "mtime_ns", "ctime_ns", "atime_ns")


def _stat_change(path: str, before: Any, after: Any) -> str:
    if isinstance(before, list) and isinstance(after, list):
        diff = [f"{n} {a} -> {b}" for n, a, b in zip(_STAT_FIELDS, before, after, strict=True) if a != b]
        return f"{path}: {', '.join(diff)}"
    return f"{path}: {before} -> {after}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as f:
        return f.read().split(") ")[-1][:1] not in ("Z", "X")
    return False


def run_clock_jump(
    registry_host: str, image: SoakImage, work: Path, *, library: str,
    plan: dict[str, list[float]] | None = None, seconds: float = 10.0, lead: float = 1.5,
    read_timeout: float = 3.0, cache_size: str = "4MiB", tokens_issued: Callable[[], int] | None = None,
    seed: int = 47,
) -> dict[str, Any]:  # fmt: skip
    """Each mount of ``plan`` ("wall": only the wall clock moves; "both":
    wall and monotonic together) runs under libfaketime; for each offset of
    its list, readers run, ``lead`` seconds later the daemon's clock jumps to
    that offset from the true time, and ``seconds`` later the readers stop.
    After each jump: is the daemon alive, does every file read whole and
    exact, is every ``stat`` as before the first jump, how many registry
    tokens were handed out so far (``tokens_issued``), and what offset the
    daemon's own clock showed (:func:`seen_offset`)."""
    plan = CLOCK_PLAN if plan is None else plan
    deadline = deadline_of(read_timeout)
    out: dict[str, Any] = {"read_timeout_s": read_timeout, "deadline_s": deadline, "library": library,
                           "phase_seconds": seconds, "lead_seconds": lead, "mounts": {}}  # fmt: skip
    for kind, offsets in plan.items():
        clock = FakeClock(work / f"clock-{kind}.rc", library, monotonic=kind == "both")
        cache = work / f"clock-{kind}-cache"
        m = Mount(f"{registry_host}/{image.repo}", work, f"clock-{kind}", cache_dir=cache, env=clock.env(),
                  args=("--read-timeout", f"{read_timeout:g}", "--timeout", f"{max(1.0, read_timeout / 2):g}",
                        "--cache-size", cache_size, "--memory-cache", "1MiB", "--no-prefetch",
                        # In the daemon's own process: under libfaketime 0.9.10 a forked fetch
                        # worker kept stamping entries with the first offset after the file
                        # changed again, so the stamps below would measure the harness.
                        "--fetch-workers", "0"))  # fmt: skip
        res: dict[str, Any] = {
            "clock": "wall clock (CLOCK_REALTIME) only; CLOCK_MONOTONIC true" if kind == "wall"
            else "wall clock and CLOCK_MONOTONIC together",
            "jumps": [],
        }  # fmt: skip
        shm_before = _faketime_shm()
        try:
            m.open()
            pid = m.pid
            with open(f"/proc/{pid}/maps") as f:
                res["preloaded"] = library in f.read()
            baseline = stat_snapshot(m, image)
            res["tokens_at_mount"] = tokens_issued() if tokens_issued else None
            for i, offset in enumerate(offsets):
                before = clock.offset
                log(f"clock {kind}: {before:+.0f} s -> {offset:+.0f} s under readers")
                counted = _counters(m.stats())
                wl = _scenario_readers(m, image, deadline, seed + 10 * i)
                with periodic(1.0, drop_caches):
                    time.sleep(lead)
                    clock.set(offset)
                    time.sleep(seconds)
                    wl.stop()
                    during, finished = wl.wait(60)
                alive = _alive(pid)
                if alive:  # what the readers made the daemon fetch, the jump in the middle
                    now_counted = _counters(m.stats())
                    fetched = {k: (now_counted[k] or 0) - (counted[k] or 0)
                               for k in ("requests", "frames_fetched", "bytes_fetched", "read_errors")}  # fmt: skip
                drop_caches()
                after = read_everything(m.rootfs, image, deadline=deadline)
                now = stat_snapshot(m, image)
                changed = [_stat_change(k, baseline[k], now.get(k)) for k in sorted(baseline) if now.get(k) != baseline[k]]
                res["jumps"].append({
                    "from_s": before, "to_s": offset, "jump_s": offset - before,
                    "during": during.summary(), "readers_finished": finished, "alive": alive,
                    "daemon_during": fetched if alive else None,
                    "after": after.summary(), "stat_changed": changed[:10], "stat_changed_count": len(changed),
                    "seen_offset_s": seen_offset(cache),
                    "tokens_issued": tokens_issued() if tokens_issued else None,
                    "stats": _counters(m.stats()) if alive else None,
                })  # fmt: skip
                if not alive:
                    break
        finally:
            res.update(m.take_down())
            remove_faketime_leftovers(shm_before)
        out["mounts"][kind] = res
    return out
