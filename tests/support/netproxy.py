"""A loopback HTTP/1.1 reverse proxy that emulates a slow, faulty network.

This kernel has no ``netem``, so tests and the cold-start benchmark put this
between the client and the registry instead. It adds:

* latency: every request waits ``rtt`` seconds before it is forwarded (one
  round trip per request, as over a warm keep-alive connection);
* a bandwidth cap shared by all connections: response bodies go out in
  pieces over one FIFO "link" of ``bandwidth_bps`` bits per second;
* faults chosen by rules that can change at runtime: a connection reset, a
  503, a 429 with Retry-After, a truncated body, a 200 with the whole blob
  for a range request (the Range header is dropped on the way up),
  corrupted body bytes, a stall before answering, a one-byte-per-second
  trickle.

It streams in pieces (nothing is buffered whole) and forwards ``Host``
unchanged, so the registry builds upload and redirect URLs that point back
at the proxy; absolute ``Location`` headers naming the upstream are
rewritten too. It runs its own asyncio loop in a background thread, so sync
tests can use it as a context manager, and from the command line::

    python -m tests.support.netproxy --upstream http://127.0.0.1:5000 --rtt-ms 20 --mbit 100
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import re
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import TracebackType
from urllib.parse import urlsplit

__all__ = ["FAULT_KINDS", "FaultRule", "NetProxy", "ProxyStatistics", "main"]

PIECE = 64 << 10
MAX_HEAD = 64 << 10

RESET = "reset"  # close the client connection with a TCP RST before answering
STATUS_503 = "503"  # answer 503 Service Unavailable without asking upstream
TRUNCATE = "truncate"  # send the head and about half the body, then reset
IGNORE_RANGE = "ignore-range"  # drop the Range header: upstream answers 200 with everything
CORRUPT = "corrupt"  # flip one byte in the middle of the body's first piece
STATUS_429 = "429"  # answer 429 Too Many Requests with Retry-After: 1, without asking upstream
STALL = "stall"  # wait ``stall_seconds`` before forwarding (longer than a client's read deadline)
TRICKLE = "trickle"  # send the response body one byte per second
FAULT_KINDS = (RESET, STATUS_503, TRUNCATE, IGNORE_RANGE, CORRUPT, STATUS_429, STALL, TRICKLE)


@dataclass
class FaultRule:
    """Inject ``kind`` into matching requests.

    A request matches when ``path`` (a regex, searched in the request
    target) and ``method`` fit; it then fires with ``probability``, at most
    ``count`` times (None: forever). ``fired`` counts how often it did.
    """

    kind: str
    count: int | None = None
    probability: float = 1.0
    path: str | None = None
    method: str | None = None
    fired: int = 0
    _regex: re.Pattern[str] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault {self.kind!r}; choose from {', '.join(FAULT_KINDS)}")
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"probability {self.probability} is not in [0, 1]")
        self._regex = re.compile(self.path) if self.path else None

    def matches(self, method: str, target: str) -> bool:
        if self.count is not None and self.fired >= self.count:
            return False
        if self.method and self.method.upper() != method.upper():
            return False
        return not (self._regex and not self._regex.search(target))

    @classmethod
    def parse(cls, spec: str) -> FaultRule:
        """``KIND[:PROB|:xN][@REGEX]``, e.g. ``503:x2@/blobs/`` or ``reset:0.1``."""
        head, _, path = spec.partition("@")
        kind, _, amount = head.partition(":")
        count, probability = None, 1.0
        if amount.startswith("x"):
            count = int(amount[1:])
        elif amount:
            probability = float(amount)
        return cls(kind, count=count, probability=probability, path=path or None)


@dataclass(frozen=True)
class ProxyStatistics:
    """Requests seen, response bytes sent to clients, request bytes sent upstream, faults fired."""

    requests: int
    bytes_sent: int
    bytes_received: int
    faults: int


class _Abort(Exception):
    """End this client connection now (a fault, or a peer went away)."""


def _parse_head(head: bytes) -> tuple[str, list[tuple[str, str]]]:
    lines = head.decode("latin-1").split("\r\n")
    headers = []
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise _Abort(f"malformed header line {line!r}")
        headers.append((name.strip(), value.strip()))
    return lines[0], headers


def _get(headers: list[tuple[str, str]], name: str) -> str | None:
    name = name.lower()
    for k, v in headers:
        if k.lower() == name:
            return v
    return None


def _without(headers: list[tuple[str, str]], *names: str) -> list[tuple[str, str]]:
    drop = {n.lower() for n in names}
    return [(k, v) for k, v in headers if k.lower() not in drop]


def _build_head(first: str, headers: list[tuple[str, str]]) -> bytes:
    return ("\r\n".join([first, *(f"{k}: {v}" for k, v in headers)]) + "\r\n\r\n").encode("latin-1")


async def _read_head(reader: asyncio.StreamReader) -> bytes | None:
    try:
        return await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial.strip():
            raise _Abort("connection closed inside a message head") from None
        return None
    except asyncio.LimitOverrunError:
        raise _Abort("message head too large") from None


def _rst(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset (SO_LINGER 0), as a crashed peer or middlebox would."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def _quiet_cancelled(loop: asyncio.AbstractEventLoop, context: dict) -> None:
    """The loop's exception handler: connections cancelled by the proxy's own
    shutdown are expected (Python 3.11's stream server reports each one with
    a CancelledError traceback); everything else is reported as usual."""
    if isinstance(context.get("exception"), asyncio.CancelledError):
        return
    loop.default_exception_handler(context)


class NetProxy:
    """Reverse proxy on loopback with latency, a shared bandwidth cap and fault rules.

    ``rtt`` (seconds) and ``bandwidth_bps`` (bits per second, None for
    unlimited) may be changed while it runs; so may the fault rules
    (:meth:`add_fault`, :meth:`clear_faults`).
    """

    def __init__(
        self,
        upstream: str,
        *,
        rtt: float = 0.0,
        bandwidth_bps: float | None = None,
        listen: tuple[str, int] = ("127.0.0.1", 0),
        seed: int | None = None,
    ) -> None:
        u = urlsplit(upstream)
        if u.scheme != "http" or not u.hostname:
            raise ValueError(f"upstream {upstream!r} must be an http:// URL")
        self.upstream_host = u.hostname
        self.upstream_port = u.port or 80
        self.upstream_netloc = u.netloc
        self.rtt = rtt
        self.bandwidth_bps = bandwidth_bps
        self.stall_seconds = 60.0
        self.listen = listen
        self.port = 0
        self._rules: list[FaultRule] = []
        self._lock = threading.Lock()
        self._random = random.Random(seed)
        self._requests = 0
        self._bytes_sent = 0
        self._bytes_received = 0
        self._faults = 0
        self._link_free = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._stopping: asyncio.Event | None = None

    # ----------------------------------------------------------- public

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``: use it where a registry host is expected."""
        return f"{self.listen[0]}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def requests(self) -> int:
        return self._requests

    @property
    def bytes_sent(self) -> int:
        return self._bytes_sent

    def stats(self) -> ProxyStatistics:
        return ProxyStatistics(self._requests, self._bytes_sent, self._bytes_received, self._faults)

    statistics = stats

    def reset_counters(self) -> None:
        with self._lock:
            self._requests = self._bytes_sent = self._bytes_received = self._faults = 0

    def add_fault(
        self,
        kind: str,
        *,
        count: int | None = None,
        probability: float = 1.0,
        path: str | None = None,
        method: str | None = None,
    ) -> FaultRule:
        """Add a rule (rules are tried in order; the first that fires wins)."""
        rule = FaultRule(kind, count=count, probability=probability, path=path, method=method)
        with self._lock:
            self._rules.append(rule)
        return rule

    def clear_faults(self) -> None:
        with self._lock:
            self._rules.clear()

    def start(self) -> NetProxy:
        started = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            loop.set_exception_handler(_quiet_cancelled)
            self._loop = loop
            try:
                loop.run_until_complete(self._main(started))
            except BaseException as exc:
                failure.append(exc)
                started.set()
            finally:
                loop.close()

        self._thread = threading.Thread(
            target=run, name=f"netproxy->{self.upstream_netloc}", daemon=True
        )
        self._thread.start()
        if not started.wait(10) or failure:
            raise RuntimeError(f"netproxy did not start: {failure[0] if failure else 'timeout'}")
        return self

    def stop(self) -> None:
        loop, stopping = self._loop, self._stopping
        if loop is not None and stopping is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stopping.set)
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None

    def __enter__(self) -> NetProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"NetProxy({self.url} -> {self.upstream_netloc}, rtt={self.rtt}, bandwidth_bps={self.bandwidth_bps})"

    # ----------------------------------------------------------- internals

    async def _main(self, started: threading.Event) -> None:
        self._stopping = asyncio.Event()
        self._server = await asyncio.start_server(
            self._client, self.listen[0], self.listen[1], limit=MAX_HEAD
        )
        self.port = self._server.sockets[0].getsockname()[1]
        started.set()
        await self._stopping.wait()
        self._server.close()
        for task in list(asyncio.all_tasks()):
            if task is not asyncio.current_task():
                task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 5)

    def _pick_fault(self, method: str, target: str) -> str | None:
        with self._lock:
            self._requests += 1
            for rule in self._rules:
                if rule.matches(method, target) and self._random.random() < rule.probability:
                    rule.fired += 1
                    self._faults += 1
                    return rule.kind
        return None

    async def _throttle(self, n: int) -> None:
        """Serialise ``n`` bytes on the shared link (FIFO across connections)."""
        bps = self.bandwidth_bps
        if not bps:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        start = max(now, self._link_free)
        self._link_free = start + n * 8 / bps
        delay = self._link_free - now
        if delay > 0:
            await asyncio.sleep(delay)

    async def _send_body_piece(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        for i in range(0, len(data), PIECE):
            piece = data[i : i + PIECE]
            await self._throttle(len(piece))
            # Count before writing: the peer may read the bytes (and ask for
            # the counters) before this thread runs again.
            with self._lock:
                self._bytes_sent += len(piece)
            writer.write(piece)
            await writer.drain()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        try:
            while True:
                head = await _read_head(reader)
                if head is None:
                    return
                keep, up = await self._exchange(head, reader, writer, up)
                if not keep:
                    return
        except (_Abort, ConnectionError, OSError, asyncio.IncompleteReadError, ValueError):
            _rst(writer)
        except asyncio.CancelledError:
            _rst(writer)
            raise
        finally:
            if up is not None:
                up[1].transport.abort()
            with contextlib.suppress(Exception):
                writer.close()

    async def _relay_request_body(
        self,
        headers: list[tuple[str, str]],
        reader: asyncio.StreamReader,
        out: asyncio.StreamWriter | None,
    ) -> None:
        """Copy (or with ``out`` None, drain) a request body, framed as the client framed it."""

        async def emit(data: bytes) -> None:
            if out is not None:
                out.write(data)
                with self._lock:
                    self._bytes_received += len(data)
                await out.drain()

        if (_get(headers, "transfer-encoding") or "").lower() == "chunked":
            await self._relay_chunked(reader, emit)
            return
        left = int(_get(headers, "content-length") or "0")
        while left > 0:
            data = await reader.read(min(left, PIECE))
            if not data:
                raise _Abort("client closed inside a request body")
            left -= len(data)
            await emit(data)

    @staticmethod
    async def _relay_chunked(
        reader: asyncio.StreamReader, emit: Callable[[bytes], Awaitable[None]]
    ) -> None:
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";")[0].strip(), 16)
            await emit(size_line)
            if size == 0:
                while True:  # trailers, up to the empty line
                    line = await reader.readuntil(b"\r\n")
                    await emit(line)
                    if line == b"\r\n":
                        return
            left = size + 2
            while left:
                data = await reader.read(min(left, PIECE))
                if not data:
                    raise _Abort("peer closed inside a chunk")
                left -= len(data)
                await emit(data)

    async def _exchange(
        self,
        head: bytes,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        up: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None,
    ) -> tuple[bool, tuple[asyncio.StreamReader, asyncio.StreamWriter] | None]:
        """One request/response; returns (keep the client connection, upstream connection)."""
        request_line, headers = _parse_head(head)
        method, target, _version = ([*request_line.split(" ", 2), "", ""])[:3]
        fault = self._pick_fault(method, target)
        if self.rtt:
            await asyncio.sleep(self.rtt)
        if fault == RESET:
            raise _Abort("injected reset")
        if fault in (STATUS_503, STATUS_429):
            await self._relay_request_body(headers, reader, None)
            writer.write(
                b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n"
                if fault == STATUS_503
                else b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 1\r\nContent-Length: 0\r\n\r\n"
            )
            await writer.drain()
            return True, up
        if fault == STALL:
            await asyncio.sleep(self.stall_seconds)
        client_close = (_get(headers, "connection") or "").lower() == "close"
        if fault == IGNORE_RANGE:
            headers = _without(headers, "range", "if-range")
        if up is None or up[0].at_eof():
            if up is not None:
                up[1].transport.abort()
            up = await asyncio.open_connection(
                self.upstream_host, self.upstream_port, limit=MAX_HEAD
            )
        up_reader, up_writer = up
        up_writer.write(_build_head(request_line, _without(headers, "proxy-connection")))
        await self._relay_request_body(headers, reader, up_writer)
        await up_writer.drain()

        while True:  # skip interim 1xx answers (100 Continue) after relaying them
            rhead = await _read_head(up_reader)
            if rhead is None:
                raise _Abort("upstream closed without answering")
            status_line, rheaders = _parse_head(rhead)
            status = int(status_line.split(" ", 2)[1])
            if status >= 200 or status == 101:
                break
            writer.write(rhead)
            await writer.drain()
        location = _get(rheaders, "location")
        if location:
            u = urlsplit(location)
            if u.scheme == "http" and u.netloc == self.upstream_netloc:
                location = location.replace(f"http://{self.upstream_netloc}", self.url, 1)
                rheaders = [*_without(rheaders, "location"), ("Location", location)]
        writer.write(_build_head(status_line, rheaders))
        await writer.drain()

        no_body = method.upper() == "HEAD" or status in (204, 304)
        upstream_close = (_get(rheaders, "connection") or "").lower() == "close"
        chunked = (_get(rheaders, "transfer-encoding") or "").lower() == "chunked"
        length_header = _get(rheaders, "content-length")
        if no_body:
            return not (client_close or upstream_close), up

        sent = 0
        cut_after = None
        if fault == TRUNCATE:
            total = int(length_header) if length_header and length_header.isdigit() else 2 * PIECE
            cut_after = max(0, total // 2 if total > 1 else 0)
        corrupt_pending = fault == CORRUPT
        trickle = fault == TRICKLE

        async def out(data: bytes) -> None:
            nonlocal sent, corrupt_pending
            if trickle:
                for i in range(len(data)):
                    writer.write(data[i : i + 1])
                    await writer.drain()
                    await asyncio.sleep(1.0)
                return
            if corrupt_pending and data:
                i = len(data) // 2
                data = data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :]
                corrupt_pending = False
            if cut_after is not None and sent + len(data) >= cut_after:
                await self._send_body_piece(writer, data[: cut_after - sent])
                raise _Abort("injected truncation")
            sent += len(data)
            await self._send_body_piece(writer, data)

        if chunked:
            await self._relay_chunked(up_reader, out)
        elif length_header is not None:
            left = int(length_header)
            while left > 0:
                data = await up_reader.read(min(left, PIECE))
                if not data:
                    raise _Abort("upstream closed inside a body")
                left -= len(data)
                await out(data)
        else:
            while data := await up_reader.read(PIECE):
                await out(data)
            return False, up
        if cut_after is not None:
            raise _Abort("injected truncation")
        return not (client_close or upstream_close), up


def _parse_listen(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return (host or "127.0.0.1"), int(port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.support.netproxy",
        description="Loopback HTTP reverse proxy with added latency, a bandwidth cap and fault injection.",
    )
    parser.add_argument(
        "--listen", default="127.0.0.1:0", help="HOST:PORT to listen on (default: a free port)"
    )
    parser.add_argument("--upstream", required=True, help="http://HOST:PORT of the real server")
    parser.add_argument("--rtt-ms", type=float, default=0.0, help="latency added to every request")
    parser.add_argument(
        "--mbit", type=float, default=0.0, help="shared bandwidth cap in Mbit/s (0: none)"
    )
    parser.add_argument(
        "--fault", action="append", default=[], metavar="KIND[:PROB|:xN][@REGEX]",
        help=f"inject a fault ({', '.join(FAULT_KINDS)}); repeatable",
    )  # fmt: skip
    args = parser.parse_args(argv)
    proxy = NetProxy(
        args.upstream,
        rtt=args.rtt_ms / 1000,
        bandwidth_bps=args.mbit * 1e6 or None,
        listen=_parse_listen(args.listen),
    )
    for spec in args.fault:
        rule = FaultRule.parse(spec)
        proxy.add_fault(rule.kind, count=rule.count, probability=rule.probability, path=rule.path)
    # Stop on SIGINT or SIGTERM even when started in the background, where a
    # shell (or a CI job run with &) leaves SIGINT ignored, and Python then
    # keeps ignoring it.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with proxy:
        print(f"netproxy: {proxy.url} -> {args.upstream}", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
        s = proxy.stats()
        print(
            f"netproxy: {s.requests} requests, {s.bytes_sent} bytes sent, {s.faults} faults",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
