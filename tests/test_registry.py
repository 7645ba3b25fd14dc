"""lazyfs.oci against a real docker-registry: references, resolve, range reads, push."""

from __future__ import annotations

import hashlib
import json
import os

import httpx
import pytest
from support.localregistry import LocalRegistry
from support.registry import layer_descriptor, push_image

from lazyfs.errors import FetchError, FormatError, IntegrityError, NotFoundError
from lazyfs.oci import (
    MEDIA_OCI_INDEX,
    MEDIA_OCI_MANIFEST,
    Reference,
    RegistryClient,
    RegistryOptions,
    is_loopback_host,
    open_url_blob,
    parse_reference,
)

HEX = "a" * 64
D256 = f"sha256:{HEX}"
D512 = "sha512:" + "b" * 128


# --------------------------------------------------------------------------
# References


@pytest.mark.parametrize(
    ("text", "registry", "repository", "tag", "digest"),
    [
        ("ubuntu", "docker.io", "library/ubuntu", "latest", None),
        ("ubuntu:22.04", "docker.io", "library/ubuntu", "22.04", None),
        ("user/app", "docker.io", "user/app", "latest", None),
        ("docker.io/ubuntu", "docker.io", "library/ubuntu", "latest", None),
        ("index.docker.io/user/app:v1", "docker.io", "user/app", "v1", None),
        ("localhost/x", "localhost", "x", "latest", None),
        ("localhost:5000/a/b/c:tag-1.0_x", "localhost:5000", "a/b/c", "tag-1.0_x", None),
        ("127.0.0.1:5000/repo:v1", "127.0.0.1:5000", "repo", "v1", None),
        ("ghcr.io/org/img", "ghcr.io", "org/img", "latest", None),
        (f"ghcr.io/org/img@{D256}", "ghcr.io", "org/img", None, D256),
        (f"ghcr.io/org/img:v2@{D256}", "ghcr.io", "org/img", "v2", D256),
        (f"quay.io/a/b@{D512}", "quay.io", "a/b", None, D512),
        ("[::1]:5000/x:y", "[::1]:5000", "x", "y", None),
        (
            "my-registry.example.com:443/a__b/c.d-e:Z",
            "my-registry.example.com:443",
            "a__b/c.d-e",
            "Z",
            None,
        ),
    ],
)
def test_reference_parses_like_docker_and_round_trips(text, registry, repository, tag, digest):
    ref = parse_reference(text)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == (
        registry,
        repository,
        tag,
        digest,
    )
    assert parse_reference(str(ref)) == ref


def test_reference_for_docker_hub_uses_the_api_endpoint():
    assert parse_reference("ubuntu").api_host == "registry-1.docker.io"
    assert str(parse_reference("ubuntu")) == "docker.io/library/ubuntu:latest"
    assert parse_reference("localhost:5000/x").api_host == "localhost:5000"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "Ubuntu",  # uppercase repository
        "ubuntu:",  # empty tag
        "ubuntu:-bad",
        "ubuntu:" + "x" * 129,
        "a//b",
        "localhost:99999/x",
        "http://localhost:5000/x",
        "ubuntu@sha256:abc",  # too short
        f"ubuntu@sha256:{'A' * 64}",  # uppercase hex
        f"ubuntu@sha256:{HEX}0",  # too long
        f"ubuntu@sha256:{'g' * 64}",
        f"ubuntu@md5:{'a' * 32}",
        f"ubuntu@sha512:{'a' * 64}",  # sha512 needs 128
        f"ubuntu@sha256:{HEX}/../../etc",
        "ubuntu@",
        "ub untu",
    ],
)
def test_reference_refuses_malformed_names_and_digests(text):
    with pytest.raises(FormatError):
        parse_reference(text)


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("localhost:5000", True), ("127.0.0.1", True), ("127.8.9.1:80", True), ("[::1]:5000", True),
     ("example.com", False), ("10.0.0.1:5000", False), ("localhost.example.com", False)],
)  # fmt: skip
def test_plain_http_is_chosen_only_for_loopback_hosts(host, loopback):
    assert is_loopback_host(host) is loopback
    client = RegistryClient()
    assert client.base_url(host).startswith("http://" if loopback else "https://")
    assert (
        RegistryClient(RegistryOptions(plain_http=True)).base_url("example.com")
        == "http://example.com"
    )


# --------------------------------------------------------------------------
# Push, resolve, read


async def test_pushed_image_resolves_by_tag_and_by_digest_with_layers_in_order(
    registry: LocalRegistry,
):
    layers = [os.urandom(5000), os.urandom(70_000), b"top layer"]
    ref = parse_reference(f"{registry.host}/test/app:v1")
    async with RegistryClient() as client:
        digest = await push_image(client, ref, layers)
        by_tag = await client.resolve(ref)
        by_digest = await client.resolve(parse_reference(f"{registry.host}/test/app@{digest}"))
    for image in (by_tag, by_digest):
        assert image.digest == digest
        assert image.media_type == MEDIA_OCI_MANIFEST
        assert hashlib.sha256(image.manifest_bytes).hexdigest() == digest.split(":")[1]
        assert [d["digest"] for d in image.layers] == [
            layer_descriptor(b)["digest"] for b in layers
        ]
        assert image.config is not None and image.config["rootfs"]["type"] == "layers"


async def test_range_reads_are_byte_exact_at_start_middle_and_end(registry: LocalRegistry):
    data = os.urandom(3 << 20)
    ref = parse_reference(f"{registry.host}/test/ranges:v1")
    async with RegistryClient() as client:
        await push_image(client, ref, [data])
        blob = client.blob(ref, layer_descriptor(data))
        assert blob.size == len(data)
        assert await blob.read(0, 1) == data[:1]
        assert await blob.read(0, 4096) == data[:4096]
        assert await blob.read(1_234_567, 1 << 20) == data[1_234_567 : 1_234_567 + (1 << 20)]
        assert await blob.read(len(data) - 1, 1) == data[-1:]
        assert await blob.read(len(data) - 5000, 5000) == data[-5000:]
        assert await blob.read(0, len(data)) == data
        assert await blob.read(100, 0) == b""
        with pytest.raises(FetchError, match="outside"):
            await blob.read(len(data) - 10, 11)
        stats = blob.statistics()
    assert stats.requests == 6 and stats.retries == 0
    assert stats.bytes_fetched == 1 + 4096 + (1 << 20) + 1 + 5000 + len(data)


async def test_chunked_upload_stores_the_same_blob_and_a_second_push_is_skipped(
    registry: LocalRegistry, tmp_path
):
    data = os.urandom(2_500_000)
    path = tmp_path / "blob"
    path.write_bytes(data)
    desc = layer_descriptor(data)
    ref = parse_reference(f"{registry.host}/test/chunked:v1")
    async with RegistryClient() as client:
        assert (
            await client.push_blob(ref, path, desc["digest"], len(data), chunk_size=1 << 20) is True
        )
        assert await client.push_blob(ref, path, desc["digest"], len(data)) is False
        assert await client.blob(ref, desc).read(0, len(data)) == data
    assert registry.blob_path(desc["digest"]).read_bytes() == data


async def test_push_blob_refuses_a_size_that_does_not_match_the_bytes(registry: LocalRegistry):
    ref = parse_reference(f"{registry.host}/test/x:v1")
    async with RegistryClient() as client:
        with pytest.raises(FormatError, match="declared"):
            await client.push_blob(ref, b"abc", layer_descriptor(b"abc")["digest"], 4)


async def test_missing_tag_and_missing_blob_raise_not_found(registry: LocalRegistry):
    async with RegistryClient() as client:
        with pytest.raises(NotFoundError, match="nope"):
            await client.resolve(parse_reference(f"{registry.host}/test/nope:v1"))
        ref = parse_reference(f"{registry.host}/test/app:v1")
        await push_image(client, ref, [b"x"])
        with pytest.raises(NotFoundError):
            await client.blob(ref, {"mediaType": "x", "digest": D256, "size": 10}).read(0, 5)


async def test_blob_descriptor_with_a_bad_digest_never_reaches_a_url(registry: LocalRegistry):
    ref = parse_reference(f"{registry.host}/test/app:v1")
    async with RegistryClient() as client:
        for bad in ("sha256:../../x", "sha256:" + "A" * 64, "md5:abc"):
            with pytest.raises(FormatError):
                client.blob(ref, {"mediaType": "x", "digest": bad, "size": 1})


async def test_index_resolves_to_the_requested_platform_and_refuses_a_missing_one(
    registry: LocalRegistry,
):
    ref_amd = parse_reference(f"{registry.host}/test/multi:amd64")
    ref_arm = parse_reference(f"{registry.host}/test/multi:arm64")
    async with RegistryClient() as client:
        amd = await push_image(client, ref_amd, [b"amd64 layer"], platform="linux/amd64")
        arm = await push_image(client, ref_arm, [b"arm64 layer"], platform="linux/arm64")
        sizes = {}
        for d in (amd, arm):
            sizes[d] = len(
                (
                    await client.resolve(parse_reference(f"{registry.host}/test/multi@{d}"))
                ).manifest_bytes
            )
        index = json.dumps({
            "schemaVersion": 2, "mediaType": MEDIA_OCI_INDEX,
            "manifests": [
                {"mediaType": MEDIA_OCI_MANIFEST, "digest": amd, "size": sizes[amd],
                 "platform": {"os": "linux", "architecture": "amd64"}},
                {"mediaType": MEDIA_OCI_MANIFEST, "digest": arm, "size": sizes[arm],
                 "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
            ],
        }).encode()  # fmt: skip
        ref = parse_reference(f"{registry.host}/test/multi:latest")
        index_digest = await client.push_manifest(ref, index, MEDIA_OCI_INDEX)
    for platform, want in (("linux/amd64", amd), ("linux/arm64", arm), ("linux/arm64/v8", arm)):
        async with RegistryClient(RegistryOptions(platform=platform)) as client:
            image = await client.resolve(ref)
        assert image.digest == want
        assert image.index_digest == index_digest
    async with RegistryClient(RegistryOptions(platform="linux/s390x")) as client:
        with pytest.raises(NotFoundError, match=r"linux/s390x.*linux/amd64"):
            await client.resolve(ref)


async def test_pinned_digest_that_does_not_match_the_bytes_is_refused(registry: LocalRegistry):
    """The registry stores manifests as blobs; rewrite one on disk and ask by its digest."""
    ref = parse_reference(f"{registry.host}/test/tamper:v1")
    async with RegistryClient() as client:
        digest = await push_image(client, ref, [b"layer"])
    stored = registry.blob_path(digest)
    original = stored.read_bytes()
    stored.write_bytes(original.replace(b'"schemaVersion": 2', b'"schemaVersion":  2', 1))
    assert stored.read_bytes() != original
    pinned = parse_reference(f"{registry.host}/test/tamper@{digest}")
    async with RegistryClient() as client:
        with pytest.raises(IntegrityError, match="digest mismatch") as info:
            await client.resolve(pinned)
        assert digest in str(info.value)
        with pytest.raises(IntegrityError, match="digest mismatch"):
            await client.resolve(ref)


async def test_manifest_digest_mismatch_names_both_digests(registry: LocalRegistry):
    """A corrupting hop between us and the registry: by digest and by tag."""
    ref = parse_reference(f"{registry.host}/test/app:v1")
    async with RegistryClient() as client:
        digest = await push_image(client, ref, [b"layer"])

    def corrupt(request: httpx.Request) -> httpx.Response:
        upstream = httpx.get(str(request.url), headers=dict(request.headers))
        body = upstream.content.replace(b"schemaVersion", b"schemaversion")
        return httpx.Response(upstream.status_code, headers=upstream.headers, content=body)

    transport = httpx.MockTransport(corrupt)
    async with RegistryClient(transport=transport) as client:
        with pytest.raises(IntegrityError) as info:
            await client.resolve(parse_reference(f"{registry.host}/test/app@{digest}"))
        assert digest in str(info.value) and "hash to sha256:" in str(info.value)
        with pytest.raises(IntegrityError, match="Docker-Content-Digest") as info:
            await client.resolve(ref)
        assert digest in str(info.value)


async def test_open_url_blob_learns_the_size_and_reads_ranges(registry: LocalRegistry):
    data = os.urandom(200_000)
    ref = parse_reference(f"{registry.host}/test/url:v1")
    async with RegistryClient() as client:
        await push_image(client, ref, [data])
    url = f"{registry.url}/v2/test/url/blobs/{layer_descriptor(data)['digest']}"
    async with open_url_blob(url) as blob:
        assert blob.size == len(data)
        assert blob.digest == layer_descriptor(data)["digest"]
        assert await blob.read(150_000, 50_000) == data[150_000:]


async def test_open_url_blob_refuses_a_bad_digest_in_the_url():
    with pytest.raises(FormatError):
        async with open_url_blob("http://127.0.0.1:1/v2/x/blobs/sha256:../../etc/passwd"):
            pass
    with pytest.raises(FormatError):
        async with open_url_blob("ftp://example.com/blob"):
            pass


async def test_registry_down_gives_fetch_error_and_recovers_when_back(registry: LocalRegistry):
    data = os.urandom(10_000)
    ref = parse_reference(f"{registry.host}/test/down:v1")
    async with RegistryClient(RegistryOptions(retries=1)) as client:
        await push_image(client, ref, [data])
        blob = client.blob(ref, layer_descriptor(data))
        registry.stop()
        with pytest.raises(FetchError, match="after 2 attempt"):
            await blob.read(0, 100)
        registry.start()
        assert await blob.read(0, 100) == data[:100]


def test_reference_dataclass_needs_a_tag_or_digest():
    with pytest.raises(FormatError):
        Reference("docker.io", "library/x")


# --------------------------------------------------------------------------
# CLI options


def test_registry_options_come_from_flags_and_the_password_from_stdin(monkeypatch):
    import argparse
    import io

    from lazyfs.cli._registry_opts import add_registry_options, options_from_args

    parser = argparse.ArgumentParser()
    add_registry_options(parser)
    add_registry_options(parser)  # a second call (inspect reuses the parser) is harmless
    monkeypatch.setattr("sys.stdin", io.StringIO("s3cret\n"))
    args = parser.parse_args(
        ["--plain-http", "--username", "bob", "--password-stdin", "--platform", "linux/arm64/v8",
         "--http2", "--retries", "2", "--timeout", "5"]
    )  # fmt: skip
    options = options_from_args(args)
    assert options == RegistryOptions(
        plain_http=True,
        username="bob",
        password="s3cret",
        platform="linux/arm64/v8",
        http2=True,
        retries=2,
        timeout=5.0,
    )
    assert options_from_args(args).password == "s3cret"  # stdin is read once
    assert "s3cret" not in repr(options)
    assert options_from_args(parser.parse_args([])) == RegistryOptions()


@pytest.mark.parametrize("command", ["push", "inspect", "mount", "verify"])
def test_every_registry_command_offers_the_registry_options(command, capsys):
    from lazyfs.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    help_text = capsys.readouterr().out
    for flag in ("--plain-http", "--insecure-tls", "--password-stdin", "--platform", "--retries"):
        assert flag in help_text


async def test_open_url_blob_refuses_a_size_that_disagrees_with_the_descriptor(
    registry: LocalRegistry,
):
    data = os.urandom(1000)
    ref = parse_reference(f"{registry.host}/test/url:v1")
    async with RegistryClient() as client:
        await push_image(client, ref, [data])
    url = f"{registry.url}/v2/test/url/blobs/{layer_descriptor(data)['digest']}"
    with pytest.raises(IntegrityError, match="expected 999"):
        async with open_url_blob(url, size=999):
            pass
