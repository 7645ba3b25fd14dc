"""The fuzz loop: mutate seeds, run a target, judge the outcome, keep what is new.

Verdicts per input:

* a :class:`~lazyfs.errors.LazyErofsError` (or a clean return) is a pass;
* any other exception is a finding (``exception``);
* wall time over ``deadline`` is a finding (``deadline``); an input that
  never returns is caught by the parent (``hang``, see :func:`run_isolated`),
  which watches a heartbeat in shared memory and holds the input being run;
* an input that raises the process's peak RSS by more than ``mem_bound``
  bytes is a finding (``memory``); ``RLIMIT_AS`` turns a real blow-up into a
  MemoryError (also a finding) instead of the OOM killer.

Guidance, kept cheap so the rate stays high: an input is added to the corpus
when its outcome is new (the project's error messages name the check that
failed, so their shape, digits stripped, says which branch refused it), or,
on one input in ``trace_every``, when a line tracer sees a line pair of
lazyfs (or the stdlib parser it drives) that no input reached before.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import multiprocessing as mp
import os
import random
import re
import resource
import struct
import sys
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing import shared_memory
from typing import Any

from lazyfs.errors import LazyErofsError

from .targets import TARGETS, Target

__all__ = ["DEFAULT_DEADLINE", "DEFAULT_MEM_BOUND", "fuzz_loop", "run_isolated"]

DEFAULT_DEADLINE = 1.0  # seconds per input
DEFAULT_HARD_DEADLINE = 20.0  # the parent kills a worker whose heartbeat stopped this long
DEFAULT_MEM_BOUND = 128 << 20  # peak-RSS growth one input may cause
ADDRESS_SPACE_HEADROOM = 3 << 30  # RLIMIT_AS above the worker's size at start
MAX_CORPUS = 4000
MAX_SAVED_INPUT = 1 << 16  # bytes of a finding's input kept in the report (base64)
_SHM_HEAD = struct.Struct("<QI")  # heartbeat counter, input length
_SHM_SIZE = _SHM_HEAD.size + (4 << 20)

_NUM_RE = re.compile(r"0x[0-9a-f]+|\d+|'[^']*'|\"[^\"]*\"|[0-9a-f]{16,}")
_HERE = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_TRACED = (os.path.join(_HERE, "lazyfs"), "tarfile.py", "json/decoder.py", "ipaddress.py")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class Finding:
    kind: str  # exception | deadline | memory | hang
    target: str
    exc_type: str
    message: str
    where: str
    input_len: int
    input_sha256: str
    input_b64: str
    seconds: float = 0.0
    count: int = 1

    @property
    def key(self) -> tuple[str, str, str, str]:
        return (self.target, self.kind, self.exc_type, self.where)

    @classmethod
    def make(cls, kind: str, target: str, data: bytes, exc: BaseException | None, **kw: Any) -> Finding:
        where = ""
        if exc is not None:
            tb = traceback.extract_tb(exc.__traceback__)
            if tb:
                last = tb[-1]
                where = f"{os.path.relpath(last.filename, _HERE)}:{last.lineno} in {last.name}"
        return cls(
            kind=kind, target=target,
            exc_type=type(exc).__name__ if exc is not None else "",
            message=str(exc)[:300] if exc is not None else kw.pop("message", ""),
            where=where or kw.pop("where", ""), input_len=len(data),
            input_sha256=hashlib.sha256(data).hexdigest(),
            input_b64=base64.b64encode(data[:MAX_SAVED_INPUT]).decode(), **kw,
        )  # fmt: skip

    def input(self) -> bytes:
        return base64.b64decode(self.input_b64)


@dataclass
class Stats:
    target: str
    inputs: int = 0
    seconds: float = 0.0
    passed: int = 0  # parsed without error
    refused: dict[str, int] = field(default_factory=dict)  # project error class -> count
    findings: list[Finding] = field(default_factory=list)
    corpus: int = 0
    lines: int = 0  # distinct traced line pairs
    slowest: float = 0.0
    rss_start: int = 0
    rss_end: int = 0
    peak_rss: int = 0
    max_peak_growth: int = 0  # largest peak-RSS rise one input caused
    workers: int = 1

    def add_finding(self, f: Finding) -> None:
        for old in self.findings:
            if old.key == f.key:
                old.count += f.count
                return
        self.findings.append(f)

    def merge(self, other: Stats) -> None:
        self.inputs += other.inputs
        self.seconds += other.seconds
        self.passed += other.passed
        for k, v in other.refused.items():
            self.refused[k] = self.refused.get(k, 0) + v
        for f in other.findings:
            self.add_finding(f)
        self.corpus = max(self.corpus, other.corpus)
        self.lines = max(self.lines, other.lines)
        self.slowest = max(self.slowest, other.slowest)
        self.rss_start = self.rss_start or other.rss_start
        self.rss_end = other.rss_end or self.rss_end
        self.peak_rss = max(self.peak_rss, other.peak_rss)
        self.max_peak_growth = max(self.max_peak_growth, other.max_peak_growth)
        self.workers += other.workers

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["findings"] = [f.__dict__ for f in self.findings]
        d["rate"] = round(self.inputs / self.seconds) if self.seconds else 0
        return d


class _Tracer:
    """Line-pair coverage of the traced files, for sampled inputs only."""

    def __init__(self) -> None:
        self.seen: set[tuple[str, int, int]] = set()
        self.new = 0
        self._prev: dict[int, int] = {}

    def _local(self, frame: Any, event: str, arg: Any) -> Any:
        if event == "line":
            code = frame.f_code
            key = (code.co_filename, self._prev.get(id(frame), 0), frame.f_lineno)
            if key not in self.seen:
                self.seen.add(key)
                self.new += 1
            self._prev[id(frame)] = frame.f_lineno
        return self._local

    def _global(self, frame: Any, event: str, arg: Any) -> Any:
        name = frame.f_code.co_filename
        if name.startswith(_TRACED[0]) or name.endswith(_TRACED[1:]):
            return self._local
        return None

    def run(self, fn: Any, data: bytes) -> int:
        self.new = 0
        self._prev.clear()
        sys.settrace(self._global)
        try:
            fn(data)
        finally:
            sys.settrace(None)
        return self.new


def _outcome(exc: BaseException | None) -> str:
    if exc is None:
        return "ok"
    return type(exc).__name__ + ":" + _NUM_RE.sub("#", str(exc))[:160]


def fuzz_loop(
    target: Target,
    *,
    inputs: int,
    seconds: float,
    seed: int = 0,
    deadline: float = DEFAULT_DEADLINE,
    mem_bound: int = DEFAULT_MEM_BOUND,
    trace_every: int = 32,
    shm: memoryview | None = None,
) -> Stats:
    """Run ``target`` on up to ``inputs`` inputs or for ``seconds``, whichever ends first.

    The seeds run first, unmutated. ``shm`` (the parent's heartbeat area)
    gets the input before it runs and the count after.
    """
    logging.disable(logging.WARNING)  # refusals are counted; their log lines would drown the report
    rng = random.Random(seed)
    stats = Stats(target.name, rss_start=_rss())
    seeds = [s[: target.max_len] for s in target.seeds()]
    corpus: list[bytes] = list(seeds)
    outcomes: set[str] = set()
    tracer = _Tracer()
    run = target.run
    mutate = target.mutator
    start = time.perf_counter()
    stop_at = start + seconds
    peak = _peak()
    n = 0
    while n < inputs:
        if n & 63 == 0 and time.perf_counter() > stop_at:
            break
        data = seeds[n] if n < len(seeds) else mutate(rng.choice(corpus), corpus, rng)
        if shm is not None:
            length = min(len(data), len(shm) - _SHM_HEAD.size)
            shm[_SHM_HEAD.size : _SHM_HEAD.size + length] = data[:length]
            _SHM_HEAD.pack_into(shm, 0, n, length)
        exc: BaseException | None = None
        traced = trace_every and n % trace_every == 0
        t0 = time.perf_counter()
        try:
            if traced:
                if tracer.run(run, data):
                    corpus.append(data)
            else:
                run(data)
        except LazyErofsError as e:
            exc = e
            name = type(e).__name__
            stats.refused[name] = stats.refused.get(name, 0) + 1
        except BaseException as e:  # everything else is a finding
            if isinstance(e, KeyboardInterrupt):
                raise
            exc = e
            stats.add_finding(Finding.make("exception", target.name, data, e))
        else:
            stats.passed += 1
        took = time.perf_counter() - t0
        n += 1
        if took > stats.slowest:
            stats.slowest = took
        if took > deadline:
            stats.add_finding(Finding.make(
                "deadline", target.name, data, None, seconds=round(took, 3),
                message=f"input took {took:.3f} s, deadline {deadline} s", where=_outcome(exc)[:120],
            ))  # fmt: skip
        new_peak = _peak()
        if new_peak != peak:
            grew = new_peak - peak
            stats.max_peak_growth = max(stats.max_peak_growth, grew)
            if grew > mem_bound:
                stats.add_finding(Finding.make(
                    "memory", target.name, data, None,
                    message=f"peak RSS grew by {grew >> 20} MiB on one input (bound {mem_bound >> 20} MiB)",
                    where=_outcome(exc)[:120],
                ))  # fmt: skip
            peak = new_peak
        key = _outcome(exc)
        if key not in outcomes:
            outcomes.add(key)
            corpus.append(data)
        if len(corpus) > MAX_CORPUS:
            del corpus[rng.randrange(len(seeds), len(corpus))]
    stats.inputs = n
    stats.seconds = time.perf_counter() - start
    stats.corpus = len(corpus)
    stats.lines = len(tracer.seen)
    stats.rss_end = _rss()
    stats.peak_rss = _peak()
    if shm is not None:
        _SHM_HEAD.pack_into(shm, 0, n, 0)
    return stats


# ---------------------------------------------------------------- isolation


def _worker(name: str, kw: dict[str, Any], shm_name: str, conn: Any) -> None:
    shm = shared_memory.SharedMemory(name=shm_name)
    try:
        # Turn a runaway allocation into a MemoryError (a finding), not an OOM kill.
        with open("/proc/self/statm") as f:
            vsize = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        resource.setrlimit(resource.RLIMIT_AS, (vsize + ADDRESS_SPACE_HEADROOM, resource.RLIM_INFINITY))
        stats = fuzz_loop(TARGETS[name], shm=shm.buf, **kw)
        conn.send(stats)
    finally:
        shm.close()


def run_isolated(
    name: str,
    *,
    inputs: int,
    seconds: float,
    seed: int = 0,
    deadline: float = DEFAULT_DEADLINE,
    hard_deadline: float = DEFAULT_HARD_DEADLINE,
    mem_bound: int = DEFAULT_MEM_BOUND,
    trace_every: int = 32,
) -> Stats:
    """:func:`fuzz_loop` in a forked worker, watched: a worker whose heartbeat
    stops for ``hard_deadline`` seconds is killed, the input it was running is
    recorded as a ``hang``, and a fresh worker carries on with what is left of
    the budget. A worker that dies (a signal, the OOM killer) is a ``crash``."""
    ctx = mp.get_context("fork")
    total = Stats(name, workers=0)
    began = time.monotonic()
    attempt = 0
    while total.inputs < inputs and time.monotonic() - began < seconds and attempt < 20:
        shm = shared_memory.SharedMemory(create=True, size=_SHM_SIZE)
        try:
            recv, send = ctx.Pipe(duplex=False)
            kw = dict(
                inputs=inputs - total.inputs, seconds=max(0.1, seconds - (time.monotonic() - began)),
                seed=seed + 7919 * attempt, deadline=deadline, mem_bound=mem_bound,
                trace_every=trace_every,
            )  # fmt: skip
            proc = ctx.Process(target=_worker, args=(name, kw, shm.name, send), daemon=True)
            proc.start()
            send.close()
            last, last_change = -1, time.monotonic()
            result: Stats | None = None
            while True:
                if recv.poll(0.25):
                    try:
                        result = recv.recv()
                    except EOFError:
                        result = None
                    break
                if not proc.is_alive():
                    break
                beat, _ = _SHM_HEAD.unpack_from(shm.buf, 0)
                now = time.monotonic()
                if beat != last:
                    last, last_change = beat, now
                elif now - last_change > hard_deadline:
                    break
            proc.join(0.5 if result is not None else 0)
            if result is not None:
                total.merge(result)
            else:
                beat, length = _SHM_HEAD.unpack_from(shm.buf, 0)
                data = bytes(shm.buf[_SHM_HEAD.size : _SHM_HEAD.size + length])
                alive = proc.is_alive()
                if alive:
                    proc.kill()
                proc.join()
                kind = "hang" if alive else "crash"
                msg = (f"no progress for {hard_deadline} s" if alive
                       else f"worker died with exit code {proc.exitcode}")  # fmt: skip
                total.add_finding(Finding.make(kind, name, data, None, message=msg, where=""))
                total.inputs += beat + 1  # the inputs it got through, and the one that hung
                total.workers += 1
            recv.close()
        finally:
            shm.close()
            shm.unlink()
        attempt += 1
    return total
