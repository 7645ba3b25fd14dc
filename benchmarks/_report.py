"""Turn cold-start measurements into coldstart.json / .md / .png.

The physical limit is derived here rather than measured, from the lazy cold
run's touch log, so it always describes exactly the frames the workload
needed in that run (see ``benchmarks/coldstart.py`` for the model).
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from lazyfs.units import format_size

__all__ = ["derive", "write_all"]

Key = tuple[int, float, float, str]  # chunk, rtt_ms, mbit, workload
LAZY = ("lazy", "lazy-ondemand", "lazy+prefetch", "lazy+profile", "lazy+optimized", "lazy-warm")


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _touched(touch_log: list[dict[str, Any]], layer_raw: dict[str, int], chunk: int) -> tuple[int, int, int]:
    """(touched compressed bytes, touched raw bytes, touched frames)."""
    comp = raw = frames = 0
    for layer in touch_log:
        usize = layer_raw.get(layer["digest"], 0)
        for (start, end), i in zip(layer["spans"], layer["frames"], strict=True):
            comp += end - start
            raw += max(0, min(chunk, usize - i * chunk)) if usize else chunk
            frames += 1
    return comp, raw, frames


def link_bps(meta: dict[str, Any], mbit: float) -> float:
    """Bytes per second the emulated link gives at a ``mbit`` cap: the cap, or
    less where the proxy measured at setup delivered less (older results
    have no measurement: the cap)."""
    ceiling = meta.get("link_ceilings", {}).get(str(mbit))
    return (ceiling["effective_mbit"] if ceiling else mbit) * 1e6 / 8


def derive(measurements: list[dict[str, Any]], meta: dict[str, Any]) -> dict[str, Any]:
    """Limit rows, table rows, touched fractions and the RTT slope analysis."""
    rtt_round_trips = meta["limit_round_trips"]
    raw_sizes = [la["raw_bytes"] for la in meta["layers"]]
    raw_total = sum(raw_sizes)
    # Local run time of each workload with every byte in memory: the fastest
    # eager run after its mounts were ready (page cache holds the fresh images).
    local: dict[tuple[int, str], float] = {}
    for m in measurements:
        if m["strategy"] == "eager":
            k = (m["chunk_size"], m["workload"])
            local[k] = min(local.get(k, float("inf")), m["workload_s"])
    groups: dict[tuple[Key, str], list[dict[str, Any]]] = defaultdict(list)
    for m in measurements:
        groups[((m["chunk_size"], m["rtt_ms"], m["mbit"], m["workload"]), m["strategy"])].append(m)

    limits: list[dict[str, Any]] = []
    touched_rows: dict[tuple[int, str], dict[str, Any]] = {}
    # The touch log lists every frame a mount fetched: the on-demand-only
    # run's is what the workload needed (the default one fetches the rest too).
    touch_source = "lazy-ondemand" if any(m["strategy"] == "lazy-ondemand" for m in measurements) else "lazy"
    for (key, strategy), runs in sorted(groups.items()):
        if strategy != touch_source:
            continue
        chunk, rtt_ms, mbit, workload = key
        img = meta["images"][str(chunk)]
        layer_raw = {la["digest"]: raw_sizes[i] for i, la in enumerate(img["layers"]) if i < len(raw_sizes)}
        blob_total = sum(la["size"] for la in img["layers"])
        table_bytes = sum(la["table_bytes"] for la in img["layers"])
        per_run = []
        for m in runs:
            log = m["detail"].get("touch_log") or []
            if not log:
                continue
            comp, raw, frames = _touched(log, layer_raw, chunk)
            bw = link_bps(meta, mbit)
            head = img["manifest_bytes"] + table_bytes
            ready = head / bw + (rtt_round_trips - 1) * rtt_ms / 1000
            net = (head + comp) / bw + rtt_round_trips * rtt_ms / 1000
            loc = local.get((chunk, workload), 0.0)
            per_run.append((ready, net + loc, head + comp, comp, raw, frames, net, loc))
            touched_rows.setdefault((chunk, workload), {"comp": [], "raw": [], "frames": [], "blob_total": blob_total})
            touched_rows[(chunk, workload)]["comp"].append(comp)
            touched_rows[(chunk, workload)]["raw"].append(raw)
            touched_rows[(chunk, workload)]["frames"].append(frames)
        if not per_run:
            continue
        best = min(per_run, key=lambda x: x[1])
        limits.append(
            {
                "chunk_size": chunk,
                "rtt_ms": rtt_ms,
                "mbit": mbit,
                "workload": workload,
                "strategy": "limit",
                "ready_s": best[0],
                "done_s": best[1],
                "bytes_fetched": best[2],
                "requests": rtt_round_trips,
                "touched_compressed": best[3],
                "touched_raw": best[4],
                "touched_frames": best[5],
                "network_s": best[6],
                "local_workload_s": best[7],
            }
        )

    fractions = []
    for (chunk, workload), t in sorted(touched_rows.items()):
        comp, raw = min(t["comp"]), min(t["raw"])
        fractions.append(
            {
                "chunk_size": chunk,
                "workload": workload,
                "touched_frames": min(t["frames"]),
                "touched_raw_bytes": raw,
                "raw_total": raw_total,
                "raw_fraction": raw / raw_total if raw_total else float("nan"),
                "touched_compressed_bytes": comp,
                "blob_total": t["blob_total"],
                "compressed_fraction": comp / t["blob_total"] if t["blob_total"] else float("nan"),
            }
        )

    rows = []
    limit_by_key = {(r["chunk_size"], r["rtt_ms"], r["mbit"], r["workload"]): r for r in limits}
    med: dict[tuple[Key, str], dict[str, float]] = {}
    for (key, strategy), runs in groups.items():
        med[(key, strategy)] = {
            f: _median([r[f] for r in runs]) for f in ("ready_s", "done_s", "bytes_fetched", "requests")
        }
    order = {"eager": 0, "lazy": 1, "lazy-ondemand": 2, "lazy+prefetch": 2, "lazy+profile": 3, "lazy+optimized": 4, "lazy-warm": 5, "limit": 6}
    keys = sorted({k for k, _s in med} | set(limit_by_key), key=lambda k: (-k[0], k[1], -k[2], k[3]))
    for key in keys:
        eager = med.get((key, "eager"))
        limit = limit_by_key.get(key)
        for strategy in sorted({s for k, s in med if k == key} | ({"limit"} if limit else set()), key=order.get):
            v = limit if strategy == "limit" else med[(key, strategy)]
            assert v is not None
            row = {
                "chunk_size": key[0],
                "rtt_ms": key[1],
                "mbit": key[2],
                "workload": key[3],
                "strategy": strategy,
                "ready_s": v["ready_s"],
                "done_s": v["done_s"],
                "bytes_fetched": v["bytes_fetched"],
                "requests": v["requests"],
                "lazy_over_eager": None,
                "lazy_over_limit": None,
            }
            if strategy in LAZY:
                if eager:
                    row["lazy_over_eager"] = v["done_s"] / eager["done_s"]
                if limit and strategy != "lazy-warm":
                    row["lazy_over_limit"] = v["done_s"] / limit["done_s"]
            rows.append(row)

    # Sequential round trips: slope of lazy time over RTT at fixed bandwidth.
    slopes = []
    by_bw: dict[tuple[int, float, str], list[tuple[float, float, float]]] = defaultdict(list)
    for (key, strategy), v in med.items():
        if strategy == "lazy":
            by_bw[(key[0], key[2], key[3])].append((key[1] / 1000, v["done_s"], v["ready_s"]))
    for (chunk, mbit, workload), pts in sorted(by_bw.items()):
        if len({p[0] for p in pts}) < 2:
            continue
        slopes.append(
            {
                "chunk_size": chunk,
                "mbit": mbit,
                "workload": workload,
                "sequential_rtts_done": _slope([(p[0], p[1]) for p in pts]),
                "sequential_rtts_ready": _slope([(p[0], p[2]) for p in pts]),
            }
        )
    return {
        "limits": limits,
        "rows": rows,
        "touched": fractions,
        "rtt_slopes": slopes,
        "targets": targets(rows, local, meta, superblock_frames(measurements)),
    }


def superblock_frames(measurements: list[dict[str, Any]]) -> dict[int, int]:
    """Compressed bytes of every layer's frame 0 (its superblock, which the
    kernel must read before a layer mounts), per chunk size, from the touch
    logs of the lazy runs."""
    out: dict[int, int] = {}
    for m in measurements:
        if m["strategy"] not in ("lazy", "lazy-ondemand") or m["chunk_size"] in out:
            continue
        log = (m.get("detail") or {}).get("touch_log") or []
        spans = [end - start for layer in log for (start, end), i in zip(layer["spans"], layer["frames"], strict=True) if i == 0]
        if log and len(spans) == len(log):
            out[m["chunk_size"]] = sum(spans)
    return out


def targets(
    rows: list[dict[str, Any]],
    local: dict[tuple[int, str], float],
    meta: dict[str, Any],
    superblocks: dict[int, int] | None = None,
) -> list[dict[str, Any]]:
    """Issue 12's "must show" checks, one per point and target: the bound,
    the measured value, met or not.

    * default lazy <= 0.8 x eager at 100 Mbit/s, <= 1.0 x eager everywhere;
    * lazy+profile <= 1.2 x the limit (which includes the local run time);
    * ready <= 4 RTT + first frames + 0.25 s, first frames taken as the
      manifest, the chunk tables and every layer's frame 0 (the superblock
      the kernel reads to mount it; ``superblocks``, per chunk size) at the
      link's bandwidth (the default lazy run);
    * warm mount <= 0.3 s; warm workload <= 2 x local disk + 0.3 s.
    """
    by = {(r["chunk_size"], r["rtt_ms"], r["mbit"], r["workload"], r["strategy"]): r for r in rows}
    out: list[dict[str, Any]] = []

    def check(key: Key, target: str, value: float, bound: float) -> None:
        out.append(
            {
                "chunk_size": key[0], "rtt_ms": key[1], "mbit": key[2], "workload": key[3],
                "target": target, "value": value, "bound": bound, "met": value <= bound,
            }
        )

    for key in sorted({k[:4] for k in by}, key=lambda k: (-k[0], k[1], -k[2], k[3])):
        chunk, rtt_ms, mbit, workload = key
        eager, lazy = by.get((*key, "eager")), by.get((*key, "lazy"))
        profile, warm, limit = by.get((*key, "lazy+profile")), by.get((*key, "lazy-warm")), by.get((*key, "limit"))
        if eager and lazy:
            check(key, "lazy <= 1.0x eager", lazy["done_s"] / eager["done_s"], 1.0)
            if mbit == 100:
                check(key, "lazy <= 0.8x eager (100 Mbit/s)", lazy["done_s"] / eager["done_s"], 0.8)
        if profile and limit:
            check(key, "lazy+profile <= 1.2x limit", profile["done_s"] / limit["done_s"], 1.2)
        if lazy:
            img = meta["images"].get(str(chunk))
            head = (img["manifest_bytes"] + sum(la["table_bytes"] for la in img["layers"])) if img else 0
            head += (superblocks or {}).get(chunk, 0)
            bound = 4 * rtt_ms / 1000 + head / link_bps(meta, mbit) + 0.25
            check(key, "ready <= 4 RTT + first frames + 0.25 s", lazy["ready_s"], bound)
        if warm:
            check(key, "warm mount <= 0.3 s", warm["ready_s"], 0.3)
            loc = local.get((chunk, workload))
            if loc is not None:
                check(key, "warm workload <= 2x local + 0.3 s", warm["done_s"] - warm["ready_s"], 2 * loc + 0.3)
    return out


def _ceiling_lines(meta: dict[str, Any]) -> list[str]:
    """What the emulated link delivered at setup, per cap (issue 12 item 5)."""
    ceilings = meta.get("link_ceilings") or {}
    if not ceilings:
        return []
    parts = []
    for c in ceilings.values():
        par = next((f"{v:g} Mbit/s over {k.split('_')[0]} parallel range requests" for k, v in c.items() if k.endswith("_streams_mbit")), "")
        parts.append(f"at a {c['cap_mbit']:g} Mbit/s cap it delivered {c['one_connection_mbit']:g} Mbit/s over one connection, {par}")
    return [
        "Link check (one blob through a fresh proxy with no RTT, before the sweep): " + "; ".join(parts)
        + ". The limit uses the lower of the cap and the best delivered rate.",
    ]


def _slope(pts: list[tuple[float, float]]) -> float:
    n = len(pts)
    mx = sum(p[0] for p in pts) / n
    my = sum(p[1] for p in pts) / n
    den = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / den if den else float("nan")


def _fmt_ratio(x: float | None) -> str:
    return "" if x is None else f"{x:.2f}"


def markdown(derived: dict[str, Any], meta: dict[str, Any]) -> str:
    m = meta["machine"]
    lines = [
        "# Cold start: eager pull vs lazy mount vs physical limit",
        "",
        f"Image: {meta['image']}, {len(meta['layers'])} layers "
        + ", ".join(f"{la['name']} {format_size(la['raw_bytes'])}" for la in meta["layers"])
        + " (raw EROFS).",
        f"Machine: {m['cpus']} CPUs ({m['cpu_model']}), {m['memory']}, kernel {m['kernel']}, Python {m['python']}; {m['date']}.",
        f"Network: {meta['network_emulator']} (per-request RTT, shared bandwidth cap) in front of docker-registry.",
        *_ceiling_lines(meta),
        f"Repetitions per point: {meta['repeat']} (the table shows the median). Total wall time {meta['wall_s'] / 60:.1f} min.",
        "",
        "Workloads (in a chroot of the mounted rootfs):",
        "",
    ]
    lines += [f"* `{name}`: `{cmd}`" for name, cmd in meta["workloads"].items()]
    lines += [
        "",
        "Strategies: `eager` = download every blob, verify+decode every frame, write layer.erofs, kernel-mount, "
        "overlay; `lazy` = `lazyerofs mount --rootfs` with an empty chunk cache and the default policy (once "
        "mounted, the rest of the image is fetched in the background with the measured link's bandwidth-delay "
        "product in flight, stepping aside for on-demand reads; its bytes include that traffic until the workload "
        "exited); `lazy-ondemand` = the same with `--no-prefetch` (on-demand reads only: the old default); "
        "`lazy+profile` = a cold mount replaying the "
        "startup profile the `lazy` run of the same workload recorded and pushed (the other lazy strategies "
        "mount with `--no-profile`); `lazy+optimized` = the image laid out by `lazyerofs optimize` for that same "
        "profile (issue 14), mounted cold with the translated profile; `lazy-warm` = `lazy` with the whole "
        "image in the chunk cache (filled by an untimed mount; page cache dropped); `limit` = (manifest + chunk tables + compressed bytes of the frames the "
        f"lazy run touched) / bandwidth + {meta['limit_round_trips']} x RTT (manifest; all tables in parallel; all "
        "touched frames in parallel) + the workload's run time with all bytes local (the frames touched are those "
        "the on-demand-only run fetched). Every run starts with "
        "`sync; echo 3 > /proc/sys/vm/drop_caches`.",
        "",
        "Times in seconds: *ready* = rootfs mounted, *done* = workload exited (both from the start of the pull). "
        "Bytes and requests as seen by the network emulator (eager, lazy*) or modelled (limit). Ratios use *done*; "
        "lazy/eager and lazy/limit are given for each lazy strategy's own time (lazy/limit not for lazy-warm).",
        "",
        "| chunk | RTT ms | Mbit/s | workload | strategy | ready s | done s | bytes fetched | requests | lazy/eager | lazy/limit |",
        "|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in derived["rows"]:
        lines.append(
            f"| {format_size(r['chunk_size'])} | {r['rtt_ms']:g} | {r['mbit']:g} | {r['workload']} | {r['strategy']} "
            f"| {r['ready_s']:.2f} | {r['done_s']:.2f} | {format_size(int(r['bytes_fetched']))} | {r['requests']:g} "
            f"| {_fmt_ratio(r['lazy_over_eager'])} | {_fmt_ratio(r['lazy_over_limit'])} |"
        )
    lines += [
        "",
        "## Fraction of the image each workload touches",
        "",
        "| chunk | workload | frames | raw bytes touched | of raw image | compressed bytes | of blobs |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for t in derived["touched"]:
        lines.append(
            f"| {format_size(t['chunk_size'])} | {t['workload']} | {t['touched_frames']} | "
            f"{format_size(t['touched_raw_bytes'])} | {t['raw_fraction']:.1%} | "
            f"{format_size(t['touched_compressed_bytes'])} | {t['compressed_fraction']:.1%} |"
        )
    if derived.get("targets"):
        tally: dict[str, list[int]] = {}
        for t in derived["targets"]:
            tally.setdefault(t["target"], [0, 0])[0 if t["met"] else 1] += 1
        lines += [
            "",
            "## Issue 12 targets",
            "",
            "First frames (the ready target): the manifest, the chunk tables and every layer's frame 0 (its "
            "superblock, which the kernel reads before the layer mounts) at the link's measured rate.",
            "",
            "| target | points met | points missed | worst value / bound |",
            "|---|---:|---:|---|",
        ]
        for name, (met, missed) in tally.items():
            worst = max((t for t in derived["targets"] if t["target"] == name), key=lambda t: t["value"] / t["bound"])
            lines.append(
                f"| {name} | {met} | {missed} | {worst['value']:.2f} / {worst['bound']:.2f} at "
                f"{format_size(worst['chunk_size'])}, {worst['rtt_ms']:g} ms, {worst['mbit']:g} Mbit/s, {worst['workload']} |"
            )
        lines += [
            "",
            "Misses, point by point:",
            "",
            "| chunk | RTT ms | Mbit/s | workload | target | value | bound |",
            "|---|---:|---:|---|---|---:|---:|",
        ]
        for t in derived["targets"]:
            if not t["met"]:
                lines.append(
                    f"| {format_size(t['chunk_size'])} | {t['rtt_ms']:g} | {t['mbit']:g} | {t['workload']} | "
                    f"{t['target']} | {t['value']:.2f} | {t['bound']:.2f} |"
                )
    if meta.get("load"):
        load = meta["load"]
        lines += [
            "",
            f"Machine load (1-minute load average, {meta['machine']['cpus']} CPUs, other jobs were running): "
            f"{load['start']:.1f} at the start, {load['end']:.1f} at the end, {load['min']:.1f}-{load['max']:.1f} "
            "over the runs (each run's own is in the JSON as `load1`).",
        ]
    if derived["rtt_slopes"]:
        lines += [
            "",
            "## Sequential round trips of the lazy path",
            "",
            "Slope of the lazy time over RTT at fixed bandwidth: how many round trips the client waits for one "
            f"after another (the limit needs {meta['limit_round_trips']}).",
            "",
            "| chunk | Mbit/s | workload | sequential RTTs to ready | sequential RTTs to done |",
            "|---|---:|---|---:|---:|",
        ]
        for s in derived["rtt_slopes"]:
            lines.append(
                f"| {format_size(s['chunk_size'])} | {s['mbit']:g} | {s['workload']} | "
                f"{s['sequential_rtts_ready']:.1f} | {s['sequential_rtts_done']:.1f} |"
            )
    return "\n".join(lines) + "\n"


def _plot(derived: dict[str, Any], path: Path) -> bool:
    """Bar chart of time-to-done per strategy, one panel per chunk size x workload."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[report] matplotlib missing (pip install '.[bench]'): no plot")
        return False
    rows = derived["rows"]
    chunks = sorted({r["chunk_size"] for r in rows}, reverse=True)
    workloads = sorted({r["workload"] for r in rows})
    strategies = [
        s
        for s in ("eager", "lazy", "lazy-ondemand", "lazy+prefetch", "lazy+profile", "lazy+optimized", "lazy-warm", "limit")
        if any(r["strategy"] == s for r in rows)
    ]
    nets = sorted({(r["rtt_ms"], r["mbit"]) for r in rows}, key=lambda x: (x[0], -x[1]))
    fig, axes = plt.subplots(
        len(chunks), len(workloads), figsize=(5.5 * len(workloads), 3.2 * len(chunks)), squeeze=False, sharey=True
    )
    width = 0.8 / max(1, len(strategies))
    for i, chunk in enumerate(chunks):
        for j, wl in enumerate(workloads):
            ax = axes[i][j]
            for k, strat in enumerate(strategies):
                ys = []
                for rtt, mbit in nets:
                    match = [
                        r["done_s"]
                        for r in rows
                        if (r["chunk_size"], r["workload"], r["strategy"], r["rtt_ms"], r["mbit"])
                        == (chunk, wl, strat, rtt, mbit)
                    ]
                    ys.append(match[0] if match else 0)
                ax.bar([x + k * width for x in range(len(nets))], ys, width, label=strat)
            ax.set_xticks([x + width * (len(strategies) - 1) / 2 for x in range(len(nets))])
            ax.set_xticklabels([f"{rtt:g}ms\n{mbit:g}Mb" for rtt, mbit in nets], fontsize=8)
            ax.set_yscale("log")
            ax.set_title(f"{wl}, chunk {format_size(chunk)}", fontsize=10)
            if j == 0:
                ax.set_ylabel("time to workload done (s)")
            ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_all(
    measurements: list[dict[str, Any]], meta: dict[str, Any], results: Path, name: str, *, plot: bool = True
) -> list[Path]:
    """Write ``name``.json (everything), ``name``.md and ``name``.png under ``results``."""
    results.mkdir(parents=True, exist_ok=True)
    derived = derive(measurements, meta)
    out = [results / f"{name}.json", results / f"{name}.md"]
    out[0].write_text(json.dumps({"meta": meta, "measurements": measurements, **derived}, indent=1) + "\n")
    out[1].write_text(markdown(derived, meta))
    if plot and derived["rows"] and _plot(derived, results / f"{name}.png"):
        out.append(results / f"{name}.png")
    return out
