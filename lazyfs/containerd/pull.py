"""The lazy pull: an image into containerd without downloading its layers.

containerd 1.6's own pull downloads every layer blob and applies it. This
pull reads only the manifest and config from the registry, stores those two
in containerd's content store, and asks containerd to prepare each layer
bottom-up on the lazyerofs snapshotter with the labels that let the
snapshotter mount it lazily and answer "already exists" - so containerd
records the layer as unpacked without a byte of it. Then it registers the
image by name. All of it under a lease, so containerd's garbage collector
cannot remove a half-made image; afterwards garbage-collection labels on
the config and manifest keep the snapshots alive for as long as the image.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from lazyfs.containerd import labels
from lazyfs.containerd.client import Containerd
from lazyfs.errors import FormatError, LazyErofsError
from lazyfs.format.digest import verify_bytes
from lazyfs.format.seekable import MEDIA_TYPE_PLAIN, MEDIA_TYPE_SEEKABLE
from lazyfs.oci import RegistryClient, RegistryOptions, parse_reference

__all__ = ["PullResult", "chain_ids", "pull"]

# containerd's CRI caps the image-layers label near 4 KiB.
_LAYERS_LABEL_MAX = 4000


class PullError(LazyErofsError):
    pass


@dataclass(frozen=True)
class PullResult:
    name: str
    manifest_digest: str
    chain_id: str  # of the top layer: the image's rootfs snapshot
    layers: int
    lazily: int  # layers the snapshotter mounted lazily now
    present: int  # layers that were already there
    seconds: float


def chain_ids(diff_ids: Sequence[str]) -> list[str]:
    """The OCI chain ID of each layer (containerd's snapshot names)."""
    out: list[str] = []
    for diff in diff_ids:
        if not out:
            out.append(diff)
        else:
            out.append("sha256:" + hashlib.sha256(f"{out[-1]} {diff}".encode()).hexdigest())
    return out


async def _fetch(ref_text: str, options: RegistryOptions) -> tuple[Any, bytes]:
    ref = parse_reference(ref_text)
    async with RegistryClient(options) as client:
        resolved = await client.resolve(ref, with_config=False)
        desc = resolved.manifest.get("config")
        if not isinstance(desc, dict):
            raise FormatError(f"{ref}: the manifest has no config")
        config = await client.blob(ref, desc).read(0, desc["size"])
    verify_bytes(config, desc["digest"], f"{ref}: config")
    return resolved, config


def _layers_label(digests: list[str]) -> str:
    out = []
    size = 0
    for d in digests:
        size += len(d) + 1
        if size > _LAYERS_LABEL_MAX:
            break
        out.append(d)
    return ",".join(out)


def pull(
    ref_text: str,
    *,
    address: str,
    namespace: str = "default",
    snapshotter: str = "lazyerofs",
    options: RegistryOptions | None = None,
    progress: Callable[[str], None] = lambda _msg: None,
) -> PullResult:
    import trio

    started = time.monotonic()
    options = options or RegistryOptions()
    resolved, config_bytes = trio.run(_fetch, ref_text, options)
    ref = resolved.reference
    name = str(ref)  # containerd names images by the normalized reference
    try:
        config = json.loads(config_bytes)
        diff_ids = config["rootfs"]["diff_ids"]
        if not isinstance(diff_ids, list) or not all(isinstance(d, str) for d in diff_ids):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise FormatError(f"{ref}: the config has no rootfs.diff_ids list") from None
    layers = resolved.layers
    if len(diff_ids) != len(layers):
        raise FormatError(f"{ref}: {len(layers)} layers but {len(diff_ids)} diff_ids in the config")
    for i, layer in enumerate(layers):
        if layer["mediaType"] not in (MEDIA_TYPE_SEEKABLE, MEDIA_TYPE_PLAIN):
            raise PullError(
                f"{ref}: layer {i} ({layer['digest']}) is {layer['mediaType']}, not EROFS: "
                "a lazy pull needs an EROFS image (see 'lazyerofs convert'); pull it with containerd instead"
            )
    chains = chain_ids(diff_ids)
    digests = [layer["digest"] for layer in layers]
    manifest_desc = {
        "mediaType": resolved.media_type,
        "digest": resolved.digest,
        "size": len(resolved.manifest_bytes),
    }
    verify_bytes(resolved.manifest_bytes, resolved.digest, f"{ref}: manifest")

    lazily = present = 0
    with Containerd(address, namespace) as ctd:
        ctd.wait_ready(10)
        with ctd.leased():
            config_desc = resolved.manifest["config"]
            ctd.put_content(
                config_desc["digest"],
                config_bytes,
                {f"containerd.io/gc.ref.snapshot.{snapshotter}": chains[-1]},
            )
            ctd.put_content(
                resolved.digest,
                resolved.manifest_bytes,
                {"containerd.io/gc.ref.content.config": config_desc["digest"]},
            )
            parent = ""
            for i, (chain, digest) in enumerate(zip(chains, digests, strict=True)):
                if ctd.snapshot_exists(snapshotter, chain):
                    present += 1
                    progress(f"layer {i + 1}/{len(chains)} {digest[:19]}: already there")
                else:
                    key = f"lazyerofs-pull-{secrets.token_hex(6)} {chain}"
                    snapshot_labels = {
                        labels.TARGET: chain,
                        labels.IMAGE_REF: str(ref),
                        labels.MANIFEST_DIGEST: resolved.digest,
                        labels.LAYER_DIGEST: digest,
                        labels.IMAGE_LAYERS: _layers_label(digests[i:]),
                    }
                    t0 = time.monotonic()
                    if not ctd.prepare(snapshotter, key, parent, snapshot_labels):
                        ctd.remove_snapshot(snapshotter, key)
                        raise PullError(
                            f"snapshotter {snapshotter!r} did not mount layer {i} ({digest}) lazily; "
                            "is it lazyerofs, and can it reach the registry? (see its log)"
                        )
                    lazily += 1
                    progress(f"layer {i + 1}/{len(chains)} {digest[:19]}: mounted lazily ({time.monotonic() - t0:.2f}s)")
                parent = chain
            ctd.put_image(name, manifest_desc["mediaType"], resolved.digest, manifest_desc["size"], {})
    return PullResult(name, resolved.digest, chains[-1], len(chains), lazily, present, time.monotonic() - started)
