"""Profile-guided layout on the cold-start image: bytes, requests and time of a
cold mount + workload, plain vs optimized (with and without profile replay),
against eager, through the emulated link.

Per workload: a profile is recorded on the plain image pushed with small
frames (64 KiB, so the profile says precisely which parts of the image were
read), ``lazyerofs optimize`` rebuilds the image from it with the measured
frame size and pushes the translated profile, then each strategy runs cold
behind a fresh NetProxy (20 ms, 100 Mbit/s by default).

The "packed floor" is what the issue calls the floor of a good layout: the
raw bytes the recording read (its 64 KiB frames), packed together and
compressed in frames of the measured size.

Lazy mounts go through a ``lazyerofs service`` of the benchmark's own
(``--no-service``: in-process), as in the cold-start benchmark.

    sudo .venv/bin/python -m benchmarks.layout_bench [--repeat N] [--workloads imports,print,imports4]
Writes benchmarks/results/NAME.{json,md} (NAME: --name, default layout).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import zstandard

from benchmarks import _image
from benchmarks.coldstart import (
    EXTRA_WORKLOADS,
    WORKLOADS,
    bench_service,
    image_info,
    lazyerofs,
    machine_info,
    push,
    run_eager,
    run_lazy,
)
from lazyfs.fetch.profile import parse_profile
from lazyfs.units import format_size
from tests.support.localregistry import LocalRegistry
from tests.support.netproxy import NetProxy

HERE = Path(__file__).resolve().parent
WORK = HERE / ".work"
RESULTS = HERE / "results"
REPO = "bench/layout"
RECORD_CHUNK = 64 << 10


def packed_floor(profile_path: Path, layer_images: dict[str, Path], chunk: int) -> tuple[int, int]:
    """(raw bytes read, compressed bytes) of what the recording read, packed and
    compressed in ``chunk``-sized zstd frames (level 3)."""
    profile = parse_profile(profile_path.read_bytes())
    cctx = zstandard.ZstdCompressor(level=3)
    raw_total = comp_total = 0
    for layer in profile.layers:
        image = layer_images.get(layer.digest)
        if image is None or not layer.chunk_size:
            continue
        with open(image, "rb") as f:
            buf = bytearray()
            for frame in sorted(layer.frames):
                f.seek(frame * layer.chunk_size)
                buf += f.read(layer.chunk_size)
        raw_total += len(buf)
        for i in range(0, len(buf), chunk):
            comp_total += len(cctx.compress(bytes(buf[i : i + chunk])))
    return raw_total, comp_total


def hot_part_split(touch_log: Path, layouts: list[dict[str, Any] | None], chunk: int) -> tuple[int, int]:
    """(compressed bytes of the touched frames inside each layer's hot part,
    touched frames past it), from a run's touch log: what the layout itself
    made a cold start fetch, apart from anything fetched beyond it."""
    inside = past = 0
    for layer, la in zip(json.loads(touch_log.read_text()), layouts, strict=False):
        hot_frames = -(-la["hot_end"] // chunk) if la else 0
        for frame, (start, end) in zip(layer["frames"], layer["spans"], strict=True):
            if frame < hot_frames:
                inside += end - start
            else:
                past += 1
    return inside, past


def layer_digests(ref: str) -> list[str]:
    return [la["digest"] for la in image_info(ref)["layers"]]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunk-size", type=int, default=1 << 20, help="frame size of the measured images (default 1 MiB)")
    ap.add_argument("--rtt-ms", type=float, default=20.0)
    ap.add_argument("--mbit", type=float, default=100.0)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--workloads", default="imports,print", help=f"of {', '.join({**WORKLOADS, **EXTRA_WORKLOADS})}")
    ap.add_argument("--name", default="layout", help="output file stem under benchmarks/results/")
    ap.add_argument("--no-service", dest="service", action="store_false", help="mount in-process, not through a service")
    args = ap.parse_args(argv)
    known = {**WORKLOADS, **EXTRA_WORKLOADS}
    unknown = [w for w in args.workloads.split(",") if w not in known]
    if unknown:
        ap.error(f"unknown workloads {unknown}; known: {', '.join(known)}")
    if os.geteuid() != 0:
        raise SystemExit("needs root (FUSE, kernel mounts, chroot, drop_caches)")
    root = _image.debian_rootfs(WORK)
    layers = _image.build_layers(root, WORK)
    run_dir = WORK / f"run-{args.name}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    chunk = args.chunk_size
    registry = LocalRegistry(run_dir / "registry" / "storage")
    results: dict[str, Any] = {
        "machine": machine_info(),
        "link": {"rtt_ms": args.rtt_ms, "mbit": args.mbit},
        "chunk_size": chunk,
        "record_chunk_size": RECORD_CHUNK,
        "workloads": {},
    }
    cleanup = contextlib.ExitStack()
    try:
        results["service"] = cleanup.enter_context(bench_service(run_dir, args.service))
        registry.start()
        up = registry.url
        host = registry.host
        rec_ref, plain_ref = f"{host}/{REPO}:rec", f"{host}/{REPO}:plain"
        push([la.path for la in layers], rec_ref, RECORD_CHUNK)
        push([la.path for la in layers], plain_ref, chunk)
        rec_images = dict(zip(layer_digests(rec_ref), [la.path for la in layers], strict=True))
        plain_blobs = sum(la["size"] for la in image_info(plain_ref)["layers"])
        results["plain_blob_bytes"] = plain_blobs
        results["raw_image_bytes"] = sum(la.size for la in layers)
        for wname in args.workloads.split(","):
            cmd = known[wname]
            wdir = run_dir / wname
            wdir.mkdir()
            profile = wdir / "profile.json"
            # 1. record on the small-frame plain image (an unshaped link: setup, not measured)
            with NetProxy(up) as proxy:
                run_lazy(proxy, f"{proxy.host}/{REPO}:rec", cmd, wdir, warm=False, prefetch=False,
                         touch_log=wdir / "touch-rec.json", save_profile=profile)  # fmt: skip
            raw_read, floor = packed_floor(profile, rec_images, chunk)
            # 2. optimize (pushes the translated profile next to the new image)
            opt_tag = f"opt-{wname}"
            t0 = time.monotonic()
            proc = lazyerofs("optimize", "--profile", str(profile), "--chunk-size", str(chunk),
                             "--json", rec_ref, f"{host}/{REPO}:{opt_tag}", timeout=1800)  # fmt: skip
            if proc.returncode != 0:
                raise RuntimeError(f"optimize failed: {proc.stderr[-2000:]}")
            opt_s = time.monotonic() - t0
            opt_report = json.loads(proc.stdout)
            opt_blobs = sum(la["size"] for la in opt_report["layers"])
            runs: dict[str, list[dict[str, Any]]] = {}
            for rep in range(args.repeat):
                for strategy, tag in (("eager", "plain"), ("eager of the optimized image", opt_tag), ("lazy", "plain"),
                                      ("lazy+optimized", opt_tag), ("lazy+optimized+profile", opt_tag)):  # fmt: skip
                    with NetProxy(up, rtt=args.rtt_ms / 1000, bandwidth_bps=args.mbit * 1e6) as proxy:
                        ref = f"{proxy.host}/{REPO}:{tag}"
                        if strategy.startswith("eager"):
                            m = run_eager(proxy, ref, cmd, wdir)
                        else:
                            m = run_lazy(proxy, ref, cmd, wdir, warm=False, prefetch=False,
                                         touch_log=wdir / f"touch-{strategy}.json",
                                         profile=strategy.endswith("+profile"))  # fmt: skip
                    detail = m.pop("detail", None) or {}
                    daemon = detail.get("daemon_stats") or {}
                    # Where a lazy run's time went: the mount's steps, and the replay's counters.
                    m["startup"] = (daemon.get("startup") or {}).get("steps")
                    m["replay"] = daemon.get("profile")
                    if tag == opt_tag and not strategy.startswith("eager"):
                        m["hot_part_bytes"], m["frames_past_hot_part"] = hot_part_split(
                            wdir / f"touch-{strategy}.json", [la.get("layout") for la in opt_report["layers"]], chunk
                        )
                    runs.setdefault(strategy, []).append(m)
                    print(f"[{wname} {rep}] {strategy}: {m['done_s']:.2f}s, {format_size(m['bytes_fetched'])} "
                          f"in {m['requests']} requests", flush=True)  # fmt: skip
            results["workloads"][wname] = {
                "command": cmd,
                "recorded_raw_bytes": raw_read,
                "packed_floor_bytes": floor,
                "optimize_s": round(opt_s, 1),
                "optimized_blob_bytes": opt_blobs,
                "layout": [la.get("layout") for la in opt_report["layers"]],
                "runs": runs,
            }
    finally:
        registry.stop()
        cleanup.close()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / f"{args.name}.md").write_text(markdown(results))
    print(markdown(results))
    return 0


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else 0.0


def markdown(r: dict[str, Any]) -> str:
    lines = [
        "# Profile-guided layout: cold mount + workload",
        "",
        f"Link: {r['link']['rtt_ms']:g} ms RTT, {r['link']['mbit']:g} Mbit/s (tests/support/netproxy.py). "
        f"Frames: {format_size(r['chunk_size'])}. Plain blobs: {format_size(r['plain_blob_bytes'])} "
        f"({format_size(r['raw_image_bytes'])} raw). Profiles recorded on the plain image in "
        f"{format_size(r['record_chunk_size'])} frames. Medians of the runs. Layout: hot metadata, then the hot "
        "data blocks in first-read order (files read in part written chunk-based, 4 KiB chunks), then cold "
        "metadata and cold data; `lazyerofs optimize` defaults: the hot part's frames at zstd level 19, the "
        "rest at 3 (the packed floor is compressed at level 3, as the issue measured it). "
        + _service_line(r.get("service")),
        "",
    ]
    for wname, w in r["workloads"].items():
        floor = w["packed_floor_bytes"]
        # The faster of the two eager pulls (the optimized image's blobs are a little smaller).
        eager = min(
            _median([m["done_s"] for m in w["runs"].get(name, [])]) or float("inf")
            for name in ("eager", "eager of the optimized image")
        )
        lines += [
            f"## {wname}: `{w['command']}`",
            "",
            f"Packed floor: {format_size(floor)} ({100 * floor / r['plain_blob_bytes']:.1f}% of the plain blobs; "
            f"{format_size(w['recorded_raw_bytes'])} raw read in the recording). Optimized blobs: "
            f"{format_size(w['optimized_blob_bytes'])}; optimize took {w['optimize_s']}s.",
            "",
            "| strategy | done (s) | x faster than the faster eager | fetched | % of blobs | x floor | requests |",
            "|---|---|---|---|---|---|---|",
        ]
        for strategy, runs in w["runs"].items():
            done = _median([m["done_s"] for m in runs])
            fetched = _median([m["bytes_fetched"] for m in runs])
            reqs = _median([m["requests"] for m in runs])
            lines.append(
                f"| {strategy} | {done:.2f} | {eager / done if done else 0:.1f} | {format_size(int(fetched))} | "
                f"{100 * fetched / r['plain_blob_bytes']:.1f} | {fetched / floor if floor else 0:.2f} | {int(reqs)} |"
            )
        lines += ["", *_layout_lines(w), *_target_lines(wname, w, r["plain_blob_bytes"], eager)]
        lines += ["", _bound_line(floor, r["link"], eager), ""]
    return "\n".join(lines) + "\n"


def _service_line(service: dict[str, Any] | None) -> str:
    if not service:
        return "Mounts: not recorded whether through a lazyerofs service."
    if not service.get("used"):
        return "Mounts: in-process (--no-service)."
    return f"Mounts: through the benchmark's own lazyerofs service ({service.get('served')} served)."


def _bound_line(floor: int, link: dict[str, float], eager: float) -> str:
    """How fast any lazy start could be: the packed floor at the link's rate
    plus the round trips of a mount (manifest, tables, frames)."""
    rate = link["mbit"] * 1e6 / 8
    best = floor / rate + 3 * link["rtt_ms"] / 1000
    return (
        f"Bound: the packed floor alone takes {best:.2f} s on this link (its bytes at {link['mbit']:g} Mbit/s + "
        f"3 round trips), so with level-3 frames no lazy start of this workload beats eager by more than "
        f"{eager / best:.1f}x here."
    )


def _layout_lines(w: dict[str, Any]) -> list[str]:
    """What the layout did per layer (LayoutReport.to_json)."""
    out = []
    for i, la in enumerate(w.get("layout") or []):
        if la:
            out.append(
                f"Layer {i}: hot part {format_size(la['hot_end'])} of {format_size(la['image_size'])} (hot metadata "
                f"{format_size(la['metadata_bytes'])}, hot data {format_size(la['hot_bytes'])} of {la['hot_files']} "
                f"files, {la.get('chunked_files', 0)} of them read in part and chunk-based).  "
            )
    return out


def _target_lines(wname: str, w: dict[str, Any], plain: int, eager: float) -> list[str]:
    """The issue's lazy+optimized ("the image rebuilt from a profile recorded
    on the same workload, mounted cold with its profile": the
    lazy+optimized+profile row) against its targets, met or not, in words."""
    runs = w["runs"].get("lazy+optimized+profile")
    if not runs:
        return []
    fetched = _median([m["bytes_fetched"] for m in runs])
    done = _median([m["done_s"] for m in runs])
    floor = w["packed_floor_bytes"]
    x_floor, pct, speed = fetched / floor if floor else 0.0, 100 * fetched / plain, eager / done if done else 0.0
    if wname == "print":
        bytes_line = f"{pct:.1f}% of the blobs (target <= 10%: {'met' if pct <= 10 else 'MISSED'}; {x_floor:.2f}x the floor)"
        if 100 * floor / plain > 10:
            bytes_line += f"; the packed floor itself is {100 * floor / plain:.1f}% of these blobs"
    else:
        bytes_line = f"{x_floor:.2f}x the packed floor (target <= 1.15x: {'met' if x_floor <= 1.15 else 'MISSED'}; {pct:.1f}% of the blobs)"
    out = [
        "",
        f"Targets (issue 14's lazy+optimized: mounted cold with its profile, the lazy+optimized+profile row): "
        f"fetched {bytes_line}; {speed:.1f}x faster than eager "
        f"(target >= 5x: {'met' if speed >= 5 else 'MISSED'}).",
    ]
    if "hot_part_bytes" in runs[0]:
        inside = _median([m["hot_part_bytes"] for m in runs])
        past = _median([m["frames_past_hot_part"] for m in runs])
        out += [
            "",
            f"Of that, {format_size(int(inside))} lay in the layers' hot parts ({inside / floor if floor else 0:.2f}x the "
            f"floor, {100 * inside / plain:.1f}% of the blobs) and {int(past)} frames past them.",
        ]
    return out


if __name__ == "__main__":
    sys.exit(main())
