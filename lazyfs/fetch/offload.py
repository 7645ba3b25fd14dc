"""Fetch workers: frames fetched, verified, decoded and cached in processes of their own.

Why: a mount's daemon is one Python process, and its trio thread serves
FUSE *and* receives every HTTP body (httpx/h11), while its worker threads
hash, decompress and write frames, all under one GIL. A profile of a cold
sequential read had the trio thread 87% busy and the threads' SHA-512 + zstd
of a 4 MiB frame taking 44 ms instead of 6 ms, waiting for the GIL: the
second core sat mostly idle. A fetch worker is a forked process that runs a
trio loop and a registry client of its own: given a run of frames, it makes
the range request (the same :class:`~lazyfs.oci.RemoteBlob` code: redirects,
credentials, retries, answer checks), verifies and decodes each frame
(:func:`~lazyfs.format.seekable.decode_frame_bytes`, refetching a bad frame
once) and writes it to the chunk cache, which several processes may share.
It answers with each frame's outcome, not its bytes: readers waiting for a
frame read the part they asked for back from the cache (the page cache
has it, just written), which costs the daemon one ``pread`` instead of
receiving and unpickling the whole decoded frame. Only a frame the disk
refused comes back whole (the daemon keeps it in memory).

The daemon keeps every decision (what to fetch, single flight, the memory
budget, counting, the link estimate: :class:`~lazyfs.fetch.frames.FrameStore`);
a worker only carries out a run. A worker that dies fails nothing: the runs
it held are fetched again in the daemon, and so is everything after.

Workers are forked (:meth:`FetchWorkers.spawn`) before the daemon starts trio
or any thread, so the fork copies a process with one thread and every module
already imported: a worker costs ~5 ms to start. Messages are pickles over a
private socketpair: both ends are this program, nobody else can reach it.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import pickle
import signal
import socket
import struct
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from lazyfs.errors import FetchError, IntegrityError, LazyErofsError
from lazyfs.format import seekable

if TYPE_CHECKING:
    from lazyfs.oci.blob import BlobSpec

__all__ = ["CacheSpec", "FetchWorkers", "FrameJob", "FrameOutcome", "RunOutcome", "WorkerGone", "default_workers"]

log = logging.getLogger(__name__)

# 8-byte length, then a pickle.
_HEADER = struct.Struct("!Q")
# Frames a worker hashes and decodes at once (threads: zstd and hashlib let
# go of the GIL over big buffers).
_DECODE_THREADS = 2
# A message bigger than this is a bug (a run is at most the merge size plus
# its decoded frames); refuse it rather than allocate it.
_MAX_MESSAGE = 1 << 31


def default_workers() -> int:
    """One worker where there is a second core for it to use, else none."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return 1 if cpus >= 2 else 0


@dataclass(frozen=True)
class CacheSpec:
    """How a worker opens the mount's chunk cache (no memory LRU of its own:
    what it fetched is the daemon's to keep in memory)."""

    root: str
    max_bytes: int
    verify_at_rest: bool = False


@dataclass(frozen=True)
class FrameJob:
    """One frame of a run: what its table entry says, and its cache key."""

    index: int
    span: tuple[int, int]  # compressed bytes in the blob
    raw_length: int
    checksum: bytes | None  # SHA-512 of the compressed bytes; None: unverified table
    key: bytes


@dataclass
class FrameOutcome:
    index: int
    data: bytes | None = None  # the decoded frame, only when it could not be persisted
    persisted: bool = False  # in the chunk cache now
    error: tuple[str, str] | None = None  # (IntegrityError | FetchError, message)

    def exception(self) -> LazyErofsError:
        assert self.error is not None
        kind, message = self.error
        return IntegrityError(message) if kind == "IntegrityError" else FetchError(message)


@dataclass
class RunOutcome:
    """What a worker did with one run: bytes it received (refetches
    included) and each frame's outcome, in run order."""

    nbytes: int = 0
    requests: int = 0
    verify_failures: int = 0
    frames: list[FrameOutcome] = field(default_factory=list)


class WorkerGone(Exception):
    """No worker could carry out the run (none left, or the one asked died):
    the caller fetches it itself."""


# -- framing (both ends run trio) ---------------------------------------------


async def _send(stream: trio.SocketStream, lock: trio.Lock, message: object) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    header = _HEADER.pack(len(data))
    async with lock:
        if len(data) < 65536:
            await stream.send_all(header + data)  # one write for the small ones
        else:
            await stream.send_all(header)
            await stream.send_all(data)


async def _receive_exactly(sock: trio.socket.SocketType, n: int) -> bytearray | None:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = await sock.recv_into(view[got:], min(n - got, 4 << 20))
        if k == 0:
            return None
        got += k
    return buf


async def _receive(sock: trio.socket.SocketType) -> Any:
    """The next message, or None at the end of the stream."""
    header = await _receive_exactly(sock, _HEADER.size)
    if header is None:
        return None
    (n,) = _HEADER.unpack(header)
    if n > _MAX_MESSAGE:
        raise FetchError(f"fetch worker channel: a {n}-byte message")
    body = await _receive_exactly(sock, n)
    if body is None:
        return None
    return pickle.loads(body)


# -- the daemon's side ---------------------------------------------------------


class _Reply:
    """One request's answer: set when it arrives, or when the worker is
    gone (``value`` stays None)."""

    __slots__ = ("arrived", "value")

    def __init__(self) -> None:
        self.arrived = trio.Event()
        self.value: Any = None


class _Worker:
    __slots__ = ("alive", "asked", "lock", "outstanding", "pending", "pid", "sock", "stream", "warm")

    def __init__(self, pid: int, sock: socket.socket) -> None:
        self.pid = pid
        self.sock = sock  # a plain socket until running() wraps it
        self.stream: trio.SocketStream | None = None
        self.lock: trio.Lock | None = None
        self.pending: dict[int, _Reply] = {}  # by request id
        self.outstanding = 0  # bytes of runs it holds
        self.alive = True
        # Registries (origin and scope) it has a connection and credentials
        # for (warm_up): only those runs go to it.
        self.warm: set[tuple[object, ...]] = set()
        self.asked: set[tuple[object, ...]] = set()  # warm_up sent (once each)


class FetchWorkers:
    """The daemon's handle on its fetch workers.

    ``spawn`` before trio and threads start; ``running()`` inside the mount's
    trio run (it reads the answers); ``fetch`` from any task.
    """

    def __init__(self, workers: list[_Worker]) -> None:
        self._workers = workers
        self._next_id = 0
        self.runs = 0  # runs the workers carried out
        self.fallbacks = 0  # runs fetched in the daemon because no worker could
        self.died = 0

    @classmethod
    def spawn(cls, n: int, cache: CacheSpec, *, keep_fds: Sequence[int] = ()) -> FetchWorkers:
        """Fork ``n`` workers; call with one thread running (before trio).
        ``keep_fds``: descriptors a worker keeps besides 0-2 and its socket
        (the log file); every other one is closed in the worker, so it never
        holds the daemon's readiness pipe or FUSE device open."""
        workers = []
        for _ in range(n):
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            pid = os.fork()
            if pid == 0:  # pragma: no cover - runs in the child
                ours.close()
                _worker_main(theirs, cache, keep_fds)
            theirs.close()
            workers.append(_Worker(pid, ours))
        return cls(workers)

    @property
    def alive(self) -> int:
        return sum(w.alive for w in self._workers)

    def pids(self) -> list[int]:
        return [w.pid for w in self._workers if w.alive]

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[FetchWorkers]:
        """Read the workers' answers while the block runs; at its end the
        workers are told to stop (their socket closes) and reaped."""
        try:
            async with trio.open_nursery() as nursery:
                for w in self._workers:
                    sock = trio.socket.from_stdlib_socket(w.sock)
                    w.stream = trio.SocketStream(sock)
                    w.lock = trio.Lock()
                    nursery.start_soon(self._read_answers, w, sock)
                try:
                    yield self
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            self.close()

    def close(self) -> None:
        for w in self._workers:
            if w.alive:
                w.alive = False
                self._fail_pending(w)
            with contextlib.suppress(OSError):
                w.sock.close()
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(w.pid, os.WNOHANG)

    def ready_for(self, blob: BlobSpec) -> bool:
        """Whether a live worker is warmed up for ``blob``'s registry: until
        one is, the daemon fetches itself (its connection is already open,
        a worker's first request would pay a connect and a token)."""
        key = _warm_key(blob)
        return any(w.alive and key in w.warm for w in self._workers)

    async def warm_up(self, blob: BlobSpec) -> None:
        """Have every worker open a connection to ``blob``'s registry and get
        its credentials (a HEAD of the blob), once per registry and scope."""
        key = _warm_key(blob)
        async with trio.open_nursery() as nursery:
            for w in self._workers:
                if w.alive and w.stream is not None and key not in w.asked:
                    w.asked.add(key)
                    nursery.start_soon(self._warm_one, w, blob)

    async def _warm_one(self, w: _Worker, blob: BlobSpec) -> None:
        with contextlib.suppress(WorkerGone):
            if await self._call(w, ("warm", blob), 0):
                w.warm.add(_warm_key(blob))
            # else it could not reach the registry: that registry's runs stay in the daemon

    async def fetch(
        self, blob: BlobSpec, start: int, length: int, jobs: list[FrameJob], *, name: str
    ) -> RunOutcome:
        """Have a worker fetch bytes ``[start, start+length)`` of ``blob``
        and settle each frame of ``jobs``. Raises WorkerGone when no worker
        can (then nothing of the run was settled)."""
        key = _warm_key(blob)
        live = [w for w in self._workers if w.alive and w.stream is not None and key in w.warm]
        if not live:
            self.fallbacks += 1
            raise WorkerGone("no fetch worker is running")
        worker = min(live, key=lambda w: w.outstanding)
        try:
            outcome: RunOutcome = await self._call(worker, ("fetch", blob, start, length, jobs, name), length)
        except WorkerGone:
            self.fallbacks += 1
            raise
        self.runs += 1
        return outcome

    async def _call(self, worker: _Worker, request: tuple[Any, ...], weight: int) -> Any:
        """Send ``request`` (its kind, then its arguments) and wait for the answer."""
        self._next_id += 1
        rid = self._next_id
        reply = worker.pending[rid] = _Reply()
        worker.outstanding += weight
        try:
            assert worker.stream is not None and worker.lock is not None
            try:
                await _send(worker.stream, worker.lock, (request[0], rid, *request[1:]))
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                self._lost(worker, f"cannot send to it: {exc!r}")
            await reply.arrived.wait()
        finally:
            worker.pending.pop(rid, None)
            worker.outstanding -= weight
        if reply.value is None:
            raise WorkerGone(f"fetch worker {worker.pid} exited")
        return reply.value

    async def _read_answers(self, w: _Worker, sock: trio.socket.SocketType) -> None:
        try:
            while True:
                message = await _receive(sock)
                if message is None:
                    break
                rid, outcome = message
                reply = w.pending.get(rid)
                if reply is not None:  # else its asker gave up (cancelled)
                    reply.value = outcome
                    reply.arrived.set()
        except (OSError, LazyErofsError, pickle.UnpicklingError, trio.ClosedResourceError) as exc:
            self._lost(w, f"its channel failed: {exc!r}")
        else:
            self._lost(w, "it exited")
        # The channel ends when the worker does: reap it (no zombie).
        await trio.to_thread.run_sync(_reap, w.pid, abandon_on_cancel=True)

    def _lost(self, w: _Worker, why: str) -> None:
        if not w.alive:
            return
        w.alive = False
        self.died += 1
        log.warning("fetch worker %d is gone (%s); its frames are fetched in the daemon", w.pid, why)
        self._fail_pending(w)

    @staticmethod
    def _fail_pending(w: _Worker) -> None:
        for reply in w.pending.values():
            reply.arrived.set()  # value stays None: WorkerGone

    def statistics(self) -> dict[str, object]:
        return {
            "workers": len(self._workers),
            "alive": self.alive,
            "runs": self.runs,
            "fallbacks": self.fallbacks,
            "pids": self.pids(),
        }


def _warm_key(blob: BlobSpec) -> tuple[object, ...]:
    """Blobs that share a connection and credentials."""
    return (blob.options, blob.host, blob.scope)


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, 0)


# -- the worker ----------------------------------------------------------------


def _worker_main(sock: socket.socket, cache: CacheSpec, keep_fds: Sequence[int]) -> None:  # pragma: no cover
    """A worker's life; never returns."""
    code = 0
    try:
        keep = sorted({0, 1, 2, sock.fileno(), *keep_fds})
        low = 3
        for fd in keep:
            if fd >= low:
                os.closerange(low, fd)
                low = fd + 1
        os.closerange(low, 1 << 16)
        # The daemon owns signals: Ctrl-C of a foreground mount reaches the
        # whole process group, and only the daemon should act on it.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        _die_with_parent()
        trio.run(_serve_worker, sock, cache)
    except BaseException:
        log.exception("fetch worker failed")
        code = 1
    finally:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os._exit(code)


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """SIGKILL this worker when the daemon dies, even by SIGKILL (the
    channel's end would stop it too, but not in the middle of a fetch)."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return
    libc = ctypes.CDLL(libc_name, use_errno=True)
    pr_set_pdeathsig, pr_set_name = 1, 15
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    libc.prctl(pr_set_name, ctypes.c_char_p(b"lazyerofs-fetch"), 0, 0, 0)
    if os.getppid() == 1:  # the daemon died before prctl
        os._exit(0)


async def _serve_worker(plain: socket.socket, cache_spec: CacheSpec) -> None:  # pragma: no cover
    from cache import CacheError, ChunkCache
    from lazyfs.oci import RegistryClient
    from lazyfs.oci.blob import RemoteBlob

    sock = trio.socket.from_stdlib_socket(plain)
    stream = trio.SocketStream(sock)
    lock = trio.Lock()
    try:
        # The daemon counts what this writes and evicts (count_written): it
        # holds entries open, and must drop those it evicts.
        cache = ChunkCache(
            cache_spec.root,
            max_bytes=cache_spec.max_bytes,
            memory_bytes=0,
            verify_at_rest=cache_spec.verify_at_rest,
            evict=False,
        )
    except CacheError as exc:
        # The daemon opens the same cache and reports this to the user.
        log.debug("fetch worker: %s", exc)
        return
    limiter = trio.CapacityLimiter(_DECODE_THREADS)
    clients: dict[Any, RegistryClient] = {}
    blobs: dict[BlobSpec, RemoteBlob] = {}
    async with contextlib.AsyncExitStack() as stack:

        async def blob_for(spec: BlobSpec) -> RemoteBlob:
            blob = blobs.get(spec)
            if blob is None:
                client = clients.get(spec.options)
                if client is None:
                    client = clients[spec.options] = await stack.enter_async_context(RegistryClient(spec.options))
                blob = blobs[spec] = RemoteBlob.from_spec(client, spec)
            return blob

        async def answer(rid: int, value: object) -> None:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await _send(stream, lock, (rid, value))

        async def fetch(rid: int, spec: BlobSpec, start: int, length: int, jobs: list[FrameJob], name: str) -> None:
            await answer(rid, await _carry_out(await blob_for(spec), cache, limiter, start, length, jobs, name))

        async def warm(rid: int, spec: BlobSpec) -> None:
            try:
                await (await blob_for(spec)).probe_size()
            except LazyErofsError as exc:
                log.info("fetch worker: cannot reach %s: %s", spec.url, exc)
                await answer(rid, False)
            else:
                await answer(rid, True)

        handlers = {"fetch": fetch, "warm": warm}

        async with trio.open_nursery() as nursery:
            while True:
                message = await _receive(sock)
                if message is None:
                    break  # the daemon is done (or gone)
                kind, *args = message
                nursery.start_soon(handlers[kind], *args)
            nursery.cancel_scope.cancel()
    cache.close()


async def _carry_out(
    blob: Any,
    cache: Any,
    limiter: trio.CapacityLimiter,
    start: int,
    length: int,
    jobs: list[FrameJob],
    name: str,
) -> RunOutcome:
    """Fetch one run and settle each of its frames (run in a worker; also
    callable in-process, which is how the tests reach it without a fork)."""
    out = RunOutcome(frames=[FrameOutcome(job.index) for job in jobs])
    try:
        data = await blob.read(start, length)
    except LazyErofsError as exc:
        for frame in out.frames:
            frame.error = (type(exc).__name__, str(exc))
        return out
    out.nbytes += len(data)
    out.requests += 1
    view = memoryview(data)

    async def settle(job: FrameJob, frame: FrameOutcome) -> None:
        s, e = job.span

        def decode(compressed: bytes | memoryview) -> bytes:
            return seekable.decode_frame_bytes(compressed, job.index, job.span, job.raw_length, job.checksum, name=name)

        try:
            try:
                raw = await trio.to_thread.run_sync(decode, view[s - start : e - start], limiter=limiter)
            except IntegrityError as first:
                # A bad frame may be a transport accident: refetch once.
                out.verify_failures += 1
                log.warning("%s; refetching frame %d once", first, job.index)
                again = await blob.read(s, e - s)
                out.nbytes += len(again)
                out.requests += 1
                try:
                    raw = await trio.to_thread.run_sync(decode, again, limiter=limiter)
                except IntegrityError:
                    out.verify_failures += 1
                    raise
        except LazyErofsError as exc:
            frame.error = (type(exc).__name__, str(exc))
            return
        frame.persisted = await trio.to_thread.run_sync(cache.put, job.key, raw, limiter=limiter)
        if not frame.persisted:
            frame.data = raw

    async with trio.open_nursery() as nursery:
        for job, frame in zip(jobs, out.frames, strict=True):
            nursery.start_soon(settle, job, frame)
    return out
