"""``lazyerofs service``: a pre-imported process that runs ``lazyerofs mount``.

Two halves live here because ``lazyerofs mount`` needs the client half
before it imports anything else: importing any module under
``lazyfs.mount`` runs that package's ``__init__`` (kernel, state, daemon:
~50 ms), which is what the handoff is there to avoid. So this module
imports only the standard library's socket, json, struct and signal; the
server (imports, listening, forking) is :mod:`lazyfs.mount.service`.

Protocol, over a unix stream socket, one message = 4-byte big-endian
length + a JSON object; the mount request carries the caller's fds 0, 1, 2
and its working directory as SCM_RIGHTS:

    client -> {"op": "mount", "fingerprint", "argv", "env", "umask", "started"}
    service -> {"accepted": true}      sent before the fork, or {"refused": why}
    service -> {"pid": int}            the child running ``lazyerofs mount``
    service -> {"rc": int}             its exit status (negative: killed by that signal)

A client falls back to running the mount itself only before
``accepted`` (no socket, refused, fingerprint or namespaces differ, the
service died first): once accepted the child may have started, and a mount
must never run twice. ``{"op": "status"}`` and ``{"op": "stop"}`` answer
with one message.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import struct
import sys
from collections.abc import Sequence

__all__ = [
    "DEFAULT_SOCKET",
    "DISABLE_ENV",
    "SOCKET_ENV",
    "ServiceRefused",
    "ServiceUnavailable",
    "fingerprint",
    "handoff",
    "recv_message",
    "register",
    "request",
    "send_message",
    "socket_path",
]

DEFAULT_SOCKET = "/run/lazyerofs/service.sock"
SOCKET_ENV = "LAZYEROFS_SERVICE_SOCKET"
# Set (to anything but "" or "0") to never hand a mount to the service.
DISABLE_ENV = "LAZYEROFS_NO_SERVICE"
# How long a client waits for the service to take its request before it
# gives up and mounts in-process (the service answers in about a millisecond).
HANDSHAKE_TIMEOUT = 5.0
MAX_MESSAGE = 4 << 20
_HEADER = struct.Struct("!I")
# Signals a waiting client passes on to the child running its mount.
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


class ServiceUnavailable(Exception):
    """No service answered at the socket."""


class ServiceRefused(ServiceUnavailable):
    """A service answered but will not serve us (the reason is the message)."""


# ------------------------------------------------------------------ protocol


def socket_path(path: str | None = None) -> str:
    return path or os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET


def fingerprint() -> str:
    """What code this process runs: the version, the interpreter, the
    import path and every source file of ``lazyfs`` and ``cache`` (path,
    mtime, size). The service serves only a client with its own: an
    upgraded or edited tree, or another checkout, never runs old code.
    About 100 stats, well under a millisecond."""
    import lazyfs

    pkg = os.path.dirname(os.path.abspath(lazyfs.__file__))
    parts = [lazyfs.__version__, sys.version, sys.prefix, repr(sys.path[1:]), pkg]
    # `cache` is lazyfs's sibling package (one source tree, one install).
    for root in (pkg, os.path.join(os.path.dirname(pkg), "cache")):
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
            for name in sorted(filenames):
                if name.endswith(".py"):
                    path = os.path.join(dirpath, name)
                    try:
                        st = os.stat(path)
                    except OSError:
                        continue
                    parts.append(f"{path[len(pkg) - len('lazyfs') :]}:{st.st_mtime_ns}:{st.st_size}")
    return "\n".join(parts)


def send_message(sock: socket.socket, message: dict[str, object], fds: Sequence[int] = ()) -> None:
    data = json.dumps(message).encode()
    data = _HEADER.pack(len(data)) + data
    if fds:
        sent = socket.send_fds(sock, [data], list(fds))
        data = data[sent:]
    if data:
        sock.sendall(data)


def recv_message(sock: socket.socket, *, max_fds: int = 0) -> tuple[dict[str, object], list[int]]:
    """One message and the descriptors that came with it; reads no byte of
    the next one (two messages may arrive in one segment). Raises EOFError
    when the peer closed first, ValueError on a malformed message."""
    fds: list[int] = []
    try:
        if max_fds:
            head, fds, _flags, _addr = socket.recv_fds(sock, _HEADER.size, max_fds)
        else:
            head = sock.recv(_HEADER.size)
        head += _recv_exactly(sock, _HEADER.size - len(head)) if head else b""
        if not head:
            raise EOFError("connection closed")
        (size,) = _HEADER.unpack(head)
        if size > MAX_MESSAGE:
            raise ValueError("message too long")
        message = json.loads(_recv_exactly(sock, size))
        if not isinstance(message, dict):
            raise ValueError("not a JSON object")
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return message, fds


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError("connection closed mid-message")
        buf += chunk
    return buf


def _connect(path: str, timeout: float) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except OSError as exc:
        sock.close()
        raise ServiceUnavailable(f"no service at {path}: {exc.strerror or exc}") from exc
    return sock


def request(message: dict[str, object], path: str | None = None, *, timeout: float = HANDSHAKE_TIMEOUT) -> dict[str, object]:
    """One request, one answer (status, stop). Raises ServiceUnavailable."""
    path = socket_path(path)
    with _connect(path, timeout) as sock:
        try:
            send_message(sock, message)
            answer, _ = recv_message(sock)
        except (OSError, EOFError, ValueError) as exc:
            raise ServiceUnavailable(f"the service at {path} did not answer: {exc}") from exc
    if "refused" in answer:
        raise ServiceRefused(f"the service at {path} refused: {answer['refused']}")
    return answer


# ---------------------------------------------------------------- the handoff


def _wants_service(argv: Sequence[str]) -> bool:
    """Whether ``lazyerofs ARGV`` (a mount) may go to the service. Foreground
    mounts stay here (they own the terminal until unmounted), and so does
    help. Loose on purpose: a false match only means an in-process mount.
    Long options may be abbreviated, as argparse allows."""
    for word in argv:
        if word == "--":
            break
        if word.startswith("--") and len(word) > 2:
            name = word.split("=", 1)[0]
            if any(full.startswith(name) for full in ("--foreground", "--help", "--no-service")):
                return False
        elif word.startswith("-") and len(word) > 1 and ("f" in word or "h" in word):
            return False
    return True


def handoff(argv: Sequence[str], started: float) -> int | None:
    """Run the mount ``argv`` in the service: its exit status, or None when
    the service is not there or will not take it (then mount in-process)."""
    if os.environ.get(DISABLE_ENV, "") not in ("", "0") or not _wants_service(argv):
        return None
    try:
        sock = _connect(socket_path(), HANDSHAKE_TIMEOUT)
    except ServiceUnavailable:
        return None
    with sock:
        try:
            cwd = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            umask = os.umask(0o022)
            os.umask(umask)
            message = {
                "op": "mount",
                "fingerprint": fingerprint(),
                "argv": list(argv),
                "env": dict(os.environ),
                "umask": umask,
                "started": started,
            }
            send_message(sock, message, [0, 1, 2, cwd])
        except OSError:
            return None  # a closed stdio fd, or the service went away: it has no request
        finally:
            os.close(cwd)
        try:
            answer, _ = recv_message(sock)
        except TimeoutError:
            if not _abandon(sock):
                return None
            answer = {"accepted": True}
        except (OSError, EOFError, ValueError):
            return None  # gone before it took the request
        if answer.get("accepted") is not True:
            return None  # refused: another version, namespace or uid
        return _wait(sock)


def _abandon(sock: socket.socket) -> bool:
    """Give up on a service that has not answered: shut the socket so that
    it can no longer accept (its acceptance would fail with EPIPE), then
    look whether it accepted just before. True: it did (do not run here)."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
        sock.setblocking(False)
        answer, _ = recv_message(sock)
    except (OSError, EOFError, ValueError):
        return False
    return answer.get("accepted") is True


def _wait(sock: socket.socket) -> int:
    """The request was taken: pass signals on to the child, return its status."""
    sock.settimeout(None)
    child: list[int] = []
    pending: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        if child:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child[0], signum)
        else:
            pending.append(signum)

    previous = {}
    with contextlib.suppress(ValueError):  # not the main thread: nothing to forward from
        for sig in FORWARDED_SIGNALS:
            previous[sig] = signal.signal(sig, forward)
    try:
        while True:
            try:
                message, _ = recv_message(sock)
            except (OSError, EOFError, ValueError) as exc:
                print(
                    f"lazyerofs: error: the mount service went away during the mount ({exc}); "
                    "it may or may not have mounted: see 'lazyerofs status'",
                    file=sys.stderr,
                )
                return 1
            if isinstance(message.get("pid"), int):
                child.append(message["pid"])  # type: ignore[arg-type]
                for signum in pending:
                    forward(signum, None)
            elif isinstance(message.get("rc"), int):
                rc: int = message["rc"]  # type: ignore[assignment]
                break
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if rc < 0:
        # Killed by a signal: die the same way, so our caller sees what a
        # mount run here would have shown.
        sys.stdout.flush()
        sys.stderr.flush()
        signal.signal(-rc, signal.SIG_DFL)
        os.kill(os.getpid(), -rc)
        return 128 - rc
    return rc


# ------------------------------------------------------------------- command


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "service",
        help="keep the mount command's imports warm: mounts start ~0.3 s sooner",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=f"""\
A resident process that has imported everything 'lazyerofs mount' needs
(trio, httpx, pyfuse3, the fetch path). While it runs, 'lazyerofs mount'
hands its request to it over a unix socket and a forked child of the
service mounts, from imports already in memory: ~0.3 s of Python start-up
less per mount. The mount is the same as without the service (same
arguments, environment, working directory, umask, stdin/stdout/stderr, CPU
affinity, nice value, resource limits and cgroup; Ctrl-C and SIGTERM reach
it), and its daemon does not depend on the service: stopping the service
leaves every mount up.

Cost: one idle process of about 40 MB. It runs as root (mounts need root)
and serves only clients of its own uid, in its own mount, network, pid and
user namespaces and root directory, running exactly its code (an upgraded
tree is refused, and the client mounts in-process). Foreground mounts
('mount -f') and 'mount --no-service' always run in-process, and so does
every mount when ${DISABLE_ENV}=1 or no service answers.

Socket: --socket, else ${SOCKET_ENV}, else {DEFAULT_SOCKET}
(directory 0700, socket 0600); 'lazyerofs mount' looks for it at
${SOCKET_ENV}, else {DEFAULT_SOCKET}.""",
        epilog="""\
examples:
  lazyerofs service start       # detach; returns once it answers
  lazyerofs service status
  lazyerofs service stop        # waits for mounts it is running; leaves mounts up
  systemd: examples/lazyerofs-service.service runs 'lazyerofs service run'""",
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    for name, text in (
        ("start", "start the service in the background; returns once it answers"),
        ("run", "run the service in the foreground until SIGTERM or 'service stop' (for systemd)"),
        ("stop", "stop the service once the mounts it is running return; mounts stay up"),
        ("status", "whether the service runs, its pid, the mounts it served (exit 3: not running)"),
    ):
        a = actions.add_parser(name, help=text, description=text)
        a.add_argument("--socket", metavar="PATH", help=f"the service's socket (default: ${SOCKET_ENV} or {DEFAULT_SOCKET})")
        if name in ("start", "stop"):
            a.add_argument("--timeout", type=float, default=30.0, help="seconds to wait (default: 30)")
        if name == "start":
            a.add_argument("--log-file", metavar="FILE", help="the service's log (default: beside the socket, service.log)")
        if name == "status":
            a.add_argument("--json", action="store_true", help="print one JSON object for machines")
        a.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lazyfs.mount import service

    path = socket_path(args.socket)
    if args.action == "run":
        return service.serve(path)
    if args.action == "start":
        info = service.start(path, log_file=args.log_file, timeout=args.timeout)
        print(f"lazyerofs: service running (pid {info['pid']}) at {path}", file=sys.stderr)
        return 0
    if args.action == "stop":
        pid = service.stop(path, timeout=args.timeout)
        print(
            f"lazyerofs: service (pid {pid}) stopped" if pid else f"lazyerofs: no service at {path}",
            file=sys.stderr,
        )
        return 0
    try:
        info = request({"op": "status", "fingerprint": fingerprint()}, path)
    except ServiceRefused as exc:
        from lazyfs.errors import LazyErofsError

        raise LazyErofsError(str(exc)) from None
    except ServiceUnavailable as exc:
        if args.json:
            print(json.dumps({"running": False, "socket": path}))
        else:
            print(f"not running ({exc})")
        return 3
    if args.json:
        print(json.dumps({"running": True, **info}))
        return 0
    print(f"running: pid {info['pid']} (uid {info['uid']}), up {info['uptime_s']:.0f}s, socket {path}")
    print(f"  code:     lazyerofs {info['version']}, {'same as this command' if info['current'] else 'DIFFERS from this command (mounts run in-process; restart the service)'}")
    print(f"  mounts:   {info['served']} served, {len(info['children'])} running, {info['refusals']} refused")  # type: ignore[arg-type]
    print(f"  memory:   {int(info['rss_bytes']) >> 20} MiB resident")  # type: ignore[call-overload]
    return 0
