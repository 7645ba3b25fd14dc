"""RegistryClient: resolve images, hand out blob readers, push blobs and manifests.

Everything goes through one ``httpx.AsyncClient`` (connection reuse,
optional HTTP/2) under trio, with :class:`~lazyfs.oci.auth.RegistryAuth`
for credentials and :func:`~lazyfs.oci.transport.retrying` for failures.

Trust: a manifest's bytes are hashed and compared with the pinned digest, or
with the registry's ``Docker-Content-Digest`` when only a tag was given.
The bytes of layers are the chunk table's business, not this package's.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx

from lazyfs.errors import FormatError, IntegrityError
from lazyfs.format.digest import check_digest, verify_bytes
from lazyfs.oci import push
from lazyfs.oci.auth import AuthSession, BodyFactory, RegistryAuth
from lazyfs.oci.blob import RemoteBlob
from lazyfs.oci.media import (
    ACCEPT_MANIFESTS,
    INDEX_TYPES,
    MANIFEST_TYPES,
    MEDIA_OCI_INDEX,
    MEDIA_OCI_MANIFEST,
    check_descriptor,
    check_image_manifest,
    default_platform,
    parse_platform,
    pick_platform,
)
from lazyfs.oci.reference import Reference
from lazyfs.oci.transport import (
    BlobStatistics,
    Counters,
    LazyTLSTransport,
    Origin,
    RegistryOptions,
    Transient,
    quiet_library_loggers,
    raise_for_status,
    safe_url,
)
from lazyfs.oci.transport import base_url as _base_url
from lazyfs.oci.transport import deadline as _deadline
from lazyfs.oci.transport import origin as _origin
from lazyfs.oci.transport import retrying as _retrying

__all__ = ["RegistryClient", "ResolvedImage", "open_url_blob"]

log = logging.getLogger(__name__)

# The distribution spec lets registries refuse manifests over 4 MiB; so do we,
# which also bounds what an untrusted server can make us buffer.
MAX_MANIFEST_SIZE = 4 << 20
MAX_CONFIG_SIZE = 4 << 20

T = TypeVar("T")
_DEFAULT_OPTIONS = RegistryOptions()


@dataclass(frozen=True)
class ResolvedImage:
    """An image manifest whose bytes have been checked against their digest.

    ``layers`` are the manifest's layer descriptors, bottom first; ``digest``
    is the digest of ``manifest_bytes`` (the platform manifest when the
    reference named an index, whose digest is then ``index_digest``).
    """

    reference: Reference
    digest: str
    media_type: str
    manifest_bytes: bytes = field(repr=False)
    manifest: dict[str, Any] = field(repr=False)
    layers: list[dict[str, Any]] = field(repr=False)
    config: dict[str, Any] | None = field(default=None, repr=False)
    index_digest: str | None = None
    # False when only a tag was given and the registry sent no
    # Docker-Content-Digest: then nothing vouches for the manifest's bytes.
    digest_verified: bool = True


def _hash(algo: str, data: bytes) -> str:
    return f"{algo}:{hashlib.new(algo, data).hexdigest()}"


class RegistryClient:
    """One connection pool and one auth state for any number of registries.

    Use as ``async with RegistryClient(options) as client:``. ``transport``
    replaces the network (tests inject faults with it); ``clock`` (monotonic
    seconds) times token lifetimes and cached redirects.

    The public plumbing (``http``, ``send``, ``retrying``, ``count``,
    ``deadline``) is what :class:`~lazyfs.oci.blob.RemoteBlob` builds on.
    """

    def __init__(
        self,
        options: RegistryOptions = _DEFAULT_OPTIONS,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if options.retries < 0:
            raise ValueError("retries must be >= 0")
        if not options.overall_timeout > 0:
            raise ValueError("overall_timeout must be > 0")
        # Per client, not at import: logging may have been reconfigured since.
        quiet_library_loggers()
        self.options = options
        self.clock = clock
        self._platform = parse_platform(options.platform or default_platform())
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=32)
        if transport is None:
            # No SSL context until the first https:// request (see LazyTLSTransport).
            transport = LazyTLSTransport(
                insecure_tls=options.insecure_tls, http2=options.http2, limits=limits
            )
        # ``verify`` still matters to the proxy transports httpx mounts from
        # $HTTPS_PROXY and friends (built only when such variables are set).
        self.http = httpx.AsyncClient(
            transport=transport,
            verify=not options.insecure_tls,
            http2=options.http2,
            timeout=httpx.Timeout(options.timeout),
            follow_redirects=False,
            limits=limits,
            headers={"User-Agent": "lazyerofs"},
        )
        self._counters = Counters()
        self._auth = AuthSession(self.http, options, self._counters, clock=clock)

    def __repr__(self) -> str:
        return f"RegistryClient(platform={'/'.join(p for p in self._platform if p)!r})"

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.http.aclose()

    def statistics(self) -> BlobStatistics:
        """Everything this client fetched: manifests, configs, tables and frames."""
        return self._counters.freeze()

    # ------------------------------------------------------------ plumbing

    def base_url(self, host: str) -> str:
        """``scheme://host`` for API calls: TLS unless asked, or the host is loopback."""
        return _base_url(self.options, host)

    def deadline(self, stage: str) -> contextlib.AbstractContextManager[None]:
        """Bound a whole network stage (``options.overall_timeout``), retries included."""
        return _deadline(stage, self.options.overall_timeout)

    def count(
        self, counters: Counters | None = None, *, requests: int = 0, bytes_fetched: int = 0
    ) -> None:
        """Add to this client's totals and, if given, to ``counters`` (a blob's)."""
        for c in (self._counters, counters):
            if c is not None:
                c.requests += requests
                c.bytes_fetched += bytes_fetched

    async def send(
        self,
        method: str,
        url: str | httpx.URL,
        *,
        host: str,
        scope: str,
        headers: Mapping[str, str] | None = None,
        content: BodyFactory | None = None,
        stream: bool = False,
        counters: Counters | None = None,
        origin: Origin | None = None,
        anonymous: bool = False,
    ) -> httpx.Response:
        """Send with the right credentials; on 401, answer the challenge once and resend.

        ``content`` is a factory so a body can be produced again for the resend.
        The caller closes a streamed response. Credentials only go to
        ``origin`` (scheme, host, port; default: the registry's own), never
        when ``anonymous``: a URL elsewhere (an upload Location, storage) is
        sent without them.
        """
        request = self.http.build_request(
            method, url, headers=dict(headers or {}), content=content() if content else None
        )
        auth = RegistryAuth(
            self._auth, host=host, scope=scope, body=content,
            registry=None if anonymous else origin or _origin(self.base_url(host)),
            on_request=lambda: self.count(counters, requests=1),
        )  # fmt: skip
        return await self.http.send(request, auth=auth, stream=stream)

    async def retrying(
        self, what: str, op: Callable[[], Awaitable[T]], counters: Counters | None = None
    ) -> T:
        """Run ``op`` with bounded, jittered backoff on transient failures (counted)."""

        def on_retry() -> None:
            for c in (self._counters, counters):
                if c is not None:
                    c.retries += 1

        return await _retrying(what, op, retries=self.options.retries, on_retry=on_retry)

    # ------------------------------------------------------------ manifests

    def _manifest_url(self, ref: Reference, selector: str) -> str:
        return f"{self.base_url(ref.api_host)}/v2/{ref.repository}/manifests/{selector}"

    async def _manifest_body(self, ref: Reference, selector: str) -> tuple[bytes, httpx.Headers]:
        """One manifest's bytes and headers, size capped, retried."""
        what = f"{ref.name} manifest {selector}"

        async def once() -> tuple[bytes, httpx.Headers]:
            resp = await self.send(
                "GET", self._manifest_url(ref, selector), host=ref.api_host,
                scope=f"repository:{ref.repository}:pull", headers={"Accept": ACCEPT_MANIFESTS},
                stream=True,
            )  # fmt: skip
            try:
                if resp.status_code != 200:
                    await raise_for_status(resp, what)
                declared = resp.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > MAX_MANIFEST_SIZE:
                    raise FormatError(
                        f"{what}: manifest of {declared} bytes exceeds the {MAX_MANIFEST_SIZE}-byte limit"
                    )
                body = bytearray()
                async for piece in resp.aiter_bytes():
                    body += piece
                    self.count(bytes_fetched=len(piece))
                    if len(body) > MAX_MANIFEST_SIZE:
                        raise FormatError(
                            f"{what}: manifest exceeds the {MAX_MANIFEST_SIZE}-byte limit"
                        )
                if (
                    declared
                    and declared.isdigit()
                    and int(declared) != len(body)
                    and "content-encoding" not in resp.headers
                ):
                    raise Transient(f"{what}: short body ({len(body)} of {declared} bytes)")
                return bytes(body), resp.headers
            finally:
                await resp.aclose()

        return await self.retrying(what, once)

    async def _fetch_manifest(
        self,
        ref: Reference,
        selector: str,
        *,
        expected: str | None,
        expected_size: int | None = None,
    ) -> tuple[bytes, str, str, bool]:
        """(bytes, media type, digest, verified) of one manifest, its digest checked
        (``verified`` is False when nothing vouched for it: no pin, no header)."""
        what = f"{ref.name} manifest {selector}"
        body, headers = await self._manifest_body(ref, selector)
        verified = True
        if expected is not None:
            got = _hash(expected.split(":", 1)[0], body)
            if got != expected:
                raise IntegrityError(
                    f"{what}: digest mismatch: expected {expected}, received bytes hash to {got}"
                )
            digest = expected
        elif claimed := headers.get("docker-content-digest"):
            claimed = check_digest(claimed, what=f"{what}: Docker-Content-Digest")
            got = _hash(claimed.split(":", 1)[0], body)
            if got != claimed:
                raise IntegrityError(
                    f"{what}: digest mismatch: registry says Docker-Content-Digest {claimed}, "
                    f"received bytes hash to {got}"
                )
            digest = claimed
        else:
            verified = False
            digest = _hash("sha256", body)
            log.warning(
                "%s: registry sent no Docker-Content-Digest; pin the image by digest to verify it",
                what,
            )
        if expected_size is not None and expected_size != len(body):
            raise IntegrityError(f"{what}: {len(body)} bytes, its descriptor says {expected_size}")
        try:
            doc = json.loads(body)
        except (ValueError, RecursionError) as exc:  # RecursionError: nesting past the stack
            raise FormatError(f"{what}: manifest is not valid JSON: {exc}") from exc
        if not isinstance(doc, dict):
            raise FormatError(f"{what}: manifest is not a JSON object")
        media_type = doc.get("mediaType") or headers.get("content-type", "").split(";")[0].strip()
        if media_type not in (*MANIFEST_TYPES, *INDEX_TYPES):
            if "manifests" in doc:
                media_type = MEDIA_OCI_INDEX
            elif "layers" in doc:
                media_type = MEDIA_OCI_MANIFEST
            else:
                raise FormatError(f"{what}: unsupported manifest type {media_type or '(none)'}")
        return body, media_type, digest, verified

    async def fetch_manifest(self, ref: Reference) -> tuple[bytes, str, str, bool]:
        """``ref``'s manifest or index as stored, no platform picked: (bytes, media
        type, digest, verified), the digest checked as :meth:`resolve` checks it."""
        with self.deadline(f"{ref}: fetching the manifest"):
            return await self._fetch_manifest(ref, ref.selector, expected=ref.digest)

    async def resolve(self, ref: Reference, *, with_config: bool = True) -> ResolvedImage:
        """Fetch and check the image manifest (through an index if need be) and its config.

        ``with_config=False`` skips the config blob (one request fewer; the
        result's ``config`` is then None): a mount needs only the layers.
        The whole stage has one deadline (``RegistryOptions.overall_timeout``).
        """
        stage = "the manifest and config" if with_config else "the manifest"
        with self.deadline(f"{ref}: resolving {stage}"):
            return await self._resolve(ref, with_config=with_config)

    async def _resolve(self, ref: Reference, *, with_config: bool) -> ResolvedImage:
        body, media_type, digest, verified = await self._fetch_manifest(
            ref, ref.selector, expected=ref.digest
        )
        index_digest = None
        if media_type in INDEX_TYPES:
            index_digest = digest
            chosen = pick_platform(json.loads(body), self._platform, str(ref))
            body, media_type, digest, _ = await self._fetch_manifest(
                ref, chosen["digest"], expected=chosen["digest"], expected_size=chosen["size"]
            )
            if media_type in INDEX_TYPES:
                raise FormatError(
                    f"{ref}: index {index_digest} points at another index; nesting is not supported"
                )
        manifest = json.loads(body)
        layers = check_image_manifest(manifest, ref)
        config = None
        config_desc = manifest.get("config")
        if config_desc is not None:
            # Checked either way: a malformed config descriptor is a malformed manifest.
            config_desc = check_descriptor(config_desc, f"{ref}: config")
            if with_config and config_desc["size"] <= MAX_CONFIG_SIZE:
                config = await self._fetch_config(ref, config_desc)
        return ResolvedImage(
            reference=ref, digest=digest, media_type=media_type, manifest_bytes=body,
            manifest=manifest, layers=list(layers), config=config, index_digest=index_digest,
            digest_verified=verified,
        )  # fmt: skip

    async def _fetch_config(self, ref: Reference, desc: dict[str, Any]) -> dict[str, Any] | None:
        blob = self.blob(ref, desc)
        data = await blob.read(0, desc["size"]) if desc["size"] else b""
        verify_bytes(data, desc["digest"], f"{ref}: config")
        try:
            config = json.loads(data)
        except (ValueError, RecursionError):
            log.warning("%s: config %s is not JSON; ignored", ref, desc["digest"])
            return None
        return config if isinstance(config, dict) else None

    # ------------------------------------------------------------ blobs

    def blob(self, ref: Reference, descriptor: Mapping[str, Any]) -> RemoteBlob:
        """A range reader for the blob ``descriptor`` names, in ``ref``'s repository."""
        desc = check_descriptor(dict(descriptor), f"{ref}: blob")
        url = f"{self.base_url(ref.api_host)}/v2/{ref.repository}/blobs/{desc['digest']}"
        return RemoteBlob(
            self, url, host=ref.api_host, scope=f"repository:{ref.repository}:pull",
            digest=desc["digest"], size=desc["size"],
        )  # fmt: skip

    async def blob_exists(self, ref: Reference, digest: str) -> bool:
        """Whether ``ref``'s repository has blob ``digest`` (a HEAD)."""
        return await push.blob_exists(self, ref, digest)

    async def push_blob(
        self,
        ref: Reference,
        path_or_bytes: str | os.PathLike[str] | bytes,
        digest: str,
        size: int,
        *,
        chunk_size: int | None = None,
    ) -> bool:
        """Upload a blob unless present; True if bytes went up (see :func:`push.push_blob`)."""
        return await push.push_blob(self, ref, path_or_bytes, digest, size, chunk_size=chunk_size)

    async def push_manifest(self, ref: Reference, manifest_bytes: bytes, media_type: str) -> str:
        """PUT a manifest under ``ref``'s tag (or its digest); returns the manifest digest."""
        return await push.push_manifest(self, ref, manifest_bytes, media_type)


_BLOB_PATH_RE = re.compile(r"/v2/(?P<repo>.+)/blobs/(?P<digest>.*)")


@contextlib.asynccontextmanager
async def open_url_blob(
    url: str,
    *,
    size: int | None = None,
    options: RegistryOptions = _DEFAULT_OPTIONS,
    transport: httpx.AsyncBaseTransport | None = None,
) -> AsyncIterator[RemoteBlob]:
    """A :class:`RemoteBlob` for a plain blob URL (a registry's ``/v2/.../blobs/<digest>``
    or any server), through a client of its own.

    The size is asked of the server (HEAD, or a one-byte ranged GET); when
    the caller knows it too (from a descriptor), a disagreement is an
    IntegrityError before any byte is read.
    """
    try:
        raw_path = urlsplit(url).path
    except ValueError:
        raise FormatError(f"blob URL {safe_url(url)!r} is not a URL") from None
    if any(segment in (".", "..") for segment in raw_path.split("/")):
        raise FormatError(f"{safe_url(url)}: blob URL path has '.' or '..' segments")
    try:
        u = httpx.URL(url)
    except httpx.InvalidURL:
        raise FormatError(f"blob URL {safe_url(url)!r} is not a URL") from None
    if u.scheme not in ("http", "https") or not u.host:
        raise FormatError(f"{safe_url(url)}: only http(s) blob URLs are supported")
    digest = None
    scope = ""
    m = _BLOB_PATH_RE.fullmatch(raw_path)
    if m:
        digest = check_digest(m.group("digest"), what=f"{safe_url(url)}: digest in the URL")
        scope = f"repository:{m.group('repo')}:pull"
    async with RegistryClient(options, transport=transport) as client:
        blob = RemoteBlob(
            client, str(u), host=u.netloc.decode(), scope=scope, digest=digest, size=-1
        )
        with client.deadline(f"{blob.name}: size probe"):
            blob.size = await blob.probe_size()
        if size is not None and size != blob.size:
            raise IntegrityError(f"{blob.name}: server says {blob.size} bytes, expected {size}")
        yield blob
