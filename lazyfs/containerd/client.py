"""A small, synchronous client of containerd's gRPC API: just the calls a
lazy pull needs (content, images, leases, snapshots).

containerd scopes every call by the ``containerd-namespace`` header and,
while a lease is held, keeps what the calls create alive through the
``containerd-lease`` header.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc

from lazyfs.containerd import api
from lazyfs.errors import LazyErofsError

__all__ = ["Containerd", "ContainerdError"]

# Bytes per Write message (containerd's own clients use 1 MiB).
_WRITE_CHUNK = 1 << 20
# Seconds an UNAVAILABLE answer is retried.
UNAVAILABLE_RETRY = 20.0


class ContainerdError(LazyErofsError):
    """A containerd call failed; ``code`` is the gRPC status code."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


class Containerd:
    def __init__(self, address: str, namespace: str, *, timeout: float = 60.0) -> None:
        self.address = address
        self.namespace = namespace
        self.timeout = timeout
        self.lease: str | None = None
        self.m = api.messages()
        self._channel = grpc.insecure_channel(f"unix://{address}")

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Containerd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing

    def _metadata(self) -> list[tuple[str, str]]:
        md = [("containerd-namespace", self.namespace)]
        if self.lease:
            md.append(("containerd-lease", self.lease))
        return md

    def call(self, service: str, name: str, request: Any, response: str) -> Any:
        """One unary call. UNAVAILABLE is retried for ``UNAVAILABLE_RETRY``
        seconds: it is what containerd answers while it reconnects to a
        proxy plugin (a snapshotter that just restarted), and such a call
        never reached the plugin."""
        stub = self._channel.unary_unary(
            api.method(service, name),
            request_serializer=type(request).SerializeToString,
            response_deserializer=self.m(response).FromString,
        )
        deadline = time.monotonic() + UNAVAILABLE_RETRY
        pause = 0.2
        while True:
            try:
                return stub(request, metadata=self._metadata(), timeout=self.timeout)
            except grpc.RpcError as exc:
                unavailable = isinstance(exc, grpc.Call) and exc.code() == grpc.StatusCode.UNAVAILABLE
                if not unavailable or time.monotonic() + pause > deadline:
                    raise self._error(f"{service.rsplit('.', 1)[-1]}.{name}", exc) from None
            time.sleep(pause)
            pause = min(pause * 2, 2.0)

    def _error(self, what: str, exc: grpc.RpcError) -> ContainerdError:
        code = exc.code() if isinstance(exc, grpc.Call) else None
        details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
        if code == grpc.StatusCode.UNAVAILABLE:
            return ContainerdError(
                f"containerd {what} ({self.address}): unavailable for {UNAVAILABLE_RETRY:g}s: {details} "
                "(is containerd running, and the snapshotter it names?)",
                code,
            )
        return ContainerdError(f"containerd {what}: {details}", code)

    def wait_ready(self, seconds: float) -> None:
        try:
            grpc.channel_ready_future(self._channel).result(timeout=seconds)
        except grpc.FutureTimeoutError:
            raise ContainerdError(f"containerd is not answering on {self.address}") from None

    # -- leases

    @contextlib.contextmanager
    def leased(self, expire: float = 3600.0) -> Iterator[str]:
        """Hold a lease (expiring after ``expire`` seconds in any case) for the block."""
        lease_id = f"lazyerofs-pull-{int(time.time())}-{secrets.token_hex(4)}"
        until = (datetime.now(UTC) + timedelta(seconds=expire)).strftime("%Y-%m-%dT%H:%M:%SZ")
        req = self.m("containerd.services.leases.v1.CreateRequest")(
            id=lease_id, labels={"containerd.io/gc.expire": until}
        )
        self.call(api.LEASES, "Create", req, "containerd.services.leases.v1.CreateResponse")
        self.lease = lease_id
        try:
            yield lease_id
        finally:
            self.lease = None
            with contextlib.suppress(ContainerdError):
                self.call(
                    api.LEASES, "Delete",
                    self.m("containerd.services.leases.v1.DeleteRequest")(id=lease_id),
                    "google.protobuf.Empty",
                )  # fmt: skip

    # -- content

    def content_info(self, digest: str) -> Any | None:
        req = self.m("containerd.services.content.v1.InfoRequest")(digest=digest)
        try:
            return self.call(api.CONTENT, "Info", req, "containerd.services.content.v1.InfoResponse").info
        except ContainerdError as exc:
            if exc.code == grpc.StatusCode.NOT_FOUND:
                return None
            raise

    def put_content(self, digest: str, data: bytes, labels: Mapping[str, str]) -> None:
        """Store ``data`` (which must hash to ``digest``) with ``labels``;
        content already there only gets the labels."""
        if self.content_info(digest) is not None:
            info = self.m("containerd.services.content.v1.Info")(digest=digest, labels=dict(labels))
            req = self.m("containerd.services.content.v1.UpdateRequest")(info=info)
            req.update_mask.paths.extend(f"labels.{k}" for k in labels)
            self.call(api.CONTENT, "Update", req, "containerd.services.content.v1.UpdateResponse")
            return
        write = self.m("containerd.services.content.v1.WriteContentRequest")
        ref = f"lazyerofs-{digest}"

        def requests() -> Iterator[Any]:
            for off in range(0, len(data), _WRITE_CHUNK):
                chunk = data[off : off + _WRITE_CHUNK]
                yield write(action=1, ref=ref, total=len(data), expected=digest, offset=off, data=chunk)
            yield write(action=2, ref=ref, total=len(data), expected=digest, offset=len(data), labels=dict(labels))

        stub = self._channel.stream_stream(
            api.method(api.CONTENT, "Write"),
            request_serializer=write.SerializeToString,
            response_deserializer=self.m("containerd.services.content.v1.WriteContentResponse").FromString,
        )
        try:
            for resp in stub(requests(), metadata=self._metadata(), timeout=self.timeout):
                if resp.action == 2 and resp.digest and resp.digest != digest:
                    raise ContainerdError(f"containerd stored {resp.digest}, expected {digest}")
        except grpc.RpcError as exc:
            if isinstance(exc, grpc.Call) and exc.code() == grpc.StatusCode.ALREADY_EXISTS:
                return  # written meanwhile by someone else
            raise self._error("Content.Write", exc) from None

    # -- snapshots

    def snapshot_exists(self, snapshotter: str, key: str) -> bool:
        req = self.m("containerd.services.snapshots.v1.StatSnapshotRequest")(snapshotter=snapshotter, key=key)
        try:
            self.call(api.SNAPSHOTS, "Stat", req, "containerd.services.snapshots.v1.StatSnapshotResponse")
            return True
        except ContainerdError as exc:
            if exc.code == grpc.StatusCode.NOT_FOUND:
                return False
            raise

    def prepare(self, snapshotter: str, key: str, parent: str, labels: Mapping[str, str]) -> bool:
        """Prepare ``key``; True when the snapshotter answered that the target
        (labels' ``containerd.io/snapshot.ref``) already exists - made
        available remotely - and False when it made an ordinary snapshot."""
        req = self.m("containerd.services.snapshots.v1.PrepareSnapshotRequest")(
            snapshotter=snapshotter, key=key, parent=parent, labels=dict(labels)
        )
        try:
            self.call(api.SNAPSHOTS, "Prepare", req, "containerd.services.snapshots.v1.PrepareSnapshotResponse")
        except ContainerdError as exc:
            if exc.code == grpc.StatusCode.ALREADY_EXISTS:
                return True
            raise
        return False

    def remove_snapshot(self, snapshotter: str, key: str) -> None:
        req = self.m("containerd.services.snapshots.v1.RemoveSnapshotRequest")(snapshotter=snapshotter, key=key)
        self.call(api.SNAPSHOTS, "Remove", req, "google.protobuf.Empty")

    # -- images

    def put_image(self, name: str, media_type: str, digest: str, size: int, labels: Mapping[str, str]) -> None:
        image = self.m("containerd.services.images.v1.Image")(name=name, labels=dict(labels))
        image.target.media_type = media_type
        image.target.digest = digest
        image.target.size = size
        try:
            self.call(
                api.IMAGES, "Create",
                self.m("containerd.services.images.v1.CreateImageRequest")(image=image),
                "containerd.services.images.v1.CreateImageResponse",
            )  # fmt: skip
        except ContainerdError as exc:
            if exc.code != grpc.StatusCode.ALREADY_EXISTS:
                raise
            req = self.m("containerd.services.images.v1.UpdateImageRequest")(image=image)
            req.update_mask.paths.extend(["target", *(f"labels.{k}" for k in labels)])
            self.call(api.IMAGES, "Update", req, "containerd.services.images.v1.UpdateImageResponse")
