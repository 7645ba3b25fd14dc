"""The mount service: ``lazyerofs mount`` from a process that has imported it.

A fresh ``lazyerofs mount`` spends ~0.3 s importing trio, httpx, pyfuse3
and the fetch path before it does anything. The service pays that once,
then listens on a unix socket; per request it forks a child that becomes
the caller's ``lazyerofs mount`` (its fds 0-2, working directory, umask,
environment, CPU affinity, resource limits and cgroup), runs
``lazyfs.cli.main(argv)`` from the imports in memory and exits with its
status, which the service passes back. The client half and the wire
format are :mod:`lazyfs.cli.service` (import-light, see there).

The service is one thread and never starts trio or a thread itself, so
every fork is safe. It serves a peer only when it has the service's uid
(SO_PEERCRED), the same mount, network, pid and user namespaces and root
directory (a mount made elsewhere would land in the wrong place), and the
same code (:func:`lazyfs.cli.service.fingerprint`); otherwise the client
mounts in-process. The fingerprint is taken before the imports: code
edited in between makes the service refuse new clients, never serve them
old code. When its own files change on disk it stops (exit 75, for
systemd's ``Restart=on-failure``) once its running mounts return.

The snapshotter's :mod:`lazyfs.snapshotter.zygote` is the same idea over
a pipe, one request at a time; this one serves many at once.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import resource
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lazyfs.cli.service import (
    ServiceRefused,
    ServiceUnavailable,
    fingerprint,
    recv_message,
    request,
    send_message,
)
from lazyfs.errors import LazyErofsError
from lazyfs.mount.state import open_private, private_dir

__all__ = ["EXIT_STALE", "check_peer", "preload", "serve", "start", "stop"]

log = logging.getLogger(__name__)

# Exit status when the code on disk changed under the service (restart me).
EXIT_STALE = 75
# Mounts running at once before further clients are turned away (they mount in-process).
MAX_CHILDREN = 64
# A client has this long to send its request once connected.
REQUEST_TIMEOUT = 2.0
# Namespaces a peer must share with the service: the mount is made in ours.
NAMESPACES = ("mnt", "net", "pid", "user")
# Packages whose every module a mount may import (the daemon imports lazily).
PRELOAD_PACKAGES = ("lazyfs.fetch", "lazyfs.oci", "lazyfs.mount", "lazyfs.format", "cache")
PRELOAD_MODULES = (
    "lazyfs.cli.mount",
    "trio",
    "httpx",
    "pyfuse3",
    "zstandard",
    "ssl",
    "certifi",
    "h11",
    "httpcore",
    "anyio",
    "idna",
    "concurrent.futures.thread",
    "encodings.idna",  # httpx encodes the registry's host name at the first request
)
# Not needed by a mount, and they pull in the producer side.
PRELOAD_SKIP = ("lazyfs.format.encode", "lazyfs.format.verity_build")


def preload() -> list[str]:
    """Import everything a mount imports; the names that failed (logged)."""
    import importlib

    failed = []
    names = list(PRELOAD_MODULES)
    for package in PRELOAD_PACKAGES:
        names.append(package)
        try:
            pkg = importlib.import_module(package)
        except ImportError:
            continue
        for directory in getattr(pkg, "__path__", []):
            names += sorted(f"{package}.{n[:-3]}" for n in os.listdir(directory) if n.endswith(".py") and n != "__init__.py")
    for name in names:
        if name in PRELOAD_SKIP or name == __name__:
            continue
        try:
            importlib.import_module(name)
        except Exception as exc:  # an optional module: the child imports it itself if needed
            log.info("preload: %s: %s", name, exc)
            failed.append(name)
    return failed


# ------------------------------------------------------------------- checks


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int


def peer_of(sock: socket.socket) -> Peer:
    import struct

    pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return Peer(pid, uid, gid)


def _root_id(pid: int | str) -> tuple[int, int]:
    st = os.stat(f"/proc/{pid}/root")
    return st.st_dev, st.st_ino


def check_peer(peer: Peer, *, uid: int | None = None) -> str | None:
    """Why the service must not serve ``peer``, or None. The uid is the
    security check; the namespaces and root keep a mount where the caller
    would have made it."""
    own = os.getuid() if uid is None else uid
    if peer.uid != own:
        return f"uid {peer.uid} is not the service's uid {own}"
    try:
        for ns in NAMESPACES:
            if os.readlink(f"/proc/{peer.pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}"):
                return f"the caller is in another {ns} namespace"
        if _root_id(peer.pid) != _root_id("self"):
            return "the caller has another root directory (chroot)"
    except OSError as exc:
        return f"cannot inspect the caller (pid {peer.pid}): {exc.strerror}"
    return None


def _check_request(message: dict[str, object]) -> str | None:
    argv, env = message.get("argv"), message.get("env")
    if not (isinstance(argv, list) and all(isinstance(a, str) for a in argv)):
        return "argv must be a list of strings"
    if not (isinstance(env, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())):
        return "env must map strings to strings"
    umask = message.get("umask")
    if not (isinstance(umask, int) and 0 <= umask <= 0o777):
        return "umask must be 0..0o777"
    if not isinstance(message.get("started"), (int, float)):
        return "started must be a number"
    return None


# --------------------------------------------------------------- the child


@dataclass(frozen=True)
class _Caller:
    """What the child copies from the caller's process besides its request."""

    affinity: set[int] | None
    nice: int | None
    limits: dict[int, tuple[int, int]]
    cgroup: str | None

    @classmethod
    def read(cls, pid: int) -> _Caller:
        affinity = nice = cgroup = None
        with contextlib.suppress(OSError):
            affinity = os.sched_getaffinity(pid)
        with contextlib.suppress(OSError):
            nice = os.getpriority(os.PRIO_PROCESS, pid)
        limits = {}
        for name in dir(resource):
            if name.startswith("RLIMIT_"):
                with contextlib.suppress(OSError, ValueError):
                    res = getattr(resource, name)
                    limits[res] = resource.prlimit(pid, res)
        with contextlib.suppress(OSError), open(f"/proc/{pid}/cgroup") as f:
            for line in f:
                if line.startswith("0::"):  # cgroup v2
                    cgroup = line[3:].strip()
        return cls(affinity, nice, limits, cgroup)

    def apply(self) -> None:
        """Best effort: what cannot be copied stays as the service has it."""
        if self.cgroup is not None and self.cgroup != _own_cgroup():
            # The mount's daemon belongs with its caller (a systemd stop of
            # the service must not take it along).
            with contextlib.suppress(OSError), open(f"/sys/fs/cgroup{self.cgroup}/cgroup.procs", "w") as f:
                f.write("0")
        if self.affinity:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(0, self.affinity)
        if self.nice is not None:
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, 0, self.nice)
        for res, limit in self.limits.items():
            with contextlib.suppress(OSError, ValueError):
                resource.setrlimit(res, limit)


def _own_cgroup() -> str | None:
    with contextlib.suppress(OSError), open("/proc/self/cgroup") as f:
        for line in f:
            if line.startswith("0::"):
                return line[3:].strip()
    return None


def _reread_environment() -> None:
    """Module state computed from the environment at import, which the
    child must take from the caller's environment instead of the service's.
    (Found by grep: lazyfs.mount.state.RUN_DIR, also imported by name.)"""
    from lazyfs.mount import state

    old = state.RUN_DIR
    new = Path(os.environ.get("LAZYEROFS_RUN_DIR", "/run/lazyerofs"))
    for name, module in list(sys.modules.items()):
        if (name == "lazyfs" or name.startswith("lazyfs.")) and getattr(module, "RUN_DIR", None) is old:
            module.RUN_DIR = new  # type: ignore[attr-defined]


def _become_caller(message: dict[str, object], fds: list[int], caller: _Caller) -> None:
    """In the child: take on the caller's stdio, directory, umask,
    environment and process attributes; then lazyfs.cli.main is its command."""
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    caller.apply()
    for target, fd in enumerate(fds[:3]):
        os.dup2(fd, target)
    os.fchdir(fds[3])
    for fd in fds:
        if fd > 2:
            os.close(fd)
    os.umask(int(message["umask"]))  # type: ignore[call-overload]
    os.environ.clear()
    os.environ.update(message["env"])  # type: ignore[arg-type]
    _reread_environment()
    argv: list[str] = message["argv"]  # type: ignore[assignment]
    sys.argv = ["lazyerofs", *argv]
    # New stdio objects on the caller's fds: buffering follows their kind
    # (line-buffered on a terminal), as it would in a fresh process.
    sys.stdin = open(0, closefd=False)  # noqa: SIM115
    sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", closefd=False, buffering=1, errors="backslashreplace")  # noqa: SIM115
    # The service's log handler: lazyfs.cli.main sets logging up for the caller.
    root = logging.getLogger()
    for handler in root.handlers[:]:
        root.removeHandler(handler)
    root.setLevel(logging.WARNING)


def _run_child(message: dict[str, object], fds: list[int], caller: _Caller, close: Callable[[], None]) -> None:
    code = 1
    try:
        # The service's sockets, selector and pipe: the mount's daemon (forked
        # from here) must hold none of them.
        close()
        _become_caller(message, fds, caller)
        import lazyfs.cli as cli

        cli.STARTED = float(message["started"])  # type: ignore[arg-type]
        code = cli.main(message["argv"])  # type: ignore[arg-type]
    except SystemExit as exc:  # as the interpreter would: a message goes to stderr, status 1
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt:
        code = 130
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        with contextlib.suppress(BaseException):
            sys.stdout.flush()
        with contextlib.suppress(BaseException):
            sys.stderr.flush()
        os._exit(code)


# ------------------------------------------------------------------ server


@dataclass
class _Server:
    path: str
    fingerprint: str
    listener: socket.socket
    started: float = field(default_factory=time.monotonic)
    children: dict[int, socket.socket] = field(default_factory=dict)
    served: int = 0
    refused: int = 0
    stopping: bool = False
    exit_code: int = 0
    selector: selectors.BaseSelector = field(default_factory=selectors.DefaultSelector)
    wakeup: tuple[int, int] = (-1, -1)
    bound: tuple[int, int] | None = None  # the socket file's (dev, inode)

    def close_in_child(self, conn: socket.socket) -> None:
        """In a child: close the request's connection (the service answers
        it) and everything else of the service's."""
        conn.close()
        signal.set_wakeup_fd(-1)
        for fd in self.wakeup:
            os.close(fd)
        self.selector.close()
        self.listener.close()
        for conn in self.children.values():
            conn.close()

    def status(self, client_fingerprint: object) -> dict[str, object]:
        from lazyfs import __version__

        return {
            "pid": os.getpid(),
            "uid": os.getuid(),
            "socket": self.path,
            "version": __version__,
            "current": client_fingerprint == self.fingerprint,
            "uptime_s": time.monotonic() - self.started,
            "served": self.served,
            "refusals": self.refused,
            "children": sorted(self.children),
            "rss_bytes": _rss_bytes(),
        }

    def handle(self, conn: socket.socket) -> None:
        """One connection: check the peer, read its request, answer or fork."""
        conn.settimeout(REQUEST_TIMEOUT)
        fds: list[int] = []
        try:
            peer = peer_of(conn)
            why = check_peer(peer)
            if why is not None:
                # Unread, the request's descriptors go with the connection.
                self._refuse(conn, why, peer)
                return
            message, fds = recv_message(conn, max_fds=4)
            op = message.get("op")
            if op == "status":
                send_message(conn, self.status(message.get("fingerprint")))
            elif op == "stop":
                send_message(conn, {"stopping": os.getpid()})
                log.info("stop requested by pid %d", peer.pid)
                self.stopping = True
            elif op == "mount":
                fds, taken = [], fds
                conn = self._mount(conn, message, taken, peer)  # type: ignore[assignment]
            else:
                self._refuse(conn, f"unknown op {op!r}", peer)
        except (OSError, EOFError, ValueError) as exc:
            log.info("connection dropped: %s", exc)
        finally:
            for fd in fds:
                os.close(fd)
            # Closed now: the caller's loop still holds a reference, and an
            # open connection would keep the caller's stdio (in flight) open.
            if conn is not None:
                conn.close()

    def _refuse(self, conn: socket.socket, why: str, peer: Peer) -> None:
        self.refused += 1
        log.info("refused pid %d (uid %d): %s", peer.pid, peer.uid, why)
        with contextlib.suppress(OSError):
            send_message(conn, {"refused": why})

    def _mount(self, conn: socket.socket, message: dict[str, object], fds: list[int], peer: Peer) -> socket.socket | None:
        """Fork the child for a mount request; closes ``fds``. Returns the
        connection to close, or None when it is kept (until the child exits)."""
        try:
            why = _check_request(message)
            if why is None and len(fds) != 4:
                why = f"expected 4 descriptors (stdin, stdout, stderr, cwd), got {len(fds)}"
            if why is None and message.get("fingerprint") != self.fingerprint:
                why = "the caller runs other code than the service (another version or checkout)"
                if fingerprint() != self.fingerprint:
                    log.warning("the code on disk changed since the service started: stopping")
                    self.stopping, self.exit_code = True, EXIT_STALE
            if why is None and self.stopping:
                why = "the service is stopping"
            if why is None and len(self.children) >= MAX_CHILDREN:
                why = f"{MAX_CHILDREN} mounts are running already"
            if why is not None:
                self._refuse(conn, why, peer)
                return conn
            caller = _Caller.read(peer.pid)
            # Accepted before the fork: a client that has this must never
            # mount itself. If it has gone, this fails and nothing forks.
            send_message(conn, {"accepted": True})
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child
                _run_child(message, fds, caller, lambda: self.close_in_child(conn))
            self.children[pid] = conn
            self.served += 1
            log.info("mount for pid %d: child %d: %s", peer.pid, pid, message["argv"])
            with contextlib.suppress(OSError):
                send_message(conn, {"pid": pid})
            return None
        except OSError as exc:
            log.info("mount request of pid %d dropped: %s", peer.pid, exc)
            return conn
        finally:
            for fd in fds:
                os.close(fd)

    def reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            conn = self.children.pop(pid, None)
            if conn is None:
                continue
            rc = os.waitstatus_to_exitcode(status)
            log.info("child %d exited: %d", pid, rc)
            with contextlib.suppress(OSError):
                conn.settimeout(REQUEST_TIMEOUT)
                send_message(conn, {"rc": rc})
            conn.close()

    def loop(self) -> None:
        self.listener.setblocking(False)
        self.selector.register(self.listener, selectors.EVENT_READ, "listen")
        self.selector.register(self.wakeup[0], selectors.EVENT_READ, "wakeup")
        while True:
            if self.stopping and self.listener.fileno() >= 0:
                self.selector.unregister(self.listener)
                _remove_socket(self.path, self.bound)
                self.listener.close()
            if self.stopping and not self.children:
                return
            for key, _ in self.selector.select(timeout=None if self.children or not self.stopping else 0):
                if key.data == "listen":
                    with contextlib.suppress(BlockingIOError, InterruptedError):
                        self.handle(self.listener.accept()[0])
                else:
                    with contextlib.suppress(BlockingIOError):
                        while os.read(self.wakeup[0], 512):
                            pass
            self.reap()


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def _file_id(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _remove_socket(path: str, bound: tuple[int, int] | None) -> None:
    """Unlink the socket file we bound (``bound``: its id then), unless
    another service has taken the path since."""
    if bound is not None and _file_id(path) == bound:
        with contextlib.suppress(OSError):
            os.unlink(path)


def _private_parent(path: str) -> None:
    try:
        private_dir(Path(path).parent)
    except OSError as exc:
        raise LazyErofsError(f"cannot make the socket's directory {Path(path).parent}: {exc.strerror}") from exc


def _listen(path: str) -> socket.socket:
    """Bind the socket: its directory 0700 and ours, the socket 0600. A
    socket file nobody answers on (a killed service) is replaced; a live
    one is an error."""
    _private_parent(path)
    try:
        info = request({"op": "status"}, path, timeout=1.0)
    except ServiceRefused as exc:
        raise LazyErofsError(f"another service is running at {path}: {exc}") from None
    except ServiceUnavailable:
        pass
    else:
        raise LazyErofsError(f"a service is already running at {path} (pid {info.get('pid')})")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        raise LazyErofsError(f"cannot listen on {path}: {exc.strerror}") from exc
    finally:
        os.umask(old)
    sock.listen(64)
    return sock


def serve(path: str) -> int:
    """``lazyerofs service run``: preload, listen, serve until SIGTERM,
    SIGINT, a stop request or a change of the code on disk; return once the
    mounts it runs have returned. Returns the exit status."""
    code = fingerprint()  # before the imports: see the module docstring
    for fd in (0, 1, 2):  # a received fd must never land on 0-2 (see _become_caller)
        try:
            os.fstat(fd)
        except OSError:
            nul = os.open(os.devnull, os.O_RDWR)
            if nul != fd:
                os.dup2(nul, fd)
                os.close(nul)
    t0 = time.monotonic()
    failed = preload()
    listener = _listen(path)
    server = _Server(path, code, listener, bound=_file_id(path))
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    server.wakeup = (r, w)

    def stop(signum: int, _frame: object) -> None:
        log.info("signal %d: stopping", signum)
        server.stopping = True

    signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, stop)
    signal.signal(signal.SIGCHLD, lambda _s, _f: None)  # wakes the selector through the wakeup fd
    log.info(
        "serving at %s: pid %d, imports %.3fs, %d MiB%s",
        path, os.getpid(), time.monotonic() - t0, _rss_bytes() >> 20,
        f", not imported: {', '.join(failed)}" if failed else "",
    )  # fmt: skip
    try:
        server.loop()
    finally:
        signal.set_wakeup_fd(-1)
        if listener.fileno() >= 0:
            _remove_socket(path, server.bound)
            listener.close()
        os.close(r)
        os.close(w)
    log.info("stopped after %d mounts", server.served)
    return server.exit_code


# ------------------------------------------------------------ start / stop


def default_log_file(path: str) -> str:
    return os.path.join(os.path.dirname(path), "service.log")


def start(path: str, *, log_file: str | None = None, timeout: float = 30.0) -> dict[str, object]:
    """``lazyerofs service start``: run ``service run`` detached (own
    session, stdio on /dev/null and the log) and return its status once it
    answers. A service already answering is left alone and returned."""
    with contextlib.suppress(ServiceUnavailable):
        info = request({"op": "status", "fingerprint": fingerprint()}, path, timeout=1.0)
        if not info.get("current"):
            raise LazyErofsError(f"a service of other code runs at {path} (pid {info.get('pid')}): stop it first")
        return info
    _private_parent(path)
    log_file = log_file or default_log_file(path)
    try:
        log_fd = open_private(log_file, os.O_APPEND)
    except OSError as exc:
        raise LazyErofsError(f"cannot open the service's log {log_file}: {exc.strerror}") from exc
    try:
        level = "debug" if logging.getLogger().getEffectiveLevel() <= logging.DEBUG else "info"
        proc = subprocess.Popen(
            [sys.executable, "-m", "lazyfs.cli", "--log-level", level, "service", "run", "--socket", path],
            stdin=subprocess.DEVNULL,
            stdout=log_fd,
            stderr=log_fd,
            start_new_session=True,
            cwd="/",
        )
    finally:
        os.close(log_fd)
    deadline = time.monotonic() + timeout
    while True:
        try:
            return request({"op": "status", "fingerprint": fingerprint()}, path, timeout=1.0)
        except ServiceRefused as exc:
            raise LazyErofsError(str(exc)) from None
        except ServiceUnavailable:
            pass
        if proc.poll() is not None:
            raise LazyErofsError(f"the service exited with status {proc.returncode}:{_tail(log_file)}")
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise LazyErofsError(f"the service did not answer within {timeout:g}s:{_tail(log_file)}")
        time.sleep(0.02)


def _tail(log_file: str) -> str:
    try:
        with open(log_file, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 2000))
            text = f.read().decode(errors="replace").strip()
    except OSError:
        return f" (no log at {log_file})"
    return f"\n{text}" if text else f" (log {log_file} is empty)"


def stop(path: str, *, timeout: float = 30.0) -> int | None:
    """``lazyerofs service stop``: ask the service to stop and wait until
    its process is gone (it first waits for the mounts it is running).
    The pid stopped, or None when no service answered (a stale socket file
    is removed)."""
    try:
        answer = request({"op": "stop"}, path)
    except ServiceRefused as exc:
        raise LazyErofsError(str(exc)) from None
    except ServiceUnavailable:
        with contextlib.suppress(OSError):
            _remove_stale(path)
        return None
    pid = answer.get("stopping")
    if not isinstance(pid, int):
        raise LazyErofsError(f"unexpected answer from the service: {answer}")
    from lazyfs.mount.state import wait_gone

    if not wait_gone(pid, timeout):
        raise LazyErofsError(f"the service (pid {pid}) did not stop within {timeout:g}s (mounts still running?)")
    return pid


def _remove_stale(path: str) -> None:
    """Remove a socket file nobody listens on."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            raise
    finally:
        sock.close()
