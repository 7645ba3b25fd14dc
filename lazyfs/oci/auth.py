"""Registry auth: challenges, bearer tokens, and the flow that answers them.

The distribution auth flow: a request answered 401 carries
``WWW-Authenticate: Bearer realm=...,service=...,scope=...`` (or ``Basic``).
For Bearer we ask the realm for a token (with basic credentials when we have
some, anonymously otherwise) and retry; for Basic we resend with the
credentials. Tokens are cached per (realm, service, scope) until shortly
before they expire, and dropped on a 401 so a long mount survives expiry.
Credentials (``credentials.py``) and tokens stay out of every log and repr.

:class:`RegistryAuth` is that flow as an ``httpx.Auth``: it answers a
challenge once (a second 401 is an AuthError), and only ever sends
credentials to the registry's own origin (scheme, host and port).
:class:`AuthSession` is the state all requests of one client share.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import NoReturn

import httpx
import trio

from lazyfs.errors import AuthError
from lazyfs.oci.credentials import Credentials, Secret, load_docker_credentials
from lazyfs.oci.reference import is_loopback_host
from lazyfs.oci.transport import (
    BodyFactory,
    Counters,
    Origin,
    RegistryOptions,
    base_url,
    deadline,
    origin,
    raise_for_status,
    safe_url,
)

__all__ = [
    "AuthSession",
    "Challenge",
    "RegistryAuth",
    "TokenCache",
    "parse_challenges",
]

# Refresh this long before the server's expiry, so a token never dies in flight.
TOKEN_EXPIRY_MARGIN = 10.0
# The distribution token spec says to assume 60 s when expires_in is absent.
DEFAULT_TOKEN_LIFETIME = 60.0
# A token answer is a small JSON object; a server sending more is hostile.
MAX_TOKEN_RESPONSE = 1 << 20


@dataclass(frozen=True)
class Challenge:
    """One parsed ``WWW-Authenticate`` challenge."""

    scheme: str  # lower case: "bearer" or "basic"
    params: dict[str, str] = field(default_factory=dict)

    @property
    def realm(self) -> str | None:
        return self.params.get("realm")


# One \s* before the comma, one after it only: "\s*,?\s*" splits a run of blanks
# every possible way before failing, quadratic in a header that is all blanks.
_SCHEME_RE = re.compile(r"\s*(?:,\s*)?([A-Za-z][A-Za-z0-9_-]*)")
_PARAM_RE = re.compile(r'\s*([A-Za-z0-9_.-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))\s*,?')


def parse_challenges(header: str) -> list[Challenge]:
    """Parse a ``WWW-Authenticate`` value into challenges (quoted values may hold commas)."""
    out: list[Challenge] = []
    pos = 0
    n = len(header)
    while pos < n:
        m = _SCHEME_RE.match(header, pos)
        if not m:
            break
        scheme = m.group(1).lower()
        pos = m.end()
        params: dict[str, str] = {}
        while pos < n:
            pm = _PARAM_RE.match(header, pos)
            if not pm:
                break
            value = pm.group(2) if pm.group(2) is not None else pm.group(3)
            params[pm.group(1).lower()] = re.sub(r"\\(.)", r"\1", value)
            pos = pm.end()
        out.append(Challenge(scheme, params))
    return out


@dataclass
class _Token:
    value: Secret
    expires_at: float


TokenKey = tuple[str, str, str]  # (realm, service, scope)


class TokenCache:
    """Bearer tokens keyed by (realm, service, scope), forgotten before they expire.

    ``clock`` (seconds, monotonic) is injectable so expiry can be tested
    without waiting for it.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._tokens: dict[TokenKey, _Token] = {}

    def get(self, key: TokenKey) -> Secret | None:
        tok = self._tokens.get(key)
        if tok is None:
            return None
        if self._clock() >= tok.expires_at:
            del self._tokens[key]
            return None
        return tok.value

    def put(self, key: TokenKey, value: str, expires_in: float | None) -> Secret:
        lifetime = expires_in if expires_in and expires_in > 0 else DEFAULT_TOKEN_LIFETIME
        margin = min(TOKEN_EXPIRY_MARGIN, lifetime / 4)
        secret = Secret(value)
        self._tokens[key] = _Token(secret, self._clock() + lifetime - margin)
        return secret

    def drop(self, key: TokenKey) -> None:
        self._tokens.pop(key, None)

    def secrets(self) -> list[Secret]:
        """Every token held (still wrapped), e.g. to check none of them leaked."""
        return [tok.value for tok in self._tokens.values()]

    def __repr__(self) -> str:
        return f"TokenCache({len(self._tokens)} tokens)"


class AuthSession:
    """What all requests of one client share: credentials per host, each host's
    auth mode, bearer tokens, and one lock per token so that many reads hitting
    an expired token at once cause one fetch.

    Token fetches go through ``http`` (the client's pool, no auth of its own)
    and count into ``counters``.
    """

    def __init__(
        self,
        http: httpx.AsyncClient,
        options: RegistryOptions,
        counters: Counters,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._http = http
        self._options = options
        self._counters = counters
        self.tokens = TokenCache(clock)
        self._token_locks: dict[TokenKey, trio.Lock] = {}
        # host -> ("bearer", realm, service) or ("basic", "", "")
        self._host_auth: dict[str, tuple[str, str, str]] = {}
        self._creds: dict[str, Credentials | None] = {}

    def __repr__(self) -> str:
        return f"AuthSession({len(self._host_auth)} hosts, {self.tokens!r})"

    def credentials(self, host: str) -> Credentials | None:
        if host not in self._creds:
            if self._options.username is not None:
                self._creds[host] = Credentials(
                    self._options.username, Secret(self._options.password or "")
                )
            else:
                self._creds[host] = load_docker_credentials(self._options.docker_config, host)
        return self._creds[host]

    def authorization(self, host: str, scope: str) -> str | None:
        """The Authorization header for ``host`` and ``scope`` as things stand, if any."""
        mode = self._host_auth.get(host)
        if mode is None:
            return None
        if mode[0] == "basic":
            creds = self.credentials(host)
            return creds.basic_header() if creds else None
        token = self.tokens.get((mode[1], mode[2], scope))
        return f"Bearer {token.reveal()}" if token else None

    def refused(self, host: str, scope: str) -> AuthError:
        """The error for a 401 that answering the challenge did not cure."""
        if self._host_auth.get(host, ("",))[0] == "basic":
            creds = self.credentials(host)
            user = creds.username if creds else "?"
            return AuthError(f"{host}: registry refused the credentials of user {user!r}")
        return AuthError(
            f"{host}: access to {scope or 'this resource'} refused even with a fresh token"
        )

    async def answer(self, host: str, scope: str, header: str, sent: str | None) -> None:
        """Get what a 401's challenge asks for. ``sent`` is the Authorization we sent."""
        challenges = parse_challenges(header)
        bearer = next((c for c in challenges if c.scheme == "bearer" and c.realm), None)
        if bearer is not None:
            realm, service = bearer.realm or "", bearer.params.get("service", "")
            token_scope = scope or bearer.params.get("scope", "")
            lock = self._token_locks.setdefault((realm, service, scope), trio.Lock())
            async with lock:
                self._host_auth[host] = ("bearer", realm, service)
                current = self.authorization(host, scope)
                if current is not None and current != sent:
                    return  # someone refreshed it while we waited
                self.tokens.drop((realm, service, scope))
                await self._fetch_token(host, realm, service, token_scope, scope)
            return
        if any(c.scheme == "basic" for c in challenges):
            creds = self.credentials(host)
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

    async def _fetch_token(
        self, host: str, realm: str, service: str, scope: str, cache_scope: str
    ) -> None:
        try:
            realm_url = httpx.URL(realm)
        except httpx.InvalidURL as exc:
            raise AuthError(f"{host}: token realm is not a URL") from exc
        if realm_url.scheme not in ("http", "https"):
            raise AuthError(f"{host}: token realm {safe_url(realm_url)} is not http(s)")
        where = f"{host}: token server {safe_url(realm_url)}"
        params = {k: v for k, v in (("service", service), ("scope", scope)) if v}
        headers = {"Accept-Encoding": "identity"}  # the size cap counts wire bytes
        creds = self.credentials(host)
        if creds is not None:
            if (
                realm_url.scheme == "http"
                and base_url(self._options, host).startswith("https:")
                and self._options.plain_http is not True
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
        with deadline(where, self._options.overall_timeout):
            body = await self._token_answer(realm_url, params, headers, where, creds, scope)
        try:
            doc = json.loads(body)
            token = doc.get("token") or doc.get("access_token")
            expires_in = doc.get("expires_in")
        except (ValueError, AttributeError, RecursionError):
            raise AuthError(f"{where}: answer is not a JSON token") from None
        if not isinstance(token, str) or not token:
            raise AuthError(f"{where}: answer holds no token")
        try:
            lifetime = float(expires_in) if isinstance(expires_in, int | float) else None
        except OverflowError:  # an integer past float range: no usable lifetime, use the default
            lifetime = None
        self.tokens.put((realm, service, cache_scope), token, lifetime)

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

        Transport failures and 5xx stay retryable for the caller's retry loop.
        """
        request = self._http.build_request("GET", realm_url, params=params, headers=headers)
        resp = await self._http.send(request, stream=True)
        try:
            if resp.status_code in (401, 403):
                who = f"the credentials of user {creds.username!r}" if creds else "anonymous access"
                raise AuthError(
                    f"{where} refused {who} for scope {scope or '(none)'} (HTTP {resp.status_code})"
                )
            if resp.status_code != 200:
                await raise_for_status(resp, where)
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


class RegistryAuth(httpx.Auth):
    """One request's credentials: sent to ``registry`` (an origin; None: nowhere)
    only, refreshed once on a 401, the request then resent.

    A 401 to a bare request is the normal challenge; a 401 to credentials we
    sent means they expired or lack scope: answered once, then AuthError.
    ``body`` makes a fresh body for the resend (a streamed one is spent);
    ``on_request`` is called for every request put on the wire.
    """

    def __init__(
        self,
        session: AuthSession,
        *,
        host: str,
        scope: str,
        registry: Origin | None,
        body: BodyFactory | None = None,
        on_request: Callable[[], None] = lambda: None,
    ) -> None:
        self._session = session
        self._host = host
        self._scope = scope
        self._registry = registry
        self._body = body
        self._on_request = on_request

    def sync_auth_flow(self, request: httpx.Request) -> NoReturn:
        raise RuntimeError("RegistryAuth works with httpx.AsyncClient only")

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        if origin(request.url) != self._registry:
            # Elsewhere (storage, an upload Location on another host): no credentials.
            self._on_request()
            yield request
            return
        challenged = refreshed = False
        while True:
            authz = self._session.authorization(self._host, self._scope)
            request.headers.pop("Authorization", None)
            if authz:
                request.headers["Authorization"] = authz
            self._on_request()
            response = yield request
            if response.status_code != 401:
                return
            challenge = response.headers.get("www-authenticate", "")
            await _drop_body(response)
            if (authz is None and challenged) or (authz is not None and refreshed):
                raise self._session.refused(self._host, self._scope)
            if authz is None:
                challenged = True
            else:
                refreshed = True
            await self._session.answer(self._host, self._scope, challenge, authz)
            if self._body is not None:
                request = httpx.Request(
                    request.method, request.url, headers=request.headers,
                    content=self._body(), extensions=request.extensions,
                )  # fmt: skip


async def _drop_body(response: httpx.Response) -> None:
    """Hang up on a 401 without reading its body (the server chooses its size).

    httpx reads a response its auth flow answered once the flow moves on; an
    empty stream in place of the real one makes that read a no-op, and the
    real one is closed now, before a token fetch, so its connection is free.
    """
    if isinstance(response.stream, httpx.AsyncByteStream):
        await response.stream.aclose()
    response.stream = httpx.ByteStream(b"")
