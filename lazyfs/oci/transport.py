"""Retries, deadlines and the one place httpx failures become our errors.

Transient failures (5xx, 429, resets, timeouts, short bodies) are retried a
bounded number of times with jittered exponential backoff, then surface as
:class:`~lazyfs.errors.FetchError`; a status that retrying cannot fix becomes
NotFoundError, AuthError or RegistryError with the registry's own (bounded,
sanitized) explanation. URLs are cut down before they reach a message or a
log: pre-signed storage URLs carry their signature in the query.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import ssl
from collections.abc import AsyncIterable, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import httpx
import trio

from lazyfs.errors import AuthError, FetchError, NotFoundError, RegistryError
from lazyfs.oci.reference import is_loopback_host

__all__ = [
    "DEBUG_HTTP_ENV",
    "DEFAULT_OVERALL_TIMEOUT",
    "DEFAULT_RETRIES",
    "DEFAULT_TIMEOUT",
    "BlobStatistics",
    "BodyFactory",
    "Counters",
    "LazyTLSTransport",
    "Origin",
    "RegistryOptions",
    "Session",
    "Transient",
    "base_url",
    "deadline",
    "origin",
    "printable",
    "quiet_library_loggers",
    "raise_for_status",
    "retrying",
    "safe_url",
]

log = logging.getLogger(__name__)

DEFAULT_RETRIES = 4
DEFAULT_TIMEOUT = 30.0
# Deadline of a whole network stage (resolving a manifest and its config, one
# token fetch, a size probe): a per-request timeout alone lets a server that
# trickles a byte now and then hold a mount forever.
DEFAULT_OVERALL_TIMEOUT = 60.0
BACKOFF_BASE = 0.1
BACKOFF_MAX = 5.0
MAX_SERVER_TEXT = 300

T = TypeVar("T")


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


def base_url(options: RegistryOptions, host: str) -> str:
    """``scheme://host`` for API calls: TLS unless asked, or the host is loopback."""
    plain = options.plain_http
    if plain is None:
        plain = is_loopback_host(host)
    return f"{'http' if plain else 'https'}://{host}"


class LazyTLSTransport(httpx.AsyncBaseTransport):
    """Plain-HTTP requests go to a pool that does no TLS; the verifying TLS pool
    is built on the first ``https://`` request.

    Building a certificate-checking SSL context (loading the CA bundle) costs
    ~0.1 s, which a mount from a loopback or ``--plain-http`` registry would
    pay for nothing. The TLS pool is exactly what httpx builds for
    ``verify=not insecure_tls`` (``SSL_CERT_FILE``/``SSL_CERT_DIR`` honoured),
    only later.
    """

    def __init__(self, *, insecure_tls: bool, http2: bool, limits: httpx.Limits) -> None:
        self._insecure_tls = insecure_tls
        self._http2 = http2
        self._limits = limits
        # The plain pool gets a context that verifies but trusts no CA, so an
        # https URL that ever reached it would fail closed, never go unchecked.
        # (A bare context is cheap: no CA bundle is loaded.)
        self._plain = httpx.AsyncHTTPTransport(
            verify=ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), http2=http2, limits=limits
        )
        self._tls: httpx.AsyncHTTPTransport | None = None

    @property
    def tls_ready(self) -> bool:
        """Whether the TLS pool (and its SSL context) has been built."""
        return self._tls is not None

    def _tls_pool(self) -> httpx.AsyncHTTPTransport:
        if self._tls is None:
            self._tls = httpx.AsyncHTTPTransport(
                verify=not self._insecure_tls, http2=self._http2, limits=self._limits
            )
        return self._tls

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        pool = self._tls_pool() if request.url.scheme == "https" else self._plain
        return await pool.handle_async_request(request)

    async def aclose(self) -> None:
        await self._plain.aclose()
        if self._tls is not None:
            await self._tls.aclose()


# --------------------------------------------------------------- logging

# The HTTP stack's own loggers see every header: at DEBUG, hpack/h2 log the
# header block (the bearer token included) and httpcore the raw traffic. They
# stay at WARNING whatever the root level is, unless this variable is "1".
DEBUG_HTTP_ENV = "LAZYEROFS_DEBUG_HTTP"
_LIBRARY_LOGGERS = ("hpack", "h2", "h11", "httpcore", "httpx", "anyio", "trio")

_URL_IN_TEXT_RE = re.compile(
    r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?:[^/\s@?#]*@)?(?P<rest>[^\s?#'\"]*)(?:[?#][^\s'\"]*)?"
)


def redact_urls(text: str) -> str:
    """``text`` with userinfo, query and fragment cut out of every URL in it."""
    return _URL_IN_TEXT_RE.sub(lambda m: m.group("scheme") + m.group("rest"), text)


class _RedactURLs(logging.Filter):
    """httpx logs every request URL at INFO (when let through, see
    ``DEBUG_HTTP_ENV``); pre-signed storage URLs carry signatures in their
    query and URLs may carry userinfo: strip both from what it logs."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(safe_url(a) if isinstance(a, httpx.URL) else a for a in record.args)
        return True


def quiet_library_loggers() -> None:
    """Configure the HTTP libraries' loggers; called by every RegistryClient.

    Their URLs are redacted (one filter, added once), and they are held at
    WARNING unless ``$LAZYEROFS_DEBUG_HTTP=1``. Called again per client, as
    logging may have been reconfigured in between; nothing happens at import.
    """
    httpx_log = logging.getLogger("httpx")
    if not any(isinstance(f, _RedactURLs) for f in httpx_log.filters):
        httpx_log.addFilter(_RedactURLs())
    if os.environ.get(DEBUG_HTTP_ENV) == "1":
        return
    for name in _LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


# --------------------------------------------------------------- URLs and text


def safe_url(url: httpx.URL | str) -> str:
    """A URL fit for messages and logs: no userinfo, no query (pre-signed
    storage URLs carry their signature there), no fragment. Works on text
    that does not parse as a URL too."""
    try:
        u = httpx.URL(str(url))
        return str(u.copy_with(query=None, fragment=None, username=None, password=None))
    except (httpx.InvalidURL, TypeError, ValueError):
        text = redact_urls(str(url))
        # No scheme: still cut anything that looks like userinfo or a query.
        text = re.sub(r"^[^/@]*@", "", text)
        return text.split("?", 1)[0].split("#", 1)[0]


# (scheme, host, port): credentials go to one origin only.
Origin = tuple[str, str, int | None]
_HTTP_PORTS = {"http": 80, "https": 443}


def origin(url: httpx.URL | str) -> Origin:
    """(scheme, host, port) of ``url``, with the default port filled in."""
    u = url if isinstance(url, httpx.URL) else httpx.URL(url)
    scheme = u.scheme.lower()
    return scheme, u.host.lower(), u.port or _HTTP_PORTS.get(scheme)


# Terminal escape sequences (CSI ... final byte, OSC ... BEL/ST, two-byte ESC x).
_ESCAPE_RE = re.compile(
    r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)?|[@-_])|\x9b[0-?]*[ -/]*[@-~]"
)


def printable(text: str, limit: int = MAX_SERVER_TEXT) -> str:
    """Server-chosen text made safe for a terminal: escape sequences and other
    control characters dropped, whitespace runs folded, length capped."""
    text = _ESCAPE_RE.sub("", text)
    text = "".join(c if c.isprintable() else " " for c in text)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------- errors


class Transient(Exception):
    """A failure worth retrying (internal; becomes FetchError when retries run out)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def _describe(exc: BaseException) -> str:
    text = redact_urls(str(exc).strip())
    name = type(exc).__name__
    return f"{name}: {text}" if text and not isinstance(exc, Transient) else (text or name)


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


async def _error_summary(resp: httpx.Response) -> str:
    """The registry's error codes/messages (distribution JSON), bounded and
    sanitized: it is the server's text, printed on the user's terminal."""
    body = b""
    with contextlib.suppress(httpx.HTTPError):
        async for piece in resp.aiter_bytes():
            body += piece
            if len(body) > 8192:
                break
    summary = resp.reason_phrase or ""
    try:
        errors = json.loads(body).get("errors") or []
        parts = [
            f"{e.get('code', '?')}: {e.get('message', '')}".strip()
            for e in errors
            if isinstance(e, dict)
        ]
        if parts:
            summary = "; ".join(parts)[:500]
    except (ValueError, AttributeError, TypeError, RecursionError):  # any JSON shape, any depth
        pass
    return printable(summary)


async def raise_for_status(resp: httpx.Response, what: str) -> None:
    """Turn a non-success status into the right error (5xx/429 are transient)."""
    code = resp.status_code
    if code == 429 or 500 <= code < 600:
        raise Transient(f"{what}: HTTP {code} {printable(resp.reason_phrase)}", _retry_after(resp))
    summary = await _error_summary(resp)
    said = f": {summary}" if summary else ""
    if code == 404:
        raise NotFoundError(f"{what}: not found (HTTP 404{said})")
    if code in (401, 403):
        raise AuthError(f"{what}: access denied (HTTP {code}{said})")
    raise RegistryError(f"{what}: unexpected HTTP {code}{said}")


# --------------------------------------------------------------- statistics


@dataclass(frozen=True)
class BlobStatistics:
    """What one blob (or a whole client) cost on the wire."""

    requests: int = 0
    bytes_fetched: int = 0
    retries: int = 0


@dataclass
class Counters:
    """The running totals behind a :class:`BlobStatistics`."""

    requests: int = 0
    bytes_fetched: int = 0
    retries: int = 0

    def freeze(self) -> BlobStatistics:
        return BlobStatistics(self.requests, self.bytes_fetched, self.retries)


# --------------------------------------------------------------- retries, deadlines


async def retrying(
    what: str,
    op: Callable[[], Awaitable[T]],
    *,
    retries: int,
    on_retry: Callable[[], None] = lambda: None,
) -> T:
    """Run ``op`` with bounded, jittered exponential backoff on transient failures.

    Every httpx exception ``op`` lets out ends here: transport errors are
    retried (a TLS failure is not: retrying will not fix a certificate), the
    rest become FetchError at once.
    """
    attempts = retries + 1
    last: BaseException | None = None
    for attempt in range(attempts):
        if attempt:
            delay = min(BACKOFF_MAX, BACKOFF_BASE * 2 ** (attempt - 1)) * random.uniform(0.5, 1.5)
            if isinstance(last, Transient) and last.retry_after is not None:
                delay = max(delay, min(last.retry_after, BACKOFF_MAX))
            log.info(
                "%s: %s; retry %d/%d in %.2fs",
                what, _describe(last or Exception()), attempt, attempts - 1, delay,
            )  # fmt: skip
            on_retry()
            await trio.sleep(delay)
        try:
            return await op()
        except Transient as exc:
            last = exc
        except httpx.TransportError as exc:  # resets, refused connections, timeouts, protocol
            if _is_tls_failure(exc):
                raise FetchError(
                    f"{what}: TLS handshake failed ({exc}); pass --insecure-tls only for a registry you trust"
                ) from exc
            last = exc
        except httpx.HTTPError as exc:  # anything else httpx raises is not worth retrying
            raise FetchError(f"{what}: {_describe(exc)}") from exc
    assert last is not None
    raise FetchError(f"{what}: failed after {attempts} attempt(s): {_describe(last)}") from last


@contextlib.contextmanager
def deadline(stage: str, limit: float) -> Iterator[None]:
    """Bound a whole network stage, retries and trickling servers included."""
    try:
        with trio.fail_after(limit):
            yield
    except trio.TooSlowError:
        raise FetchError(
            f"{stage}: not done within {limit:g} s (overall deadline, --overall-timeout)"
        ) from None


# --------------------------------------------------------------- what readers build on

# Makes a request body; called again for a resend, as a streamed body is spent.
BodyFactory = Callable[[], bytes | AsyncIterable[bytes]]


class Session(Protocol):
    """The public plumbing of a :class:`~lazyfs.oci.client.RegistryClient`
    that blob readers and uploads build on (and tests may stand in for)."""

    options: RegistryOptions
    clock: Callable[[], float]
    http: httpx.AsyncClient

    def base_url(self, host: str) -> str: ...

    def deadline(self, stage: str) -> contextlib.AbstractContextManager[None]: ...

    def count(
        self, counters: Counters | None = None, *, requests: int = 0, bytes_fetched: int = 0
    ) -> None: ...

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
    ) -> httpx.Response: ...

    async def retrying(
        self, what: str, op: Callable[[], Awaitable[T]], counters: Counters | None = None
    ) -> T: ...
