"""OCI distribution client: resolve images, read blob ranges, push.

The network layer knows nothing about the seekable format: it turns a
reference into a verified manifest and a descriptor into a :class:`RemoteBlob`
whose :meth:`RemoteBlob.read` returns exactly the requested bytes or raises.
Everything the mount needs from a registry goes through one
``httpx.AsyncClient`` (connection reuse, optional HTTP/2), used under trio
via anyio.

Trust: a manifest's bytes are hashed and compared with the pinned digest, or
with the registry's ``Docker-Content-Digest`` when only a tag was given.
Range reads are checked against ``Content-Range``; integrity of the bytes
themselves is the chunk table's job (``lazyfs.format.seekable``).

Transient failures (5xx, 429, resets, timeouts, short bodies) are retried a
bounded number of times with jittered exponential backoff, then surface as
:class:`~lazyfs.errors.FetchError`. httpx exceptions never leave this module
untranslated. Credentials and tokens never appear in logs, messages or reprs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform as _platform
import random
import re
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import anyio
import httpx

from lazyfs.errors import (
    AuthError,
    FetchError,
    FormatError,
    IntegrityError,
    NotFoundError,
    RegistryError,
)
from lazyfs.oci.auth import (
    Credentials,
    Secret,
    TokenCache,
    load_docker_credentials,
    parse_challenges,
)
from lazyfs.oci.reference import Reference, check_digest, is_loopback_host, parse_reference

__all__ = [
    "MEDIA_DOCKER_MANIFEST",
    "MEDIA_DOCKER_MANIFEST_LIST",
    "MEDIA_OCI_CONFIG",
    "MEDIA_OCI_INDEX",
    "MEDIA_OCI_MANIFEST",
    "BlobStatistics",
    "Reference",
    "RegistryClient",
    "RegistryOptions",
    "RemoteBlob",
    "ResolvedImage",
    "default_platform",
    "open_url_blob",
    "parse_reference",
]

log = logging.getLogger(__name__)


# The HTTP stack's own loggers see every header: at DEBUG, hpack/h2 log the
# header block (the bearer token included) and httpcore the raw traffic. They
# stay at WARNING whatever the root level is, unless this variable is "1".
DEBUG_HTTP_ENV = "LAZYEROFS_DEBUG_HTTP"
_LIBRARY_LOGGERS = ("hpack", "h2", "h11", "httpcore", "httpx", "anyio", "trio")


def quiet_library_loggers() -> None:
    """Hold the HTTP libraries' loggers at WARNING (unless ``$LAZYEROFS_DEBUG_HTTP=1``)."""
    if os.environ.get(DEBUG_HTTP_ENV) == "1":
        return
    for name in _LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


_URL_IN_TEXT_RE = re.compile(
    r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?:[^/\s@?#]*@)?(?P<rest>[^\s?#'\"]*)(?:[?#][^\s'\"]*)?"
)


def _redact_urls(text: str) -> str:
    """``text`` with userinfo, query and fragment cut out of every URL in it."""
    return _URL_IN_TEXT_RE.sub(lambda m: m.group("scheme") + m.group("rest"), text)


class _RedactURLs(logging.Filter):
    """httpx logs every request URL at INFO (when let through, see
    ``DEBUG_HTTP_ENV``); pre-signed storage URLs carry signatures in their
    query and URLs may carry userinfo: strip both from what it logs."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                _safe_url(a) if isinstance(a, httpx.URL) else a for a in record.args
            )
        return True


logging.getLogger("httpx").addFilter(_RedactURLs())
quiet_library_loggers()

MEDIA_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MEDIA_DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
_MANIFEST_TYPES = (MEDIA_OCI_MANIFEST, MEDIA_DOCKER_MANIFEST)
_INDEX_TYPES = (MEDIA_OCI_INDEX, MEDIA_DOCKER_MANIFEST_LIST)
_ACCEPT = ", ".join((*_MANIFEST_TYPES, *_INDEX_TYPES))

# The distribution spec lets registries refuse manifests over 4 MiB; so do we,
# which also bounds what an untrusted server can make us buffer.
MAX_MANIFEST_SIZE = 4 << 20
MAX_CONFIG_SIZE = 4 << 20
MAX_REDIRECTS = 5
# Pre-signed storage URLs expire; reuse a redirect only briefly, and go back
# to the registry as soon as storage says no.
REDIRECT_TTL = 60.0
DEFAULT_RETRIES = 4
DEFAULT_TIMEOUT = 30.0
# Deadline of a whole network stage (resolving a manifest and its config, one
# token fetch, a size probe): a per-request timeout alone lets a server that
# trickles a byte now and then hold a mount forever.
DEFAULT_OVERALL_TIMEOUT = 60.0
# A token answer is a small JSON object; a server sending more is hostile.
MAX_TOKEN_RESPONSE = 1 << 20
BACKOFF_BASE = 0.1
BACKOFF_MAX = 5.0
# Monolithic PUT up to this size; beyond it, PATCH chunks of UPLOAD_CHUNK.
MONOLITHIC_LIMIT = 64 << 20
UPLOAD_CHUNK = 16 << 20
_READ_PIECE = 1 << 20

T = TypeVar("T")

_ARCH_ALIASES = {
    "x86_64": ("amd64", None),
    "amd64": ("amd64", None),
    "aarch64": ("arm64", None),
    "arm64": ("arm64", None),
    "armv7l": ("arm", "v7"),
    "armv6l": ("arm", "v6"),
    "i386": ("386", None),
    "i686": ("386", None),
    "ppc64le": ("ppc64le", None),
    "s390x": ("s390x", None),
    "riscv64": ("riscv64", None),
}


def default_platform() -> str:
    """``linux/<arch>[/<variant>]`` of this machine, in OCI spelling."""
    arch, variant = _ARCH_ALIASES.get(
        _platform.machine().lower(), (_platform.machine().lower(), None)
    )
    return f"linux/{arch}" + (f"/{variant}" if variant else "")


def _parse_platform(value: str) -> tuple[str, str, str | None]:
    parts = value.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise FormatError(f"platform {value!r} is not os/arch[/variant]")
    return parts[0], parts[1], parts[2] if len(parts) == 3 else None


@dataclass(frozen=True)
class RegistryOptions:
    """How to talk to registries. Frozen and free of live state, so one set of
    options can be shared by several clients (or passed to a daemon)."""

    plain_http: bool | None = None  # None: plain HTTP only for loopback hosts, as docker does
    insecure_tls: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    docker_config: str | os.PathLike[str] | None = None  # None: $DOCKER_CONFIG or ~/.docker
    http2: bool = False
    retries: int = DEFAULT_RETRIES
    timeout: float = DEFAULT_TIMEOUT
    platform: str | None = None  # None: default_platform()
    overall_timeout: float = DEFAULT_OVERALL_TIMEOUT  # deadline of each network stage


@dataclass(frozen=True)
class BlobStatistics:
    """What one blob (or a whole client) cost on the wire."""

    requests: int = 0
    bytes_fetched: int = 0
    retries: int = 0


@dataclass
class _Counters:
    requests: int = 0
    bytes_fetched: int = 0
    retries: int = 0

    def freeze(self) -> BlobStatistics:
        return BlobStatistics(self.requests, self.bytes_fetched, self.retries)


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


class _Transient(Exception):
    """A failure worth retrying (internal; becomes FetchError when retries run out)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def _safe_url(url: httpx.URL | str) -> str:
    """A URL fit for messages and logs: no userinfo, no query (pre-signed
    storage URLs carry their signature there), no fragment. Works on text
    that does not parse as a URL too."""
    try:
        u = httpx.URL(str(url))
        return str(u.copy_with(query=None, fragment=None, username=None, password=None))
    except (httpx.InvalidURL, TypeError, ValueError):
        text = _redact_urls(str(url))
        # No scheme: still cut anything that looks like userinfo or a query.
        text = re.sub(r"^[^/@]*@", "", text)
        return text.split("?", 1)[0].split("#", 1)[0]


_HTTP_PORTS = {"http": 80, "https": 443}


def _origin(url: httpx.URL | str) -> tuple[str, str, int | None]:
    """(scheme, host, port) with the default port filled in: credentials go to one origin only."""
    u = url if isinstance(url, httpx.URL) else httpx.URL(url)
    scheme = u.scheme.lower()
    return scheme, u.host.lower(), u.port or _HTTP_PORTS.get(scheme)


def _describe(exc: BaseException) -> str:
    text = _redact_urls(str(exc).strip())
    name = type(exc).__name__
    return f"{name}: {text}" if text and not isinstance(exc, _Transient) else (text or name)


def _is_tls_failure(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return False
        if isinstance(seen, ssl.SSLError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _retry_after(resp: httpx.Response) -> float | None:
    value = resp.headers.get("retry-after", "")
    return float(value) if value.isdigit() else None


# Terminal escape sequences (CSI ... final byte, OSC ... BEL/ST, two-byte ESC x).
_ESCAPE_RE = re.compile(
    r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)?|[@-_])|\x9b[0-?]*[ -/]*[@-~]"
)
MAX_SERVER_TEXT = 300


def _printable(text: str, limit: int = MAX_SERVER_TEXT) -> str:
    """Server-chosen text made safe for a terminal: escape sequences and other
    control characters dropped, whitespace runs folded, length capped."""
    text = _ESCAPE_RE.sub("", text)
    text = "".join(c if c.isprintable() else " " for c in text)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


async def _error_summary(resp: httpx.Response) -> str:
    """The registry's error codes/messages (distribution JSON), bounded and
    sanitized: it is the server's text, printed on the user's terminal."""
    return _printable(await _raw_error_summary(resp))


async def _raw_error_summary(resp: httpx.Response) -> str:
    body = b""
    with contextlib.suppress(httpx.HTTPError):
        async for piece in resp.aiter_bytes():
            body += piece
            if len(body) > 8192:
                break
    try:
        errors = json.loads(body).get("errors") or []
        parts = [
            f"{e.get('code', '?')}: {e.get('message', '')}".strip()
            for e in errors
            if isinstance(e, dict)
        ]
        if parts:
            return "; ".join(parts)[:500]
    except (ValueError, AttributeError):
        pass
    return resp.reason_phrase or ""


async def _raise_for_status(resp: httpx.Response, what: str) -> None:
    """Turn a non-success status into the right error (5xx/429 are transient)."""
    code = resp.status_code
    if code == 429 or 500 <= code < 600:
        raise _Transient(
            f"{what}: HTTP {code} {_printable(resp.reason_phrase)}", _retry_after(resp)
        )
    summary = await _error_summary(resp)
    if code == 404:
        raise NotFoundError(f"{what}: not found (HTTP 404{': ' + summary if summary else ''})")
    if code in (401, 403):
        raise AuthError(f"{what}: access denied (HTTP {code}{': ' + summary if summary else ''})")
    raise RegistryError(f"{what}: unexpected HTTP {code}{': ' + summary if summary else ''}")


def _hash(algo: str, data: bytes) -> str:
    return f"{algo}:{hashlib.new(algo, data).hexdigest()}"


def _check_descriptor(desc: object, what: str) -> dict[str, Any]:
    if not isinstance(desc, dict):
        raise FormatError(f"{what}: descriptor is not a JSON object")
    check_digest(desc.get("digest"), what=f"{what}: digest")
    size = desc.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise FormatError(f"{what}: size {size!r} is not a non-negative integer")
    if not isinstance(desc.get("mediaType", ""), str):
        raise FormatError(f"{what}: mediaType is not a string")
    return desc


class RegistryClient:
    """One connection pool and one auth state for any number of registries.

    Use as ``async with RegistryClient(options) as client:``. ``transport``
    replaces the network (tests inject faults with it).
    """

    def __init__(
        self,
        options: RegistryOptions = RegistryOptions(),
        *,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if options.retries < 0:
            raise ValueError("retries must be >= 0")
        if not options.overall_timeout > 0:
            raise ValueError("overall_timeout must be > 0")
        quiet_library_loggers()  # again: logging may have been reconfigured since import
        self.options = options
        self._platform = _parse_platform(options.platform or default_platform())
        self._http = httpx.AsyncClient(
            transport=transport,
            verify=not options.insecure_tls,
            http2=options.http2,
            timeout=httpx.Timeout(options.timeout),
            follow_redirects=False,
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=32),
            headers={"User-Agent": "lazyerofs"},
        )
        self._tokens = TokenCache()
        self._token_locks: dict[tuple[str, str, str], anyio.Lock] = {}
        # host -> ("bearer", realm, service) or ("basic", "", "")
        self._host_auth: dict[str, tuple[str, str, str]] = {}
        self._creds: dict[str, Credentials | None] = {}
        self._counters = _Counters()

    def __repr__(self) -> str:
        return f"RegistryClient(platform={'/'.join(p for p in self._platform if p)!r})"

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    def statistics(self) -> BlobStatistics:
        """Everything this client fetched: manifests, configs, tables and frames."""
        return self._counters.freeze()

    # ------------------------------------------------------------ plumbing

    def base_url(self, host: str) -> str:
        """``scheme://host`` for API calls: TLS unless asked, or the host is loopback."""
        plain = self.options.plain_http
        if plain is None:
            plain = is_loopback_host(host)
        return f"{'http' if plain else 'https'}://{host}"

    @contextlib.contextmanager
    def _deadline(self, stage: str) -> Iterator[None]:
        """Bound a whole network stage, retries and trickling servers included."""
        limit = self.options.overall_timeout
        try:
            with anyio.fail_after(limit):
                yield
        except TimeoutError:
            raise FetchError(
                f"{stage}: not done within {limit:g} s (overall deadline, --overall-timeout)"
            ) from None

    def _credentials(self, host: str) -> Credentials | None:
        if host not in self._creds:
            if self.options.username is not None:
                self._creds[host] = Credentials(
                    self.options.username, Secret(self.options.password or "")
                )
            else:
                self._creds[host] = load_docker_credentials(self.options.docker_config, host)
        return self._creds[host]

    def _authorization(self, host: str, scope: str) -> str | None:
        mode = self._host_auth.get(host)
        if mode is None:
            return None
        if mode[0] == "basic":
            creds = self._credentials(host)
            return creds.basic_header() if creds else None
        token = self._tokens.get((mode[1], mode[2], scope))
        return f"Bearer {token.reveal()}" if token else None

    async def _fetch_token(
        self, host: str, realm: str, service: str, scope: str, cache_scope: str
    ) -> None:
        try:
            realm_url = httpx.URL(realm)
        except httpx.InvalidURL as exc:
            raise AuthError(f"{host}: token realm is not a URL") from exc
        if realm_url.scheme not in ("http", "https"):
            raise AuthError(f"{host}: token realm {_safe_url(realm_url)} is not http(s)")
        where = f"{host}: token server {_safe_url(realm_url)}"
        params = {}
        if service:
            params["service"] = service
        if scope:
            params["scope"] = scope
        headers = {}
        creds = self._credentials(host)
        if creds is not None:
            if (
                realm_url.scheme == "http"
                and self.base_url(host).startswith("https:")
                and self.options.plain_http is not True
                and not is_loopback_host(realm_url.netloc.decode())
            ):
                # The registry is reached over TLS: do not hand its password
                # to a plain-HTTP realm it names (loopback never leaves the host).
                raise AuthError(
                    f"{where} is plain HTTP while the registry uses HTTPS; "
                    "refusing to send credentials there (--plain-http allows it)"
                )
            headers["Authorization"] = creds.basic_header()
        self._counters.requests += 1
        with self._deadline(where):
            body = await self._token_answer(realm_url, params, headers, where, creds, scope)
        try:
            doc = json.loads(body)
            token = doc.get("token") or doc.get("access_token")
            expires_in = doc.get("expires_in")
        except (ValueError, AttributeError):
            raise AuthError(f"{where}: answer is not a JSON token") from None
        if not isinstance(token, str) or not token:
            raise AuthError(f"{where}: answer holds no token")
        self._tokens.put(
            (realm, service, cache_scope),
            token,
            float(expires_in) if isinstance(expires_in, int | float) else None,
        )

    async def _token_answer(
        self,
        realm_url: httpx.URL,
        params: dict[str, str],
        headers: dict[str, str],
        where: str,
        creds: Credentials | None,
        scope: str,
    ) -> bytes:
        """The token server's body, streamed and capped at MAX_TOKEN_RESPONSE bytes.

        Transport failures and 5xx stay retryable for the caller's ``_retrying``.
        """
        headers = {**headers, "Accept-Encoding": "identity"}  # the cap counts wire bytes
        request = self._http.build_request("GET", realm_url, params=params, headers=headers)
        resp = await self._http.send(request, stream=True)
        try:
            if resp.status_code in (401, 403):
                who = f"the credentials of user {creds.username!r}" if creds else "anonymous access"
                raise AuthError(
                    f"{where} refused {who} for scope {scope or '(none)'} (HTTP {resp.status_code})"
                )
            if resp.status_code != 200:
                await _raise_for_status(resp, where)
            declared = resp.headers.get("content-length", "")
            too_big = AuthError(
                f"{where}: token answer exceeds the {MAX_TOKEN_RESPONSE}-byte limit; refused"
            )
            if declared.isdigit() and int(declared) > MAX_TOKEN_RESPONSE:
                raise too_big
            body = bytearray()
            async for piece in resp.aiter_bytes():
                body += piece
                self._counters.bytes_fetched += len(piece)
                if len(body) > MAX_TOKEN_RESPONSE:
                    raise too_big
            return bytes(body)
        finally:
            await resp.aclose()

    async def _on_challenge(self, host: str, scope: str, header: str, sent: str | None) -> None:
        """Get what the 401's challenge asks for. ``sent`` is the Authorization we sent."""
        challenges = parse_challenges(header)
        bearer = next((c for c in challenges if c.scheme == "bearer" and c.realm), None)
        if bearer is not None:
            realm, service = bearer.realm or "", bearer.params.get("service", "")
            token_scope = scope or bearer.params.get("scope", "")
            # Many reads hit an expired token at once: one fetches, the rest reuse it.
            lock = self._token_locks.setdefault((realm, service, scope), anyio.Lock())
            async with lock:
                self._host_auth[host] = ("bearer", realm, service)
                current = self._authorization(host, scope)
                if current is not None and current != sent:
                    return  # someone refreshed it while we waited
                self._tokens.drop((realm, service, scope))
                await self._fetch_token(host, realm, service, token_scope, scope)
            return
        if any(c.scheme == "basic" for c in challenges):
            creds = self._credentials(host)
            if creds is None:
                raise AuthError(
                    f"{host}: registry requires credentials (basic auth); "
                    "pass --username/--password-stdin or add them to the docker config"
                )
            if sent is not None and self._host_auth.get(host, ("",))[0] == "basic":
                raise AuthError(
                    f"{host}: registry refused the credentials of user {creds.username!r}"
                )
            self._host_auth[host] = ("basic", "", "")
            return
        raise AuthError(f"{host}: HTTP 401 without a usable WWW-Authenticate challenge")

    async def _send(
        self,
        method: str,
        url: str | httpx.URL,
        *,
        host: str,
        scope: str,
        headers: Mapping[str, str] | None = None,
        content: Callable[[], Any] | None = None,
        stream: bool = False,
        counters: _Counters | None = None,
        origin: tuple[str, str, int | None] | None = None,
    ) -> httpx.Response:
        """Send with the right credentials; on 401, answer the challenge once and resend.

        ``content`` is a factory so a body can be produced again for the resend.
        The caller closes a streamed response. Credentials only go to
        ``origin`` (scheme, host, port; default: the registry's own): a URL
        elsewhere (an upload Location, say) is sent without them.
        """
        if _origin(url) != (origin or _origin(self.base_url(host))):
            request = self._http.build_request(
                method, url, headers=dict(headers or {}), content=content() if content else None
            )
            self._counters.requests += 1
            if counters is not None:
                counters.requests += 1
            return await self._http.send(request, stream=stream)
        challenged = refreshed = False
        while True:
            hdrs = dict(headers or {})
            authz = self._authorization(host, scope)
            if authz:
                hdrs["Authorization"] = authz
            request = self._http.build_request(
                method, url, headers=hdrs, content=content() if content else None
            )
            self._counters.requests += 1
            if counters is not None:
                counters.requests += 1
            resp = await self._http.send(request, stream=stream)
            if resp.status_code != 401:
                return resp
            challenge = resp.headers.get("www-authenticate", "")
            await resp.aclose()
            # A 401 to a bare request is the normal challenge; a 401 to a token
            # we sent means it expired or lacks scope: refresh it, but only once.
            if (authz is None and challenged) or (authz is not None and refreshed):
                if self._host_auth.get(host, ("",))[0] == "basic":
                    creds = self._credentials(host)
                    user = creds.username if creds else "?"
                    raise AuthError(f"{host}: registry refused the credentials of user {user!r}")
                raise AuthError(
                    f"{host}: access to {scope or 'this resource'} refused even with a fresh token"
                )
            if authz is None:
                challenged = True
            else:
                refreshed = True
            await self._on_challenge(host, scope, challenge, authz)

    async def _retrying(
        self, what: str, op: Callable[[], Awaitable[T]], counters: _Counters | None = None
    ) -> T:
        """Run ``op`` with bounded, jittered exponential backoff on transient failures."""
        attempts = self.options.retries + 1
        last: BaseException | None = None
        for attempt in range(attempts):
            if attempt:
                delay = min(BACKOFF_MAX, BACKOFF_BASE * 2 ** (attempt - 1)) * random.uniform(
                    0.5, 1.5
                )
                if isinstance(last, _Transient) and last.retry_after is not None:
                    delay = max(delay, min(last.retry_after, BACKOFF_MAX))
                log.info(
                    "%s: %s; retry %d/%d in %.2fs",
                    what,
                    _describe(last or Exception()),
                    attempt,
                    attempts - 1,
                    delay,
                )
                self._counters.retries += 1
                if counters is not None:
                    counters.retries += 1
                await anyio.sleep(delay)
            try:
                return await op()
            except _Transient as exc:
                last = exc
            except (
                httpx.TransportError
            ) as exc:  # resets, refused connections, timeouts, protocol errors
                if _is_tls_failure(exc):  # retrying will not fix a certificate
                    raise FetchError(
                        f"{what}: TLS handshake failed ({exc}); pass --insecure-tls only for a registry you trust"
                    ) from exc
                last = exc
            except httpx.HTTPError as exc:  # anything else httpx raises is not worth retrying
                raise FetchError(f"{what}: {_describe(exc)}") from exc
        assert last is not None
        raise FetchError(f"{what}: failed after {attempts} attempt(s): {_describe(last)}") from last

    # ------------------------------------------------------------ manifests

    def _manifest_url(self, ref: Reference, selector: str) -> str:
        return f"{self.base_url(ref.api_host)}/v2/{ref.repository}/manifests/{selector}"

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
        scope = f"repository:{ref.repository}:pull"

        async def once() -> tuple[bytes, httpx.Headers]:
            resp = await self._send(
                "GET", self._manifest_url(ref, selector), host=ref.api_host, scope=scope,
                headers={"Accept": _ACCEPT}, stream=True,
            )  # fmt: skip
            try:
                if resp.status_code != 200:
                    await _raise_for_status(resp, what)
                declared = resp.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > MAX_MANIFEST_SIZE:
                    raise FormatError(
                        f"{what}: manifest of {declared} bytes exceeds the {MAX_MANIFEST_SIZE}-byte limit"
                    )
                body = bytearray()
                async for piece in resp.aiter_bytes():
                    body += piece
                    self._counters.bytes_fetched += len(piece)
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
                    raise _Transient(f"{what}: short body ({len(body)} of {declared} bytes)")
                return bytes(body), resp.headers
            finally:
                await resp.aclose()

        body, headers = await self._retrying(what, once)
        verified = True
        if expected is not None:
            got = _hash(expected.split(":", 1)[0], body)
            if got != expected:
                raise IntegrityError(
                    f"{what}: digest mismatch: expected {expected}, received bytes hash to {got}"
                )
            digest = expected
        else:
            claimed = headers.get("docker-content-digest")
            if claimed:
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
        except ValueError as exc:
            raise FormatError(f"{what}: manifest is not valid JSON: {exc}") from exc
        if not isinstance(doc, dict):
            raise FormatError(f"{what}: manifest is not a JSON object")
        media_type = doc.get("mediaType") or headers.get("content-type", "").split(";")[0].strip()
        if media_type not in (*_MANIFEST_TYPES, *_INDEX_TYPES):
            if "manifests" in doc:
                media_type = MEDIA_OCI_INDEX
            elif "layers" in doc:
                media_type = MEDIA_OCI_MANIFEST
            else:
                raise FormatError(f"{what}: unsupported manifest type {media_type or '(none)'}")
        return body, media_type, digest, verified

    def _pick_platform(self, ref: Reference, index: dict[str, Any]) -> dict[str, Any]:
        entries = index.get("manifests")
        if not isinstance(entries, list):
            raise FormatError(f"{ref}: index has no 'manifests' list")
        want_os, want_arch, want_variant = self._platform
        default_variant = {"arm64": "v8"}.get(want_arch)
        candidates = []
        seen = []
        for i, entry in enumerate(entries):
            desc = _check_descriptor(entry, f"{ref}: index entry {i}")
            plat = desc.get("platform") or {}
            if not isinstance(plat, dict):
                continue
            os_, arch, variant = plat.get("os"), plat.get("architecture"), plat.get("variant")
            seen.append("/".join(str(p) for p in (os_, arch, variant) if p))
            if os_ != want_os or arch != want_arch:
                continue
            if want_variant is not None and (variant or default_variant) != want_variant:
                continue
            # Without a wanted variant, an entry without one (or the default) ranks first.
            rank = 0 if variant in (None, default_variant) else 1
            candidates.append((rank, i, desc))
        if not candidates:
            want = "/".join(p for p in self._platform if p)
            raise NotFoundError(
                f"{ref}: no manifest for platform {want} (index has: {', '.join(seen) or 'none'})"
            )
        return min(candidates, key=lambda c: (c[0], c[1]))[2]

    async def resolve(self, ref: Reference) -> ResolvedImage:
        """Fetch and check the image manifest (through an index if need be) and its config.

        The whole stage has one deadline (``RegistryOptions.overall_timeout``).
        """
        with self._deadline(f"{ref}: resolving the manifest and config"):
            return await self._resolve(ref)

    async def _resolve(self, ref: Reference) -> ResolvedImage:
        body, media_type, digest, verified = await self._fetch_manifest(
            ref, ref.selector, expected=ref.digest
        )
        index_digest = None
        if media_type in _INDEX_TYPES:
            index_digest = digest
            chosen = self._pick_platform(ref, json.loads(body))
            body, media_type, digest, _ = await self._fetch_manifest(
                ref, chosen["digest"], expected=chosen["digest"], expected_size=chosen["size"]
            )
            if media_type in _INDEX_TYPES:
                raise FormatError(
                    f"{ref}: index {index_digest} points at another index; nesting is not supported"
                )
        manifest = json.loads(body)
        if manifest.get("schemaVersion") != 2:
            raise FormatError(
                f"{ref}: manifest schemaVersion {manifest.get('schemaVersion')!r} is not 2"
            )
        layers = manifest.get("layers")
        if not isinstance(layers, list):
            raise FormatError(f"{ref}: manifest has no 'layers' list")
        for i, layer in enumerate(layers):
            _check_descriptor(layer, f"{ref}: layer {i}")
        config = None
        config_desc = manifest.get("config")
        if config_desc is not None:
            config_desc = _check_descriptor(config_desc, f"{ref}: config")
            if config_desc["size"] <= MAX_CONFIG_SIZE:
                config = await self._fetch_config(ref, config_desc)
        return ResolvedImage(
            reference=ref,
            digest=digest,
            media_type=media_type,
            manifest_bytes=body,
            manifest=manifest,
            layers=list(layers),
            config=config,
            index_digest=index_digest,
            digest_verified=verified,
        )

    async def _fetch_config(self, ref: Reference, desc: dict[str, Any]) -> dict[str, Any] | None:
        blob = self.blob(ref, desc)
        data = await blob.read(0, desc["size"]) if desc["size"] else b""
        got = _hash(desc["digest"].split(":", 1)[0], data)
        if got != desc["digest"]:
            raise IntegrityError(
                f"{ref}: config digest mismatch: expected {desc['digest']}, got {got}"
            )
        try:
            config = json.loads(data)
        except ValueError:
            log.warning("%s: config %s is not JSON; ignored", ref, desc["digest"])
            return None
        return config if isinstance(config, dict) else None

    # ------------------------------------------------------------ blobs

    def blob(self, ref: Reference, descriptor: Mapping[str, Any]) -> RemoteBlob:
        """A range reader for the blob ``descriptor`` names, in ``ref``'s repository."""
        desc = _check_descriptor(dict(descriptor), f"{ref}: blob")
        url = f"{self.base_url(ref.api_host)}/v2/{ref.repository}/blobs/{desc['digest']}"
        return RemoteBlob(
            self, url, host=ref.api_host, scope=f"repository:{ref.repository}:pull",
            digest=desc["digest"], size=desc["size"],
        )  # fmt: skip

    async def blob_exists(self, ref: Reference, digest: str) -> bool:
        check_digest(digest, what=f"{ref.name}: blob digest")
        url = f"{self.base_url(ref.api_host)}/v2/{ref.repository}/blobs/{digest}"
        what = f"{ref.name} blob {digest}"

        async def once() -> bool:
            resp = await self._send(
                "HEAD", url, host=ref.api_host, scope=f"repository:{ref.repository}:pull,push"
            )
            if resp.status_code == 200:
                return True
            if resp.status_code == 404:
                return False
            await _raise_for_status(resp, what)
            return False

        return await self._retrying(what, once)

    async def push_blob(
        self,
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
            raise FormatError(
                f"{ref.name}: blob {digest} is {actual} bytes, but {size} were declared"
            )
        if await self.blob_exists(ref, digest):
            log.info("%s: blob %s already present", ref.name, digest)
            return False
        if chunk_size is None:
            chunk_size = size if size <= MONOLITHIC_LIMIT else UPLOAD_CHUNK
        chunk_size = max(1, chunk_size)
        host, scope = ref.api_host, f"repository:{ref.repository}:pull,push"
        what = f"{ref.name}: upload of blob {digest}"

        def body(offset: int, length: int) -> Callable[[], Any]:
            if data is not None:
                return lambda: data[offset : offset + length]
            assert path is not None
            return lambda: _file_body(path, offset, length)

        async def once() -> None:
            resp = await self._send(
                "POST", f"{self.base_url(host)}/v2/{ref.repository}/blobs/uploads/", host=host, scope=scope,
                headers={"Content-Length": "0"},
            )  # fmt: skip
            if resp.status_code != 202:
                await _raise_for_status(resp, what)
            location = _location(resp, what)
            offset = 0
            if size > chunk_size:
                while offset < size:
                    n = min(chunk_size, size - offset)
                    resp = await self._send(
                        "PATCH", location, host=host, scope=scope, content=body(offset, n),
                        headers={
                            "Content-Type": "application/octet-stream",
                            "Content-Length": str(n),
                            "Content-Range": f"{offset}-{offset + n - 1}",
                        },
                    )  # fmt: skip
                    if resp.status_code != 202:
                        await _raise_for_status(resp, f"{what} (chunk at {offset})")
                    location = _location(resp, what)
                    offset += n
            final = httpx.URL(location).copy_merge_params({"digest": digest})
            resp = await self._send(
                "PUT", final, host=host, scope=scope, content=body(offset, size - offset),
                headers={"Content-Type": "application/octet-stream", "Content-Length": str(size - offset)},
            )  # fmt: skip
            if resp.status_code != 201:
                await _raise_for_status(resp, what)
            said = resp.headers.get("docker-content-digest")
            if said and said != digest:
                raise IntegrityError(f"{what}: registry stored it as {_printable(said, 200)}")

        await self._retrying(what, once)
        return True

    async def push_manifest(self, ref: Reference, manifest_bytes: bytes, media_type: str) -> str:
        """PUT a manifest under ``ref``'s tag (or its digest); returns the manifest digest."""
        digest = _hash("sha256", manifest_bytes)
        if ref.digest is not None and ref.tag is None and ref.digest != digest:
            raise IntegrityError(
                f"{ref}: manifest hashes to {digest}, not the digest in the reference"
            )
        selector = ref.tag or digest
        what = f"{ref.name}: push of manifest {selector}"

        async def once() -> str:
            resp = await self._send(
                "PUT", self._manifest_url(ref, selector), host=ref.api_host,
                scope=f"repository:{ref.repository}:pull,push", content=lambda: manifest_bytes,
                headers={"Content-Type": media_type},
            )  # fmt: skip
            if resp.status_code not in (200, 201):
                await _raise_for_status(resp, what)
            said = resp.headers.get("docker-content-digest")
            if said and said != digest:
                raise IntegrityError(
                    f"{what}: registry computed {_printable(said, 200)}, we computed {digest}"
                )
            return digest

        return await self._retrying(what, once)


def _location(resp: httpx.Response, what: str) -> str:
    loc = resp.headers.get("location")
    if not loc:
        raise RegistryError(f"{what}: HTTP {resp.status_code} without a Location header")
    return str(resp.url.join(loc))


async def _file_body(path: Path, offset: int, length: int) -> AsyncIterator[bytes]:
    """Stream ``length`` bytes of a file from ``offset``, reading in a worker thread."""
    f = await anyio.to_thread.run_sync(open, path, "rb")
    try:
        await anyio.to_thread.run_sync(f.seek, offset)
        left = length
        while left:
            piece = await anyio.to_thread.run_sync(f.read, min(_READ_PIECE, left))
            if not piece:
                raise FormatError(f"{path}: file shrank during upload")
            left -= len(piece)
            yield piece
    finally:
        await anyio.to_thread.run_sync(f.close)


async def _raw_pieces(resp: httpx.Response) -> AsyncIterator[bytes]:
    """The body as received; a response built already read (mock transports) gives its content."""
    try:
        content = resp.content
    except httpx.ResponseNotRead:
        async for piece in resp.aiter_raw():
            yield piece
    else:
        yield content


_CONTENT_RANGE_RE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")


class RemoteBlob:
    """Exact byte ranges of one remote blob over HTTP range requests.

    Answers it accepts: 206 whose ``Content-Range`` is exactly the range
    asked for, or 200 with the whole blob (then the range is cut out of the
    stream as it passes, never buffering the whole blob, and the blob is
    remembered as one whose server ignores ranges). Anything else is an
    error; short bodies and transient failures are retried.
    """

    def __init__(
        self,
        client: RegistryClient,
        url: str,
        *,
        host: str,
        scope: str,
        digest: str | None,
        size: int,
        owns_client: bool = False,
    ) -> None:
        self._client = client
        self.url = url
        self._host = host
        self._scope = scope
        self.digest = digest
        self.size = size
        self._owns_client = owns_client
        self._origin = _origin(url)  # the only place registry credentials go
        self._redirect: tuple[str, float] | None = None
        self._counters = _Counters()
        self.ignores_ranges = False
        self._name = f"blob {digest}" if digest else f"blob {_safe_url(url)}"

    def __repr__(self) -> str:
        return f"RemoteBlob({self._name}, size={self.size})"

    def statistics(self) -> BlobStatistics:
        return self._counters.freeze()

    async def read(self, offset: int, length: int) -> bytes:
        """Exactly bytes ``[offset, offset+length)`` of the blob, or an exception."""
        if offset < 0 or length < 0 or (self.size >= 0 and offset + length > self.size):
            raise FetchError(
                f"{self._name}: range {offset}+{length} is outside the {self.size}-byte blob"
            )
        if length == 0:
            return b""
        what = f"{self._name} bytes {offset}-{offset + length - 1}"
        return await self._client._retrying(
            what, lambda: self._read_once(offset, length, what), self._counters
        )

    async def _open(self, headers: dict[str, str]) -> httpx.Response:
        """GET through redirects (to blob storage, cached briefly), auth only on the registry."""
        http = self._client._http
        if self._redirect is not None:
            url, expires = self._redirect
            if time.monotonic() < expires:
                self._counters.requests += 1
                self._client._counters.requests += 1
                resp = await http.send(http.build_request("GET", url, headers=headers), stream=True)
                if resp.status_code not in (401, 403, 404, 410) and not resp.is_redirect:
                    return resp
                await resp.aclose()
            self._redirect = None
        url: str = self.url
        was_tls = downgraded = False
        for hop in range(MAX_REDIRECTS + 1):
            target = httpx.URL(url)
            if target.scheme not in ("http", "https"):
                raise FetchError(f"{self._name}: redirect to a non-HTTP URL {_safe_url(url)}")
            if was_tls and target.scheme == "http":
                # Storage behind a downgrade sees the request in clear text:
                # only when plain HTTP was asked for, and never with credentials.
                if self._client.options.plain_http is not True:
                    raise FetchError(
                        f"{self._name}: refused a redirect from HTTPS to plain HTTP "
                        f"({_safe_url(url)}); pass --plain-http to allow it"
                    )
                downgraded = True
            was_tls = was_tls or target.scheme == "https"
            if not downgraded and _origin(target) == self._origin:
                resp = await self._client._send(
                    "GET", url, host=self._host, scope=self._scope, headers=headers, stream=True,
                    counters=self._counters, origin=self._origin,
                )  # fmt: skip
            else:  # storage, another origin: never send registry credentials there
                self._counters.requests += 1
                self._client._counters.requests += 1
                resp = await http.send(http.build_request("GET", url, headers=headers), stream=True)
            if not resp.is_redirect:
                if hop:
                    self._redirect = (url, time.monotonic() + REDIRECT_TTL)
                return resp
            location = resp.headers.get("location")
            await resp.aclose()
            if not location:
                raise FetchError(f"{self._name}: redirect without a Location header")
            try:
                url = str(resp.url.join(location))
            except httpx.InvalidURL:
                raise FetchError(
                    f"{self._name}: redirect to an invalid URL {_safe_url(location)}"
                ) from None
        raise FetchError(f"{self._name}: more than {MAX_REDIRECTS} redirects")

    async def _read_once(self, offset: int, length: int, what: str) -> bytes:
        end = offset + length - 1
        resp = await self._open({"Range": f"bytes={offset}-{end}", "Accept-Encoding": "identity"})
        try:
            encoding = resp.headers.get("content-encoding", "identity").lower()
            if resp.status_code in (200, 206) and encoding != "identity":
                raise FetchError(f"{what}: server applied Content-Encoding {encoding!r} to a blob")
            if resp.status_code == 206:
                self._check_content_range(resp, offset, end, what)
                return await self._collect(resp, 0, length, what, exact=True)
            if resp.status_code == 200:
                if not self.ignores_ranges:
                    log.warning(
                        "%s: server ignores range requests (200 with the whole blob); reads will be slow",
                        self._name,
                    )
                    self.ignores_ranges = True
                declared = resp.headers.get("content-length")
                if (
                    self.size >= 0
                    and declared
                    and declared.isdigit()
                    and int(declared) != self.size
                ):
                    raise FetchError(
                        f"{what}: 200 answer of {declared} bytes for a {self.size}-byte blob"
                    )
                return await self._collect(resp, offset, length, what, exact=False)
            if resp.status_code == 416:
                raise FetchError(f"{what}: server says the range is not satisfiable (HTTP 416)")
            await _raise_for_status(resp, what)
            raise AssertionError("unreachable")
        finally:
            await resp.aclose()

    def _check_content_range(self, resp: httpx.Response, offset: int, end: int, what: str) -> None:
        ctype = resp.headers.get("content-type", "")
        if ctype.lower().startswith("multipart/"):
            raise FetchError(f"{what}: multipart 206 answer to a single-range request")
        value = resp.headers.get("content-range", "")
        m = _CONTENT_RANGE_RE.fullmatch(value.strip())
        if not m:
            raise FetchError(f"{what}: 206 answer with Content-Range {value!r}")
        first, last, total = int(m.group(1)), int(m.group(2)), m.group(3)
        if (first, last) != (offset, end):
            raise FetchError(f"{what}: 206 answer covers bytes {first}-{last} instead")
        if total != "*" and self.size >= 0 and int(total) != self.size:
            raise FetchError(f"{what}: server says the blob is {total} bytes, expected {self.size}")

    async def _collect(
        self, resp: httpx.Response, skip: int, length: int, what: str, *, exact: bool
    ) -> bytes:
        buf = bytearray()
        async for raw_piece in _raw_pieces(resp):
            piece = memoryview(raw_piece)
            self._counters.bytes_fetched += len(piece)
            self._client._counters.bytes_fetched += len(piece)
            if skip:
                if len(piece) <= skip:
                    skip -= len(piece)
                    continue
                piece, skip = piece[skip:], 0
            need = length - len(buf)
            if len(piece) >= need:
                if exact and len(piece) > need:
                    raise _Transient(
                        f"{what}: body longer than the {length} bytes of its Content-Range"
                    )
                buf += piece[:need]
                if not exact:
                    break  # the rest of a whole-blob answer is not needed: drop the connection
            else:
                buf += piece
        if len(buf) != length:
            raise _Transient(f"{what}: truncated body ({len(buf)} of {length} bytes)")
        return bytes(buf)

    async def probe_size(self) -> int:
        """The blob's size: HEAD's Content-Length, else a ``Range: bytes=0-0`` GET's Content-Range."""

        async def once() -> int:
            if self._origin[0] in ("http", "https"):
                resp = await self._client._send(
                    "HEAD", self.url, host=self._host, scope=self._scope, counters=self._counters,
                    origin=self._origin,
                )  # fmt: skip
                declared = resp.headers.get("content-length", "")
                if resp.status_code == 200 and declared.isdigit():
                    return int(declared)
                if (
                    resp.status_code != 200
                    and not resp.is_redirect
                    and resp.status_code not in (403, 405)
                ):
                    await _raise_for_status(resp, f"{self._name}: HEAD")
            resp = await self._open({"Range": "bytes=0-0", "Accept-Encoding": "identity"})
            try:
                if resp.status_code == 206:
                    m = _CONTENT_RANGE_RE.fullmatch(resp.headers.get("content-range", "").strip())
                    if m and m.group(3) != "*":
                        return int(m.group(3))
                    raise FetchError(f"{self._name}: cannot tell the blob size from Content-Range")
                if resp.status_code == 200 and resp.headers.get("content-length", "").isdigit():
                    self.ignores_ranges = True
                    return int(resp.headers["content-length"])
                await _raise_for_status(resp, f"{self._name}: size probe")
                raise FetchError(f"{self._name}: cannot tell the blob size")
            finally:
                await resp.aclose()

        return await self._client._retrying(f"{self._name}: size probe", once, self._counters)


_BLOB_PATH_RE = re.compile(r"/v2/(?P<repo>.+)/blobs/(?P<digest>.*)")


@contextlib.asynccontextmanager
async def open_url_blob(
    url: str,
    *,
    size: int | None = None,
    options: RegistryOptions = RegistryOptions(),
    transport: httpx.AsyncBaseTransport | None = None,
) -> AsyncIterator[RemoteBlob]:
    """A :class:`RemoteBlob` for a plain blob URL (a registry's ``/v2/.../blobs/<digest>`` or any server).

    The size is asked of the server (HEAD, or a one-byte ranged GET); when
    the caller knows it too (from a descriptor), a disagreement is an
    IntegrityError before any byte is read.
    """
    try:
        raw_path = urlsplit(url).path
    except ValueError:
        raise FormatError(f"blob URL {_safe_url(url)!r} is not a URL") from None
    if any(segment in (".", "..") for segment in raw_path.split("/")):
        raise FormatError(f"{_safe_url(url)}: blob URL path has '.' or '..' segments")
    try:
        u = httpx.URL(url)
    except httpx.InvalidURL:
        raise FormatError(f"blob URL {_safe_url(url)!r} is not a URL") from None
    if u.scheme not in ("http", "https") or not u.host:
        raise FormatError(f"{_safe_url(url)}: only http(s) blob URLs are supported")
    digest = None
    scope = ""
    m = _BLOB_PATH_RE.fullmatch(raw_path)
    if m:
        digest = check_digest(m.group("digest"), what=f"{_safe_url(url)}: digest in the URL")
        scope = f"repository:{m.group('repo')}:pull"
    async with RegistryClient(options, transport=transport) as client:
        blob = RemoteBlob(
            client, str(u), host=u.netloc.decode(), scope=scope, digest=digest, size=-1
        )
        with client._deadline(f"{blob._name}: size probe"):
            blob.size = await blob.probe_size()
        if size is not None and size != blob.size:
            raise IntegrityError(f"{blob._name}: server says {blob.size} bytes, expected {size}")
        yield blob
