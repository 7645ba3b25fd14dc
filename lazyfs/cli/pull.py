"""``lazyerofs pull``: a lazy pull into containerd, through the lazyerofs snapshotter."""

from __future__ import annotations

import argparse
import json
import sys

from lazyfs.cli._registry_opts import add_registry_options, options_from_args

DEFAULT_CONTAINERD = "/run/containerd/containerd.sock"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pull",
        help="pull an image into containerd lazily (manifest and config only)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""\
Pull REF into containerd without downloading its layers: the manifest and
config go into containerd's content store, and each layer is prepared on the
lazyerofs snapshotter, which mounts it lazily ('lazyerofs snapshotter' must
be running and configured in containerd as a proxy snapshotter). Afterwards
'ctr run --snapshotter lazyerofs REF ID CMD' starts a container that fetches
only what it reads. Every layer must be EROFS (seekable or plain); convert
other images with 'lazyerofs convert'. Works with containerd 1.6 and later.""",
        epilog="""\
examples:
  lazyerofs pull localhost:5000/app:v1
  ctr run --rm --snapshotter lazyerofs localhost:5000/app:v1 demo python3 -V
  lazyerofs pull --address /run/k3s/containerd/containerd.sock -n k8s.io registry.example/app:v1""",
    )
    p.add_argument("ref", metavar="REF", help="image reference")
    p.add_argument("--address", default=DEFAULT_CONTAINERD, metavar="SOCK", help=f"containerd's socket (default: {DEFAULT_CONTAINERD})")
    p.add_argument("-n", "--namespace", default="default", metavar="NS", help="containerd namespace (default: default; Kubernetes uses k8s.io)")
    p.add_argument("--snapshotter", default="lazyerofs", metavar="NAME", help="the proxy snapshotter's name in containerd's config (default: lazyerofs)")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    add_registry_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lazyfs.containerd.pull import pull

    def progress(msg: str) -> None:
        if not args.quiet:
            print(f"lazyerofs: {msg}", file=sys.stderr, flush=True)

    result = pull(
        args.ref,
        address=args.address,
        namespace=args.namespace,
        snapshotter=args.snapshotter,
        options=options_from_args(args),
        progress=progress,
    )
    if args.json:
        json.dump(result.__dict__, sys.stdout, indent=2)
        print()
    else:
        print(
            f"{result.name}: {result.layers} layer(s), {result.lazily} mounted lazily, "
            f"{result.present} already present, in {result.seconds:.2f}s ({result.manifest_digest})"
        )
    return 0
