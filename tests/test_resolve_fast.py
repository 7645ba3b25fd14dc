"""A fast resolve for mounts: no config fetch when asked, no CA bundle for plain HTTP,
and TLS still verified whenever https:// is spoken."""

from __future__ import annotations

import os
import ssl

import pytest
from support.registry import push_image

from lazyfs.errors import FetchError
from lazyfs.oci import RegistryClient, RegistryOptions, parse_reference


async def test_resolve_without_config_makes_one_request_fewer_and_returns_no_config(registry):
    ref = parse_reference(f"{registry.host}/fast/app:v1")
    async with RegistryClient() as client:
        digest = await push_image(client, ref, [os.urandom(1000), os.urandom(2000)])
    async with RegistryClient() as client:
        full = await client.resolve(ref)
        with_config = client.statistics().requests
    async with RegistryClient() as client:
        lean = await client.resolve(ref, with_config=False)
        without_config = client.statistics().requests
    assert full.config is not None and full.config["os"] == "linux"
    assert lean.config is None
    assert without_config == with_config - 1
    # Everything a mount uses is the same either way.
    assert (lean.digest, lean.manifest_bytes, lean.layers) == (
        digest,
        full.manifest_bytes,
        full.layers,
    )


@pytest.fixture
def ca_loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every CA bundle an SSL context loads (the ~0.1 s a mount should not pay for nothing)."""
    loads: list[str] = []
    real_locations = ssl.SSLContext.load_verify_locations
    real_defaults = ssl.SSLContext.load_default_certs

    def load_verify_locations(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        loads.append("locations")
        return real_locations(self, *args, **kwargs)

    def load_default_certs(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        loads.append("defaults")
        return real_defaults(self, *args, **kwargs)

    monkeypatch.setattr(ssl.SSLContext, "load_verify_locations", load_verify_locations)
    monkeypatch.setattr(ssl.SSLContext, "load_default_certs", load_default_certs)
    return loads


async def test_a_plain_http_registry_never_loads_a_ca_bundle(registry, ca_loads):
    ref = parse_reference(f"{registry.host}/fast/app:v1")
    async with RegistryClient() as client:
        await push_image(client, ref, [os.urandom(1000)])
        image = await client.resolve(ref, with_config=False)
        assert await client.blob(ref, image.layers[0]).read(0, 10)
    assert ca_loads == []


async def test_https_builds_a_verifying_context_on_first_use_and_refuses_an_unknown_ca(
    tls_registry, ca_loads, monkeypatch
):
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    ref = parse_reference(f"{tls_registry.host}/secure/app:v1")
    async with RegistryClient(RegistryOptions(plain_http=False)) as client:
        assert ca_loads == []  # nothing loaded until https is spoken
        with pytest.raises(FetchError, match="TLS handshake failed"):
            await client.resolve(ref)
        assert ca_loads  # the default trust store was loaded, and it refused the certificate
        assert client.statistics().retries == 0


async def test_https_with_the_registrys_ca_trusted_is_accepted_and_verified(
    tls_registry, monkeypatch
):
    # The lazily built context still honours SSL_CERT_FILE, as httpx's eager one did.
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_registry.cert))
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    ref = parse_reference(f"{tls_registry.host}/secure/app:v1")
    data = os.urandom(5000)
    async with RegistryClient(RegistryOptions(plain_http=False)) as client:
        digest = await push_image(client, ref, [data])
        image = await client.resolve(ref, with_config=False)
        assert image.digest == digest
        assert await client.blob(ref, image.layers[0]).read(100, 50) == data[100:150]
