"""RemoteBlob: exact byte ranges of one blob, over HTTP range requests.

Follows redirects to blob storage (remembered briefly, as pre-signed URLs
expire), sends registry credentials only to the registry's own origin, and
checks every answer: a 206 must carry exactly the ``Content-Range`` asked
for, a 200 (a server ignoring ranges) must be the whole blob. Built on the
public plumbing of a client (:class:`~lazyfs.oci.transport.Session`).
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import httpx
import trio

from lazyfs.errors import FetchError, IntegrityError
from lazyfs.oci.transport import (
    BlobStatistics,
    Counters,
    RegistryOptions,
    Session,
    Transient,
    origin,
    raise_for_status,
    safe_url,
)

__all__ = ["BlobSpec", "RemoteBlob"]

log = logging.getLogger(__name__)

MAX_REDIRECTS = 5
# Pre-signed storage URLs expire; reuse a redirect only briefly, and go back
# to the registry as soon as storage says no.
REDIRECT_TTL = 60.0


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

# A body that delivers fewer than LOW_SPEED_BYTES per LOW_SPEED_SECONDS is
# given up and retried (as curl's --speed-limit/--speed-time): the read
# timeout alone never fires while a server trickles a byte at a time, and
# such a request would hold its frames for hours.
LOW_SPEED_BYTES = 16 << 10
LOW_SPEED_SECONDS = 5.0


class _LowSpeed:
    """Raises Transient once a body falls under the low-speed limit."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.mark_time = trio.current_time()
        self.mark_bytes = self.received = 0

    def add(self, n: int) -> None:
        self.received += n
        now = trio.current_time()
        if now - self.mark_time < LOW_SPEED_SECONDS:
            return
        got = self.received - self.mark_bytes
        if got < LOW_SPEED_BYTES:
            raise Transient(
                f"{self.what}: transfer too slow ({got} bytes in {now - self.mark_time:.1f}s, "
                f"under {LOW_SPEED_BYTES} per {LOW_SPEED_SECONDS:g}s)"
            )
        self.mark_time, self.mark_bytes = now, self.received


@dataclass(frozen=True)
class BlobSpec:
    """What it takes to open the same blob in another process (a fetch
    worker, :mod:`lazyfs.fetch.offload`): no live state, picklable."""

    options: RegistryOptions
    url: str
    host: str
    scope: str
    digest: str | None
    size: int


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
        client: Session,
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
        self._origin = origin(url)  # the only place registry credentials go
        self._redirect: tuple[str, float] | None = None
        self._counters = Counters()
        self.ignores_ranges = False
        self.name = f"blob {digest}" if digest else f"blob {safe_url(url)}"

    def __repr__(self) -> str:
        return f"RemoteBlob({self.name}, size={self.size})"

    def statistics(self) -> BlobStatistics:
        return self._counters.freeze()

    def spec(self) -> BlobSpec:
        """This blob, to be opened again elsewhere with :meth:`from_spec`."""
        return BlobSpec(self._client.options, self.url, self._host, self._scope, self.digest, self.size)

    @classmethod
    def from_spec(cls, client: Session, spec: BlobSpec) -> RemoteBlob:
        """The blob ``spec`` describes, read through ``client`` (whose
        options should be ``spec.options``)."""
        return cls(client, spec.url, host=spec.host, scope=spec.scope, digest=spec.digest, size=spec.size)

    async def read(self, offset: int, length: int) -> bytes:
        """Exactly bytes ``[offset, offset+length)`` of the blob, or an exception."""
        if offset < 0 or length < 0 or (self.size >= 0 and offset + length > self.size):
            raise FetchError(
                f"{self.name}: range {offset}+{length} is outside the {self.size}-byte blob"
            )
        if length == 0:
            return b""
        what = f"{self.name} bytes {offset}-{offset + length - 1}"
        return await self._client.retrying(
            what, lambda: self._read_once(offset, length, what), self._counters
        )

    async def _open(self, headers: dict[str, str]) -> httpx.Response:
        """GET through redirects (to blob storage, cached briefly), auth only on the registry."""
        client = self._client
        if self._redirect is not None:
            url, expires = self._redirect
            if client.clock() < expires:
                resp = await self._send(url, headers, anonymous=True)
                if resp.status_code not in (401, 403, 404, 410) and not resp.is_redirect:
                    return resp
                await resp.aclose()
            self._redirect = None
        url = self.url
        was_tls = downgraded = False
        for hop in range(MAX_REDIRECTS + 1):
            target = httpx.URL(url)
            if target.scheme not in ("http", "https"):
                raise FetchError(f"{self.name}: redirect to a non-HTTP URL {safe_url(url)}")
            if was_tls and target.scheme == "http":
                # Storage behind a downgrade sees the request in clear text:
                # only when plain HTTP was asked for, and never with credentials.
                if client.options.plain_http is not True:
                    raise FetchError(
                        f"{self.name}: refused a redirect from HTTPS to plain HTTP "
                        f"({safe_url(url)}); pass --plain-http to allow it"
                    )
                downgraded = True
            was_tls = was_tls or target.scheme == "https"
            # Storage (another origin) never sees registry credentials.
            resp = await self._send(url, headers, anonymous=downgraded)
            if not resp.is_redirect:
                if hop:
                    self._redirect = (url, client.clock() + REDIRECT_TTL)
                return resp
            location = resp.headers.get("location")
            await resp.aclose()
            if not location:
                raise FetchError(f"{self.name}: redirect without a Location header")
            try:
                url = str(resp.url.join(location))
            except httpx.InvalidURL:
                raise FetchError(
                    f"{self.name}: redirect to an invalid URL {safe_url(location)}"
                ) from None
        raise FetchError(f"{self.name}: more than {MAX_REDIRECTS} redirects")

    async def _send(
        self, url: str, headers: dict[str, str], *, anonymous: bool = False
    ) -> httpx.Response:
        return await self._client.send(
            "GET", url, host=self._host, scope=self._scope, headers=headers, stream=True,
            counters=self._counters, origin=self._origin, anonymous=anonymous,
        )  # fmt: skip

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
                        self.name,
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
            await raise_for_status(resp, what)
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
        speed = _LowSpeed(what)
        async for raw_piece in _raw_pieces(resp):
            piece = memoryview(raw_piece)
            self._client.count(self._counters, bytes_fetched=len(piece))
            speed.add(len(piece))
            if skip:
                if len(piece) <= skip:
                    skip -= len(piece)
                    continue
                piece, skip = piece[skip:], 0
            need = length - len(buf)
            if len(piece) >= need:
                if exact and len(piece) > need:
                    raise Transient(
                        f"{what}: body longer than the {length} bytes of its Content-Range"
                    )
                buf += piece[:need]
                if not exact:
                    break  # the rest of a whole-blob answer is not needed: drop the connection
            else:
                buf += piece
        if len(buf) != length:
            raise Transient(f"{what}: truncated body ({len(buf)} of {length} bytes)")
        return bytes(buf)

    async def stream(
        self, sink: Callable[[bytes], Awaitable[None]], *, piece_size: int = 1 << 20
    ) -> None:
        """Send the whole blob to ``sink`` in order, in pieces of about ``piece_size``,
        hashing as it passes. The last piece is held back until the byte count and
        the digest match, so a consumer that saw the end has seen checked bytes;
        on a mismatch ``sink`` never gets it and IntegrityError is raised.

        A transfer cut short is resumed from where it stopped (a ranged GET), within
        the client's retry budget; memory is bounded by ``piece_size``.
        """
        if self.digest is None or self.size < 0:
            raise FetchError(f"{self.name}: streaming needs a digest and a size to check")
        algo = self.digest.split(":", 1)[0]
        state = {"received": 0}
        hasher = hashlib.new(algo)
        pending = bytearray()

        async def flush(final: bool) -> None:
            if final:
                got = f"{algo}:{hasher.hexdigest()}"
                if got != self.digest:
                    raise IntegrityError(f"{self.name}: content hashes to {got}")
            if pending:
                piece = bytes(pending)
                pending.clear()
                await sink(piece)

        async def rest() -> None:
            start = state["received"]
            headers = {"Accept-Encoding": "identity"}
            if start:
                headers["Range"] = f"bytes={start}-{self.size - 1}"
            resp = await self._open(headers)
            try:
                encoding = resp.headers.get("content-encoding", "identity").lower()
                if resp.status_code in (200, 206) and encoding != "identity":
                    raise FetchError(f"{self.name}: server applied Content-Encoding {encoding!r}")
                if resp.status_code == 206 and start:
                    self._check_content_range(resp, start, self.size - 1, self.name)
                    skip = 0
                elif resp.status_code == 200:
                    skip = start  # the whole blob again: drop what we already have
                else:
                    await raise_for_status(resp, self.name)
                    raise FetchError(f"{self.name}: unexpected HTTP {resp.status_code}")
                speed = _LowSpeed(self.name)
                async for raw_piece in _raw_pieces(resp):
                    piece = memoryview(raw_piece)
                    self._client.count(self._counters, bytes_fetched=len(piece))
                    speed.add(len(piece))
                    if skip:
                        cut = min(skip, len(piece))
                        piece, skip = piece[cut:], skip - cut
                    if state["received"] + len(piece) > self.size:
                        raise IntegrityError(f"{self.name}: longer than its {self.size} bytes")
                    hasher.update(piece)
                    pending.extend(piece)
                    state["received"] += len(piece)
                    if len(pending) >= piece_size and state["received"] < self.size:
                        await flush(final=False)
            finally:
                await resp.aclose()
            if state["received"] != self.size:
                raise Transient(
                    f"{self.name}: body ended at byte {state['received']} of {self.size}"
                )

        if self.size:
            await self._client.retrying(f"{self.name}: download", rest, self._counters)
        await flush(final=True)

    async def probe_size(self) -> int:
        """The blob's size: HEAD's Content-Length, else a ``Range: bytes=0-0`` GET's Content-Range."""

        async def once() -> int:
            if self._origin[0] in ("http", "https"):
                resp = await self._client.send(
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
                    await raise_for_status(resp, f"{self.name}: HEAD")
            resp = await self._open({"Range": "bytes=0-0", "Accept-Encoding": "identity"})
            try:
                if resp.status_code == 206:
                    m = _CONTENT_RANGE_RE.fullmatch(resp.headers.get("content-range", "").strip())
                    if m and m.group(3) != "*":
                        return int(m.group(3))
                    raise FetchError(f"{self.name}: cannot tell the blob size from Content-Range")
                if resp.status_code == 200 and resp.headers.get("content-length", "").isdigit():
                    self.ignores_ranges = True
                    return int(resp.headers["content-length"])
                await raise_for_status(resp, f"{self.name}: size probe")
                raise FetchError(f"{self.name}: cannot tell the blob size")
            finally:
                await resp.aclose()

        return await self._client.retrying(f"{self.name}: size probe", once, self._counters)
