"""Pushing: blobs (monolithic or chunked uploads), manifests, and whole images.

An image here is layer blobs plus the OCI config (``rootfs.diff_ids``, the
platform) and manifest built from their descriptors; the layers' own format
is the caller's business.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import trio

from lazyfs.errors import FormatError, IntegrityError, RegistryError
from lazyfs.format.digest import check_digest
from lazyfs.oci.media import MEDIA_OCI_CONFIG, MEDIA_OCI_MANIFEST, parse_platform
from lazyfs.oci.reference import Reference
from lazyfs.oci.transport import BodyFactory, Session, printable, raise_for_status

__all__ = [
    "ImageLayer",
    "blob_exists",
    "image_config",
    "image_manifest",
    "push_blob",
    "push_image",
    "push_manifest",
]

log = logging.getLogger(__name__)

# Monolithic PUT up to this size; beyond it, PATCH chunks of UPLOAD_CHUNK.
MONOLITHIC_LIMIT = 64 << 20
UPLOAD_CHUNK = 16 << 20
_READ_PIECE = 1 << 20


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _manifest_url(session: Session, ref: Reference, selector: str) -> str:
    return f"{session.base_url(ref.api_host)}/v2/{ref.repository}/manifests/{selector}"


@dataclass(frozen=True)
class ImageLayer:
    """One layer to push: its blob (a file or bytes), its descriptor (digest,
    size, mediaType, annotations) and its diff_id (sha256 of what it unpacks to)."""

    blob: Path | bytes
    descriptor: Mapping[str, Any]
    diff_id: str


def image_config(diff_ids: Sequence[str], platform: str) -> bytes:
    """The OCI image config: platform and ``rootfs.diff_ids``, bottom layer first."""
    os_, arch, variant = parse_platform(platform)
    config: dict[str, Any] = {"architecture": arch, "os": os_}
    if variant:
        config["variant"] = variant
    config["rootfs"] = {"type": "layers", "diff_ids": list(diff_ids)}
    return json.dumps(config, separators=(",", ":")).encode()


def image_manifest(layers: Sequence[Mapping[str, Any]], config: bytes) -> bytes:
    """The OCI image manifest for layer descriptors ``layers`` and ``config``'s bytes."""
    manifest = {
        "schemaVersion": 2,
        "mediaType": MEDIA_OCI_MANIFEST,
        "config": {"mediaType": MEDIA_OCI_CONFIG, "digest": _sha256(config), "size": len(config)},
        "layers": [dict(layer) for layer in layers],
    }
    return json.dumps(manifest, indent=2).encode()


async def push_image(
    session: Session,
    ref: Reference,
    layers: Sequence[ImageLayer],
    *,
    platform: str,
    on_layer: Callable[[int, bool], None] = lambda index, uploaded: None,
) -> str:
    """Push ``layers`` (bottom first), a config and a manifest; returns the manifest digest.

    ``on_layer(index, uploaded)`` is told of each layer as it is done
    (``uploaded`` is False when the registry had it already).
    """
    config = image_config([layer.diff_id for layer in layers], platform)
    manifest = image_manifest([layer.descriptor for layer in layers], config)
    for i, layer in enumerate(layers):
        desc = layer.descriptor
        on_layer(i, await push_blob(session, ref, layer.blob, desc["digest"], desc["size"]))
    await push_blob(session, ref, config, _sha256(config), len(config))
    return await push_manifest(session, ref, manifest, MEDIA_OCI_MANIFEST)


async def blob_exists(session: Session, ref: Reference, digest: str) -> bool:
    """Whether ``ref``'s repository has blob ``digest`` (a HEAD)."""
    check_digest(digest, what=f"{ref.name}: blob digest")
    url = f"{session.base_url(ref.api_host)}/v2/{ref.repository}/blobs/{digest}"
    what = f"{ref.name} blob {digest}"

    async def once() -> bool:
        resp = await session.send(
            "HEAD", url, host=ref.api_host, scope=f"repository:{ref.repository}:pull,push"
        )
        if resp.status_code == 200:
            return True
        if resp.status_code == 404:
            return False
        await raise_for_status(resp, what)
        return False

    return await session.retrying(what, once)


async def push_blob(
    session: Session,
    ref: Reference,
    path_or_bytes: str | os.PathLike[str] | bytes,
    digest: str,
    size: int,
    *,
    chunk_size: int | None = None,
) -> bool:
    """Upload a blob unless the registry has it already (HEAD first).

    Small blobs go up in one PUT, larger ones (or any, with ``chunk_size``)
    as PATCH chunks then a closing PUT. A transient failure restarts the
    upload. Returns True if bytes were uploaded, False if it was present.
    """
    check_digest(digest, what=f"{ref.name}: blob digest")
    if isinstance(path_or_bytes, bytes | bytearray | memoryview):
        data: bytes | None = bytes(path_or_bytes)
        path = None
        actual = len(data)
    else:
        data, path = None, Path(path_or_bytes)
        actual = path.stat().st_size
    if actual != size:
        raise FormatError(f"{ref.name}: blob {digest} is {actual} bytes, but {size} were declared")
    if await blob_exists(session, ref, digest):
        log.info("%s: blob %s already present", ref.name, digest)
        return False
    if chunk_size is None:
        chunk_size = size if size <= MONOLITHIC_LIMIT else UPLOAD_CHUNK
    chunk_size = max(1, chunk_size)
    host, scope = ref.api_host, f"repository:{ref.repository}:pull,push"
    what = f"{ref.name}: upload of blob {digest}"

    def body(offset: int, length: int) -> BodyFactory:
        if data is not None:
            return lambda: data[offset : offset + length]
        assert path is not None
        return lambda: _file_body(path, offset, length)

    async def once() -> None:
        resp = await session.send(
            "POST", f"{session.base_url(host)}/v2/{ref.repository}/blobs/uploads/", host=host,
            scope=scope, headers={"Content-Length": "0"},
        )  # fmt: skip
        if resp.status_code != 202:
            await raise_for_status(resp, what)
        location = _location(resp, what)
        offset = 0
        if size > chunk_size:
            while offset < size:
                n = min(chunk_size, size - offset)
                resp = await session.send(
                    "PATCH", location, host=host, scope=scope, content=body(offset, n),
                    headers={
                        "Content-Type": "application/octet-stream",
                        "Content-Length": str(n),
                        "Content-Range": f"{offset}-{offset + n - 1}",
                    },
                )  # fmt: skip
                if resp.status_code != 202:
                    await raise_for_status(resp, f"{what} (chunk at {offset})")
                location = _location(resp, what)
                offset += n
        final = httpx.URL(location).copy_merge_params({"digest": digest})
        resp = await session.send(
            "PUT", final, host=host, scope=scope, content=body(offset, size - offset),
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(size - offset)},
        )  # fmt: skip
        if resp.status_code != 201:
            await raise_for_status(resp, what)
        said = resp.headers.get("docker-content-digest")
        if said and said != digest:
            raise IntegrityError(f"{what}: registry stored it as {printable(said, 200)}")

    await session.retrying(what, once)
    return True


async def push_manifest(
    session: Session, ref: Reference, manifest_bytes: bytes, media_type: str
) -> str:
    """PUT a manifest under ``ref``'s tag (or its digest); returns the manifest digest."""
    digest = _sha256(manifest_bytes)
    if ref.digest is not None and ref.tag is None and ref.digest != digest:
        raise IntegrityError(f"{ref}: manifest hashes to {digest}, not the digest in the reference")
    selector = ref.tag or digest
    what = f"{ref.name}: push of manifest {selector}"

    async def once() -> str:
        resp = await session.send(
            "PUT", _manifest_url(session, ref, selector), host=ref.api_host,
            scope=f"repository:{ref.repository}:pull,push", content=lambda: manifest_bytes,
            headers={"Content-Type": media_type},
        )  # fmt: skip
        if resp.status_code not in (200, 201):
            await raise_for_status(resp, what)
        said = resp.headers.get("docker-content-digest")
        if said and said != digest:
            raise IntegrityError(
                f"{what}: registry computed {printable(said, 200)}, we computed {digest}"
            )
        return digest

    return await session.retrying(what, once)


def _location(resp: httpx.Response, what: str) -> str:
    loc = resp.headers.get("location")
    if not loc:
        raise RegistryError(f"{what}: HTTP {resp.status_code} without a Location header")
    return str(resp.url.join(loc))


async def _file_body(path: Path, offset: int, length: int) -> AsyncIterator[bytes]:
    """Stream ``length`` bytes of a file from ``offset``, reading in a worker thread."""
    f = await trio.to_thread.run_sync(open, path, "rb")
    try:
        await trio.to_thread.run_sync(f.seek, offset)
        left = length
        while left:
            piece = await trio.to_thread.run_sync(f.read, min(_READ_PIECE, left))
            if not piece:
                raise FormatError(f"{path}: file shrank during upload")
            left -= len(piece)
            yield piece
    finally:
        await trio.to_thread.run_sync(f.close)
