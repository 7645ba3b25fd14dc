"""``lazyerofs snapshotter``: a containerd proxy snapshotter for seekable EROFS."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from lazyfs.cli._registry_opts import add_registry_options, options_from_args, registry_argv
from lazyfs.errors import MountError
from lazyfs.units import parse_size

DEFAULT_ROOT = "/var/lib/lazyerofs/snapshotter"
DEFAULT_ADDRESS = "/run/lazyerofs/snapshotter.sock"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "snapshotter",
        help="serve containerd's snapshots API: containers start from lazily fetched layers",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=f"""\
A containerd proxy snapshotter, in the foreground (run it under systemd;
examples/lazyerofs-snapshotter.service). containerd finds it through its
config (examples/containerd-config.toml):

  [proxy_plugins.lazyerofs]
    type = "snapshot"
    address = "{DEFAULT_ADDRESS}"

When containerd prepares a layer with the labels containerd.io/snapshot.ref
(its chain ID) and containerd.io/snapshot/cri.{{image-ref,manifest-digest,
layer-digest}} - as 'lazyerofs pull' does, and CRI with
disable_snapshot_annotations = false - and the layer is seekable EROFS, the
snapshotter mounts it lazily ('lazyerofs mount' of the image, one daemon per
image, then the kernel EROFS driver) and containerd skips downloading it.
Any other layer is an ordinary overlayfs snapshot that containerd fills.
Containers get overlayfs with a writable upper dir under ROOT.

State lives in ROOT/metadata.db (sqlite). Mounts outlive the snapshotter:
containers keep running while it is stopped, and a restart adopts the image
daemons still running and mounts again what is gone. Needs root.""",
        epilog="""\
examples:
  lazyerofs snapshotter --root /var/lib/lazyerofs/snapshotter
  lazyerofs pull --address /run/containerd/containerd.sock localhost:5000/app:v1
  ctr run --snapshotter lazyerofs --rm localhost:5000/app:v1 demo python3 -V""",
    )
    p.add_argument("--address", default=DEFAULT_ADDRESS, metavar="SOCK", help=f"unix socket to serve on (default: {DEFAULT_ADDRESS})")
    p.add_argument("--root", default=DEFAULT_ROOT, metavar="DIR", help=f"state and snapshot directory (default: {DEFAULT_ROOT})")
    p.add_argument("--metrics", metavar="HOST:PORT", help="serve Prometheus metrics at http://HOST:PORT/metrics (e.g. 127.0.0.1:9101)")
    p.add_argument("--no-remote", action="store_true", help="never mount layers lazily (a plain overlayfs snapshotter)")
    p.add_argument(
        "--unmount-all",
        action="store_true",
        help="do not serve: unmount every layer and image under ROOT and exit (containers using them get EIO)",
    )
    g = p.add_argument_group("lazy mounts (passed to each image's 'lazyerofs mount')")
    g.add_argument("--cache-dir", metavar="DIR", help="chunk cache directory (default: /var/cache/lazyerofs)")
    g.add_argument("--cache-size", type=parse_size, metavar="SIZE", help="disk budget of the chunk cache, e.g. 10GiB")
    g.add_argument(
        "--no-prefetch",
        action="store_true",
        help="fetch only what containers read (default: once an image is mounted, fetch the rest in the background, "
        "pausing while reads wait, as stargz and nydus snapshotters do)",
    )
    g.add_argument("--mount-option", action="append", default=[], metavar="FLAG", help="another 'lazyerofs mount' flag, e.g. --mount-option=--prefetch (repeatable)")
    add_registry_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        raise MountError("the snapshotter mounts filesystems and needs root")
    root = Path(args.root).absolute()
    if args.unmount_all:
        from lazyfs.snapshotter.teardown import unmount_all

        n = unmount_all(root)
        print(f"unmounted {n} mount(s) under {root}")
        return 0
    options = options_from_args(args)
    mount_args = registry_argv(options)
    if args.cache_dir:
        mount_args += ["--cache-dir", os.path.abspath(args.cache_dir)]
    if args.cache_size:
        mount_args += ["--cache-size", str(args.cache_size)]
    mount_args.append("--no-prefetch" if args.no_prefetch else "--prefetch")
    mount_args += args.mount_option
    if args.metrics and ":" not in args.metrics:
        raise MountError(f"--metrics wants HOST:PORT, not {args.metrics!r}")
    # The snapshotter logs at info unless told otherwise, with times: it is a service.
    if args.log_level == "warning":
        logging.getLogger().setLevel(logging.INFO)
    for handler in logging.getLogger().handlers:
        handler.setFormatter(logging.Formatter("%(asctime)s lazyerofs: %(levelname)s: %(name)s: %(message)s"))
    logging.getLogger("lazyfs").setLevel(logging.getLogger().level)

    from lazyfs.snapshotter.server import ServeConfig, serve

    cfg = ServeConfig(
        address=args.address,
        root=root,
        mount_args=mount_args,
        password=options.password,
        metrics=args.metrics,
        log_level=args.log_level,
        remote=not args.no_remote,
    )
    return serve(cfg, ready=lambda: print(f"lazyerofs snapshotter: ready on {cfg.address}", file=sys.stderr, flush=True))
