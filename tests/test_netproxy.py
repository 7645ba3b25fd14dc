"""The network emulator: latency, a shared bandwidth cap, counters, fault rules, the CLI.

Timing bounds are loose on purpose (lower bounds only, with slack): they
show the knob takes effect, not how precisely.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import trio
from support.localregistry import LocalRegistry
from support.netproxy import FaultRule, NetProxy
from support.registry import layer_descriptor, push_image

from lazyfs.oci import RegistryClient, parse_reference

BLOB = os.urandom(2 << 20)


@pytest.fixture
def blob_url(registry: LocalRegistry) -> str:
    """Path of a 2 MiB blob in ``registry`` (a sync fixture, so sync tests can use it)."""

    async def push() -> None:
        async with RegistryClient() as client:
            await push_image(client, parse_reference(f"{registry.host}/test/net:v1"), [BLOB])

    trio.run(push)
    return f"/v2/test/net/blobs/{layer_descriptor(BLOB)['digest']}"


REPO = Path(__file__).resolve().parents[1]


def test_added_latency_delays_every_request(registry: LocalRegistry):
    with (
        NetProxy(upstream=registry.url, rtt=0.15) as proxy,
        httpx.Client(base_url=proxy.url) as http,
    ):
        started = time.monotonic()
        for _ in range(4):
            assert http.get("/v2/").status_code == 200
        elapsed = time.monotonic() - started
        assert elapsed >= 0.5
        proxy.rtt = 0.0  # runtime change
        started = time.monotonic()
        http.get("/v2/")
        assert time.monotonic() - started < 0.15
        assert proxy.stats().requests == 5


def test_bandwidth_cap_is_shared_by_all_connections(registry: LocalRegistry, blob_url: str):
    # 2 x 2 MiB at 32 Mbit/s is about 1.05 s if the cap is shared, 0.5 s if not.
    with NetProxy(upstream=registry.url, bandwidth_bps=32e6) as proxy:
        results: list[bytes] = []

        def fetch() -> None:
            with httpx.Client(base_url=proxy.url) as http:
                results.append(http.get(blob_url).content)

        started = time.monotonic()
        threads = [threading.Thread(target=fetch) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        elapsed = time.monotonic() - started
        assert results == [BLOB, BLOB]
        assert elapsed >= 0.8
        assert proxy.stats().bytes_sent >= 2 * len(BLOB)


def test_counters_count_requests_and_bytes_and_reset(registry: LocalRegistry, blob_url: str):
    with NetProxy(upstream=registry.url) as proxy, httpx.Client(base_url=proxy.url) as http:
        r = http.get(blob_url, headers={"Range": "bytes=100-199"})
        assert r.status_code == 206 and r.content == BLOB[100:200]
        s = proxy.stats()
        assert s.requests == 1 and 100 <= s.bytes_sent < 1000 and s.faults == 0
        proxy.reset_counters()
        assert proxy.stats().requests == 0 and proxy.bytes_sent == 0


def test_fault_rules_fire_for_the_next_n_matching_requests_only(
    registry: LocalRegistry, blob_url: str
):
    with NetProxy(upstream=registry.url) as proxy, httpx.Client(base_url=proxy.url) as http:
        rule = proxy.add_fault("503", count=2, path="/blobs/")
        assert http.get("/v2/").status_code == 200  # path does not match
        assert [http.get(blob_url).status_code for _ in range(3)] == [503, 503, 200]
        assert rule.fired == 2
        proxy.add_fault("reset", probability=0.0)
        assert http.get("/v2/").status_code == 200


def test_ignore_range_and_corrupt_faults_change_what_the_client_sees(
    registry: LocalRegistry, blob_url: str
):
    with NetProxy(upstream=registry.url) as proxy, httpx.Client(base_url=proxy.url) as http:
        proxy.add_fault("ignore-range", count=1)
        r = http.get(blob_url, headers={"Range": "bytes=0-9"})
        assert r.status_code == 200 and len(r.content) == len(BLOB)
        proxy.add_fault("corrupt", count=1)
        r = http.get(blob_url, headers={"Range": "bytes=0-999"})
        assert r.status_code == 206 and len(r.content) == 1000 and r.content != BLOB[:1000]


def test_reset_and_truncate_faults_break_the_connection(registry: LocalRegistry, blob_url: str):
    with NetProxy(upstream=registry.url) as proxy:
        proxy.add_fault("reset", count=1)
        with pytest.raises(httpx.TransportError), httpx.Client(base_url=proxy.url) as http:
            http.get("/v2/")
        proxy.add_fault("truncate", count=1)
        with pytest.raises(httpx.TransportError), httpx.Client(base_url=proxy.url) as http:
            http.get(blob_url)
        with httpx.Client(base_url=proxy.url) as http:
            assert http.get(blob_url).content == BLOB


async def test_uploads_through_the_proxy_keep_their_location_urls(registry: LocalRegistry):
    with NetProxy(upstream=registry.url, rtt=0.01) as proxy:
        data = os.urandom(300_000)
        ref = parse_reference(f"{proxy.host}/test/up:v1")
        async with RegistryClient() as client:
            await client.push_blob(
                ref, data, layer_descriptor(data)["digest"], len(data), chunk_size=100_000
            )
        assert registry.blob_path(layer_descriptor(data)["digest"]).read_bytes() == data


def test_fault_rule_spec_parsing():
    assert FaultRule.parse("503:x2@/blobs/") == FaultRule("503", count=2, path="/blobs/")
    assert FaultRule.parse("reset:0.25").probability == 0.25
    with pytest.raises(ValueError, match="unknown fault"):
        FaultRule.parse("explode")


def test_command_line_proxy_forwards_until_interrupted(registry: LocalRegistry):
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.support.netproxy", "--upstream", registry.url, "--rtt-ms", "5", "--mbit", "100",
         "--fault", "503:x1@/v2/"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
    )  # fmt: skip
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        assert line.startswith("netproxy: http://127.0.0.1:"), line
        url = line.split()[1]
        with httpx.Client(base_url=url) as http:
            assert http.get("/v2/").status_code == 503
            assert http.get("/v2/").status_code == 200
    finally:
        proc.send_signal(2)
        try:
            _, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise
    assert "2 requests" in err


def test_429_answers_with_retry_after_without_asking_upstream(registry: LocalRegistry, blob_url: str):
    with NetProxy(upstream=registry.url) as proxy, httpx.Client(base_url=proxy.url) as http:
        proxy.add_fault("429", count=1)
        first = http.get(blob_url)
        assert first.status_code == 429 and first.headers["retry-after"] == "1"
        assert http.get(blob_url).content == BLOB


def test_stall_holds_the_answer_for_stall_seconds(registry: LocalRegistry):
    with NetProxy(upstream=registry.url) as proxy, httpx.Client(base_url=proxy.url) as http:
        proxy.stall_seconds = 0.6
        proxy.add_fault("stall", count=1)
        started = time.monotonic()
        assert http.get("/v2/").status_code == 200
        assert time.monotonic() - started >= 0.6


def test_trickle_sends_one_byte_a_second(registry: LocalRegistry, blob_url: str):
    with NetProxy(upstream=registry.url) as proxy, httpx.Client(base_url=proxy.url, timeout=5) as http:
        proxy.add_fault("trickle", count=1)
        started = time.monotonic()
        with http.stream("GET", blob_url, headers={"Range": "bytes=0-2"}) as resp:
            got = b"".join(resp.iter_raw())
        assert got == BLOB[:3]
        assert time.monotonic() - started >= 1.9  # bytes at 0 s, 1 s, 2 s
