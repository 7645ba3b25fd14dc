"""Cold start of a container rootfs: eager pull vs lazy mount vs the physical limit.

The question: how long from "run this image" to "the program finished" when
the image is a Debian minbase + python3 split into three seekable EROFS
layers, served by a real ``docker-registry`` behind an emulated network
(per-request RTT, shared bandwidth cap), for

* ``eager``: what containerd's EROFS differ does today: download every blob
  whole, verify and decode every frame, write ``layer.erofs``, kernel-mount
  each layer, stack them with overlayfs, chroot and run;
* ``lazy``: ``lazyerofs mount --rootfs`` with an empty chunk cache and the
  default policy (the rest of the image is fetched in the background once
  mounted, stepping aside for on-demand reads);
* ``lazy-warm``: the same with the whole image in the chunk cache (the
  cache the ``lazy`` run left, completed by an untimed mount that fetches
  the rest) and the page cache dropped;
* ``lazy-ondemand``: ``lazy`` with ``--no-prefetch`` (on-demand reads only:
  the default before issue 12, measured in the same run against the new one);
* ``lazy+profile``: a cold mount (empty cache) that finds the startup profile
  the ``lazy`` run of the same workload recorded and pushed to the registry,
  and replays it (the other lazy strategies mount with ``--no-profile``);
* ``limit``: the physical floor: the compressed bytes of exactly the frames
  the workload touched (plus manifest and chunk tables) at the link's
  bandwidth, plus the round trips no client can avoid (manifest, then all
  chunk tables in parallel, then all touched frames in parallel = 3 x RTT),
  plus the workload's own run time with every byte already local.

Every measured run starts cold: chunk cache empty (lazy), decoded images
deleted (eager), ``sync; echo 3 > /proc/sys/vm/drop_caches``, and gets its
own network emulator (``tests.support.netproxy.NetProxy``), so traffic a previous
run left in flight cannot hold the link. Every mount, the registry and the
proxy are torn down in ``finally`` blocks, so Ctrl-C leaves nothing behind.
A ``lazyerofs`` command that does not return in time stops the sweep
(partial results are written, exit status 1).

Lazy mounts go through a ``lazyerofs service`` the benchmark starts on a
private socket (a warm, pre-imported mount command: how a host that uses
lazyerofs runs it) and stops at the end; ``--no-service`` mounts in-process.
The results record which, and how many mounts the service served.

Run: ``.venv/bin/python -m benchmarks.coldstart`` (root; ``make bench``).
Writes ``benchmarks/results/coldstart.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks import _eager, _image, _report
from benchmarks._bytecode import compile_bytecode
from lazyfs.format import seekable
from lazyfs.mount import kernel as kmount
from lazyfs.units import format_size, parse_size
from tests.support.localregistry import LocalRegistry
from tests.support.netproxy import NetProxy
from tests.support.system import drop_caches

HERE = Path(__file__).resolve().parent
WORK = HERE / ".work"
RESULTS = HERE / "results"
LAZYEROFS = str(Path(sys.executable).parent / "lazyerofs")
REPO = "bench/debian"

WORKLOADS: dict[str, str] = {
    "print": "chroot {root} /usr/bin/python3 -c 'print(1)'",
    "imports": (
        "chroot {root} /usr/bin/python3 -c "
        "'import json, email, http.client, sqlite3, decimal, asyncio, ssl, logging, argparse, subprocess'"
    ),
}
# More workloads a benchmark may name (not in the default sweep): the
# four-module import the issues measured their numbers with.
EXTRA_WORKLOADS: dict[str, str] = {
    "imports4": "chroot {root} /usr/bin/python3 -c 'import json, email, http.client, sqlite3'",
}
# Run in this order at each point: lazy-warm reuses the chunk cache lazy filled.
STRATEGIES = ("eager", "lazy", "lazy-warm", "lazy-ondemand", "lazy+profile", "lazy+optimized")
# manifest, then all chunk tables (parallel), then all touched frames (parallel)
LIMIT_ROUND_TRIPS = 3


def _csv(kind: type, text: str) -> list[Any]:
    return [kind(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.coldstart",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--rtt-ms", default="0,20,80", help="round-trip times to emulate, ms")
    p.add_argument("--mbit", default="1000,100", help="bandwidth caps, Mbit/s")
    p.add_argument("--chunk-sizes", default="4MiB,1MiB,256KiB", help="seekable chunk sizes")
    p.add_argument("--repeat", type=int, default=1, help="repetitions per point (the table shows the median)")
    p.add_argument(
        "--quick", action="store_true", help="a small sweep: RTT 0,80 ms x 100 Mbit/s x 1MiB (about 2 minutes)"
    )
    p.add_argument(
        "--workload",
        action="append",
        metavar="NAME[=CMD]",
        help="replace the default workloads; CMD is a shell command with {root} for the mounted rootfs; "
        f"a NAME alone is one of {', '.join({**WORKLOADS, **EXTRA_WORKLOADS})}",
    )
    p.add_argument(
        "--tree",
        type=Path,
        help="use this directory as the image instead of the debootstrap rootfs (split by the same rules)",
    )
    p.add_argument(
        "--image-from",
        choices=("push", "convert"),
        default="push",
        help="how the seekable images get into the registry: 'lazyerofs push' of mkfs.erofs images of the "
        "layer trees, or the same trees pushed as an ordinary tar+gzip image and 'lazyerofs convert'ed",
    )
    p.add_argument("--strategies", default=",".join(STRATEGIES), help="which measured strategies to run")
    p.add_argument("--work", type=Path, default=WORK, help="scratch and cache directory")
    p.add_argument("--results", type=Path, default=RESULTS, help="output directory")
    p.add_argument("--name", default="coldstart", help="output file stem")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG (no matplotlib needed)")
    p.add_argument(
        "--no-service",
        dest="service",
        action="store_false",
        help="mount in-process instead of through a lazyerofs service of the benchmark's own",
    )
    p.add_argument(
        "--mount-args",
        default="",
        metavar="ARGS",
        help="extra options for every lazy mount, e.g. '--fetch-ahead 1MiB' (compare with --name)",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.rtt_ms, args.mbit, args.chunk_sizes = "0,80", "100", "1MiB"
    args.rtt_list = _csv(float, args.rtt_ms)
    args.mbit_list = _csv(float, args.mbit)
    args.chunk_list = [parse_size(x.strip()) for x in args.chunk_sizes.split(",") if x.strip()]
    args.strategy_list = [s for s in args.strategies.split(",") if s]
    EXTRA_MOUNT_ARGS[:] = shlex.split(args.mount_args)
    unknown = set(args.strategy_list) - set(STRATEGIES)
    if unknown:
        p.error(f"unknown strategies {sorted(unknown)}; known: {', '.join(STRATEGIES)}")
    if args.workload:
        wl = {}
        known = {**WORKLOADS, **EXTRA_WORKLOADS}
        for item in args.workload:
            name, sep, cmd = item.partition("=")
            if not sep and name in known:
                cmd = known[name]
            elif not sep or not name or not cmd:
                p.error(f"--workload wants NAME=CMD or one of {', '.join(known)}, got {item!r}")
            wl[name] = cmd
        args.workloads = wl
    else:
        args.workloads = dict(WORKLOADS)
    return args


# --------------------------------------------------------------------------
# Plumbing


def proxy_counters(proxy: NetProxy) -> tuple[int, int]:
    """(requests, response bytes) the proxy has seen so far."""
    st = proxy.stats()
    return st.requests, st.bytes_sent




def run_workload(cmd: str, root: Path) -> float:
    t0 = time.monotonic()
    proc = subprocess.run(
        cmd.format(root=shlex.quote(str(root))), shell=True, capture_output=True, text=True, timeout=600
    )
    took = time.monotonic() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"workload {cmd!r} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return took


class Hang(Exception):
    """A ``lazyerofs`` command did not finish in time: a bug, so the sweep stops."""


def lazyerofs(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            [LAZYEROFS, *args], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, cwd=HERE.parent
        )
    except subprocess.TimeoutExpired as exc:
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr or ""
        raise Hang(f"lazyerofs {' '.join(args)} did not finish within {timeout:g}s: {err[-1000:]}") from None


def convert(src: str, ref: str, chunk_size: int) -> None:
    """``lazyerofs convert --chunk-size``: the tar+gzip image ``src`` as ``ref``."""
    proc = lazyerofs("convert", "--chunk-size", str(chunk_size), src, ref, timeout=900)
    if proc.returncode != 0:
        raise SystemExit(f"lazyerofs convert {src} {ref} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")


def push(images: list[Path], ref: str, chunk_size: int) -> None:
    """``lazyerofs push --chunk-size``: the layer images, bottom first, as ``ref``."""
    proc = lazyerofs("push", "--chunk-size", str(chunk_size), *map(str, images), ref, timeout=600)
    if proc.returncode != 0:
        raise SystemExit(f"lazyerofs push {ref} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")


def force_unmount(mnt: Path, rootfs: Path) -> None:
    """Last resort after a failed ``lazyerofs umount``: detach what is ours, top first."""
    paths = (str(mnt.resolve()), str(rootfs.resolve()))
    for target, _fstype, source in reversed(kmount.mounts()):
        if target == paths[1] or source.startswith(paths[0] + "/"):
            subprocess.run(["umount", "-l", target], capture_output=True)
    if kmount.find_mount(paths[0]) is not None:
        subprocess.run(["fusermount3", "-u", "-z", paths[0]], capture_output=True)
        subprocess.run(["umount", "-l", paths[0]], capture_output=True)


@contextlib.contextmanager
def bench_service(work: Path, enabled: bool) -> Iterator[dict[str, Any]]:
    """Lazy mounts of this process's ``lazyerofs`` commands go through a
    service of our own on a private socket under ``work`` (``enabled``), or
    in-process (not), whatever runs on the machine. Yields a record that
    says which, filled in with the service's served count at the end."""
    record: dict[str, Any] = {"used": enabled}
    saved = {k: os.environ.get(k) for k in ("LAZYEROFS_SERVICE_SOCKET", "LAZYEROFS_NO_SERVICE")}
    sock = work / "service" / "service.sock"
    try:
        if enabled:
            os.environ.pop("LAZYEROFS_NO_SERVICE", None)
            os.environ["LAZYEROFS_SERVICE_SOCKET"] = str(sock)
            lazyerofs("service", "stop")  # one left by an interrupted run
            start = lazyerofs("service", "start")
            if start.returncode != 0:
                raise SystemExit(f"lazyerofs service start failed: {start.stderr[-2000:]}")
        else:
            os.environ["LAZYEROFS_NO_SERVICE"] = "1"
        yield record
    finally:
        if enabled:
            status = lazyerofs("service", "status", "--json")
            with contextlib.suppress(ValueError):
                info = json.loads(status.stdout)
                record.update(served=info.get("served"), refused=info.get("refused"))
            lazyerofs("service", "stop")
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


MOUNT_TIMEOUT = 120.0
# Extra ``lazyerofs mount`` options for every lazy strategy (--mount-args).
EXTRA_MOUNT_ARGS: list[str] = []


@contextlib.contextmanager
def lazy_mount(
    ref: str, mnt: Path, rootfs: Path, cache: Path, touch_log: Path, *, prefetch: bool, profile: bool = False
) -> Iterator[float]:
    """Mount ``ref`` lazily with a rootfs; yield seconds until ready; always unmount.

    A mount that does not return within MOUNT_TIMEOUT raises :class:`Hang`.
    """
    for d in (mnt, rootfs):
        d.mkdir(parents=True, exist_ok=True)
    args = ["mount", ref, str(mnt), "--rootfs", str(rootfs), "--cache-dir", str(cache), "--touch-log", str(touch_log)]
    if not prefetch:
        args.append("--no-prefetch")
    if not profile:
        args.append("--no-profile")
    args += EXTRA_MOUNT_ARGS
    t0 = time.monotonic()
    try:
        proc = lazyerofs(*args, timeout=MOUNT_TIMEOUT)
        ready = time.monotonic() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"lazyerofs {' '.join(args)} failed ({proc.returncode}): {proc.stderr[-2000:]}")
        yield ready
    finally:
        try:
            u = lazyerofs("umount", str(mnt), timeout=120)
        except Hang:
            force_unmount(mnt, rootfs)
            raise
        if u.returncode != 0:
            print(f"  ! lazyerofs umount failed: {u.stderr.strip()[-300:]}; detaching lazily", flush=True)
            force_unmount(mnt, rootfs)


def lazy_stats(mnt: Path) -> dict[str, Any]:
    proc = lazyerofs("stats", str(mnt), timeout=30)
    if proc.returncode != 0:
        return {}
    try:
        return json.loads(proc.stdout)
    except json.JSONDecodeError:
        return {}


# --------------------------------------------------------------------------
# One run of each strategy


def run_eager(proxy: NetProxy, ref: str, workload: str, work: Path) -> dict[str, Any]:
    eager_work = work / "eager"
    rootfs = work / "eager-rootfs"
    shutil.rmtree(eager_work, ignore_errors=True)
    rootfs.mkdir(parents=True, exist_ok=True)
    drop_caches()
    r0, b0 = proxy_counters(proxy)
    t0 = time.monotonic()
    pull = _eager.eager_mount(ref, eager_work, rootfs)
    try:
        ready = time.monotonic() - t0
        run_s = run_workload(workload, rootfs)
        done = time.monotonic() - t0
    finally:
        pull.cleanup()
        shutil.rmtree(eager_work, ignore_errors=True)
    r1, b1 = proxy_counters(proxy)
    return {
        "ready_s": ready,
        "done_s": done,
        "workload_s": run_s,
        "requests": r1 - r0,
        "bytes_fetched": b1 - b0,
        "detail": {
            "manifest_s": pull.manifest_s,
            "download_s": pull.download_s,
            "decode_cpu_s": pull.decode_cpu_s,
            "mount_s": pull.ready_s - max(pull.download_s, pull.manifest_s),
            "blob_bytes": pull.bytes_downloaded,
            "raw_bytes": pull.raw_bytes,
            "frames": pull.frames,
        },
    }


def run_lazy(
    proxy: NetProxy,
    ref: str,
    workload: str,
    work: Path,
    *,
    warm: bool,
    prefetch: bool,
    touch_log: Path,
    profile: bool = False,
    save_profile: Path | None = None,
) -> dict[str, Any]:
    cache = work / "chunk-cache"
    if not warm:
        shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir(parents=True, exist_ok=True)
    touch_log.unlink(missing_ok=True)
    mnt, rootfs = work / "lazy-mnt", work / "lazy-rootfs"
    drop_caches()
    r0, b0 = proxy_counters(proxy)
    t0 = time.monotonic()
    stats: dict[str, Any] = {}
    with lazy_mount(ref, mnt, rootfs, cache, touch_log, prefetch=prefetch, profile=profile) as ready:
        run_s = run_workload(workload, rootfs)
        done = time.monotonic() - t0
        stats = lazy_stats(mnt)
        if save_profile is not None:
            saved = lazyerofs("profile", "save", str(mnt), "-o", str(save_profile), timeout=60)
            if saved.returncode != 0:
                raise RuntimeError(f"lazyerofs profile save failed: {saved.stderr.strip()[-500:]}")
    r1, b1 = proxy_counters(proxy)
    touched: list[dict[str, Any]] = []
    with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
        touched = json.loads(touch_log.read_text())
    return {
        "ready_s": ready,
        "done_s": done,
        "workload_s": run_s,
        "requests": r1 - r0,
        "bytes_fetched": b1 - b0,
        "detail": {"daemon_stats": stats, "touch_log": touched},
    }


def fill_cache(ref: str, work: Path, timeout: float = 300) -> None:
    """Setup, not measured: mount ``ref`` on the run's chunk cache, let the
    background fetch bring every frame in, unmount: "warm" means the whole
    image is cached."""
    cache, mnt, rootfs = work / "chunk-cache", work / "fill-mnt", work / "fill-rootfs"
    cache.mkdir(parents=True, exist_ok=True)
    with lazy_mount(ref, mnt, rootfs, cache, work / "touch-fill.json", prefetch=True):
        deadline = time.monotonic() + timeout
        while True:
            layers = lazy_stats(mnt).get("layers") or []
            if layers and all(la.get("frames_present") == la.get("frames_total") for la in layers):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the chunk cache did not fill within {timeout:g}s")
            time.sleep(0.1)


def run_one(strategy: str, upstream: str, rtt_ms: float, mbit: float, tag: str, workload: str, work: Path) -> dict[str, Any]:
    """One measured run behind its own NetProxy.

    A fresh proxy per run: transfers still in flight when the previous run
    ended (readahead or prefetch cut short by the unmount) would otherwise
    hold the emulated link and delay this run.
    """
    profile_file = work / "profile.json"
    if strategy == "lazy+optimized":
        # Setup, not measured: the image laid out for the profile the lazy run
        # of this workload recorded (lazyerofs optimize pushes the translated
        # profile next to it), then mounted cold with that profile.
        if not profile_file.exists():
            raise RuntimeError("lazy+optimized needs the profile of this point's lazy run (run 'lazy' first)")
        direct = f"{upstream.removeprefix('http://')}/{REPO}"
        opt = lazyerofs("optimize", "--profile", str(profile_file), f"{direct}:{tag}", f"{direct}:{tag}-opt", timeout=600)
        if opt.returncode != 0:
            raise RuntimeError(f"lazyerofs optimize failed: {opt.stderr.strip()[-500:]}")
        tag = f"{tag}-opt"
    if strategy == "lazy-warm":
        fill_cache(f"{upstream.removeprefix('http://')}/{REPO}:{tag}", work)
    with NetProxy(upstream, rtt=rtt_ms / 1000, bandwidth_bps=mbit * 1e6) as proxy:
        ref = f"{proxy.host}/{REPO}:{tag}"
        if strategy == "eager":
            return run_eager(proxy, ref, workload, work)
        if strategy == "lazy":
            profile_file.unlink(missing_ok=True)
        out = run_lazy(
            proxy,
            ref,
            workload,
            work,
            warm=strategy == "lazy-warm",
            prefetch=strategy != "lazy-ondemand",
            touch_log=work / f"touch-{strategy}.json",
            profile=strategy in ("lazy+profile", "lazy+optimized"),
            save_profile=profile_file if strategy == "lazy" else None,
        )
    if strategy == "lazy":
        # Published straight to the registry (setup, not part of any measured run):
        # the lazy+profile run of this workload finds it as the newest referrer.
        direct = f"{upstream.removeprefix('http://')}/{REPO}:{tag}"
        pushed = lazyerofs("profile", "push", str(profile_file), direct, timeout=120)
        if pushed.returncode != 0:
            raise RuntimeError(f"lazyerofs profile push failed: {pushed.stderr.strip()[-500:]}")
    elif strategy in ("lazy+profile", "lazy+optimized"):
        used = out["detail"]["daemon_stats"].get("profile") or {}
        if not used.get("frames"):
            raise RuntimeError(f"{strategy}: the mount replayed no profile ({used.get('error') or 'none found'})")
    return out


# --------------------------------------------------------------------------
# The sweep


def image_info(ref: str) -> dict[str, Any]:
    """Sizes the limit needs: manifest bytes, per-layer table bytes, blob sizes."""
    image = _eager.resolve(ref)
    layers = []
    for d in image.layers:
        desc = seekable.parse_descriptor(d)
        assert desc.table_offset is not None
        layers.append({"digest": desc.digest, "size": desc.size, "table_bytes": desc.size - desc.table_offset})
    return {"manifest_bytes": len(image.manifest_bytes), "layers": layers}


def proxy_ceiling(upstream: str, repo: str, blob: dict[str, Any], mbit: float, *, streams: int = 4) -> dict[str, float]:
    """What the emulated link really delivers at a ``mbit`` cap: one blob
    downloaded through a fresh NetProxy (no RTT) over one connection, and
    again as ``streams`` parallel range requests (as the lazy path fetches).

    The proxy is Python and shares these two cores with everything else, so
    at high caps it can deliver less than it claims; the limit is computed at
    what it delivered, not at the cap (issue 12 item 5).
    """
    import httpx  # the benchmark's own client, as _eager uses

    size, digest = blob["size"], blob["digest"]
    with NetProxy(upstream, rtt=0, bandwidth_bps=mbit * 1e6) as proxy:
        url = f"http://{proxy.host}/v2/{repo}/blobs/{digest}"
        with httpx.Client(timeout=120) as client:
            t0 = time.monotonic()
            with client.stream("GET", url) as resp:
                got = sum(len(piece) for piece in resp.iter_raw())
            one = got * 8 / (time.monotonic() - t0) / 1e6

            def part(k: int, out: list[int]) -> None:
                lo, hi = size * k // streams, size * (k + 1) // streams - 1
                r = client.get(url, headers={"Range": f"bytes={lo}-{hi}"})
                out.append(len(r.content))

            sizes: list[int] = []
            t0 = time.monotonic()
            threads = [threading.Thread(target=part, args=(k, sizes)) for k in range(streams)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            par = sum(sizes) * 8 / (time.monotonic() - t0) / 1e6
    if got != size or sum(sizes) != size:
        raise SystemExit(f"proxy check: got {got} and {sum(sizes)} bytes of a {size}-byte blob")
    return {"cap_mbit": mbit, "one_connection_mbit": round(one, 1), f"{streams}_streams_mbit": round(par, 1),
            "effective_mbit": round(min(mbit, max(one, par)), 1)}  # fmt: skip


def machine_info() -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = ""
    with contextlib.suppress(OSError):
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split(":", 1)[1].strip()
    return {
        "kernel": platform.release(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "cpu_model": cpu,
        "memory": mem,
        "hostname": platform.node(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _sigterm(_signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("needs root (FUSE, kernel mounts, chroot, drop_caches)")
    signal.signal(signal.SIGTERM, _sigterm)
    compile_bytecode()  # time mounts as an installed copy runs
    started = time.monotonic()
    work: Path = args.work
    work.mkdir(parents=True, exist_ok=True)
    run_dir = work / f"run-{args.name}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)

    if args.tree:
        root = args.tree.resolve()
        layers = _image.build_layers(root, run_dir / "image")
        image_desc = f"directory tree {root}"
    else:
        root = _image.debian_rootfs(work)
        layers = _image.build_layers(root, work)
        image_desc = "Debian bookworm minbase + python3 (debootstrap)"

    measurements: list[dict[str, Any]] = []
    cleanup = contextlib.ExitStack()
    service = cleanup.enter_context(bench_service(run_dir, args.service))
    # Other jobs may share the machine: its load goes with every timing.
    loads: list[float] = [os.getloadavg()[0]]
    failures: list[dict[str, Any]] = []
    images: dict[int, dict[str, Any]] = {}
    ceilings: dict[str, dict[str, float]] = {}
    registry = LocalRegistry(run_dir / "registry" / "storage")
    try:
        registry.start()
        print(f"[setup] docker-registry on {registry.host}", flush=True)
        if args.image_from == "convert":
            # The same layer trees as an ordinary tar+gzip image, converted below.
            from tests.support.containerd import push_tar_image

            trees = _image.split_tree(root, run_dir / "trees")
            source = f"{registry.host}/{REPO}-src:tgz"
            tgz = push_tar_image(trees, source, run_dir)
            shutil.rmtree(run_dir / "trees")
            image_desc += f", pushed as tar+gzip ({format_size(tgz['blob_bytes'])}) and converted with lazyerofs convert"
        for chunk in args.chunk_list:
            ref = f"{registry.host}/{REPO}:c{chunk}"
            t0 = time.monotonic()
            if args.image_from == "convert":
                convert(source, ref, chunk)
            else:
                push([la.path for la in layers], ref, chunk)
            images[chunk] = image_info(ref)
            blob_total = sum(la["size"] for la in images[chunk]["layers"])
            print(
                f"[setup] {ref}: {format_size(chunk)} chunks, {format_size(blob_total)} of blobs, "
                f"by lazyerofs {args.image_from} in {time.monotonic() - t0:.1f}s",
                flush=True,
            )
        biggest = max(images[args.chunk_list[0]]["layers"], key=lambda la: la["size"])
        for mbit in args.mbit_list:
            ceilings[str(mbit)] = proxy_ceiling(registry.url, REPO, biggest, mbit)
            print(f"[setup] emulated link at {mbit:g} Mbit/s delivers {ceilings[str(mbit)]}", flush=True)
        points = [(c, r, m) for c in args.chunk_list for r in args.rtt_list for m in args.mbit_list]
        total_runs = len(points) * len(args.workloads) * len(args.strategy_list) * args.repeat
        n = 0
        for chunk, rtt_ms, mbit in points:
            tag = f"c{chunk}"
            for wname, wcmd in args.workloads.items():
                for rep in range(args.repeat):
                    for strategy in args.strategy_list:
                        n += 1
                        base = {
                            "load1": os.getloadavg()[0],
                            "chunk_size": chunk,
                            "rtt_ms": rtt_ms,
                            "mbit": mbit,
                            "workload": wname,
                            "strategy": strategy,
                            "rep": rep,
                        }
                        try:
                            m = run_one(strategy, registry.url, rtt_ms, mbit, tag, wcmd, run_dir)
                        except Hang as exc:  # a daemon bug: stop, do not measure on top of it
                            failures.append(base | {"error": f"Hang: {exc}"})
                            print(f"[{n}/{total_runs}] {strategy} HUNG, stopping the sweep: {exc}", flush=True)
                            raise
                        except Exception as exc:  # one broken run must not lose the sweep
                            failures.append(base | {"error": f"{type(exc).__name__}: {exc}"})
                            print(f"[{n}/{total_runs}] {strategy} FAILED: {type(exc).__name__}: {exc}", flush=True)
                            continue
                        measurements.append(base | m)
                        loads.append(base["load1"])
                        print(
                            f"[{n}/{total_runs} {time.monotonic() - started:5.0f}s] chunk {format_size(chunk):>7} "
                            f"rtt {rtt_ms:3g}ms {mbit:5g}Mbit {wname:8} {strategy:13} load {base['load1']:4.1f} ready {m['ready_s']:6.2f}s "
                            f"done {m['done_s']:6.2f}s  {format_size(m['bytes_fetched']):>10} in {m['requests']} requests",
                            flush=True,
                        )
    except KeyboardInterrupt:
        print("\ninterrupted: cleaning up; partial results are written", flush=True)
    except Hang:
        print("stopped on a hang: partial results are written", flush=True)
    finally:
        registry.stop()
        shutil.rmtree(run_dir / "registry", ignore_errors=True)
        cleanup.close()
    meta = {
        "image": image_desc,
        "layers": [{"name": la.name, "raw_bytes": la.size, "files": la.files} for la in layers],
        "images": {str(k): v for k, v in images.items()},
        "workloads": args.workloads,
        "repeat": args.repeat,
        "network_emulator": "tests.support.netproxy.NetProxy",
        "link_ceilings": ceilings,
        "registry_client": "lazyfs.oci.client.RegistryClient",
        "service": service,
        "limit_round_trips": LIMIT_ROUND_TRIPS,
        "machine": machine_info(),
        "wall_s": time.monotonic() - started,
        "load": {"start": loads[0], "end": os.getloadavg()[0], "min": min(loads), "max": max(loads)},
        "argv": sys.argv[1:] if argv is None else argv,
        "failures": failures,
    }
    out = _report.write_all(measurements, meta, args.results, args.name, plot=not args.no_plot)
    print(f"[done] {len(measurements)} runs in {time.monotonic() - started:.0f}s; wrote {', '.join(map(str, out))}")
    if failures:
        print(f"[done] {len(failures)} runs FAILED (listed under meta.failures in the JSON)", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
