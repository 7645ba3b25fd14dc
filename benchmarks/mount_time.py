"""How long ``lazyerofs mount --rootfs`` takes to return, and where the time goes.

A small three-layer image (``lazyerofs push``, 1 MiB frames) in a real
``docker-registry`` behind the benchmark's network emulator
(:class:`tests.support.netproxy.NetProxy`, per-request RTT, no bandwidth
cap), mounted with ``--rootfs`` (kernel EROFS per layer plus overlayfs):

* ``cold``: empty chunk cache (no frames, no chunk tables);
* ``warm``: the cache a previous mount of the same image left (frames and
  chunk tables), which is what a second container from one image sees.

Each point runs twice: ``lazyerofs mount`` on its own (``service: no``,
``$LAZYEROFS_NO_SERVICE=1``), and handed to a running ``lazyerofs service``
(``service: yes``, on a private socket), whose forked child mounts from
imports already in memory.

Each run is timed from the ``exec`` of ``lazyerofs mount`` to its return
(the mount is ready), and split with the startup timeline the daemon
reports in ``lazyerofs stats`` (``startup.steps``, seconds since the
command's first line on the host's monotonic clock):

    interpreter   exec -> lazyfs.cli imported (Python start, site, lazyfs)
    command       imports of the mount command, argument parsing (with the
                  service: the handoff, the fork and the child's parsing)
    checks        mount point checks, log file, importing trio
    fork          fork, detach, logging
    imports       daemon-side imports (pyfuse3, fetch, oci/httpx, cache)
    cache         opening the chunk cache
    resolve       manifest (and config) from the registry
    tables        chunk tables: fetched, or read back from the table store
    fuse_init     pyfuse3.init (the FUSE mount)
    fuse_ready    the kernel's FUSE INIT (one stat through the mount)
    rootfs        kernel EROFS mounts and the overlay (reads the first frames)
    handshake     readiness up the pipe, the parent's exit

Targets (issue 12): ready <= 4 RTT + first frames + 0.25 s; a warm mount
<= 0.3 s. With no bandwidth cap the first frames' transfer is ~0.

Run as root: ``.venv/bin/python -m benchmarks.mount_time`` (about two minutes).
Writes ``benchmarks/results/mount_time.{json,md}``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.coldstart import force_unmount, machine_info
from lazyfs.produce.mkfs import make_erofs
from lazyfs.units import format_size, parse_size
from tests.support.localregistry import LocalRegistry
from tests.support.netproxy import NetProxy
from tests.support.system import drop_caches

HERE = Path(__file__).resolve().parent
WORK = HERE / ".work" / "mount_time"
RESULTS = HERE / "results"
LAZYEROFS = str(Path(sys.executable).parent / "lazyerofs")
REPO = "bench/mount-time"
COMMAND = [LAZYEROFS]

# Daemon timeline steps in order; each phase ends at its step.
STEPS = (
    "command", "checks", "fork", "imports", "cache", "resolve", "tables",
    "fuse_init", "fuse_ready", "rootfs", "ready",
)  # fmt: skip
PHASES = ("interpreter", *STEPS[:-1], "handshake")
WARM_TARGET_S = 0.3
READY_SLACK_S = 0.25


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.mount_time",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--rtt-ms", default="0,20", help="round-trip times to emulate, ms")
    p.add_argument("--repeat", type=int, default=5, help="runs per point (tables show medians)")
    p.add_argument("--layers", type=int, default=3, help="layers in the image")
    p.add_argument("--chunk-size", type=parse_size, default=1 << 20, help="seekable frame size")
    p.add_argument("--no-rootfs", action="store_true", help="FUSE tree only, no kernel EROFS/overlay mounts")
    p.add_argument("--drop-caches", action="store_true", help="drop the page cache before every mount")
    p.add_argument(
        "--no-bytecode-cache",
        action="store_true",
        help="run lazyerofs with PYTHONDONTWRITEBYTECODE as set (default: keep compiled bytecode in the "
        "work dir, as an installed package has)",
    )
    p.add_argument("--work", type=Path, default=WORK, help="scratch directory")
    p.add_argument("--results", type=Path, default=RESULTS, help="output directory")
    p.add_argument("--name", default="mount_time", help="output file stem")
    p.add_argument("--label", default="", help="a note stored with the results (e.g. 'before')")
    p.add_argument(
        "--service",
        choices=("both", "no", "yes"),
        default="both",
        help="time mounts without 'lazyerofs service', through it, or both",
    )
    p.add_argument(
        "--lazyerofs",
        default=LAZYEROFS,
        metavar="CMD",
        help="the command to time (e.g. 'python -m lazyfs.cli' with PYTHONPATH at another checkout)",
    )
    args = p.parse_args(argv)
    args.rtt_list = [float(x) for x in args.rtt_ms.split(",") if x.strip()]
    COMMAND[:] = shlex.split(args.lazyerofs)
    return args


def build_image(work: Path, layers: int) -> list[Path]:
    """``layers`` EROFS images of small deterministic trees (a few MiB each)."""
    images = []
    for i in range(layers):
        rnd = random.Random(i)
        tree = work / f"tree{i}"
        shutil.rmtree(tree, ignore_errors=True)
        for d in range(4):
            sub = tree / f"usr/lib/pkg{i}/d{d}"
            sub.mkdir(parents=True)
            for f in range(16):
                # Half random, half text: frames that compress like real files.
                (sub / f"f{f}.bin").write_bytes(rnd.randbytes(16 << 10) + b"text line\n" * 1600)
        (tree / "etc").mkdir()
        (tree / "etc" / f"layer{i}").write_text(f"{i}\n")
        image = work / f"layer{i}.erofs"
        make_erofs(tree, image)
        images.append(image)
    return images


def lazyerofs(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*COMMAND, *args], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, env=env
    )


def service_env(env: dict[str, str], work: Path) -> dict[str, str]:
    """The environment of mounts through the benchmark's own service."""
    out = {**env, "LAZYEROFS_SERVICE_SOCKET": str(work / "service" / "service.sock")}
    out.pop("LAZYEROFS_NO_SERVICE", None)
    return out


def service_status(env: dict[str, str]) -> dict[str, Any]:
    out = lazyerofs(env, "service", "status", "--json")
    return json.loads(out.stdout) if out.stdout.strip() else {"running": False}


def ensure_service(env: dict[str, str]) -> int:
    """A service running this tree's code (a source file edited meanwhile
    makes it refuse mounts and stop: start a new one). Its served count."""
    status = service_status(env)
    if not (status.get("running") and status.get("current")):
        lazyerofs(env, "service", "stop")
        start = lazyerofs(env, "service", "start")
        if start.returncode != 0:
            raise SystemExit(f"lazyerofs service start failed: {start.stderr[-2000:]}")
        status = service_status(env)
    return int(status.get("served", 0))


def one_mount(env: dict[str, str], ref: str, work: Path, cache: Path, *, rootfs: bool, drop: bool) -> dict[str, Any]:
    """Mount, time it, read its stats, unmount. Returns the run's record."""
    mnt, root = work / "mnt", work / "rootfs"
    for d in (mnt, root):
        d.mkdir(parents=True, exist_ok=True)
    args = ["mount", ref, str(mnt), "--cache-dir", str(cache)]
    if rootfs:
        args += ["--rootfs", str(root)]
    if drop:
        drop_caches()
    try:
        t0 = time.monotonic()
        proc = lazyerofs(env, *args)
        t1 = time.monotonic()
        if proc.returncode != 0:
            raise RuntimeError(f"lazyerofs {' '.join(args)} failed: {proc.stderr[-2000:]}")
        st = lazyerofs(env, "stats", str(mnt))
        stats = json.loads(st.stdout) if st.returncode == 0 else {}
    finally:
        u = lazyerofs(env, "umount", str(mnt))
        if u.returncode != 0:
            force_unmount(mnt, root)
    record: dict[str, Any] = {
        "wall_s": t1 - t0,
        "stderr": proc.stderr[-500:],
        "requests": stats.get("requests"),
        "chunk_tables": stats.get("chunk_tables"),
        "phases": {},
    }
    startup = stats.get("startup")
    if isinstance(startup, dict):
        steps = startup["steps"]
        start = startup["start"]
        phases = {"interpreter": start - t0}
        last = 0.0
        for step in STEPS:
            if step in steps:
                phases[step] = steps[step] - last
                last = steps[step]
        phases["handshake"] = (t1 - start) - last
        record["phases"] = phases
    return record


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    phases: dict[str, float] = {}
    for ph in PHASES:
        vals = [r["phases"][ph] for r in runs if ph in r["phases"]]
        if vals:
            phases[ph] = median(vals)
    return {
        "wall_s": median([r["wall_s"] for r in runs]),
        "wall_min_s": min(r["wall_s"] for r in runs),
        "wall_max_s": max(r["wall_s"] for r in runs),
        "requests": median([r["requests"] for r in runs if r["requests"] is not None]),
        "chunk_tables": runs[-1]["chunk_tables"],
        "phases": phases,
    }


def point_name(p: dict[str, Any]) -> str:
    return f"{p['rtt_ms']:g} ms {p['state']}{' svc' if p.get('service') else ''}"


def target(state: str, rtt_s: float) -> float:
    return WARM_TARGET_S if state == "warm" else 4 * rtt_s + READY_SLACK_S


def write_markdown(path: Path, data: dict[str, Any]) -> None:
    points = data["points"]
    lines = [
        "# lazyerofs mount: time to ready",
        "",
        f"{data['image']}; `lazyerofs mount{' --rootfs' if data['rootfs'] else ''}` from exec to return, "
        f"median of {data['repeat']} runs. {data['label']}".rstrip(),
        "",
        "| RTT | cache | service | ready (s) | min-max | target (s) | requests | tables fetched / cached |",
        "|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for p in points:
        s = p["summary"]
        ct = s["chunk_tables"] or {}
        ok = "ok" if s["wall_s"] <= p["target_s"] else "**over**"
        lines.append(
            f"| {p['rtt_ms']:g} ms | {p['state']} | {'yes' if p.get('service') else 'no'} | {s['wall_s']:.3f} "
            f"| {s['wall_min_s']:.3f}-{s['wall_max_s']:.3f} "
            f"| {p['target_s']:.2f} ({ok}) | {s['requests']:g} | {ct.get('fetched', '?')} / {ct.get('cached', '?')} |"
        )
    lines += ["", "Where the time goes (median seconds per phase):", ""]
    header = "| phase | " + " | ".join(point_name(p) for p in points) + " |"
    lines += [header, "|---|" + "---:|" * len(points)]
    for ph in PHASES:
        row = [f"{p['summary']['phases'].get(ph, float('nan')):.3f}" for p in points]
        lines.append(f"| {ph} | " + " | ".join(row) + " |")
    lines += ["", "Phases: see the docstring of `benchmarks/mount_time.py`; `svc`: through `lazyerofs service`.", ""]
    if data.get("service"):
        svc = data["service"]
        lines.append(
            f"The service: {svc.get('rss_bytes', 0) / (1 << 20):.0f} MiB resident, "
            f"{svc.get('served', '?')} mounts served, {svc.get('refusals', '?')} refused."
        )
        lines.append("")
    m = data["machine"]
    lines.append(f"Machine: {m['cpus']} CPUs ({m['cpu_model']}), kernel {m['kernel']}, Python {m['python']}, {m['date']}.")
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("needs root (FUSE, kernel mounts)")
    work: Path = args.work
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    env = dict(os.environ)
    if not args.no_bytecode_cache:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
    env["LAZYEROFS_NO_SERVICE"] = "1"  # "service: no" runs, whatever runs on this machine
    svc_env = service_env(env, work)
    modes = {"both": (False, True), "no": (False,), "yes": (True,)}[args.service]
    service_info: dict[str, Any] = {}
    images = build_image(work, args.layers)
    raw = sum(p.stat().st_size for p in images)
    registry = LocalRegistry(work / "registry" / "storage")
    points: list[dict[str, Any]] = []
    try:
        registry.start()
        ref_direct = f"{registry.host}/{REPO}:v1"
        push = lazyerofs(env, "push", "--chunk-size", str(args.chunk_size), *map(str, images), ref_direct, timeout=300)
        if push.returncode != 0:
            raise SystemExit(f"lazyerofs push failed: {push.stderr[-2000:]}")
        for rtt_ms in args.rtt_list:
            with NetProxy(registry.url, rtt=rtt_ms / 1000) as proxy:
                ref = f"{proxy.host}/{REPO}:v1"
                cache = work / "cache"
                for state in ("cold", "warm"):
                    for use_service in modes:
                        run_env = svc_env if use_service else env
                        for _attempt in range(3):
                            served = ensure_service(svc_env) if use_service else 0
                            shutil.rmtree(cache, ignore_errors=True)
                            cache.mkdir()
                            # One unmeasured mount first: bytecode compiled, and for
                            # "warm" the cache filled the way a first mount fills it.
                            one_mount(run_env, ref, work, cache, rootfs=not args.no_rootfs, drop=False)
                            runs = []
                            for _ in range(args.repeat):
                                if state == "cold":
                                    shutil.rmtree(cache, ignore_errors=True)
                                    cache.mkdir()
                                runs.append(
                                    one_mount(run_env, ref, work, cache, rootfs=not args.no_rootfs, drop=args.drop_caches)
                                )
                            # Every run really went through the service (none
                            # fell back because the tree was edited meanwhile).
                            now = service_status(svc_env).get("served", 0) if use_service else 0
                            if not use_service or now - served == args.repeat + 1:
                                break
                            print(f"only {now - served} of {args.repeat + 1} mounts went through the service: again")
                        else:
                            raise SystemExit("the service kept refusing mounts (is the source tree being edited?)")
                        summary = summarise(runs)
                        point = {
                            "rtt_ms": rtt_ms,
                            "state": state,
                            "service": use_service,
                            "target_s": target(state, rtt_ms / 1000),
                            "summary": summary,
                            "runs": runs,
                        }
                        points.append(point)
                        print(
                            f"RTT {rtt_ms:g} ms {state}{' (service)' if use_service else ''}: "
                            f"ready {summary['wall_s']:.3f}s (target {point['target_s']:.2f}s), "
                            f"{summary['requests']:g} requests, tables {summary['chunk_tables']}",
                            flush=True,
                        )
    finally:
        registry.stop()
        if True in modes:
            service_info = service_status(svc_env)
            lazyerofs(svc_env, "service", "stop")
    data = {
        "label": args.label,
        "image": f"{args.layers} layers, {format_size(raw)} of EROFS images, {format_size(args.chunk_size)} frames",
        "rootfs": not args.no_rootfs,
        "repeat": args.repeat,
        "service": service_info,
        "bytecode_cache": not args.no_bytecode_cache,
        "machine": machine_info(),
        "points": points,
    }
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"{args.name}.json").write_text(json.dumps(data, indent=2) + "\n")
    write_markdown(args.results / f"{args.name}.md", data)
    with contextlib.suppress(OSError):
        shutil.rmtree(work / "registry")
    print(f"wrote {args.results / args.name}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
