"""RegistryAuth, the httpx.Auth answering registry challenges, against a mock transport."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
import trio

from lazyfs.errors import AuthError
from lazyfs.oci import RegistryClient, RegistryOptions, parse_reference

REF = parse_reference("registry.example/app/x@sha256:" + "a" * 64)
BLOB = {"digest": "sha256:" + "b" * 64, "size": 4, "mediaType": "application/octet-stream"}


class LongBody(httpx.AsyncByteStream):
    """A 401 body of 4 MiB (a hostile server's could be endless); counts what was read."""

    def __init__(self) -> None:
        self.pieces = 0
        self.closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for _ in range(64):
            self.pieces += 1
            yield b"x" * 65536

    async def aclose(self) -> None:
        self.closed = True


async def test_a_401_body_is_not_read_and_the_request_is_resent_with_credentials():
    bodies: list[LongBody] = []
    seen: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("authorization"))
        if request.headers.get("authorization") is None:
            body = LongBody()
            bodies.append(body)
            return httpx.Response(401, headers={"WWW-Authenticate": 'Basic realm="r"'}, stream=body)
        return httpx.Response(206, headers={"Content-Range": "bytes 0-3/4"}, content=b"data")

    options = RegistryOptions(username="u", password="p")
    async with RegistryClient(options, transport=httpx.MockTransport(handler)) as client:
        with trio.fail_after(5):
            assert await client.blob(REF, BLOB).read(0, 4) == b"data"
        assert client.statistics().requests == 2
    assert seen[0] is None and seen[1] is not None and seen[1].startswith("Basic ")
    assert bodies[0].pieces == 0 and bodies[0].closed


async def test_credentials_refused_twice_end_in_auth_error_after_one_resend():
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return httpx.Response(401, headers={"WWW-Authenticate": 'Basic realm="r"'})

    options = RegistryOptions(username="u", password="p", retries=0)
    async with RegistryClient(options, transport=httpx.MockTransport(handler)) as client:
        with pytest.raises(AuthError, match="refused the credentials of user 'u'"):
            await client.blob(REF, BLOB).read(0, 4)
    assert calls == 2


async def test_a_resent_upload_gets_a_fresh_body():
    received: list[bytes] = []

    async def chunks() -> AsyncIterator[bytes]:
        yield b"ab"
        yield b"cd"

    def handler(request: httpx.Request) -> httpx.Response:
        received.append(request.read())
        if request.headers.get("authorization") is None:
            return httpx.Response(401, headers={"WWW-Authenticate": 'Basic realm="r"'})
        return httpx.Response(201)

    options = RegistryOptions(username="u", password="p")
    async with RegistryClient(options, transport=httpx.MockTransport(handler)) as client:
        resp = await client.send(
            "PUT", "https://registry.example/v2/app/x/blobs/uploads/1", host="registry.example",
            scope="repository:app/x:push", content=chunks, headers={"Content-Length": "4"},
        )  # fmt: skip
    assert resp.status_code == 201
    assert received == [b"abcd", b"abcd"]
