"""Registry authentication: htpasswd basic auth, bearer tokens, docker config; secrets stay secret."""

from __future__ import annotations

import base64
import json
import logging
import os

import pytest
import trio
from support.registry import AuthRegistry, TokenRegistry, layer_descriptor, push_image

from lazyfs.errors import AuthError, FetchError
from lazyfs.oci import RegistryClient, RegistryOptions, parse_reference


def creds(reg: AuthRegistry | TokenRegistry) -> RegistryOptions:
    return RegistryOptions(username=reg.username, password=reg.password)


async def test_basic_auth_with_the_right_password_pushes_and_pulls(auth_registry: AuthRegistry):
    data = os.urandom(50_000)
    ref = parse_reference(f"{auth_registry.host}/private/app:v1")
    async with RegistryClient(creds(auth_registry)) as client:
        digest = await push_image(client, ref, [data])
        image = await client.resolve(ref)
        assert image.digest == digest
        assert await client.blob(ref, image.layers[0]).read(10, 20) == data[10:30]


async def test_basic_auth_without_credentials_is_refused_clearly(
    auth_registry: AuthRegistry, tmp_path
):
    options = RegistryOptions(docker_config=tmp_path / "none.json")
    async with RegistryClient(options) as client:
        with pytest.raises(AuthError, match="requires credentials"):
            await client.resolve(parse_reference(f"{auth_registry.host}/private/app:v1"))


async def test_basic_auth_with_a_wrong_password_is_refused_without_showing_it(
    auth_registry: AuthRegistry, caplog
):
    caplog.set_level(logging.DEBUG)
    secret = "hunter2-wrong-password"
    options = RegistryOptions(username=auth_registry.username, password=secret)
    async with RegistryClient(options) as client:
        with pytest.raises(AuthError) as info:
            await client.resolve(parse_reference(f"{auth_registry.host}/private/app:v1"))
    message = str(info.value)
    assert "refused the credentials of user 'alice'" in message
    assert secret not in message and secret not in repr(info.value)
    assert secret not in repr(options) and secret not in repr(client)
    assert secret not in caplog.text
    assert base64.b64encode(f"alice:{secret}".encode()).decode() not in caplog.text


@pytest.mark.parametrize("style", ["auth", "fields"])
async def test_credentials_come_from_the_docker_config(
    auth_registry: AuthRegistry, tmp_path, style: str
):
    if style == "auth":
        token = base64.b64encode(
            f"{auth_registry.username}:{auth_registry.password}".encode()
        ).decode()
        entry = {"auth": token}
    else:
        entry = {"username": auth_registry.username, "password": auth_registry.password}
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"auths": {f"http://{auth_registry.host}": entry}}))
    ref = parse_reference(f"{auth_registry.host}/private/cfg:v1")
    async with RegistryClient(RegistryOptions(docker_config=config)) as client:
        digest = await push_image(client, ref, [b"from config"])
        assert (await client.resolve(ref)).digest == digest


async def test_docker_config_from_the_environment(
    auth_registry: AuthRegistry, tmp_path, monkeypatch
):
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "auths": {
                    auth_registry.host: {"username": "alice", "password": auth_registry.password}
                }
            }
        )
    )
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    async with RegistryClient() as client:
        await push_image(client, parse_reference(f"{auth_registry.host}/private/env:v1"), [b"x"])


# --------------------------------------------------------------------------
# Bearer tokens


async def test_bearer_token_auth_pulls_anonymously_and_pushes_with_credentials(
    token_registry: TokenRegistry,
):
    data = os.urandom(30_000)
    ref = parse_reference(f"{token_registry.host}/public/app:v1")
    async with RegistryClient(creds(token_registry)) as client:
        digest = await push_image(client, ref, [data])
    async with RegistryClient() as anonymous:
        image = await anonymous.resolve(ref)
        assert image.digest == digest
        assert await anonymous.blob(ref, image.layers[0]).read(0, 100) == data[:100]
        with pytest.raises(AuthError, match="refused"):
            await push_image(
                anonymous, parse_reference(f"{token_registry.host}/public/other:v1"), [b"nope"]
            )
    assert token_registry.token_server.issued >= 2


async def test_token_server_refusing_credentials_is_an_auth_error_without_the_password(
    token_registry: TokenRegistry, caplog
):
    caplog.set_level(logging.DEBUG)
    secret = "not-the-password-42"
    async with RegistryClient(RegistryOptions(username="alice", password=secret)) as client:
        with pytest.raises(AuthError, match="token server") as info:
            await client.resolve(parse_reference(f"{token_registry.host}/public/app:v1"))
    assert secret not in str(info.value)
    assert secret not in caplog.text
    assert token_registry.token_server.refused == 1


class FakeClock:
    """Monotonic seconds that move only when told to: token expiry without waiting."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_expired_token_is_refreshed_before_the_next_request(token_registry: TokenRegistry):
    data = os.urandom(10_000)
    ref = parse_reference(f"{token_registry.host}/public/app:v1")
    async with RegistryClient(creds(token_registry)) as client:
        await push_image(client, ref, [data])
    server = token_registry.token_server
    server.expires_in = 60
    clock = FakeClock()
    async with RegistryClient(clock=clock) as client:
        blob = client.blob(ref, layer_descriptor(data))
        assert await blob.read(0, 10) == data[:10]
        issued = server.issued
        clock.now += 49  # the client keeps a token for 60 s less a 10 s margin
        assert await blob.read(10, 10) == data[10:20]
        assert server.issued == issued  # still fresh: reused
        clock.now += 2
        assert await blob.read(20, 10) == data[20:30]
        assert server.issued == issued + 1


async def test_a_token_the_registry_rejects_is_replaced_once_and_the_request_retried(
    token_registry: TokenRegistry,
):
    data = os.urandom(10_000)
    ref = parse_reference(f"{token_registry.host}/public/app:v1")
    async with RegistryClient(creds(token_registry)) as client:
        await push_image(client, ref, [data])
    server = token_registry.token_server
    server.expires_in = 60
    clock = FakeClock()
    async with RegistryClient(clock=clock) as client:
        blob = client.blob(ref, layer_descriptor(data))
        server.poison = 1  # the next token carries a wrong issuer: the registry answers 401
        before = server.issued
        assert await blob.read(0, 10) == data[:10]
        assert server.issued == before + 2
        server.poison = 10  # every token is bad: one refresh, then a clear error
        clock.now += 61  # the good token has expired: the next read fetches a bad one
        with pytest.raises(AuthError, match="fresh token"):
            await blob.read(0, 10)


# --------------------------------------------------------------------------
# TLS


async def test_tls_is_verified_by_default_and_a_bad_certificate_fails_fast(tls_registry):
    ref = parse_reference(f"{tls_registry.host}/secure/app:v1")
    async with RegistryClient(RegistryOptions(plain_http=False)) as client:
        with pytest.raises(FetchError, match="TLS handshake failed") as info:
            await client.resolve(ref)
        assert client.statistics().retries == 0
    assert "insecure-tls" in str(info.value)


@pytest.mark.parametrize("http2", [False, True])
async def test_insecure_tls_reaches_a_self_signed_registry_over_http1_and_http2(
    tls_registry, http2: bool
):
    data = os.urandom(100_000)
    ref = parse_reference(f"{tls_registry.host}/secure/app:v1")
    options = RegistryOptions(plain_http=False, insecure_tls=True, http2=http2)
    async with RegistryClient(options) as client:
        digest = await push_image(client, ref, [data])
        image = await client.resolve(ref)
        assert image.digest == digest
        assert await client.blob(ref, image.layers[0]).read(99_000, 1000) == data[99_000:]


# --------------------------------------------------------------------------
# Units: challenges and docker config


def test_bearer_challenge_with_commas_inside_quotes_is_parsed_whole():
    from lazyfs.oci import parse_challenges

    header = 'Bearer realm="https://auth.example/token",service="reg.example",scope="repository:a/b:pull,push"'
    (challenge,) = parse_challenges(header)
    assert challenge.scheme == "bearer"
    assert challenge.params == {
        "realm": "https://auth.example/token", "service": "reg.example", "scope": "repository:a/b:pull,push"
    }  # fmt: skip
    both = parse_challenges('Basic realm="x", Bearer realm="y",service=z')
    assert [c.scheme for c in both] == ["basic", "bearer"] and both[1].params["service"] == "z"


def test_docker_config_matches_hub_aliases_and_hides_the_password(tmp_path):
    from lazyfs.oci import load_docker_credentials

    config = tmp_path / "config.json"
    config.write_text(
        json.dumps(
            {
                "auths": {
                    "https://index.docker.io/v1/": {"auth": base64.b64encode(b"u:p:w").decode()}
                }
            }
        )
    )
    found = load_docker_credentials(config, "registry-1.docker.io")
    assert found is not None and found.username == "u" and found.password.reveal() == "p:w"
    assert "p:w" not in repr(found)
    assert load_docker_credentials(config, "ghcr.io") is None
    assert load_docker_credentials(tmp_path / "missing.json", "ghcr.io") is None


async def test_concurrent_reads_share_one_token_fetch(token_registry: TokenRegistry):
    data = os.urandom(100_000)
    ref = parse_reference(f"{token_registry.host}/public/many:v1")
    async with RegistryClient(creds(token_registry)) as client:
        await push_image(client, ref, [data])
    server = token_registry.token_server
    before = server.issued
    results: dict[int, bytes] = {}
    async with RegistryClient() as client:
        blob = client.blob(ref, layer_descriptor(data))

        async def read(i: int) -> None:
            results[i] = await blob.read(i * 1000, 1000)

        async with trio.open_nursery() as nursery:
            for i in range(32):
                nursery.start_soon(read, i)
    assert all(results[i] == data[i * 1000 : (i + 1) * 1000] for i in range(32))
    assert server.issued == before + 1
