"""Crashers the fuzzer found (tests/fuzzing, benchmarks/fuzz.py), pinned as
plain tests: each input used to escape as a foreign exception (or take
seconds) and must now be the project's own error, promptly."""

from __future__ import annotations

import io
import tarfile
import time
from pathlib import Path

import httpx
import pytest

from lazyfs.errors import AuthError, FormatError, NotFoundError
from lazyfs.format.seekable import load_descriptor
from lazyfs.oci.auth import AuthSession, parse_challenges
from lazyfs.oci.client import RegistryClient
from lazyfs.oci.credentials import load_docker_credentials
from lazyfs.oci.reference import parse_reference
from lazyfs.oci.transport import Counters, RegistryOptions, raise_for_status
from lazyfs.produce.tarstage import stage_tar

DEEP = b"[" * 100_000 + b"]" * 100_000  # json's C decoder recurses once per level


# ---------------------------------------------------------------- JSON nested past the stack


def test_descriptor_nested_past_the_stack_is_a_format_error(tmp_path: Path) -> None:
    path = tmp_path / "blob.json"
    path.write_bytes(DEEP)
    with pytest.raises(FormatError, match="not valid JSON"):
        load_descriptor(path)


def test_docker_config_nested_past_the_stack_is_a_format_error(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_bytes(b'{"auths":' + DEEP + b"}")
    with pytest.raises(FormatError, match="not valid JSON"):
        load_docker_credentials(path, "localhost:5000")


def test_docker_config_not_utf8_is_a_format_error(tmp_path: Path) -> None:
    # Found by the fuzzer: read_text() raised UnicodeDecodeError past the JSON check.
    path = tmp_path / "config.json"
    path.write_bytes(b'{"auths": {"localhost:5000": {"auth": "\xc0\xff"}}}')
    with pytest.raises(FormatError, match="not valid JSON"):
        load_docker_credentials(path, "localhost:5000")


async def _token(body: bytes) -> AuthSession:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body)

    opts = RegistryOptions(retries=0, plain_http=True, docker_config="/nonexistent/config.json")
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        session = AuthSession(http, opts, Counters(), clock=lambda: 0.0)
        await session.answer("localhost:5000", "repository:a:pull", 'Bearer realm="http://localhost:5000/t"', None)
        return session


async def test_token_answer_nested_past_the_stack_is_an_auth_error() -> None:
    with pytest.raises(AuthError, match="not a JSON token"):
        await _token(DEEP)


async def test_token_answer_expires_in_past_float_range_uses_the_default_lifetime() -> None:
    # float(10**400) raised OverflowError out of the auth flow.
    session = await _token(b'{"token": "t", "expires_in": 1' + b"0" * 400 + b"}")
    assert session.authorization("localhost:5000", "repository:a:pull") == "Bearer t"


def _client(body: bytes) -> RegistryClient:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body, headers={"Content-Type": "application/json"})

    opts = RegistryOptions(retries=0, plain_http=True, docker_config="/nonexistent/config.json")
    return RegistryClient(opts, transport=httpx.MockTransport(handler))


async def test_manifest_nested_past_the_stack_is_a_format_error() -> None:
    async with _client(DEEP) as client:
        with pytest.raises(FormatError, match="not valid JSON"):
            await client.fetch_manifest(parse_reference("localhost:5000/a/b:t"))


async def test_config_nested_past_the_stack_is_ignored_like_other_non_json() -> None:
    import hashlib

    desc = {"mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": "sha256:" + hashlib.sha256(DEEP).hexdigest(), "size": len(DEEP)}  # fmt: skip
    async with _client(DEEP) as client:
        assert await client._fetch_config(parse_reference("localhost:5000/a/b:t"), desc) is None


@pytest.mark.parametrize(
    "body",
    [b'{"errors": 5}', b'{"errors": [1, {"code": "X"}], "x": ' + b"[" * 4000 + b"]" * 4000 + b"}",
     b"[" * 8000],
    ids=["errors-not-a-list", "nested-4000", "nested-truncated"],
)  # fmt: skip
async def test_registry_error_body_of_any_shape_still_gives_not_found(body: bytes) -> None:
    # Found by the fuzzer: TypeError ('int' object is not iterable) and
    # RecursionError escaped from the error summary of a 404.
    with pytest.raises(NotFoundError, match="HTTP 404"):
        await raise_for_status(httpx.Response(404, content=body), "manifest x")


# ---------------------------------------------------------------- WWW-Authenticate


def test_www_authenticate_of_blanks_parses_in_linear_time() -> None:
    # Found by the fuzzer: "\s*,?\s*" tried every split of a blank run, so a
    # 16 KiB header took seconds (64 KiB: minutes). Now a few milliseconds.
    for header in ("Bearer" + " " * 65536 + "!", " " * 65536 + "!"):
        t0 = time.perf_counter()
        parse_challenges(header)
        assert time.perf_counter() - t0 < 2.0
    assert parse_challenges('Bearer realm="r" , Basic realm="b"')[1].scheme == "basic"


# ---------------------------------------------------------------- tar headers tarfile cannot read


def _pax_record(key: bytes, value: bytes) -> bytes:
    body = b" " + key + b"=" + value + b"\n"
    n = len(body) + 1
    while len(str(n)) + len(body) != n:
        n += 1
    return str(n).encode() + body


def _tar_with_raw_pax(records: bytes, data: bytes = b"x") -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        pax = tarfile.TarInfo("PaxHeaders/f")
        pax.type = tarfile.XHDTYPE
        pax.size = len(records)
        tf.addfile(pax, io.BytesIO(records))
        ti = tarfile.TarInfo("f")
        ti.size = len(data)
        tf.addfile(ti, io.BytesIO(data))
    return out.getvalue()


@pytest.mark.parametrize(
    "records",
    [
        _pax_record(b"GNU.sparse.size", b"1.5"),  # int('1.5') in tarfile._apply_pax_info
        _pax_record(b"GNU.sparse.map", b"a,b"),  # int('a') in _proc_gnusparse_01
        _pax_record(b"hdrcharset", b"\xff\xfe"),  # strict UTF-8 decode in _proc_pax
        _pax_record(b"GNU.sparse.major", b"1") + _pax_record(b"GNU.sparse.minor", b"0"),  # 1.0 map missing
    ],
    ids=["sparse-size-not-int", "sparse-map-not-int", "hdrcharset-not-utf8", "sparse-1.0-no-map"],
)
def test_tar_header_tarfile_cannot_parse_is_a_format_error(tmp_path: Path, records: bytes) -> None:
    # Found by the fuzzer: ValueError / UnicodeDecodeError from tarfile's
    # header parsing escaped stage_tar (it caught TarError only).
    root = tmp_path / "root"
    root.mkdir()
    data = b"no newline in this sparse map" if b"major" in records else b"x"
    with pytest.raises(FormatError, match="tar"):
        stage_tar(io.BytesIO(_tar_with_raw_pax(records, data)), root, layer="layer 0")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["root"]


def test_tar_first_header_tarfile_cannot_parse_is_a_format_error(tmp_path: Path) -> None:
    # The first header is read inside tarfile.open, a second place to translate.
    raw = _tar_with_raw_pax(_pax_record(b"GNU.sparse.size", b"x"))
    (tmp_path / "root").mkdir()
    with pytest.raises(FormatError):
        stage_tar(io.BytesIO(raw), tmp_path / "root", layer="layer 0")


def test_tar_whiteout_claiming_a_huge_size_ends_promptly(tmp_path: Path) -> None:
    # Found by the fuzzer (a hang): tarfile skips a whiteout's data by reading
    # block after block past the end of the stream; 64 GiB claimed took minutes.
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tf:
        ti = tarfile.TarInfo("usr/.wh.gone")
        ti.size = 0
        tf.addfile(ti)
    raw = bytearray(out.getvalue()[:512])
    raw[124:136] = b"\x80" + (1 << 36).to_bytes(11, "big")  # base-256 size: 64 GiB
    raw[148:156] = b" " * 8
    raw[148:156] = b"%06o\0 " % sum(raw)
    (tmp_path / "root").mkdir()
    t0 = time.perf_counter()
    with pytest.raises(FormatError, match="tar ends inside"):
        stage_tar(io.BytesIO(bytes(raw)), tmp_path / "root", layer="layer 0")
    assert time.perf_counter() - t0 < 5.0


def test_docker_config_password_with_a_lone_surrogate_is_a_format_error(tmp_path: Path) -> None:
    # Found by the fuzzer: basic_header() raised UnicodeEncodeError mid-request.
    path = tmp_path / "config.json"
    path.write_text('{"auths": {"localhost:5000": {"username": "u", "password": "\\ud800"}}}')
    with pytest.raises(FormatError, match="not valid Unicode"):
        load_docker_credentials(path, "localhost:5000")
