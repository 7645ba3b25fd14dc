"""Prometheus metrics of the snapshotter, gathered when scraped.

The counters of each lazily mounted image live in its daemon; a scrape
reads every image's stats file (in a child process with a deadline, so a
hung daemon costs a scrape a few seconds, never a thread) and reports them
labelled by image, beside the snapshotter's own counts.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from lazyfs.mount.health import probe_stats
from lazyfs.snapshotter.snapshots import Snapshotter

__all__ = ["SnapshotterCollector"]

# stats.json key -> (metric name, help)
_IMAGE_COUNTERS = {
    "bytes_fetched": ("lazyerofs_fetched_bytes", "Bytes fetched from the registry"),
    "requests": ("lazyerofs_requests", "Range requests sent to the registry"),
    "cache_hits": ("lazyerofs_cache_hits", "Reads served from the chunk cache"),
    "cache_misses": ("lazyerofs_cache_misses", "Reads that had to fetch"),
    "verify_failures": ("lazyerofs_verify_failures", "Frames whose SHA-512 did not match"),
    "read_errors": ("lazyerofs_read_errors", "Reads answered with EIO"),
}
SCRAPE_TIMEOUT = 2.0


class SnapshotterCollector(Collector):
    def __init__(self, snapshotter: Snapshotter, calls: Mapping[str, int]) -> None:
        self.sn = snapshotter
        self.calls = calls

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        kinds = GaugeMetricFamily("lazyerofs_snapshots", "Snapshots by kind", labels=["kind"])
        counts: dict[str, int] = {"active": 0, "view": 0, "committed": 0, "remote": 0}
        for s in self.sn.store.all():
            counts["remote" if s.remote else s.kind.name.lower()] += 1
        for kind, n in counts.items():
            kinds.add_metric([kind], n)
        yield kinds

        calls = CounterMetricFamily("lazyerofs_snapshotter_calls", "Snapshot API calls served", labels=["method"])
        for method, n in sorted(self.calls.items()):
            calls.add_metric([method], n)
        yield calls

        up = GaugeMetricFamily("lazyerofs_image_up", "1 if the image's daemon answered", labels=["image"])
        families = {
            key: CounterMetricFamily(name, text, labels=["image"]) for key, (name, text) in _IMAGE_COUNTERS.items()
        }
        for row in self.sn.store.images():
            stats, _why = probe_stats(row.dir, SCRAPE_TIMEOUT)
            up.add_metric([row.ref], 1 if stats is not None else 0)
            for key, family in families.items():
                value = stats.get(key) if stats else None
                if isinstance(value, int):
                    family.add_metric([row.ref], value)
        yield up
        yield from families.values()
