"""The gRPC face of the snapshotter, its metrics, and the serve loop.

containerd talks to a proxy snapshotter over a unix socket with the
``containerd.services.snapshots.v1.Snapshots`` service. grpcio serves it
from a thread pool; every call is a short translation to
:class:`~lazyfs.snapshotter.snapshots.Snapshotter` and back, with the
snapshotter's errors mapped to the gRPC codes containerd turns back into
its own (not found, already exists, ...).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from lazyfs.containerd import api
from lazyfs.errors import LazyErofsError
from lazyfs.snapshotter.remote import RemoteLayers
from lazyfs.snapshotter.snapshots import Mount, Snapshotter
from lazyfs.snapshotter.store import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Snapshot,
    Store,
)
from lazyfs.snapshotter.zygote import Zygote

__all__ = ["ServeConfig", "serve"]

log = logging.getLogger(__name__)

_PKG = "containerd.services.snapshots.v1"
_CODES: list[tuple[type[Exception], grpc.StatusCode]] = [
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
]
# Snapshots sent per List message.
_LIST_BATCH = 100
# Each method's (request, response) message names.
_SHAPES = {
    "Prepare": ("PrepareSnapshotRequest", "PrepareSnapshotResponse"),
    "View": ("ViewSnapshotRequest", "ViewSnapshotResponse"),
    "Mounts": ("MountsRequest", "MountsResponse"),
    "Commit": ("CommitSnapshotRequest", "google.protobuf.Empty"),
    "Remove": ("RemoveSnapshotRequest", "google.protobuf.Empty"),
    "Stat": ("StatSnapshotRequest", "StatSnapshotResponse"),
    "Update": ("UpdateSnapshotRequest", "UpdateSnapshotResponse"),
    "List": ("ListSnapshotsRequest", "ListSnapshotsResponse"),
    "Usage": ("UsageRequest", "UsageResponse"),
    "Cleanup": ("CleanupRequest", "google.protobuf.Empty"),
}


@dataclass
class ServeConfig:
    address: str  # unix socket path
    root: Path
    mount_args: list[str] = field(default_factory=list)  # passed to each `lazyerofs mount`
    password: str | None = None
    metrics: str | None = None  # HOST:PORT for Prometheus
    log_level: str = "warning"
    remote: bool = True


class SnapshotsService:
    """containerd's snapshot calls, each one a (request -> response) function."""

    def __init__(self, snapshotter: Snapshotter) -> None:
        self.sn = snapshotter
        self.m = api.messages()
        self.calls: dict[str, int] = {}

    def _msg(self, name: str, **fields: Any) -> Any:
        return self.m(f"{_PKG}.{name}")(**fields)

    def _mounts(self, mounts: list[Mount]) -> list[Any]:
        cls = self.m("containerd.types.Mount")
        return [cls(type=m.type, source=m.source, options=list(m.options)) for m in mounts]

    def _info(self, s: Snapshot) -> Any:
        info = self.m(f"{_PKG}.Info")(name=s.key, parent=s.parent, kind=int(s.kind), labels=s.labels)
        info.created_at.FromNanoseconds(int(s.created * 1e9))
        info.updated_at.FromNanoseconds(int(s.updated * 1e9))
        return info

    def Prepare(self, req: Any) -> Any:
        return self._msg("PrepareSnapshotResponse", mounts=self._mounts(self.sn.prepare(req.key, req.parent, dict(req.labels))))

    def View(self, req: Any) -> Any:
        return self._msg("ViewSnapshotResponse", mounts=self._mounts(self.sn.view(req.key, req.parent, dict(req.labels))))

    def Mounts(self, req: Any) -> Any:
        return self._msg("MountsResponse", mounts=self._mounts(self.sn.mounts(req.key)))

    def Commit(self, req: Any) -> Any:
        self.sn.commit(req.name, req.key, dict(req.labels))
        return self.m("google.protobuf.Empty")()

    def Remove(self, req: Any) -> Any:
        self.sn.remove(req.key)
        return self.m("google.protobuf.Empty")()

    def Stat(self, req: Any) -> Any:
        return self._msg("StatSnapshotResponse", info=self._info(self.sn.stat(req.key)))

    def Update(self, req: Any) -> Any:
        snap = self.sn.update(req.info.name, dict(req.info.labels), list(req.update_mask.paths))
        return self._msg("UpdateSnapshotResponse", info=self._info(snap))

    def List(self, req: Any) -> Iterator[Any]:
        snaps = self.sn.list(list(req.filters))
        for i in range(0, len(snaps), _LIST_BATCH):
            yield self._msg("ListSnapshotsResponse", info=[self._info(s) for s in snaps[i : i + _LIST_BATCH]])

    def Usage(self, req: Any) -> Any:
        u = self.sn.usage(req.key)
        return self._msg("UsageResponse", size=u.size, inodes=u.inodes)

    def Cleanup(self, req: Any) -> Any:
        self.sn.cleanup()
        return self.m("google.protobuf.Empty")()

    # -- grpcio plumbing


    def handler(self) -> grpc.GenericRpcHandler:
        def full(name: str) -> str:
            return name if "." in name else f"{_PKG}.{name}"

        handlers = {}
        for name, (req, resp) in _SHAPES.items():
            fn = self._guarded(name, getattr(self, name))
            make = grpc.unary_stream_rpc_method_handler if name == "List" else grpc.unary_unary_rpc_method_handler
            handlers[name] = make(
                fn,
                request_deserializer=self.m(full(req)).FromString,
                response_serializer=self.m(full(resp)).SerializeToString,
            )
        return grpc.method_handlers_generic_handler(api.SNAPSHOTS, handlers)

    def _guarded(self, name: str, fn: Callable[[Any], Any]) -> Callable[[Any, grpc.ServicerContext], Any]:
        def call(req: Any, context: grpc.ServicerContext) -> Any:
            self.calls[name] = self.calls.get(name, 0) + 1
            try:
                out = fn(req)
                return iter(list(out)) if name == "List" else out
            except LazyErofsError as exc:
                code = next((c for t, c in _CODES if isinstance(exc, t)), grpc.StatusCode.UNKNOWN)
                if code == grpc.StatusCode.UNKNOWN:
                    log.error("%s: %s", name, exc)
                else:
                    log.debug("%s: %s", name, exc)
                context.abort(code, str(exc))
            except OSError as exc:
                log.error("%s: %s", name, exc)
                context.abort(grpc.StatusCode.INTERNAL, f"{name}: {exc}")

        return call


def _start_metrics(address: str, snapshotter: Snapshotter, service: SnapshotsService) -> None:
    from prometheus_client import start_http_server
    from prometheus_client.core import REGISTRY

    from lazyfs.snapshotter.metrics import SnapshotterCollector

    host, _, port = address.rpartition(":")
    REGISTRY.register(SnapshotterCollector(snapshotter, service.calls))
    start_http_server(int(port), addr=host or "127.0.0.1")
    log.info("metrics on http://%s/metrics", address)


def serve(cfg: ServeConfig, *, ready: Callable[[], None] | None = None) -> int:
    """Serve until SIGTERM/SIGINT. Mounts stay: containers keep running, and
    the next start adopts them."""
    cfg.root.mkdir(parents=True, exist_ok=True)
    os.chmod(cfg.root, 0o700)
    store = Store(cfg.root / "metadata.db")
    zygote = None
    remote = None
    if cfg.remote:
        zygote = Zygote()
        zygote.start()
        remote = RemoteLayers(
            cfg.root, store, mount_args=cfg.mount_args, password=cfg.password, log_level=cfg.log_level, zygote=zygote
        )
    snapshotter = Snapshotter(cfg.root, store, remote)
    images, layers = snapshotter.recover()
    if images or layers:
        log.warning("recovered after a restart: %d image(s) and %d layer(s) mounted again", images, layers)
    service = SnapshotsService(snapshotter)

    server = grpc.server(ThreadPoolExecutor(max_workers=8, thread_name_prefix="snapshots"))
    server.add_generic_rpc_handlers((service.handler(),))
    sock = os.path.abspath(cfg.address)
    os.makedirs(os.path.dirname(sock), exist_ok=True)
    if os.path.exists(sock):
        os.unlink(sock)  # a socket left by a previous run
    if not server.add_insecure_port(f"unix://{sock}"):
        raise LazyErofsError(f"cannot listen on {sock}")
    old_umask = os.umask(0o177)  # the socket is root's alone
    try:
        server.start()
    finally:
        os.umask(old_umask)
    if cfg.metrics:
        _start_metrics(cfg.metrics, snapshotter, service)

    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("signal %d: stopping", signum)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    log.warning("serving containerd snapshots on %s (root %s)", sock, cfg.root)
    if ready is not None:
        ready()
    stop.wait()
    server.stop(grace=5).wait()
    if zygote is not None:
        zygote.stop()
    store.close()
    with_socket = os.path.exists(sock)
    if with_socket:
        os.unlink(sock)
    return 0
