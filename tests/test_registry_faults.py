"""RemoteBlob under a misbehaving network or server: retries, clear errors, never wrong bytes.

The network faults go through a real NetProxy in front of a real registry;
server quirks a registry would not produce on its own (odd Content-Range,
redirects to storage) are played by an ``httpx.MockTransport``.
"""

from __future__ import annotations

import hashlib
import logging
import os

import httpx
import pytest
from support.localregistry import LocalRegistry
from support.netproxy import NetProxy
from support.registry import layer_descriptor, push_image

from lazyfs.errors import AuthError, FetchError, IntegrityError
from lazyfs.oci import RegistryClient, RegistryOptions, open_url_blob, parse_reference

DATA = os.urandom(1 << 20)
BLOBS = r"/blobs/sha256:"


@pytest.fixture
async def pushed(registry: LocalRegistry) -> dict:
    ref = parse_reference(f"{registry.host}/test/faults:v1")
    async with RegistryClient() as client:
        await push_image(client, ref, [DATA])
    return layer_descriptor(DATA)


def via(proxy: NetProxy) -> str:
    return f"{proxy.host}/test/faults:v1"


@pytest.mark.parametrize("kind", ["reset", "503", "truncate"])
async def test_transient_faults_are_retried_and_the_bytes_are_exact(
    fault_proxy: NetProxy, pushed: dict, kind: str
):
    fault_proxy.add_fault(kind, count=2, path=BLOBS, method="GET")
    ref = parse_reference(via(fault_proxy))
    async with RegistryClient() as client:
        blob = client.blob(ref, pushed)
        assert await blob.read(1000, 300_000) == DATA[1000:301_000]
        assert blob.statistics().retries == 2
    assert fault_proxy.stats().faults == 2


@pytest.mark.parametrize("kind", ["reset", "503", "truncate"])
async def test_a_fault_that_persists_ends_in_fetch_error_after_bounded_retries(
    fault_proxy: NetProxy, pushed: dict, kind: str
):
    fault_proxy.add_fault(kind, path=BLOBS, method="GET")
    ref = parse_reference(via(fault_proxy))
    async with RegistryClient(RegistryOptions(retries=2)) as client:
        blob = client.blob(ref, pushed)
        with pytest.raises(FetchError, match="after 3 attempt"):
            await blob.read(0, 200_000)
        assert blob.statistics().retries == 2


async def test_a_200_with_the_whole_blob_is_cut_to_the_range_and_remembered(
    fault_proxy: NetProxy, pushed: dict
):
    fault_proxy.add_fault("ignore-range", path=BLOBS)
    ref = parse_reference(via(fault_proxy))
    async with RegistryClient() as client:
        blob = client.blob(ref, pushed)
        assert await blob.read(0, 10) == DATA[:10]
        assert await blob.read(700_000, 1234) == DATA[700_000:701_234]
        assert await blob.read(len(DATA) - 3, 3) == DATA[-3:]
        assert blob.ignores_ranges
        # The reader stops once it has its range; the proxy may have pushed a
        # little more into the socket, but not the rest of a 1 MiB blob each time.
        assert blob.statistics().bytes_fetched < 3 * len(DATA)


async def test_corrupted_manifest_bytes_are_refused_as_an_integrity_error(
    fault_proxy: NetProxy, pushed: dict
):
    fault_proxy.add_fault("corrupt", path="/manifests/")
    async with RegistryClient() as client:
        with pytest.raises(IntegrityError, match="digest mismatch"):
            await client.resolve(parse_reference(via(fault_proxy)))


async def test_url_blob_through_a_server_that_ignores_ranges(fault_proxy: NetProxy, pushed: dict):
    fault_proxy.add_fault("ignore-range", path=BLOBS)
    url = f"{fault_proxy.url}/v2/test/faults/blobs/{pushed['digest']}"
    async with open_url_blob(url) as blob:
        assert blob.size == len(DATA)
        assert await blob.read(5, 5) == DATA[5:10]


# --------------------------------------------------------------------------
# Server quirks played by a mock transport


DIGEST = "sha256:" + hashlib.sha256(DATA).hexdigest()
DESC = {"mediaType": "application/octet-stream", "digest": DIGEST, "size": len(DATA)}
REF = parse_reference("127.0.0.1:5000/quirks/x:v1")


def _range(request: httpx.Request) -> tuple[int, int]:
    first, last = request.headers["range"].removeprefix("bytes=").split("-")
    return int(first), int(last)


async def test_a_206_for_a_different_range_is_an_error_not_data():
    def handler(request: httpx.Request) -> httpx.Response:
        first, last = _range(request)
        first += 1
        body = DATA[first : last + 2]
        return httpx.Response(
            206, headers={"Content-Range": f"bytes {first}-{last + 1}/{len(DATA)}"}, content=body
        )

    async with RegistryClient(transport=httpx.MockTransport(handler)) as client:
        with pytest.raises(FetchError, match="covers bytes 11-20"):
            await client.blob(REF, DESC).read(10, 10)


async def test_a_206_that_disagrees_on_the_blob_size_is_an_error():
    def handler(request: httpx.Request) -> httpx.Response:
        first, last = _range(request)
        return httpx.Response(
            206,
            headers={"Content-Range": f"bytes {first}-{last}/999"},
            content=DATA[first : last + 1],
        )

    async with RegistryClient(transport=httpx.MockTransport(handler)) as client:
        with pytest.raises(FetchError, match="999 bytes"):
            await client.blob(REF, DESC).read(0, 10)


async def test_a_multipart_206_is_refused():
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            206, headers={"Content-Type": "multipart/byteranges; boundary=x"}, content=b"--x--"
        )

    async with RegistryClient(transport=httpx.MockTransport(handler)) as client:
        with pytest.raises(FetchError, match="multipart"):
            await client.blob(REF, DESC).read(0, 10)


async def test_redirect_to_storage_is_followed_without_credentials_and_cached(caplog):
    caplog.set_level(logging.DEBUG)
    seen: list[tuple[str, str | None]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.url.host, request.headers.get("authorization")))
        if request.url.host == "127.0.0.1":
            if "authorization" not in request.headers:
                return httpx.Response(401, headers={"WWW-Authenticate": 'Basic realm="r"'})
            return httpx.Response(
                307, headers={"Location": "https://storage.example/obj?sig=SECRETSIG"}
            )
        first, last = _range(request)
        return httpx.Response(
            206,
            headers={"Content-Range": f"bytes {first}-{last}/{len(DATA)}"},
            content=DATA[first : last + 1],
        )

    options = RegistryOptions(username="u", password="pw-not-for-storage")
    async with RegistryClient(options, transport=httpx.MockTransport(handler)) as client:
        blob = client.blob(REF, DESC)
        assert await blob.read(0, 100) == DATA[:100]
        assert await blob.read(500, 100) == DATA[500:600]
    assert "SECRETSIG" not in caplog.text and "pw-not-for-storage" not in caplog.text
    storage = [auth for host, auth in seen if host == "storage.example"]
    assert storage == [None, None]  # both reads went there, never with credentials
    assert (
        sum(1 for host, _ in seen if host == "127.0.0.1") == 2
    )  # challenge + one redirect, then cached


async def test_storage_refusing_a_cached_redirect_sends_us_back_to_the_registry():
    expired = {"yes": False}
    registry_hits = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "127.0.0.1":
            registry_hits.append(1)
            return httpx.Response(
                307, headers={"Location": f"https://storage.example/obj{len(registry_hits)}"}
            )
        if expired["yes"] and request.url.path == "/obj1":
            return httpx.Response(403)
        first, last = _range(request)
        return httpx.Response(
            206,
            headers={"Content-Range": f"bytes {first}-{last}/{len(DATA)}"},
            content=DATA[first : last + 1],
        )

    async with RegistryClient(transport=httpx.MockTransport(handler)) as client:
        blob = client.blob(REF, DESC)
        assert await blob.read(0, 10) == DATA[:10]
        expired["yes"] = True
        assert await blob.read(10, 10) == DATA[10:20]
    assert len(registry_hits) == 2


async def test_server_errors_and_429_are_retried_then_succeed():
    answers = iter(
        [
            httpx.Response(503),
            httpx.Response(429, headers={"Retry-After": "0"}),
            httpx.Response(502),
        ]
    )

    def handler(request: httpx.Request) -> httpx.Response:
        nxt = next(answers, None)
        if nxt is not None:
            return nxt
        first, last = _range(request)
        return httpx.Response(
            206,
            headers={"Content-Range": f"bytes {first}-{last}/{len(DATA)}"},
            content=DATA[first : last + 1],
        )

    async with RegistryClient(transport=httpx.MockTransport(handler)) as client:
        blob = client.blob(REF, DESC)
        assert await blob.read(3, 4) == DATA[3:7]
        assert blob.statistics().retries == 3


async def test_a_403_is_an_auth_error_and_not_retried():
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        return httpx.Response(403, json={"errors": [{"code": "DENIED", "message": "no"}]})

    async with RegistryClient(transport=httpx.MockTransport(handler)) as client:
        with pytest.raises(AuthError, match="DENIED"):
            await client.blob(REF, DESC).read(0, 1)
    assert len(calls) == 1


async def test_a_trickling_body_is_given_up_by_the_low_speed_limit_and_retried(
    fault_proxy: NetProxy, pushed: dict, monkeypatch: pytest.MonkeyPatch
):
    import trio

    from lazyfs.oci import blob as blob_module

    monkeypatch.setattr(blob_module, "LOW_SPEED_SECONDS", 1.5)
    fault_proxy.add_fault("trickle", count=1, path=BLOBS, method="GET")  # 1 byte/s, the read timeout never fires
    ref = parse_reference(via(fault_proxy))
    async with RegistryClient() as client:
        blob = client.blob(ref, pushed)
        with trio.fail_after(15):
            assert await blob.read(1000, 300_000) == DATA[1000:301_000]
        assert blob.statistics().retries == 1


async def test_a_trickling_download_is_given_up_and_resumed(
    fault_proxy: NetProxy, pushed: dict, monkeypatch: pytest.MonkeyPatch
):
    import trio

    from lazyfs.oci import blob as blob_module

    monkeypatch.setattr(blob_module, "LOW_SPEED_SECONDS", 1.5)
    fault_proxy.add_fault("trickle", count=1, path=BLOBS, method="GET")
    ref = parse_reference(via(fault_proxy))
    got = bytearray()

    async def sink(piece: bytes) -> None:
        got.extend(piece)

    async with RegistryClient() as client:
        with trio.fail_after(15):
            await client.blob(ref, pushed).stream(sink)
    assert bytes(got) == DATA
