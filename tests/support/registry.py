"""Fixtures with real registries: Debian's ``docker-registry`` (distribution v2.8).

* ``registry`` / ``module_registry``: an open registry on a free loopback
  port with its own storage (a :class:`support.localregistry.LocalRegistry`:
  ``.host``, ``.url``, ``.storage``, ``.blob_path(digest)``, ``.stop()``,
  ``.start()``).
* ``auth_registry``: the same behind htpasswd basic auth; ``.username`` and
  ``.password`` are the one valid account.
* ``token_registry``: token auth, with a small token server written here
  (``.token_server``): ES256 JWTs whose signing certificate travels in the
  ``x5c`` header and is the registry's ``rootcertbundle``, which is how
  distribution v2.8 checks them.
* ``tls_registry``: HTTPS with a self-signed certificate (``.cert``).
* ``fault_proxy``: a :class:`support.netproxy.NetProxy` in front of ``registry``.

Every process and thread started here is stopped in a finalizer, even when
the test fails.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import hashlib
import json
import secrets
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from lazyfs.oci import MEDIA_OCI_CONFIG, MEDIA_OCI_MANIFEST, Reference, RegistryClient
from support.localregistry import LocalRegistry
from support.netproxy import NetProxy

USERNAME = "alice"
PASSWORD = "correct horse battery staple"
SERVICE = "lazyerofs-test-registry"
ISSUER = "lazyerofs-test-issuer"


def _need_registry() -> None:
    if shutil.which("docker-registry") is None:
        pytest.skip("needs Debian's docker-registry (scripts/setup.sh)")


def _started(reg: LocalRegistry) -> LocalRegistry:
    try:
        reg.start()
    except BaseException:
        reg.stop()
        raise
    return reg


@pytest.fixture
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRegistry]:
    """A fresh open registry for one test (stop/start it to simulate an outage)."""
    _need_registry()
    reg = LocalRegistry(tmp_path_factory.mktemp("registry") / "storage")
    try:
        yield _started(reg)
    finally:
        reg.stop()


@pytest.fixture(scope="module")
def module_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRegistry]:
    """One open registry shared by a module's tests (don't stop it)."""
    _need_registry()
    reg = LocalRegistry(tmp_path_factory.mktemp("registry") / "storage")
    try:
        yield _started(reg)
    finally:
        reg.stop()


class AuthRegistry(LocalRegistry):
    username = USERNAME
    password = PASSWORD


@pytest.fixture
def auth_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthRegistry]:
    """A registry behind htpasswd basic auth (distribution only reads bcrypt entries)."""
    _need_registry()
    if shutil.which("htpasswd") is None:
        pytest.skip("needs htpasswd (apache2-utils)")
    base = tmp_path_factory.mktemp("auth-registry")
    htpasswd = base / "htpasswd"
    line = subprocess.run(
        ["htpasswd", "-Bbn", USERNAME, PASSWORD], capture_output=True, text=True, check=True
    ).stdout.strip()
    htpasswd.write_text(line + "\n")
    reg = AuthRegistry(
        base / "storage",
        auth_yaml=f"  htpasswd:\n    realm: lazyerofs-test\n    path: {htpasswd}\n",
    )
    try:
        yield _started(reg)
    finally:
        reg.stop()


# --------------------------------------------------------------------------
# Token server


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class TokenServer:
    """Issues registry bearer tokens for ``/token?service=...&scope=...``.

    Anonymous callers get pull only unless ``anonymous_push``; ``USERNAME``/
    ``PASSWORD`` via basic auth get what they ask for; wrong credentials get
    401. ``expires_in`` is what the answer claims; ``poison`` > 0 makes that
    many next tokens unacceptable to the registry (wrong issuer), to force a
    401 and a refresh. ``issued`` counts tokens handed out.
    """

    def __init__(self, directory: Path) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lazyerofs test token signer")])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self.key, hashes.SHA256())
        )
        self.cert_der = cert.public_bytes(serialization.Encoding.DER)
        self.bundle = directory / "token-ca.pem"
        self.bundle.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        self.expires_in = 300
        self.anonymous_push = False
        self.poison = 0
        self.issued = 0
        self.refused = 0
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="token-server", daemon=True
        )

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/token"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)

    def make_token(
        self, subject: str, access: list[dict[str, object]], *, issuer: str = ISSUER
    ) -> str:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

        now = int(time.time())
        header = {"typ": "JWT", "alg": "ES256", "x5c": [base64.b64encode(self.cert_der).decode()]}
        claims = {
            "iss": issuer, "sub": subject, "aud": SERVICE, "exp": now + max(self.expires_in, 1) + 60,
            "nbf": now - 10, "iat": now, "jti": secrets.token_hex(8), "access": access,
        }  # fmt: skip
        signing_input = (
            f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        )
        r, s = decode_dss_signature(
            self.key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
        )
        return f"{signing_input}.{_b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"

    def _grant(self, user: str | None, scopes: list[str]) -> list[dict[str, object]]:
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            wanted = [a for a in actions.split(",") if a]
            allowed = (
                wanted if (user or self.anonymous_push) else [a for a in wanted if a == "pull"]
            )
            if kind == "repository" and name and allowed:
                access.append({"type": "repository", "name": name, "actions": allowed})
        return access

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:  # quiet
                pass

            def _answer(self, code: int, body: dict[str, object]) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                url = urlsplit(self.path)
                if url.path != "/token":
                    self._answer(404, {"error": "not found"})
                    return
                query = parse_qs(url.query)
                user = None
                authz = self.headers.get("Authorization", "")
                if authz.startswith("Basic "):
                    given = base64.b64decode(authz[6:]).decode(errors="replace")
                    if given != f"{USERNAME}:{PASSWORD}":
                        with server._lock:
                            server.refused += 1
                        self._answer(401, {"details": "bad credentials"})
                        return
                    user = USERNAME
                if query.get("service", [""])[0] != SERVICE:
                    self._answer(400, {"details": "unknown service"})
                    return
                scopes = [s for value in query.get("scope", []) for s in value.split(" ")]
                with server._lock:
                    server.issued += 1
                    poisoned = server.poison > 0
                    server.poison -= 1 if poisoned else 0
                token = server.make_token(
                    user or "",
                    server._grant(user, scopes),
                    issuer="someone-else" if poisoned else ISSUER,
                )
                self._answer(
                    200, {"token": token, "access_token": token, "expires_in": server.expires_in}
                )

        return Handler


class TokenRegistry(LocalRegistry):
    username = USERNAME
    password = PASSWORD
    token_server: TokenServer


@contextlib.contextmanager
def token_protected(
    tmp_path_factory: pytest.TempPathFactory, cls: type[LocalRegistry], name: str
) -> Iterator[tuple[LocalRegistry, TokenServer, Path]]:
    """A registry of class ``cls`` that wants bearer tokens from its own token
    server; yields (registry, token server, base dir) before the registry is
    started, so the caller can finish setting it up (certificates...)."""
    _need_registry()
    pytest.importorskip("cryptography")
    base = tmp_path_factory.mktemp(name)
    tokens = TokenServer(base)
    tokens.start()
    try:
        reg = cls(
            base / "storage",
            auth_yaml=(
                "  token:\n"
                f"    realm: {tokens.realm}\n"
                f"    service: {SERVICE}\n"
                f"    issuer: {ISSUER}\n"
                f"    rootcertbundle: {tokens.bundle}\n"
            ),
        )
        try:
            yield reg, tokens, base
        finally:
            reg.stop()
    finally:
        tokens.stop()


@pytest.fixture
def token_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TokenRegistry]:
    """A registry that wants bearer tokens from ``.token_server`` (anonymous: pull only)."""
    with token_protected(tmp_path_factory, TokenRegistry, "token-registry") as (reg, tokens, _):
        assert isinstance(reg, TokenRegistry)
        reg.token_server = tokens
        yield _started(reg)


class TLSRegistry(LocalRegistry):
    """A registry serving HTTPS with a self-signed certificate for 127.0.0.1."""

    cert: Path
    key: Path

    @property
    def tls_url(self) -> str:
        # ``url`` stays http://: LocalRegistry's readiness probe uses it, and a
        # plain request to a TLS port is answered (400) as soon as it listens.
        return f"https://{self.host}"

    def _write_config(self) -> None:
        super()._write_config()
        tls = f"  tls:\n    certificate: {self.cert}\n    key: {self.key}\n"
        text = self.config.read_text()
        marker = "  secret: lazyerofs-test-secret\n"
        self.config.write_text(text.replace(marker, marker + tls, 1))


def _self_signed(directory: Path) -> tuple[Path, Path]:
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "tls.crt", directory / "tls.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.fixture
def tls_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TLSRegistry]:
    """An open registry on HTTPS (self-signed, so only trusted with ``insecure_tls``)."""
    _need_registry()
    pytest.importorskip("cryptography")
    base = tmp_path_factory.mktemp("tls-registry")
    reg = TLSRegistry(base / "storage")
    reg.cert, reg.key = _self_signed(base)
    try:
        yield _started(reg)
    finally:
        reg.stop()


@pytest.fixture
def fault_proxy(registry: LocalRegistry) -> Iterator[NetProxy]:
    """A NetProxy in front of ``registry``: no latency, no cap, no faults until a test adds them."""
    with NetProxy(upstream=registry.url) as proxy:
        yield proxy


# --------------------------------------------------------------------------
# Helpers for tests that need an image in a registry


def layer_descriptor(
    data: bytes, media_type: str = "application/vnd.erofs.layer.v1"
) -> dict[str, object]:
    return {
        "mediaType": media_type,
        "digest": "sha256:" + hashlib.sha256(data).hexdigest(),
        "size": len(data),
    }


async def push_image(
    client: RegistryClient, ref: Reference, layers: list[bytes], *, platform: str = "linux/amd64"
) -> str:
    """Push ``layers`` (any bytes) with an OCI config and manifest; returns the manifest digest."""
    descs = [layer_descriptor(data) for data in layers]
    for data, desc in zip(layers, descs, strict=True):
        await client.push_blob(ref, data, str(desc["digest"]), len(data))
    os_, arch = platform.split("/")[:2]
    config = json.dumps(
        {
            "architecture": arch,
            "os": os_,
            "rootfs": {"type": "layers", "diff_ids": [d["digest"] for d in descs]},
        }
    ).encode()
    config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
    await client.push_blob(ref, config, config_digest, len(config))
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": MEDIA_OCI_MANIFEST,
            "config": {"mediaType": MEDIA_OCI_CONFIG, "digest": config_digest, "size": len(config)},
            "layers": descs,
        },
        indent=2,
    ).encode()
    return await client.push_manifest(ref, manifest, MEDIA_OCI_MANIFEST)


def push_descriptors(registry: LocalRegistry, name: str, layers: list[tuple[bytes, dict]]) -> str:
    """Push each blob under exactly the descriptor given (annotations, media
    types and all, even wrong ones), plus a config and a manifest; returns
    the reference. For tests that bend descriptors on purpose."""
    import trio

    from lazyfs.oci import parse_reference

    ref = parse_reference(f"{registry.host}/test/{name}:v1")

    async def go() -> None:
        async with RegistryClient() as client:
            for data, desc in layers:
                await client.push_blob(ref, data, desc["digest"], len(data))
            config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}).encode()
            config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
            await client.push_blob(ref, config, config_digest, len(config))
            manifest = {
                "schemaVersion": 2,
                "mediaType": MEDIA_OCI_MANIFEST,
                "config": {"mediaType": MEDIA_OCI_CONFIG, "digest": config_digest, "size": len(config)},
                "layers": [desc for _, desc in layers],
            }
            await client.push_manifest(ref, json.dumps(manifest).encode(), MEDIA_OCI_MANIFEST)

    trio.run(go)
    return str(ref)
