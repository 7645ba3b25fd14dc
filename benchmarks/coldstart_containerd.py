"""Cold start of a container through containerd: lazy pull vs containerd's own pull.

The same Debian minbase + python3 rootfs, split into the same three layers
as ``benchmarks.coldstart``, is pushed twice to a real ``docker-registry``:

* as an ordinary OCI image with ``tar+gzip`` layers (what registries hold
  today), for ``ctr image pull`` + ``ctr run`` on containerd's default
  overlayfs snapshotter: download every layer, gunzip, untar, then start;
* as seekable EROFS (4 MiB frames, as containerd's converter makes them), for
  ``lazyerofs pull`` + ``ctr run --snapshotter lazyerofs``: manifest and
  config only, then the container starts and fetches what it reads.

Each run is cold and alone: a fresh containerd (own root, state, socket),
a fresh snapshotter with an empty chunk cache, page cache dropped, and a
fresh emulated link (``tests.support.netproxy.NetProxy``: per-request RTT,
shared bandwidth cap) in front of the registry. Both strategies run side by
side at each point, so their ratio is what to read on a noisy machine.

Run: ``.venv/bin/python -m benchmarks.coldstart_containerd`` (root). Writes
``benchmarks/results/coldstart_containerd.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import _image
from benchmarks._bytecode import compile_bytecode
from tests.support.containerd import Containerd, Snapshotter, push_tar_image
from tests.support.localregistry import LocalRegistry
from tests.support.netproxy import NetProxy
from tests.support.system import drop_caches

HERE = Path(__file__).resolve().parent
WORK = HERE / ".work"
RESULTS = HERE / "results"
LAZYEROFS = [sys.executable, "-m", "lazyfs.cli"]
WORKLOAD = ["python3", "-c", "import json, email, http.client, decimal, asyncio, logging, argparse, subprocess"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.coldstart_containerd",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--rtt-ms", default="20", help="round-trip times to emulate, ms (comma-separated)")
    p.add_argument("--mbit", default="100", help="bandwidth caps, Mbit/s (comma-separated)")
    p.add_argument("--repeat", type=int, default=3, help="runs per strategy and point (the table shows medians)")
    p.add_argument("--chunk-size", default="4MiB", help="seekable EROFS frame size")
    p.add_argument("--strategies", default="containerd,lazy", help="which strategies to run")
    p.add_argument(
        "--mount-option",
        action="append",
        default=[],
        metavar="FLAG",
        help="a 'lazyerofs mount' flag for the snapshotter's image mounts, e.g. --mount-option=--prefetch",
    )
    p.add_argument("--work", type=Path, default=WORK, help="scratch and cache directory")
    p.add_argument("--results", type=Path, default=RESULTS, help="output directory")
    p.add_argument("--name", default="coldstart_containerd", help="output file stem")
    args = p.parse_args(argv)
    args.rtt_list = [float(x) for x in args.rtt_ms.split(",") if x.strip()]
    args.mbit_list = [float(x) for x in args.mbit.split(",") if x.strip()]
    return args




# -- the two images


def layer_trees(work: Path) -> list[Path]:
    """The rootfs split into layer directories (cached)."""
    root = _image.debian_rootfs(work)
    out = work / "ctd-trees"
    stamp = out / "stamp"
    key = json.dumps({"spec": _image.LAYER_SPEC, "mtime": (root / "usr/bin").stat().st_mtime_ns})
    if stamp.exists() and stamp.read_text() == key:
        return sorted(p for p in out.iterdir() if p.is_dir())
    trees = _image.split_tree(root, out)
    stamp.write_text(key)
    return trees


def push_erofs_image(trees: list[Path], ref: str, chunk_size: str) -> dict[str, Any]:
    subprocess.run([*LAZYEROFS, "push", "--chunk-size", chunk_size, *map(str, trees), ref], check=True, capture_output=True)
    out = subprocess.run([*LAZYEROFS, "inspect", "--json", ref], capture_output=True, text=True)
    blob_bytes = None
    if out.returncode == 0:
        try:
            info = json.loads(out.stdout)
            blob_bytes = sum(layer.get("size", 0) for layer in info.get("layers", []))
        except ValueError:
            pass
    return {"blob_bytes": blob_bytes, "layers": len(trees)}


# -- one run


def one_run(strategy: str, upstream: str, rtt_ms: float, mbit: float, mount_options: list[str]) -> dict[str, Any]:
    scratch = Path(f"/tmp/lzb-{os.getpid()}")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    sn = Snapshotter(scratch, extra=tuple(f"--mount-option={o}" for o in mount_options))
    ctd = Containerd(scratch, sn)
    try:
        sn.start()
        ctd.start()
        with NetProxy(upstream, rtt=rtt_ms / 1000, bandwidth_bps=mbit * 1e6) as proxy:
            drop_caches()
            t0 = time.monotonic()
            if strategy == "containerd":
                image = f"{proxy.host}/bench/debian:tgz"
                ctd.ctr("images", "pull", "--plain-http", image, timeout=900)
                pulled = time.monotonic()
                run = ctd.ctr("run", "--rm", image, "bench", *WORKLOAD, timeout=900)
            else:
                image = f"{proxy.host}/bench/debian:erofs"
                subprocess.run(
                    [*LAZYEROFS, "pull", "-q", "--plain-http", "--address", ctd.address, image],
                    check=True, capture_output=True, timeout=900,
                )  # fmt: skip
                pulled = time.monotonic()
                run = ctd.ctr("run", "--rm", "--snapshotter", "lazyerofs", image, "bench", *WORKLOAD, timeout=900)
            done = time.monotonic()
            stats = proxy.stats()
        if run.returncode != 0:
            raise RuntimeError(f"{strategy}: workload failed: {run.stderr}")
        return {
            "strategy": strategy,
            "rtt_ms": rtt_ms,
            "mbit": mbit,
            "pull_s": pulled - t0,
            "run_s": done - pulled,
            "total_s": done - t0,
            "requests": stats.requests,
            "bytes_fetched": stats.bytes_sent,
        }
    finally:
        ctd.teardown()
        sn.teardown()
        shutil.rmtree(scratch, ignore_errors=True)


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        "# Cold start through containerd: `lazyerofs pull` + `ctr run` vs `ctr image pull` + `ctr run`",
        "",
        f"Image: {meta['image']}. Workload: `{' '.join(WORKLOAD)}`. Medians of {meta['repeat']} cold runs per cell, "
        "both strategies side by side at each point. `containerd` = tar+gzip image, overlayfs snapshotter; "
        "`lazy` = seekable EROFS, lazyerofs snapshotter, empty chunk cache.",
        "",
        "| RTT | bandwidth | strategy | pull s | run s | total s | MB fetched | requests | lazy speed-up |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for point in meta["points"]:
        cells = {r["strategy"]: r for r in point["medians"]}
        speedup = cells["containerd"]["total_s"] / cells["lazy"]["total_s"] if "containerd" in cells and "lazy" in cells else None
        for strategy in ("containerd", "lazy"):
            c = cells.get(strategy)
            if c is None:
                continue
            lines.append(
                f"| {point['rtt_ms']:g} ms | {point['mbit']:g} Mbit/s | {strategy} | {c['pull_s']:.2f} | {c['run_s']:.2f} | "
                f"{c['total_s']:.2f} | {c['bytes_fetched'] / 1e6:.1f} | {c['requests']:.0f} | "
                + (f"{speedup:.2f}x" if strategy == "lazy" and speedup else "")
                + " |"
            )
    lines += ["", f"Machine: {meta['machine']}", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("needs root (containerd, mounts, drop_caches)")
    compile_bytecode()  # time the snapshotter as an installed copy runs
    work = args.work.resolve()
    trees = layer_trees(work)
    storage = work / "ctd-registry"
    shutil.rmtree(storage, ignore_errors=True)
    registry = LocalRegistry(storage)
    registry.start()
    try:
        tgz = push_tar_image(trees, f"{registry.host}/bench/debian:tgz", work)
        erofs = push_erofs_image(trees, f"{registry.host}/bench/debian:erofs", args.chunk_size)
        print(f"[bench] pushed tar+gzip ({tgz['blob_bytes'] / 1e6:.1f} MB) and seekable EROFS images", flush=True)
        points = []
        runs: list[dict[str, Any]] = []
        for rtt in args.rtt_list:
            for mbit in args.mbit_list:
                point_runs: list[dict[str, Any]] = []
                for i in range(args.repeat):
                    for strategy in args.strategies.split(","):
                        r = one_run(strategy, registry.url, rtt, mbit, args.mount_option)
                        print(f"[bench] {rtt:g} ms {mbit:g} Mbit/s {strategy} #{i + 1}: pull {r['pull_s']:.2f}s "
                              f"run {r['run_s']:.2f}s total {r['total_s']:.2f}s, {r['bytes_fetched'] / 1e6:.1f} MB", flush=True)  # fmt: skip
                        point_runs.append(r)
                runs += point_runs
                medians = []
                for strategy in args.strategies.split(","):
                    mine = [r for r in point_runs if r["strategy"] == strategy]
                    medians.append(
                        {"strategy": strategy, **{k: statistics.median(r[k] for r in mine) for k in ("pull_s", "run_s", "total_s", "requests", "bytes_fetched")}}
                    )
                points.append({"rtt_ms": rtt, "mbit": mbit, "medians": medians})
    finally:
        registry.stop()
    meta = {
        "image": f"Debian bookworm minbase + python3, {len(trees)} layers; tar+gzip {tgz['blob_bytes'] / 1e6:.1f} MB, "
        f"seekable EROFS {args.chunk_size} frames"
        + (f" {erofs['blob_bytes'] / 1e6:.1f} MB" if erofs.get("blob_bytes") else ""),
        "repeat": args.repeat,
        "points": points,
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, Linux {platform.release()}",
    }
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"{args.name}.json").write_text(json.dumps({"meta": meta, "runs": runs}, indent=2))
    (args.results / f"{args.name}.md").write_text(markdown(runs, meta))
    print(markdown(runs, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
