"""``lazyerofs profile``: save, show and push startup profiles.

    profile save DIR -o FILE     what the live mount at DIR has read, in order
    profile show FILE|REF        a profile file, or the one pushed for image REF
    profile push FILE REF        store FILE in the registry, referring to REF's manifest

The schema is documented in :mod:`lazyfs.fetch.profile`; ``lazyerofs mount``
replays the pushed profile of an image by default.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from lazyfs.cli._files import write_atomic
from lazyfs.cli._registry_opts import add_registry_options, options_from_args
from lazyfs.errors import FormatError, NotFoundError

__all__ = ["register", "run"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "profile",
        help="save, show or push a startup profile (the frames a workload reads first)",
        description=(
            "A startup profile lists, per layer, the frames a mount read in first-read order. "
            "Save it from a live mount after running a workload, push it next to the image, "
            "and every later 'lazyerofs mount' of the image fetches those frames ahead of the "
            "reads that want them."
        ),
        epilog="""\
examples:
  lazyerofs profile save /mnt/app -o app.profile.json
  lazyerofs profile push app.profile.json localhost:5000/app:v1
  lazyerofs profile show localhost:5000/app:v1""",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub2 = p.add_subparsers(dest="profile_command", metavar="ACTION", required=True)

    s = sub2.add_parser("save", help="write what a live mount has read as a profile")
    s.add_argument("mountpoint", metavar="DIR", help="a lazyerofs mount point")
    s.add_argument("-o", "--output", metavar="FILE", required=True, help="where to write it ('-': stdout)")
    s.set_defaults(func=run_save)

    sh = sub2.add_parser("show", help="print a profile readably")
    sh.add_argument("source", metavar="FILE|REF", help="a profile file, or an image reference to look one up for")
    sh.add_argument("--json", action="store_true", help="print the profile's JSON instead")
    sh.add_argument("--frames", type=int, default=40, metavar="N", help="frames to list per layer (default: 40)")
    add_registry_options(sh)
    sh.set_defaults(func=run_show)

    pu = sub2.add_parser("push", help="store a profile in the registry, referring to an image")
    pu.add_argument("file", metavar="FILE", help="a profile ('lazyerofs profile save')")
    pu.add_argument("ref", metavar="REF", help="the image it is for, e.g. localhost:5000/app:v1")
    add_registry_options(pu)
    pu.set_defaults(func=run_push)


def run(args: argparse.Namespace) -> int:
    return int(args.func(args))


# ------------------------------------------------------------------ save


def run_save(args: argparse.Namespace) -> int:
    from lazyfs.fetch.profile import dump_profile, parse_profile
    from lazyfs.mount.image import read_profile_record

    data = read_profile_record(args.mountpoint)
    profile = parse_profile(data, name=f"{args.mountpoint}: recorded profile")
    out = dump_profile(profile)
    if args.output == "-":
        sys.stdout.buffer.write(out)
    else:
        write_atomic(args.output, out)
    layers = sum(1 for layer in profile.layers if layer.frames)
    print(
        f"lazyerofs: saved {profile.frame_total} frames of {layers} layers"
        + (" (recording truncated)" if profile.truncated else "")
        + ("" if args.output == "-" else f" to {args.output}"),
        file=sys.stderr,
    )
    return 0


# ------------------------------------------------------------------ show


def run_show(args: argparse.Namespace) -> int:
    from lazyfs.fetch.profile import MAX_PROFILE_BYTES, parse_profile

    if os.path.exists(args.source):
        with open(args.source, "rb") as f:
            data = f.read(MAX_PROFILE_BYTES + 1)
        where = args.source
    else:
        data, where = _lookup(args)
    profile = parse_profile(data, name=where)
    if args.json:
        json.dump(profile.to_dict(), sys.stdout, indent=2)
        print()
        return 0
    print(f"profile   {where}")
    print(f"image     {profile.image or '-'}")
    print(f"created   {profile.created or '-'}")
    last = max((t for layer in profile.layers for t in layer.times_ms), default=0)
    print(
        f"frames    {profile.frame_total} in {len(profile.layers)} layers, last first read at {last / 1000:.3f}s"
        + ("  (recording truncated)" if profile.truncated else "")
    )
    for n, layer in enumerate(profile.layers):
        chunk = f"{layer.chunk_size >> 10} KiB frames" if layer.chunk_size else "frame size ?"
        total = f" of {layer.frame_count}" if layer.frame_count else ""
        print(f"layer {n}   {layer.digest[:19]}  {chunk}  {len(layer.frames)}{total} frames read")
        if layer.frames:
            print("  order   " + _runs(layer.frames, layer.times_ms, args.frames))
    return 0


def _runs(frames: Sequence[int], times: Sequence[int], limit: int) -> str:
    """``0-3@0ms 17@12ms ...``: consecutive frames read in a row folded into one run."""
    parts = []
    shown = 0
    k = 0
    while k < len(frames) and shown < limit:
        j = k
        while j + 1 < len(frames) and frames[j + 1] == frames[j] + 1:
            j += 1
        run = f"{frames[k]}" if j == k else f"{frames[k]}-{frames[j]}"
        parts.append(f"{run}@{times[k]}ms")
        shown += j - k + 1
        k = j + 1
    if k < len(frames):
        parts.append(f"... ({len(frames) - k} more)")
    return " ".join(parts)


def _lookup(args: argparse.Namespace) -> tuple[bytes, str]:
    import trio

    from lazyfs.fetch.profile import MAX_PROFILE_BYTES, MEDIA_TYPE_PROFILE
    from lazyfs.oci import RegistryClient, parse_reference
    from lazyfs.oci.referrers import find_artifact

    try:
        ref = parse_reference(args.source)
    except FormatError as exc:
        raise FormatError(f"{args.source}: neither a file nor an image reference ({exc})") from exc
    options = options_from_args(args)

    async def go() -> tuple[bytes, str]:
        async with RegistryClient(options) as client:
            resolved = await client.resolve(ref, with_config=False)
            artifact = await find_artifact(client, ref, resolved.digest, MEDIA_TYPE_PROFILE, max_size=MAX_PROFILE_BYTES)
            if artifact is None:
                raise NotFoundError(f"{ref}: no startup profile refers to manifest {resolved.digest}")
            return artifact.data, f"{ref.name}@{artifact.digest} (via the {artifact.via})"

    return trio.run(go)


# ------------------------------------------------------------------ push


def run_push(args: argparse.Namespace) -> int:
    import trio

    from lazyfs.fetch.profile import MAX_PROFILE_BYTES, MEDIA_TYPE_PROFILE, parse_profile
    from lazyfs.oci import RegistryClient, parse_reference
    from lazyfs.oci.referrers import ANNOTATION_CREATED, push_artifact

    ref = parse_reference(args.ref)
    try:
        with open(args.file, "rb") as f:
            data = f.read(MAX_PROFILE_BYTES + 1)
    except OSError as exc:
        raise FormatError(f"{args.file}: cannot read: {exc.strerror}") from exc
    profile = parse_profile(data, name=args.file)
    options = options_from_args(args)

    async def go() -> tuple[str, str, str]:
        async with RegistryClient(options) as client:
            resolved = await client.resolve(ref, with_config=False)
            image_layers = {d["digest"] for d in resolved.layers}
            known = [layer for layer in profile.layers if layer.digest in image_layers]
            if profile.layers and not known:
                raise FormatError(f"{args.file}: none of its {len(profile.layers)} layers is a layer of {ref}")
            for layer in profile.layers:
                if layer.digest not in image_layers:
                    print(f"lazyerofs: warning: {args.file}: layer {layer.digest[:19]} is not in {ref}; it will be ignored", file=sys.stderr)
            subject = {"mediaType": resolved.media_type, "digest": resolved.digest, "size": len(resolved.manifest_bytes)}
            annotations = {ANNOTATION_CREATED: profile.created or _now()}
            pushed = await push_artifact(client, ref, subject, MEDIA_TYPE_PROFILE, data, annotations=annotations)
            return pushed.digest, pushed.via, resolved.digest

    digest, via, subject = trio.run(go)
    print(f"lazyerofs: pushed profile {digest} for {ref.name}@{subject} (findable through the {via})", file=sys.stderr)
    print(digest)
    return 0


def _now() -> str:
    import time

    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
