"""Mount and umount at scale: an image of many tiny layers, with and without --rootfs.

Issue 13 asks for an image of any number of layers to mount as a rootfs (the
overlay's own limit is 500 lowers) and for ``umount`` to return as soon as
everything is down. This measures, with the real CLI against a local
``docker-registry`` on loopback:

* ``mount``: wall time of ``lazyerofs mount`` until it returns (the daemon
  reported the FUSE tree ready), without ``--rootfs``, with an empty chunk
  cache (cold) and again on the filled one (warm);
* ``mount --rootfs``: the same, also EROFS-mounting every layer and stacking
  them with overlayfs;
* ``umount``: wall time of ``lazyerofs umount`` of each of those mounts, until
  nothing of it is left.

Medians of ``--repeat`` (default 3). Each image has N layers; layer i holds
``layers/<i>.txt`` and a ``top.txt`` saying ``i``, so the rootfs is checked
once per size: every layer's file is there and ``top.txt`` comes from the
top layer. Targets (issue 13): 100-layer rootfs mount <= 3 s, umount <= 0.5 s.

Run as root: ``.venv/bin/python -m benchmarks.mount_scale``; writes
``benchmarks/results/mount_scale.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lazyfs.mount import kernel as kmount
from tests.support.localregistry import LocalRegistry

RESULTS = Path(__file__).resolve().parent / "results"
LAZYEROFS = str(Path(sys.executable).parent / "lazyerofs")
TARGET_ROOTFS_100_S = 3.0
TARGET_UMOUNT_S = 0.5


def lazy(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([LAZYEROFS, *args], capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=600)
    if check and proc.returncode != 0:
        raise RuntimeError(f"lazyerofs {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def make_layer_dirs(root: Path, count: int) -> list[Path]:
    """``count`` tiny trees: layer i has its own file and its own ``top.txt``."""
    dirs = []
    for i in range(count):
        d = root / f"l{i}"
        (d / "layers").mkdir(parents=True, exist_ok=True)
        (d / "layers" / f"{i}.txt").write_text(f"layer {i}\n")
        (d / "top.txt").write_text(f"{i}\n")
        dirs.append(d)
    return dirs


def push_image(registry: LocalRegistry, work: Path, count: int) -> str:
    ref = f"{registry.host}/bench/layers{count}:v1"
    dirs = make_layer_dirs(work / f"trees{count}", count)
    lazy("push", "--chunk-size", "64KiB", *map(str, dirs), ref)
    return ref


def check_rootfs(rootfs: Path, count: int) -> None:
    """Every layer's file is visible and the top layer shadows the others."""
    missing = [i for i in range(count) if (rootfs / "layers" / f"{i}.txt").read_text() != f"layer {i}\n"]
    if missing:
        raise RuntimeError(f"rootfs of {count} layers misses layers {missing[:10]}")
    top = (rootfs / "top.txt").read_text().strip()
    if top != str(count - 1):
        raise RuntimeError(f"rootfs of {count} layers: top.txt is {top!r}, not from the top layer")


def leftovers(*paths: Path) -> list[str]:
    real = [os.path.realpath(p) for p in paths]
    return [t for t, _fs, _src in kmount.mounts() if any(t == p or t.startswith(p + "/") for p in real)]


def measure(ref: str, work: Path, count: int, rootfs: bool, cache: Path, checked: set[int]) -> dict[str, float | str]:
    """One mount with chunk cache ``cache`` and its umount: seconds, or the error."""
    tag = f"{count}-{'r' if rootfs else 'f'}-{time.monotonic_ns()}"
    mnt, root = work / f"mnt-{tag}", work / f"rootfs-{tag}"
    mnt.mkdir()
    args = ["mount", ref, str(mnt), "--cache-dir", str(cache)]
    if rootfs:
        root.mkdir()
        args += ["--rootfs", str(root)]
    t0 = time.monotonic()
    proc = lazy(*args, check=False)
    t_mount = time.monotonic() - t0
    if proc.returncode != 0:
        lazy("umount", str(mnt), check=False)
        lines = [line for line in proc.stderr.splitlines() if "error" in line] or [f"exit {proc.returncode}"]
        # The paths differ every run: one kind of failure reads as one error.
        return {"error": re.sub(re.escape(str(work)) + r"/[^ :]*", "<dir>", lines[-1])}
    try:
        if rootfs and count not in checked:
            check_rootfs(root, count)
            checked.add(count)
    finally:
        t0 = time.monotonic()
        lazy("umount", str(mnt))
        t_umount = time.monotonic() - t0
    left = leftovers(mnt, root)
    if left:
        raise RuntimeError(f"umount left {left}")
    return {"mount_s": t_mount, "umount_s": t_umount}


def median_of(runs: list[dict[str, float | str]], key: str) -> float | None:
    values = [r[key] for r in runs if isinstance(r.get(key), float)]
    return statistics.median(values) if values else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", default="3,100,500", help="comma-separated layer counts (default 3,100,500)")
    ap.add_argument("--repeat", type=int, default=3, help="repetitions per case (default 3)")
    ap.add_argument("--label", default="", help="appended to the output names (e.g. 'before')")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("mount_scale: needs root (FUSE, kernel EROFS and overlay mounts)", file=sys.stderr)
        return 1
    counts = [int(x) for x in args.layers.split(",") if x]
    work = Path(tempfile.mkdtemp(prefix="lazyerofs-mount-scale-"))
    registry = LocalRegistry(work / "registry")
    rows: list[dict] = []
    try:
        registry.start()
        for count in counts:
            t0 = time.monotonic()
            ref = push_image(registry, work, count)
            push_s = time.monotonic() - t0
            print(f"{count} layers pushed in {push_s:.1f}s", flush=True)
            checked: set[int] = set()
            for rootfs in (False, True):
                cold, warm = [], []
                for rep in range(args.repeat):
                    cache = work / f"cache-{count}-{rootfs}-{rep}"
                    cold.append(measure(ref, work, count, rootfs, cache, checked))  # empty chunk cache
                    warm.append(measure(ref, work, count, rootfs, cache, checked))  # the same, now filled
                row = {
                    "layers": count,
                    "rootfs": rootfs,
                    "cold": cold,
                    "warm": warm,
                    "mount_cold_s": median_of(cold, "mount_s"),
                    "mount_warm_s": median_of(warm, "mount_s"),
                    "umount_s": median_of(cold + warm, "umount_s"),
                    "errors": sorted({str(r["error"]) for r in cold + warm if "error" in r}),
                }
                rows.append(row)
                print(
                    f"  {count} layers, rootfs={rootfs}: mount cold {row['mount_cold_s']}, "
                    f"warm {row['mount_warm_s']}, umount {row['umount_s']}"
                    + (f", errors {row['errors']}" if row["errors"] else ""),
                    flush=True,
                )
    finally:
        registry.stop()
        subprocess.run(["rm", "-rf", str(work)], check=False)

    result = {
        "repeat": args.repeat,
        "label": args.label,
        "targets": {"rootfs_100_mount_s": TARGET_ROOTFS_100_S, "umount_s": TARGET_UMOUNT_S},
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version()},
        "rows": rows,
    }
    suffix = f"-{args.label}" if args.label else ""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"mount_scale{suffix}.json").write_text(json.dumps(result, indent=2) + "\n")
    md = report(result)
    (RESULTS / f"mount_scale{suffix}.md").write_text(md)
    print(md, end="")
    return 0


def report(result: dict) -> str:
    """The Markdown table of one run's JSON."""

    def fmt(v: float | None) -> str:
        return "failed" if v is None else f"{v:.2f}"

    machine = result["machine"]
    label = f" ({result['label']})" if result.get("label") else ""
    lines = [
        f"# Mount and umount of N tiny layers{label}, medians of {result['repeat']}, loopback registry",
        "",
        f"Kernel {machine['kernel']}, {machine['cpus']} CPUs. Targets (issue 13): 100-layer "
        f"rootfs mount <= {TARGET_ROOTFS_100_S:g} s, umount <= {TARGET_UMOUNT_S:g} s.",
        "",
        "| layers | --rootfs | mount, cold cache (s) | mount, warm cache (s) | umount (s) | errors |",
        "|---:|:---:|---:|---:|---:|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['layers']} | {'yes' if r['rootfs'] else 'no'} | {fmt(r['mount_cold_s'])} "
            f"| {fmt(r['mount_warm_s'])} | {fmt(r['umount_s'])} | {'; '.join(r['errors'])} |"
        )
    lines += [
        "",
        "Mount: `lazyerofs mount` until it returns (the daemon reported the mount ready); cold = empty",
        "chunk cache (every superblock fetched from the registry), warm = a second mount on the same cache.",
        "Umount: `lazyerofs umount` until it returns with nothing left mounted (median of all mounts of the row).",
    ]
    return "\n".join(lines) + "\n"

if __name__ == "__main__":
    sys.exit(main())
