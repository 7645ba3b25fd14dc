"""``lazyerofs inspect REF``: an image's manifest and each layer's chunk table.

Fetches only what a mount fetches before serving anything: the manifest
(through an index if need be), the config, and each seekable layer's chunk
table (verified against the descriptor's ``chunk_digest``). No frame is
downloaded, and the report says how many bytes all that took.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import trio

from lazyfs.cli._registry_opts import options_from_args
from lazyfs.errors import LazyErofsError
from lazyfs.format import seekable
from lazyfs.oci import RegistryClient, parse_reference
from lazyfs.units import format_size

__all__ = ["inspect_image", "print_report", "run"]


async def inspect_image(args: argparse.Namespace) -> dict[str, Any]:
    """Resolve ``args.target`` and read every seekable layer's table; errors are collected per layer."""
    ref = parse_reference(args.target)
    async with RegistryClient(options_from_args(args)) as client:
        image = await client.resolve(ref)
        report: dict[str, Any] = {
            "reference": str(ref),
            "digest": image.digest,
            "digest_verified": image.digest_verified,
            "index_digest": image.index_digest,
            "mediaType": image.media_type,
            "manifest": image.manifest,
            "config": image.config,
            "layers": [],
            "errors": [],
        }
        for i, desc_dict in enumerate(image.layers):
            name = f"layer {i}"
            entry: dict[str, Any] = {
                "index": i,
                "digest": desc_dict["digest"],
                "mediaType": desc_dict.get("mediaType"),
                "size": desc_dict["size"],
            }
            report["layers"].append(entry)
            try:
                desc = seekable.parse_descriptor(desc_dict, name=name)
                if not desc.seekable:
                    entry["kind"] = (
                        "plain EROFS"
                        if desc.media_type == seekable.MEDIA_TYPE_PLAIN
                        else "not EROFS"
                    )
                    continue
                assert desc.table_offset is not None
                entry["kind"] = "seekable EROFS"
                blob = client.blob(ref, desc_dict)
                data = await blob.read(desc.table_offset, seekable.table_read_size(desc))
                table = seekable.read_chunk_table(data, desc, name=name)
                entry.update(
                    uncompressed_size=table.uncompressed_size,
                    chunk_size=table.chunk_size,
                    frame_count=table.frame_count,
                    compressed_size=table.compressed_size,
                    table_offset=table.table_offset,
                    chunk_digest=desc.chunk_digest,
                    verified=table.hash_algo == seekable.HASH_SHA512,
                )
                if getattr(args, "frames", False):
                    entry["frames"] = [
                        {"index": f, "offset": table.span(f)[0], "compressed": table.span(f)[1] - table.span(f)[0],
                         "raw": table.raw_length(f)}
                        for f in range(table.frame_count)
                    ]  # fmt: skip
                if desc.verity_offset is not None:
                    entry["dm_verity"] = {
                        "offset": desc.verity_offset,
                        "root_digest": desc.verity_root,
                    }
            except LazyErofsError as exc:
                entry["error"] = str(exc)
                report["errors"].append(str(exc))
        stats = client.statistics()
        report["fetched"] = {
            "requests": stats.requests,
            "bytes": stats.bytes_fetched,
            "retries": stats.retries,
        }
    return report


def print_report(report: dict[str, Any]) -> None:
    print(f"image        {report['reference']}")
    if report["index_digest"]:
        print(f"index        {report['index_digest']}")
    # Verified: pinned by digest, or the registry's Docker-Content-Digest
    # matched. Without either, nothing vouches for the manifest's bytes.
    state = (
        "(verified)"
        if report["digest_verified"]
        else "unverified (no digest header; pin by digest)"
    )
    print(f"manifest     {report['digest']}  {state}")
    print(f"media type   {report['mediaType']}")
    config = report.get("config") or {}
    if config:
        plat = "/".join(str(config[k]) for k in ("os", "architecture", "variant") if config.get(k))
        print(f"platform     {plat or '?'}")
    print(f"layers       {len(report['layers'])}")
    for entry in report["layers"]:
        print(f"  [{entry['index']}] {entry['digest']}")
        print(
            f"      {entry.get('kind', '?')}, {entry['mediaType']}, blob {format_size(entry['size'])}"
        )
        if "error" in entry:
            print(f"      ERROR: {entry['error']}")
            continue
        if "frame_count" not in entry:
            continue
        usize, csize = entry["uncompressed_size"], entry["compressed_size"]
        ratio = csize / usize if usize else 0.0
        print(
            f"      image {format_size(usize)} in {entry['frame_count']} frames of "
            f"{format_size(entry['chunk_size'])}, compressed {format_size(csize)} (ratio {ratio:.3f})"
        )
        state = "verified" if entry["verified"] else "NOT VERIFIABLE (no checksums)"
        print(f"      chunk table at {entry['table_offset']}, {entry['chunk_digest']} ({state})")
        if "dm_verity" in entry:
            v = entry["dm_verity"]
            print(f"      dm-verity at {v['offset']}, root {v['root_digest']}")
        for fr in entry.get("frames", []):
            print(
                f"      frame {fr['index']:>6} offset {fr['offset']:>12} compressed {fr['compressed']:>9} raw {fr['raw']:>9}"
            )
    f = report["fetched"]
    print(
        f"fetched      {format_size(f['bytes'])} ({f['bytes']} bytes) in {f['requests']} requests"
    )


def run(args: argparse.Namespace) -> int:
    """Entry point used by ``lazyfs.cli.inspect`` when TARGET is not a local file."""
    report = trio.run(inspect_image, args)
    if getattr(args, "json", False):
        json.dump(report, sys.stdout, indent=2)
        print()
    else:
        print_report(report)
    for err in report["errors"]:
        print(f"lazyerofs: check failed: {err}", file=sys.stderr)
    return 1 if report["errors"] else 0
