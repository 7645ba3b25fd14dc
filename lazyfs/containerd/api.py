"""containerd's gRPC messages and method paths, from the ``.proto`` files here.

The ``.proto`` files in ``proto/`` restate the parts of containerd's API that
lazyerofs serves (snapshots) or calls (content, images, leases, snapshots):
package, message names and field numbers are the interface. They are
compiled when this module is first imported, in process, by the protoc that
grpcio-tools ships (about 30 ms), into message classes; nothing generated is
kept in the tree. Services are called and served through grpcio's generic
handlers, so no generated stubs are needed either.
"""

from __future__ import annotations

import os
import tempfile
from importlib import resources
from typing import Any

from google.protobuf import descriptor_pb2, message_factory

from lazyfs.errors import LazyErofsError

__all__ = ["CONTENT", "IMAGES", "LEASES", "SNAPSHOTS", "Messages", "method"]

PROTO_FILES = ("mount.proto", "snapshots.proto", "content.proto", "images.proto", "leases.proto")

SNAPSHOTS = "containerd.services.snapshots.v1.Snapshots"
CONTENT = "containerd.services.content.v1.Content"
IMAGES = "containerd.services.images.v1.Images"
LEASES = "containerd.services.leases.v1.Leases"


def method(service: str, name: str) -> str:
    """The gRPC path of ``service``'s method ``name``."""
    return f"/{service}/{name}"


def _compile() -> descriptor_pb2.FileDescriptorSet:
    from grpc_tools import protoc  # protoc itself, as a library

    proto_dir = str(resources.files("lazyfs.containerd") / "proto")
    well_known = str(resources.files("grpc_tools") / "_proto")
    with tempfile.TemporaryDirectory(prefix="lazyerofs-proto-") as tmp:
        out = os.path.join(tmp, "api.pb")
        rc = protoc.main(
            ["protoc", f"-I{proto_dir}", f"-I{well_known}", "--include_imports", f"--descriptor_set_out={out}", *PROTO_FILES]
        )
        if rc != 0:
            raise LazyErofsError(f"cannot compile containerd's API definitions in {proto_dir} (protoc exit {rc})")
        with open(out, "rb") as f:
            return descriptor_pb2.FileDescriptorSet.FromString(f.read())


class Messages:
    """Message classes by full name: ``api.msg("containerd.types.Mount")``."""

    def __init__(self) -> None:
        self._classes: dict[str, Any] = message_factory.GetMessages(list(_compile().file))

    def __call__(self, full_name: str) -> Any:
        return self._classes[full_name]


_messages: Messages | None = None


def messages() -> Messages:
    global _messages
    if _messages is None:
        _messages = Messages()
    return _messages
