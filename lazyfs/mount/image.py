"""One image, opened for mounting: its manifest and its layers' files.

``open_image`` resolves a reference (or takes one descriptor plus a local
blob or a blob URL), opens every layer through :func:`lazyfs.fetch.open_layer`
(all chunk tables in one round trip) and returns an :class:`Image`. What a
layer is (seekable, plain) is the fetch side's business: here every layer is
a :class:`lazyfs.fetch.Layer`, and ``stats`` and ``write_touch_log`` read
only what that protocol offers.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from lazyfs.errors import FormatError, MountError
from lazyfs.mount.state import redact_url

# The fetch side, the registry client (httpx) and trio are imported by
# open_image: read_stats (``lazyerofs stats``) needs none of them.
if TYPE_CHECKING:
    from cache import ChunkCache
    from lazyfs.fetch import BlobSource, FetchContext, Layer, OpenedLayer, ReadSettings
    from lazyfs.oci import RegistryOptions

__all__ = ["STATS_PATH", "Image", "ImageLayer", "open_image", "read_stats", "stats", "write_touch_log"]

log = logging.getLogger(__name__)

# Where the FUSE tree serves ``stats`` (see fuse.py), relative to the mount point.
STATS_PATH = ".lazyerofs/stats.json"
# The counters every layer keeps, summed over the image in ``stats``.
_COUNTERS = ("bytes_fetched", "requests", "frames_fetched", "cache_hits", "cache_misses", "verify_failures", "read_errors")


@dataclass(frozen=True)
class ImageLayer:
    """A layer as the mount shows it: its file, blob digest and dm-verity sidecar."""

    file: Layer
    digest: str
    sidecar: bytes | None


@dataclass
class Image:
    manifest: bytes
    context: FetchContext | None = None  # what the layers share (chunk-table counters)
    layers: list[ImageLayer] = field(default_factory=list)  # bottom first; skipped layers left out

    @property
    def files(self) -> list[Layer]:
        return [layer.file for layer in self.layers]


async def open_image(
    ref: str,
    *,
    descriptor_file: str | None,
    registry: RegistryOptions,
    settings: ReadSettings,
    cache: ChunkCache,
    stack: contextlib.AsyncExitStack,
    mark: Callable[[str], None] = lambda _step: None,
) -> Image:
    """Open the image ``ref`` names; its sources stay open until ``stack`` closes.

    With ``descriptor_file``, ``ref`` is one blob: a local file if it exists,
    else a URL, and the manifest shown is a one-layer one built around the
    descriptor.

    Raises:
        FormatError: a bad descriptor, or no EROFS layer to mount.
        RegistryError, FetchError, IntegrityError: from resolving and opening.
    """
    import trio

    from lazyfs.fetch import FetchContext, FileSource, TableStore, open_layer
    from lazyfs.format import load_descriptor, parse_descriptor
    from lazyfs.oci import RegistryClient, open_url_blob, parse_reference

    descs: list[tuple[Mapping[str, object], BlobSource]]
    if descriptor_file:
        desc = load_descriptor(descriptor_file)
        if os.path.exists(ref):
            source: BlobSource = FileSource(ref)
            stack.callback(source.close)
        else:
            size = parse_descriptor(desc, name=descriptor_file).size
            source = await stack.enter_async_context(open_url_blob(ref, size=size, options=registry))
        manifest = json.dumps({"schemaVersion": 2, "layers": [desc]}, indent=2).encode()
        descs = [(desc, source)]
    else:
        client = await stack.enter_async_context(RegistryClient(registry))
        reference = parse_reference(ref)
        # A mount needs the layers only: the config would cost a round trip.
        resolved = await client.resolve(reference, with_config=False)
        manifest = resolved.manifest_bytes
        descs = [(d, client.blob(reference, d)) for d in resolved.layers]
    mark("resolve")
    # One per mount: limiter, demand, link estimate, budgets, and the
    # verified chunk tables kept beside the chunk cache.
    context = FetchContext(table_store=TableStore(cache.root))
    opened: list[OpenedLayer | None] = [None] * len(descs)

    async def open_one(i: int) -> None:
        desc, source = descs[i]
        opened[i] = await open_layer(i, desc, source, cache, settings, context)

    # One round trip for all chunk tables, not one per layer.
    async with trio.open_nursery() as nursery:
        for i in range(len(descs)):
            nursery.start_soon(open_one, i)
    mark("tables")
    image = Image(manifest, context)
    for result in opened:
        if result is not None:
            image.layers.append(ImageLayer(result.layer, result.layer.desc.digest, result.sidecar))
    if not image.layers:
        raise FormatError(f"{redact_url(ref)}: no EROFS layers to mount")
    return image


def stats(layers: Sequence[Layer], cache: ChunkCache, context: FetchContext | None = None) -> dict[str, object]:
    """The live counters of a mount (``.lazyerofs/stats.json``): totals over
    the layers, each layer's own, the chunk cache's and, given the mount's
    ``context``, how many chunk tables were fetched and how many read back
    from the table store."""
    total = dict.fromkeys(_COUNTERS, 0)
    per_layer = []
    for i, layer in enumerate(layers):
        s = layer.stats
        entry: dict[str, object] = {"index": i, "digest": layer.desc.digest, "size": layer.size}
        for k in _COUNTERS:
            total[k] += getattr(s, k)
            entry[k] = getattr(s, k)
        if layer.frames_total:  # a plain layer has no frames to count
            entry["frames_present"] = layer.frames_present
            entry["frames_total"] = layer.frames_total
            entry["blob_size"] = layer.desc.size
        entry["verified"] = layer.verified
        per_layer.append(entry)
    out: dict[str, object] = dict(total)
    out["layers"] = per_layer
    if context is not None:
        out["chunk_tables"] = {"fetched": context.tables_fetched, "cached": context.tables_cached}
    with contextlib.suppress(Exception):
        out["cache"] = asdict(cache.statistics())
    return out


def read_stats(mountpoint: str) -> dict[str, object]:
    """What ``stats`` said last, read through the mount (``lazyerofs stats``).

    Raises:
        MountError: not a lazyerofs mount, not ours to read, or its daemon gone.
    """
    path = os.path.join(mountpoint, STATS_PATH)
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError as exc:
        raise MountError(f"{mountpoint}: not a lazyerofs mount (no {path})") from exc
    except PermissionError as exc:
        raise MountError(f"{mountpoint}: permission denied: the mount is root's only unless mounted with --allow-other") from exc
    except OSError as exc:
        raise MountError(f"{mountpoint}: cannot read stats: {exc.strerror} (daemon gone? try 'lazyerofs umount')") from exc
    if not isinstance(data, dict):
        raise MountError(f"{mountpoint}: {path} is not a JSON object")
    return data


def write_touch_log(path: str, layers: Sequence[Layer]) -> None:
    """Write which frames were fetched, per framed layer (for benchmarks):
    digest, frame indexes and their blob spans (sorted), frame count."""
    data = []
    for layer in layers:
        if not layer.frames_total:
            continue
        touched = sorted(layer.touched())
        data.append(
            {
                "digest": layer.desc.digest,
                "frames": [i for i, _start, _end in touched],
                "spans": [[start, end] for _i, start, end in touched],
                "frame_count": layer.frames_total,
            }
        )
    Path(path).write_text(json.dumps(data))
