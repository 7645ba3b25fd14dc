"""Startup profiles end to end: record on a real mount, save, push to a real
registry (the referrers tag schema of docker-registry 2.8, and the referrers
API of a small registry front written here), look up and replay on a cold
mount; a hostile or stale profile changes nothing but speed; an on-demand
read is served while a long replay is still running."""

from __future__ import annotations

import http.client
import json
import os
import random
import re
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import trio
from support.blobtools import make_blob
from support.mount import Mounted, Mounter, lazyerofs
from support.netproxy import NetProxy
from support.registry import push_descriptors

from lazyfs.fetch.profile import (
    MEDIA_TYPE_PROFILE,
    Profile,
    ProfileLayer,
    dump_profile,
    parse_profile,
)
from lazyfs.oci import RegistryClient, parse_reference
from lazyfs.oci.referrers import push_artifact, referrers_tag

pytestmark = pytest.mark.e2e

FRAME = 64 << 10
rnd = random.Random(12)
RAW = [rnd.randbytes(2 << 20), rnd.randbytes(2 << 20)]  # incompressible: bytes on the wire = frames
SMALL_READAHEAD = ("--readahead", "4KiB")  # the kernel reads little more than asked


def push(registry_host: str, registry, name: str, raws: list[bytes] = RAW) -> tuple[str, list[str]]:
    blobs = [make_blob(r, FRAME) for r in raws]
    ref = push_descriptors(registry, name, [(b.data, b.descriptor) for b in blobs])
    if registry_host != registry.host:
        ref = ref.replace(registry.host, registry_host, 1)
    return ref, [str(b.descriptor["digest"]) for b in blobs]


def pread(path: Path, offset: int, size: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)


def wait_replay(m: Mounted, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        stats = m.stats()
        profile = stats.get("profile", {})
        if profile.get("done") or "error" in profile or time.monotonic() > deadline:
            return stats
        time.sleep(0.1)


def manifest_digest(host: str, repo: str, tag: str) -> str:
    conn = http.client.HTTPConnection(host)
    conn.request("HEAD", f"/v2/{repo}/manifests/{tag}", headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
    resp = conn.getresponse()
    resp.read()
    return resp.getheader("Docker-Content-Digest") or ""


def get(host: str, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(host)
    conn.request("GET", path, headers={"Accept": "application/vnd.oci.image.index.v1+json"})
    resp = conn.getresponse()
    return resp.status, resp.read()


# Reads of the workload the profile is recorded from: (layer, offset, size).
WORKLOAD = [(1, 10 * FRAME + 5, 100), (0, 3 * FRAME, 100), (0, 20 * FRAME, 3 * FRAME), (1, 30 * FRAME + 7, 50)]


def test_profile_recorded_saved_pushed_by_tag_schema_and_replayed_on_a_cold_mount(mounter: Mounter, registry, tmp_path: Path):
    ref, digests = push(registry.host, registry, "recorded")
    m1 = mounter(ref, "--no-profile", *SMALL_READAHEAD)
    for layer, offset, size in WORKLOAD:
        assert pread(m1.layer(layer), offset, size) == RAW[layer][offset : offset + size]
    assert "error" not in m1.stats()["profile"] and m1.stats()["profile"]["source"] is None  # --no-profile

    saved = tmp_path / "app.profile.json"
    lazyerofs("profile", "save", str(m1.dir), "-o", str(saved))
    profile = parse_profile(saved.read_bytes())
    by_digest = {layer.digest: layer for layer in profile.layers}
    assert set(by_digest) == set(digests)
    l0, l1 = by_digest[digests[0]], by_digest[digests[1]]
    assert l1.frames[0] == 10 and 30 in l1.frames
    assert l0.frames[0] == 3 and {20, 21, 22} <= set(l0.frames)
    assert l0.frames.index(3) < l0.frames.index(20)
    assert l1.times_ms[0] <= l0.times_ms[0] <= l0.times_ms[l0.frames.index(20)] <= l1.times_ms[l1.frames.index(30)]
    assert profile.image and l0.chunk_size == FRAME and l0.frame_count == 32

    pushed = lazyerofs("profile", "push", "--plain-http", str(saved), ref)
    artifact = pushed.stdout.strip()
    assert "referrers tag" in pushed.stderr
    # docker-registry 2.8 has no referrers API: the index sits under the tag schema's tag.
    assert get(registry.host, f"/v2/test/recorded/referrers/{profile.image}")[0] == 404
    status, body = get(registry.host, f"/v2/test/recorded/manifests/{referrers_tag(profile.image)}")
    assert status == 200
    entries = json.loads(body)["manifests"]
    assert [(e["digest"], e["artifactType"]) for e in entries] == [(artifact, MEDIA_TYPE_PROFILE)]
    # Pushing again does not list it twice (read-modify-write of the index).
    lazyerofs("profile", "push", str(saved), ref)
    assert len(json.loads(get(registry.host, f"/v2/test/recorded/manifests/{referrers_tag(profile.image)}")[1])["manifests"]) == 1

    shown = lazyerofs("profile", "show", ref).stdout
    assert "referrers tag" in shown and digests[0][:19] in shown and "3@" in shown
    assert json.loads(lazyerofs("profile", "show", "--json", str(saved)).stdout)["version"] == 1

    cold = mounter(ref, *SMALL_READAHEAD, cache_dir=tmp_path / "cold-cache")
    stats = wait_replay(cold)
    p = stats["profile"]
    assert "registry (referrers tag)" in p["source"] and artifact in p["source"]
    assert p["done"] and p["fetched"] == profile.frame_total and p["ignored"] == 0 and p["failed"] == 0
    before = cold.stats()["requests"]
    for layer, offset, size in WORKLOAD:
        assert pread(cold.layer(layer), offset, size) == RAW[layer][offset : offset + size]
    after = cold.stats()
    assert after["requests"] == before  # every read was already there
    assert after["profile"]["used"] >= 7 and after["profile"]["wasted"] == after["profile"]["fetched"] - after["profile"]["used"]


# ------------------------------------------------------------------ a registry with the referrers API


class ReferrersFront:
    """A registry front that answers the referrers API from the manifests
    with a ``subject`` pushed through it (and says ``OCI-Subject`` on their
    PUT, as distribution-spec 1.1 asks); everything else goes to ``upstream``."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.referrers: dict[tuple[str, str], list[dict]] = {}
        self.referrers_gets = 0
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="referrers-front", daemon=True)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self._httpd.server_address[1]}"

    def __enter__(self) -> ReferrersFront:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        front = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def _send(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
                self.send_response(status)
                for k, v in headers:
                    if k.lower() not in ("content-length", "transfer-encoding", "connection"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _forward(self) -> tuple[int, list[tuple[str, str]], bytes, bytes]:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                conn = http.client.HTTPConnection(front.upstream)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection",)}
                conn.request(self.command, self.path, body=body or None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                return resp.status, resp.getheaders(), data, body

            def _any(self) -> None:
                url = urlsplit(self.path)
                m = re.fullmatch(r"/v2/(.+)/referrers/(sha256:[0-9a-f]{64})", url.path)
                if self.command == "GET" and m:
                    with front._lock:
                        front.referrers_gets += 1
                        entries = list(front.referrers.get((m.group(1), m.group(2)), []))
                    want = parse_qs(url.query).get("artifactType")
                    headers = [("Content-Type", "application/vnd.oci.image.index.v1+json")]
                    if want:
                        entries = [e for e in entries if e.get("artifactType") == want[0]]
                        headers.append(("OCI-Filters-Applied", "artifactType"))
                    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": entries}
                    self._send(200, headers, json.dumps(index).encode())
                    return
                status, headers, data, body = self._forward()
                m = re.fullmatch(r"/v2/(.+)/manifests/([^/]+)", url.path)
                if self.command == "PUT" and m and status == 201:
                    doc = json.loads(body)
                    subject = doc.get("subject")
                    if subject:
                        digest = dict((k.lower(), v) for k, v in headers)["docker-content-digest"]
                        entry = {"mediaType": doc["mediaType"], "digest": digest, "size": len(body), "artifactType": doc.get("artifactType")}
                        if doc.get("annotations"):
                            entry["annotations"] = doc["annotations"]
                        with front._lock:
                            front.referrers.setdefault((m.group(1), subject["digest"]), []).append(entry)
                        headers.append(("OCI-Subject", subject["digest"]))
                self._send(status, headers, data)

            do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = _any

        return Handler


@pytest.fixture
def referrers_front(registry) -> Iterator[ReferrersFront]:
    with ReferrersFront(registry.host) as front:
        yield front


def profile_for(digests: list[str], frames: list[list[int]], image: str | None = None) -> bytes:
    layers = tuple(ProfileLayer(d, tuple(fs), tuple(range(len(fs)))) for d, fs in zip(digests, frames, strict=True))
    return dump_profile(Profile(layers, image=image))


def test_profile_pushed_to_and_found_through_a_registry_with_the_referrers_api(mounter: Mounter, registry, referrers_front: ReferrersFront, tmp_path: Path):
    ref, digests = push(referrers_front.host, registry, "api")
    saved = tmp_path / "p.json"
    saved.write_bytes(profile_for(digests, [[5, 6, 7], [0, 31]]))
    pushed = lazyerofs("profile", "push", str(saved), ref)
    assert "referrers API" in pushed.stderr
    image = manifest_digest(registry.host, "test/api", "v1")
    # The registry said OCI-Subject: no tag schema index was written.
    assert get(registry.host, f"/v2/test/api/manifests/{referrers_tag(image)}")[0] == 404
    assert [e["digest"] for e in referrers_front.referrers[("test/api", image)]] == [pushed.stdout.strip()]

    gets = referrers_front.referrers_gets
    m = mounter(ref, *SMALL_READAHEAD)
    p = wait_replay(m)["profile"]
    assert referrers_front.referrers_gets > gets
    assert "registry (referrers API)" in (p["source"] or ""), p
    assert p["fetched"] == 5 and p["done"]
    assert "referrers API" in lazyerofs("profile", "show", ref).stdout
    assert pread(m.layer(0), 5 * FRAME, 3 * FRAME) == RAW[0][5 * FRAME : 8 * FRAME]


# ------------------------------------------------------------------ hostile and stale profiles


def hostile_profiles(digests: list[str]) -> dict[str, bytes]:
    other = "sha256:" + "ab" * 32
    return {
        "garbage": b"\x00\xff{{{ not a profile",
        "deep": b"[" * 200_000,
        "too-big": b" " * (5 << 20) + b"{}",
        "other-image": profile_for([other], [list(range(40))]),
        "out-of-range": profile_for(digests, [[31, 32, 1000, 1 << 39], [99]]),
        "everything": profile_for(digests, [list(range(40)), list(range(31, -1, -1))]),
    }


def test_a_hostile_or_stale_profile_changes_nothing_but_speed(mounter: Mounter, registry, tmp_path: Path):
    ref, digests = push(registry.host, registry, "hostile")
    outcomes = {}
    for name, data in hostile_profiles(digests).items():
        path = tmp_path / f"{name}.json"
        path.write_bytes(data)
        m = mounter(ref, "--profile", str(path), cache_dir=tmp_path / f"cache-{name}")
        p = wait_replay(m)["profile"]
        for i, raw in enumerate(RAW):
            assert m.layer(i).read_bytes() == raw, name
        outcomes[name] = p
        lazyerofs("umount", str(m.dir))
    for name in ("garbage", "deep", "too-big"):
        assert outcomes[name]["source"] is None and outcomes[name]["error"], name
    assert outcomes["other-image"]["frames"] == 0 and outcomes["other-image"]["ignored"] == 40
    assert outcomes["out-of-range"]["frames"] == 1 and outcomes["out-of-range"]["ignored"] == 4
    assert outcomes["everything"]["fetched"] == 64 and outcomes["everything"]["ignored"] == 8
    assert outcomes["everything"]["failed"] == 0


def test_a_hostile_profile_in_the_registry_is_ignored(mounter: Mounter, registry, tmp_path: Path):
    ref, _digests = push(registry.host, registry, "planted")
    reference = parse_reference(ref)

    async def plant() -> None:
        async with RegistryClient() as client:
            resolved = await client.resolve(reference, with_config=False)
            subject = {"mediaType": resolved.media_type, "digest": resolved.digest, "size": len(resolved.manifest_bytes)}
            await push_artifact(client, reference, subject, MEDIA_TYPE_PROFILE, b'{"schema": "lazyerofs.profile", "version": 99}')

    trio.run(plant)
    m = mounter(ref)
    p = wait_replay(m)["profile"]
    assert p["source"] is None and "version 99 is not supported" in p["error"]
    assert m.layer(0).read_bytes() == RAW[0] and m.layer(1).read_bytes() == RAW[1]


# ------------------------------------------------------------------ on-demand reads go first


def test_an_on_demand_read_is_served_while_a_long_replay_is_running(mounter: Mounter, registry, tmp_path: Path):
    # 2 x 2 MiB of profile through a 2 Mbit/s link: the replay takes ~17 s.
    with NetProxy(upstream=registry.url, rtt=0.02, bandwidth_bps=2_000_000) as proxy:
        ref, digests = push(proxy.host, registry, "slow")
        saved = tmp_path / "long.json"
        saved.write_bytes(profile_for(digests, [list(range(32)), list(range(31))]))  # not frame 31 of layer 1
        m = mounter(ref, "--profile", str(saved), *SMALL_READAHEAD)
        deadline = time.monotonic() + 30
        while not m.stats()["profile"].get("in_flight") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pread(m.layer(1), 31 * FRAME + 9, 100) == RAW[1][31 * FRAME + 9 : 31 * FRAME + 109]
        p = m.stats()["profile"]
        assert not p["done"] and p["fetched"] < p["frames"], p
