"""The registry client against a hostile registry, token server or network.

Secrets (tokens, passwords, signed URLs) never reach logs, messages or a
different origin; what a server sends is bounded in size and in time; what a
server writes reaches the terminal only as printable text. Misbehaving
servers are tiny ``http.server`` instances in threads on 127.0.0.1 (one of
them speaks TLS and plain HTTP on the same port, to redirect from
``https://host:port`` to ``http://host:port``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from support.registry import (
    PASSWORD,
    USERNAME,
    TLSRegistry,
    _self_signed,
    _started,
    push_image,
    token_protected,
)

from lazyfs import cli
from lazyfs.errors import AuthError, FetchError, NotFoundError
from lazyfs.oci import (
    MEDIA_OCI_CONFIG,
    MEDIA_OCI_MANIFEST,
    RegistryClient,
    RegistryOptions,
    open_url_blob,
    parse_reference,
)

DATA = os.urandom(64 << 10)
DIGEST = "sha256:" + hashlib.sha256(DATA).hexdigest()
HTTP_LIBRARIES = ("hpack", "h2", "h11", "httpcore", "httpx")


# --------------------------------------------------------------------------
# A tiny server whose behaviour each test writes as a function


Handler = Callable[[BaseHTTPRequestHandler, bool], None]


class _Server(ThreadingHTTPServer):
    """Threaded HTTP server; with ``tls``, a connection whose first byte is a
    TLS handshake is wrapped, so one port serves https:// and http://."""

    daemon_threads = True
    block_on_close = False
    tls: ssl.SSLContext | None = None

    def get_request(self) -> tuple[socket.socket, object]:
        sock, addr = super().get_request()
        if self.tls is not None:
            sock.settimeout(5)
            if sock.recv(1, socket.MSG_PEEK) == b"\x16":
                sock = self.tls.wrap_socket(sock, server_side=True)
            sock.settimeout(None)
        return sock, addr


class TinyServer:
    """``handle(request_handler, is_tls)`` answers every request; ``seen`` records
    (tls, method, path, Authorization header) of each."""

    def __init__(self, handle: Handler, *, cert_dir: Path | None = None) -> None:
        self.seen: list[tuple[bool, str, str, str | None]] = []
        outer = self

        class RequestHandler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def _any(self) -> None:
                tls = isinstance(self.connection, ssl.SSLSocket)
                outer.seen.append((tls, self.command, self.path, self.headers.get("Authorization")))
                try:
                    handle(self, tls)
                except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
                    self.close_connection = True

            do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = _any

        self._httpd = _Server(("127.0.0.1", 0), RequestHandler)
        if cert_dir is not None:
            cert, key = _self_signed(cert_dir)
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(cert, key)
            self._httpd.tls = ctx
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., TinyServer]]:
    servers: list[TinyServer] = []

    def start(handle: Handler, *, tls: bool = False) -> TinyServer:
        server = TinyServer(handle, cert_dir=tmp_path if tls else None)
        servers.append(server)
        return server

    try:
        yield start
    finally:
        for server in servers:
            server.close()


def answer(
    h: BaseHTTPRequestHandler, code: int, body: bytes = b"", headers: dict[str, str] | None = None
) -> None:
    h.send_response(code)
    for k, v in (headers or {}).items():
        h.send_header(k, v)
    h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    if h.command != "HEAD":
        h.wfile.write(body)


def serve_range(h: BaseHTTPRequestHandler) -> None:
    first, last = (int(x) for x in h.headers["Range"].split("=")[1].split("-"))
    answer(h, 206, DATA[first : last + 1], {"Content-Range": f"bytes {first}-{last}/{len(DATA)}"})


def trickle(h: BaseHTTPRequestHandler, declared: int, every: float = 0.2) -> None:
    """Promise ``declared`` bytes, then send one at a time until the client hangs up."""
    h.send_response(200)
    h.send_header("Content-Type", "application/json")
    h.send_header("Content-Length", str(declared))
    h.end_headers()
    for _ in range(declared):
        h.wfile.write(b" ")
        h.wfile.flush()
        time.sleep(every)


# --------------------------------------------------------------------------
# 1a. HTTP library loggers stay at WARNING, even at DEBUG, even with HTTP/2


@pytest.fixture
def tls_token_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TLSRegistry]:
    """A registry on HTTPS (so HTTP/2 can be negotiated) that wants bearer tokens."""
    with token_protected(tmp_path_factory, TLSRegistry, "tls-token-registry") as (reg, _, base):
        assert isinstance(reg, TLSRegistry)
        reg.cert, reg.key = _self_signed(base)
        yield _started(reg)


async def test_bearer_token_never_reaches_the_log_through_http2_header_logging(
    tls_token_registry: TLSRegistry, caplog: pytest.LogCaptureFixture
):
    options = RegistryOptions(
        plain_http=False, insecure_tls=True, http2=True, username=USERNAME, password=PASSWORD
    )
    ref = parse_reference(f"{tls_token_registry.host}/sec/h2:v1")
    async with RegistryClient(options) as client:
        await push_image(client, ref, [DATA])
        caplog.set_level(logging.DEBUG)  # root at DEBUG, as --log-level debug does
        image = await client.resolve(ref)
        assert await client.blob(ref, image.layers[0]).read(0, 100) == DATA[:100]
        tokens = [t.reveal() for t in client._auth.tokens.secrets()]
    assert tokens
    for token in tokens:
        assert token not in caplog.text
        assert token[-40:] not in caplog.text
    chatty = [
        r
        for r in caplog.records
        if r.name.split(".")[0] in HTTP_LIBRARIES and r.levelno < logging.WARNING
    ]
    assert chatty == []


def test_library_loggers_may_be_let_through_explicitly(monkeypatch: pytest.MonkeyPatch):
    from lazyfs import oci as registry

    monkeypatch.setenv(registry.DEBUG_HTTP_ENV, "1")
    logging.getLogger("hpack").setLevel(logging.NOTSET)
    try:
        registry.quiet_library_loggers()
        assert logging.getLogger("hpack").level == logging.NOTSET
        monkeypatch.delenv(registry.DEBUG_HTTP_ENV)
        registry.quiet_library_loggers()
        assert logging.getLogger("hpack").level == logging.WARNING
    finally:
        logging.getLogger("hpack").setLevel(logging.WARNING)


# --------------------------------------------------------------------------
# 1b. Credentials go to one origin (scheme, host, port); no downgrade


def downgrading_registry(port_of: Callable[[], int]) -> Handler:
    """On TLS: /v2/... wants basic auth, then redirects to plain HTTP on the SAME host:port."""

    def handle(h: BaseHTTPRequestHandler, tls: bool) -> None:
        if tls and h.path.startswith("/v2/"):
            if not h.headers.get("Authorization"):
                answer(h, 401, b"{}", {"WWW-Authenticate": 'Basic realm="r"'})
            else:
                answer(h, 307, b"", {"Location": f"http://127.0.0.1:{port_of()}/storage/blob"})
        elif not tls and h.path == "/storage/blob":
            serve_range(h)
        else:
            answer(h, 404)

    return handle


def blob_url(server: TinyServer, scheme: str = "https") -> str:
    return f"{scheme}://{server.host}/v2/sec/redirect/blobs/{DIGEST}"


async def test_https_to_http_redirect_is_refused_and_sends_nothing_in_clear(serve):
    server = serve(downgrading_registry(lambda: server.port), tls=True)
    options = RegistryOptions(username="u", password="pw-secret", insecure_tls=True, retries=0)
    with pytest.raises(FetchError, match="from HTTPS to plain HTTP"):
        async with open_url_blob(blob_url(server), options=options):
            pass
    assert [s for s in server.seen if s[0]] != []  # the TLS side was asked
    assert [s for s in server.seen if not s[0]] == []  # nothing went out in clear text


async def test_allowed_downgrade_never_carries_the_authorization_header(serve):
    server = serve(downgrading_registry(lambda: server.port), tls=True)
    options = RegistryOptions(
        username="u", password="pw-secret", insecure_tls=True, plain_http=True, retries=0
    )
    async with open_url_blob(blob_url(server), options=options) as blob:
        assert blob.size == len(DATA)
        assert await blob.read(100, 200) == DATA[100:300]
    clear = [s for s in server.seen if not s[0]]
    assert clear and all(authz is None for _, _, _, authz in clear)
    assert any(authz for tls, _, _, authz in server.seen if tls)  # the registry did get them


async def test_upload_location_on_another_origin_gets_no_credentials():
    seen: list[tuple[str, str | None]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((str(request.url.copy_with(query=None)), request.headers.get("authorization")))
        if request.url.host == "registry.test":
            if "authorization" not in request.headers:
                return httpx.Response(401, headers={"WWW-Authenticate": 'Basic realm="r"'})
            if request.method == "HEAD":
                return httpx.Response(404)
            return httpx.Response(202, headers={"Location": "http://elsewhere.test:8080/upload"})
        return httpx.Response(201, headers={"Docker-Content-Digest": DIGEST})

    options = RegistryOptions(username="u", password="pw-secret", plain_http=False)
    ref = parse_reference("registry.test/sec/push:v1")
    async with RegistryClient(options, transport=httpx.MockTransport(handler)) as client:
        await client.push_blob(ref, DATA, DIGEST, len(DATA))
    elsewhere = [authz for url, authz in seen if "elsewhere.test" in url]
    assert elsewhere == [None]


# --------------------------------------------------------------------------
# 1c. URLs in messages and logs carry no userinfo and no query


async def test_blob_url_secrets_never_appear_in_error_messages():
    for url in (
        "https://user:pw-secret@registry.test/v2/a/../blobs/x?sig=SIGSECRET",
        "https://user:pw-secret@registry.test:99999/v2/a/blobs/x?sig=SIGSECRET",
    ):
        with pytest.raises(Exception) as info:
            async with open_url_blob(url):
                pass
        assert "pw-secret" not in str(info.value) and "SIGSECRET" not in str(info.value)


async def test_blob_url_secrets_never_appear_in_logs(caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.DEBUG)

    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "HEAD":
            return httpx.Response(200, headers={"Content-Length": str(len(DATA))})
        return httpx.Response(503)

    url = f"https://user:pw-secret@storage.test/v2/a/blobs/{DIGEST}?sig=SIGSECRET"
    options = RegistryOptions(retries=1)
    async with open_url_blob(url, options=options, transport=httpx.MockTransport(handler)) as blob:
        with pytest.raises(FetchError) as info:
            await blob.read(0, 10)
    assert caplog.records  # the retry was logged
    for text in (caplog.text, str(info.value)):
        assert "pw-secret" not in text and "SIGSECRET" not in text


# --------------------------------------------------------------------------
# 2a. The token answer is bounded


def token_challenger(token_answer: Callable[[BaseHTTPRequestHandler], None]) -> Handler:
    def handle(h: BaseHTTPRequestHandler, tls: bool) -> None:
        if h.path.startswith("/token"):
            token_answer(h)
        elif not h.headers.get("Authorization"):
            realm = f"http://{h.headers['Host']}/token"
            challenge = f'Bearer realm="{realm}",service="svc"'
            answer(h, 401, b"{}", {"WWW-Authenticate": challenge})
        else:
            answer(h, 404, b"{}")

    return handle


async def test_an_oversized_token_answer_is_refused_naming_the_token_server(serve):
    huge = json.dumps({"token": "t" * (2 << 20)}).encode()
    server = serve(token_challenger(lambda h: answer(h, 200, huge)))
    ref = parse_reference(f"{server.host}/sec/token:v1")
    async with RegistryClient(RegistryOptions(retries=0)) as client:
        with pytest.raises(AuthError, match=r"token server http://127\.0\.0\.1:\d+/token.*limit"):
            await client.resolve(ref)


async def test_an_endless_token_answer_is_cut_off(serve):
    def endless(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        piece = b"x" * 65536
        while True:  # until the client hangs up
            h.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))

    server = serve(token_challenger(endless))
    ref = parse_reference(f"{server.host}/sec/token:v1")
    async with RegistryClient(RegistryOptions(retries=0)) as client:
        with pytest.raises(AuthError, match="limit"):
            await client.resolve(ref)


# --------------------------------------------------------------------------
# 2b. Every network stage has an overall deadline


async def test_a_trickling_manifest_ends_in_fetch_error_at_the_resolve_deadline(serve):
    server = serve(lambda h, tls: trickle(h, 10_000))
    ref = parse_reference(f"{server.host}/sec/slow:v1")
    options = RegistryOptions(overall_timeout=1.0, timeout=5.0, retries=0)
    started = time.monotonic()
    async with RegistryClient(options) as client:
        with pytest.raises(FetchError, match=r"resolving the manifest and config.*1 s"):
            await client.resolve(ref)
    assert time.monotonic() - started < 4


async def test_a_trickling_token_server_ends_in_fetch_error_naming_it(serve):
    server = serve(token_challenger(lambda h: trickle(h, 10_000)))
    ref = parse_reference(f"{server.host}/sec/slow:v1")
    options = RegistryOptions(overall_timeout=1.0, timeout=5.0, retries=0)
    started = time.monotonic()
    async with RegistryClient(options) as client:
        blob = client.blob(ref, {"digest": DIGEST, "size": len(DATA)})
        with pytest.raises(FetchError, match=r"token server http://127\.0\.0\.1:\d+/token"):
            await blob.read(0, 10)
    assert time.monotonic() - started < 4


async def test_a_trickling_size_probe_of_a_blob_url_ends_at_the_deadline(serve):
    def handle(h: BaseHTTPRequestHandler, tls: bool) -> None:
        # Headers a byte at a time, each inside the per-request read timeout.
        for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 65536\r\n\r\n":
            h.wfile.write(bytes([byte]))
            h.wfile.flush()
            time.sleep(0.2)

    server = serve(handle)
    options = RegistryOptions(overall_timeout=1.0, timeout=10.0, retries=0)
    started = time.monotonic()
    with pytest.raises(FetchError, match=r"size probe.*1 s"):
        async with open_url_blob(blob_url(server, "http"), options=options):
            pass
    assert time.monotonic() - started < 4


def test_cli_refuses_a_nonsense_overall_timeout(capsys: pytest.CaptureFixture[str]):
    code = cli.main(["inspect", "127.0.0.1:1/x:y", "--overall-timeout", "0"])
    assert code == 1
    assert "--overall-timeout must be a number of seconds > 0" in capsys.readouterr().err


# --------------------------------------------------------------------------
# 3. Server text is sanitized; an unverified manifest is called so


async def test_registry_error_text_reaches_the_terminal_without_escapes():
    nasty = "\x1b]0;owned\x07\x1b[2J\x1b[31mred\x9b1m\r\nfake: line\x00" + "A" * 10_000

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.dumps({"errors": [{"code": "MANIFEST_UNKNOWN", "message": nasty}]})
        return httpx.Response(404, content=body.encode(), extensions={"reason_phrase": b"\x1b[1m"})

    async with RegistryClient(transport=httpx.MockTransport(handler)) as client:
        with pytest.raises(NotFoundError) as info:
            await client.resolve(parse_reference("registry.test/sec/esc:v1"))
    text = str(info.value)
    assert "MANIFEST_UNKNOWN" in text and "red" in text and "fake: line" in text
    assert all(c.isprintable() for c in text), repr(text[:200])
    assert len(text) < 600


def plain_image_registry(with_digest_header: bool) -> Handler:
    config = json.dumps({"architecture": "amd64", "os": "linux"}).encode()
    config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": MEDIA_OCI_MANIFEST,
            "config": {"mediaType": MEDIA_OCI_CONFIG, "digest": config_digest, "size": len(config)},
            "layers": [],
        }
    ).encode()

    def handle(h: BaseHTTPRequestHandler, tls: bool) -> None:
        if h.path.endswith("/manifests/v1"):
            headers = {"Content-Type": MEDIA_OCI_MANIFEST}
            if with_digest_header:
                headers["Docker-Content-Digest"] = "sha256:" + hashlib.sha256(manifest).hexdigest()
            answer(h, 200, manifest, headers)
        elif h.path.endswith(f"/blobs/{config_digest}"):
            answer(h, 200, config)
        else:
            answer(h, 404)

    return handle


@pytest.mark.parametrize("with_digest_header", [False, True])
def test_remote_inspect_says_unverified_without_a_digest_header(
    serve, capsys: pytest.CaptureFixture[str], with_digest_header: bool
):
    server = serve(plain_image_registry(with_digest_header))
    assert cli.main(["inspect", f"{server.host}/sec/plain:v1"]) == 0
    out = capsys.readouterr().out
    manifest_line = next(line for line in out.splitlines() if line.startswith("manifest"))
    if with_digest_header:
        assert manifest_line.endswith("(verified)")
    else:
        assert manifest_line.endswith("unverified (no digest header; pin by digest)")
        assert "(verified)" not in out


async def test_credentials_are_not_sent_to_a_plain_http_realm_of_a_tls_registry():
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url.copy_with(query=None)))
        if request.url.host == "registry.test":
            challenge = 'Bearer realm="http://auth.test/token",service="svc"'
            return httpx.Response(401, headers={"WWW-Authenticate": challenge})
        return httpx.Response(200, json={"token": "t"})

    options = RegistryOptions(username="u", password="pw-secret")
    async with RegistryClient(options, transport=httpx.MockTransport(handler)) as client:
        with pytest.raises(AuthError, match="plain HTTP while the registry uses HTTPS"):
            await client.resolve(parse_reference("registry.test/sec/realm:v1"))
    assert not [url for url in seen if "auth.test" in url]
