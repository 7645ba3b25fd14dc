"""OCI artifacts that refer to an image: push them, find them, fetch them.

An artifact here is an OCI image manifest with an ``artifactType``, an empty
config, one blob, and a ``subject`` naming the image manifest it is about
(image-spec 1.1). Registries find such artifacts two ways
(distribution-spec 1.1):

* the referrers API, ``GET /v2/<name>/referrers/<digest>``, answered with an
  OCI index of the manifests whose ``subject`` is ``<digest>``; a registry
  that has it says so on the manifest PUT with an ``OCI-Subject`` header;
* where it is missing (a 404 there, e.g. distribution 2.8), the referrers tag
  schema: the client keeps that index itself under the tag
  ``<alg>-<hex>`` of the subject digest, read-modify-write.

Nothing here knows what the artifact's blob means; its bytes come back
digest-checked and size-capped, the caller parses them.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from lazyfs.errors import FormatError, IntegrityError, NotFoundError, RegistryError
from lazyfs.format.digest import check_digest, verify_bytes
from lazyfs.oci.client import RegistryClient
from lazyfs.oci.media import INDEX_TYPES, MEDIA_OCI_INDEX, MEDIA_OCI_MANIFEST, check_descriptor
from lazyfs.oci.reference import Reference
from lazyfs.oci.transport import Transient, raise_for_status

__all__ = [
    "EMPTY_CONFIG",
    "MEDIA_OCI_EMPTY",
    "Artifact",
    "PushedArtifact",
    "artifact_manifest",
    "find_artifact",
    "list_referrers",
    "push_artifact",
    "referrers_tag",
]

log = logging.getLogger(__name__)

MEDIA_OCI_EMPTY = "application/vnd.oci.empty.v1+json"
EMPTY_CONFIG = b"{}"
_EMPTY_DIGEST = "sha256:" + hashlib.sha256(EMPTY_CONFIG).hexdigest()
# A referrers index (and an artifact manifest) is read at most this big.
MAX_INDEX_SIZE = 4 << 20
# Blobs up to this size also travel inline in the manifest (the descriptor's
# ``data``), which spares a finder one round trip.
EMBED_LIMIT = 64 << 10
# Candidates tried, newest first, before giving up on finding a good one.
MAX_CANDIDATES = 3
ANNOTATION_CREATED = "org.opencontainers.image.created"


def referrers_tag(subject: str) -> str:
    """The referrers tag schema's tag for ``subject``: ``sha256-<hex>``."""
    return check_digest(subject, what="subject digest").replace(":", "-")[:128]


@dataclass(frozen=True)
class Artifact:
    digest: str  # of the artifact manifest
    data: bytes  # its blob, digest-checked
    via: str  # "referrers API" or "referrers tag"


@dataclass(frozen=True)
class PushedArtifact:
    digest: str
    via: str


def artifact_manifest(
    artifact_type: str,
    blob: bytes,
    subject: Mapping[str, Any],
    *,
    annotations: Mapping[str, str] | None = None,
    embed_limit: int = EMBED_LIMIT,
) -> bytes:
    """The manifest of an artifact with one blob (inline too if small) about ``subject``."""
    layer: dict[str, Any] = {
        "mediaType": artifact_type,
        "digest": "sha256:" + hashlib.sha256(blob).hexdigest(),
        "size": len(blob),
    }
    if len(blob) <= embed_limit:
        layer["data"] = base64.b64encode(blob).decode()
    manifest: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": MEDIA_OCI_MANIFEST,
        "artifactType": artifact_type,
        "config": {"mediaType": MEDIA_OCI_EMPTY, "digest": _EMPTY_DIGEST, "size": len(EMPTY_CONFIG), "data": "e30="},
        "layers": [layer],
        "subject": {"mediaType": subject["mediaType"], "digest": subject["digest"], "size": subject["size"]},
    }
    if annotations:
        manifest["annotations"] = dict(annotations)
    return json.dumps(manifest, indent=2).encode()


async def _get_json(client: RegistryClient, ref: Reference, url: str, what: str) -> tuple[int, dict[str, Any] | None]:
    """GET an OCI index; (status, document), document None unless 200. Capped."""

    async def once() -> tuple[int, dict[str, Any] | None]:
        resp = await client.send(
            "GET", url, host=ref.api_host, scope=f"repository:{ref.repository}:pull",
            headers={"Accept": MEDIA_OCI_INDEX}, stream=True,
        )  # fmt: skip
        try:
            if resp.status_code in (404, 405):
                return resp.status_code, None
            if resp.status_code != 200:
                await raise_for_status(resp, what)
            body = bytearray()
            async for piece in resp.aiter_bytes():
                body += piece
                client.count(bytes_fetched=len(piece))
                if len(body) > MAX_INDEX_SIZE:
                    raise FormatError(f"{what}: answer exceeds the {MAX_INDEX_SIZE}-byte limit")
            declared = resp.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) != len(body) and "content-encoding" not in resp.headers:
                raise Transient(f"{what}: short body ({len(body)} of {declared} bytes)")
        finally:
            await resp.aclose()
        try:
            doc = json.loads(body)
        except (ValueError, RecursionError):
            raise FormatError(f"{what}: answer is not JSON") from None
        if not isinstance(doc, dict):
            raise FormatError(f"{what}: answer is not a JSON object")
        return 200, doc

    return await client.retrying(what, once)


def _entries(index: Mapping[str, Any], artifact_type: str | None, what: str) -> list[dict[str, Any]]:
    """The well-formed manifest descriptors of ``index`` of ``artifact_type``."""
    manifests = index.get("manifests")
    if manifests is None:
        return []
    if not isinstance(manifests, list):
        raise FormatError(f"{what}: 'manifests' is not a list")
    out = []
    for n, desc in enumerate(manifests):
        try:
            check_descriptor(desc, f"{what}: manifests[{n}]")
        except FormatError as exc:
            log.info("%s; skipped", exc)
            continue
        if artifact_type is None or desc.get("artifactType") == artifact_type:
            out.append(desc)
    return out


async def list_referrers(
    client: RegistryClient, ref: Reference, subject: str, *, artifact_type: str | None = None
) -> tuple[list[dict[str, Any]], str]:
    """Descriptors of the manifests in ``ref``'s repository that refer to
    ``subject`` (of ``artifact_type`` if given), and how they were found.

    The referrers API first; on a 404 (or 405) the referrers tag. A
    repository with neither has no referrers: an empty list.
    """
    subject = check_digest(subject, what="subject digest")
    url = f"{client.base_url(ref.api_host)}/v2/{ref.repository}/referrers/{subject}"
    if artifact_type is not None:
        # Quoted: a bare "+" (as in "...v1+json") would reach the registry as a space.
        url += f"?artifactType={quote(artifact_type, safe='')}"
    status, doc = await _get_json(client, ref, url, f"{ref.name} referrers of {subject}")
    if doc is not None:
        return _entries(doc, artifact_type, f"{ref.name} referrers of {subject}"), "referrers API"
    log.debug("%s: no referrers API (HTTP %d); trying the referrers tag", ref.name, status)
    tag = referrers_tag(subject)
    index = await _tag_index(client, ref, tag)
    if index is None:
        return [], "referrers tag"
    return _entries(index, artifact_type, f"{ref.name}:{tag}"), "referrers tag"


async def _tag_index(client: RegistryClient, ref: Reference, tag: str) -> dict[str, Any] | None:
    """The referrers index kept under ``tag``, or None if there is none."""
    try:
        body, media_type, _digest, _verified = await client.fetch_manifest(Reference(ref.registry, ref.repository, tag=tag))
    except NotFoundError:
        return None
    if media_type not in INDEX_TYPES:
        raise FormatError(f"{ref.name}:{tag} is a {media_type}, not a referrers index")
    doc = json.loads(body)
    assert isinstance(doc, dict)  # fetch_manifest checked it is an object
    return doc


def _created(desc: Mapping[str, Any]) -> str:
    annotations = desc.get("annotations")
    value = annotations.get(ANNOTATION_CREATED) if isinstance(annotations, dict) else None
    return value if isinstance(value, str) else ""


async def find_artifact(
    client: RegistryClient, ref: Reference, subject: str, artifact_type: str, *, max_size: int
) -> Artifact | None:
    """The newest artifact of ``artifact_type`` about ``subject`` whose blob
    checks out (at most ``max_size`` bytes, digest matching), or None.

    Raises:
        RegistryError, FetchError: the registry could not be asked.
    """
    entries, via = await list_referrers(client, ref, subject, artifact_type=artifact_type)
    # Newest first by their created annotation; the tag schema appends, so
    # among equals the later entry wins.
    ranked = sorted(enumerate(entries), key=lambda e: (_created(e[1]), e[0]), reverse=True)
    for _n, desc in ranked[:MAX_CANDIDATES]:
        try:
            data = await _artifact_blob(client, ref, desc, subject, artifact_type, max_size)
        except (FormatError, IntegrityError, RegistryError) as exc:
            log.warning("%s: referrer %s refused: %s", ref.name, desc["digest"], exc)
            continue
        return Artifact(desc["digest"], data, via)
    return None


async def _artifact_blob(
    client: RegistryClient, ref: Reference, desc: Mapping[str, Any], subject: str, artifact_type: str, max_size: int
) -> bytes:
    digest = desc["digest"]
    what = f"{ref.name} artifact {digest}"
    if desc["size"] > MAX_INDEX_SIZE:
        raise FormatError(f"{what}: manifest of {desc['size']} bytes is over the limit")
    body, _media_type, _d, _v = await client.fetch_manifest(ref.with_digest(digest))
    manifest = json.loads(body)
    if manifest.get("artifactType") != artifact_type:
        # Image-spec 1.1 also allows the type on the config; we push it at the top.
        config = manifest.get("config")
        if not (isinstance(config, dict) and config.get("mediaType") == artifact_type):
            raise FormatError(f"{what}: artifactType is not {artifact_type}")
    subj = manifest.get("subject")
    if not isinstance(subj, dict) or subj.get("digest") != subject:
        raise FormatError(f"{what}: its subject is not {subject}")
    layers = manifest.get("layers")
    if not isinstance(layers, list) or not layers:
        raise FormatError(f"{what}: no blob")
    layer = check_descriptor(layers[0], f"{what}: blob")
    if layer["size"] > max_size:
        raise FormatError(f"{what}: blob of {layer['size']} bytes is over the {max_size}-byte limit")
    algo = layer["digest"].split(":", 1)[0]
    inline = layer.get("data")
    data: bytes | None = None
    if isinstance(inline, str) and len(inline) <= 2 * max_size:
        try:
            data = base64.b64decode(inline, validate=True)
        except (binascii.Error, ValueError):
            data = None
        if data is not None and (len(data) != layer["size"] or f"{algo}:{hashlib.new(algo, data).hexdigest()}" != layer["digest"]):
            log.info("%s: inline data does not match its descriptor; fetching the blob", what)
            data = None
    if data is None:
        data = await client.blob(ref, layer).read(0, layer["size"]) if layer["size"] else b""
        verify_bytes(data, layer["digest"], f"{what}: blob")
    return data


async def push_artifact(
    client: RegistryClient,
    ref: Reference,
    subject: Mapping[str, Any],
    artifact_type: str,
    blob: bytes,
    *,
    annotations: Mapping[str, str] | None = None,
) -> PushedArtifact:
    """Push an artifact about ``subject`` (a manifest descriptor) into
    ``ref``'s repository and make it findable.

    If the registry answers the manifest PUT with ``OCI-Subject``, its
    referrers API lists it; otherwise it is added to the referrers tag's
    index (read, modify, write: a concurrent writer may lose an entry).
    """
    subject = check_descriptor(dict(subject), f"{ref.name}: subject")
    blob_digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    await client.push_blob(ref, EMPTY_CONFIG, _EMPTY_DIGEST, len(EMPTY_CONFIG))
    await client.push_blob(ref, blob, blob_digest, len(blob))
    manifest = artifact_manifest(artifact_type, blob, subject, annotations=annotations)
    digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
    said_subject = await _put_manifest(client, Reference(ref.registry, ref.repository, digest=digest), manifest, MEDIA_OCI_MANIFEST)
    if said_subject is not None:
        return PushedArtifact(digest, "referrers API")
    tag = referrers_tag(subject["digest"])
    index = await _tag_index(client, ref, tag) or {"schemaVersion": 2, "mediaType": MEDIA_OCI_INDEX, "manifests": []}
    entries = index.get("manifests")
    if not isinstance(entries, list):
        raise FormatError(f"{ref.name}:{tag}: 'manifests' is not a list")
    entry: dict[str, Any] = {"mediaType": MEDIA_OCI_MANIFEST, "digest": digest, "size": len(manifest), "artifactType": artifact_type}
    if annotations:
        entry["annotations"] = dict(annotations)
    if not any(isinstance(e, dict) and e.get("digest") == digest for e in entries):
        entries.append(entry)
    index["manifests"] = entries
    index.setdefault("schemaVersion", 2)
    index["mediaType"] = MEDIA_OCI_INDEX
    await _put_manifest(client, Reference(ref.registry, ref.repository, tag=tag), json.dumps(index, indent=2).encode(), MEDIA_OCI_INDEX)
    return PushedArtifact(digest, "referrers tag")


async def _put_manifest(client: RegistryClient, ref: Reference, body: bytes, media_type: str) -> str | None:
    """PUT a manifest under ``ref``'s tag or digest; the ``OCI-Subject`` the registry answered, if any."""
    selector = ref.tag or ref.digest
    what = f"{ref.name}: push of manifest {selector}"
    url = f"{client.base_url(ref.api_host)}/v2/{ref.repository}/manifests/{selector}"

    async def once() -> str | None:
        resp = await client.send(
            "PUT", url, host=ref.api_host, scope=f"repository:{ref.repository}:pull,push",
            content=lambda: body, headers={"Content-Type": media_type},
        )  # fmt: skip
        if resp.status_code not in (200, 201):
            await raise_for_status(resp, what)
        said = resp.headers.get("docker-content-digest")
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        if said and said != digest:
            raise IntegrityError(f"{what}: registry computed {said[:100]}, we computed {digest}")
        return resp.headers.get("oci-subject")

    return await client.retrying(what, once)
