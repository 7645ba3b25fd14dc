"""Reliability at volume: a fault soak and a crash loop through the kernel;
writes results/reliability.{json,md}.

    python -m benchmarks.reliability [--soak-seconds N] [--min-reads N] [--crash-iterations N] [--short]
    python -m benchmarks.reliability --only clockjump [--clock-seconds N]

Part 2 (soak): a random two-layer image with 256 KiB frames in a real
registry, mounted with ``lazyerofs mount --rootfs`` (kernel EROFS + overlay
over the FUSE layer files) behind the fault proxy, which injects every kind
of fault it knows into blob requests. A small disk cache, a small memory
cache and ``drop_caches`` every few seconds keep fetches (and so faults)
coming. Readers in threads and child processes read random ranges and whole
files and check every byte against the source tree. Then the faults stop and
every file is read whole.

Part 3 (crashes): the daemon is killed with SIGKILL under running readers,
``lazyerofs umount`` must leave nothing, and the cache the killed daemons
wrote is reused; also the cache directory deleted and its file system filled
under a live mount, and the registry restarted mid-read.

Part 3 (the clock jumping): the daemon runs under libfaketime (Debian
package ``faketime``; the machine's clock is never touched) while readers
read: its wall clock jumps a day forward and two back (true monotonic
clock), and on a second mount wall and monotonic clocks jump a day forward
together, twice. Every read checked; after each jump the daemon must be
alive, every file read exact and every ``stat`` unchanged. ``--only
clockjump`` runs this part alone and merges it into the existing result.

The harness is ``tests/support/soak.py``; ``tests/test_reliability_short.py``
runs the same in a short form. ``--short`` writes reliability-short.* so
the full result is not overwritten. Needs root, /dev/fuse, docker-registry.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.support import soak
from tests.support.localregistry import LocalRegistry

RESULTS = Path(__file__).resolve().parent / "results"


def _fuzz_counts() -> dict[str, Any] | None:
    """Per-parser input counts of the fuzzing run (benchmarks/fuzz.py), if there is one."""
    try:
        fuzz = json.loads((RESULTS / "fuzz.json").read_text())
    except (OSError, ValueError):
        return None
    return {
        "total_inputs": fuzz.get("total_inputs"),
        "total_findings": fuzz.get("total_findings"),
        "per_parser": {t["target"]: t["inputs"] for t in fuzz.get("targets", []) if "target" in t},
        "source": "benchmarks/results/fuzz.json",
    }


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def _markdown(r: dict[str, Any]) -> str:
    if "soak" not in r or "crashes" not in r:  # a part run alone, nothing to merge into
        return "\n".join(["# Reliability", "", *_clock_markdown(r.get("clock_jump")), ""])
    s, c = r["soak"], r["crashes"]
    reads = s["reads"]
    rss = s["rss"]
    lines = [
        "# Reliability: fault soak and crashes through the kernel",
        "",
        f"{r['machine']}; load average {r['load_start']} at the start, {r['load_end']} at the end "
        f"(a shared machine: other jobs ran beside this one). {r['wall_seconds']:.0f} s wall. "
        f"Made by `python -m benchmarks.reliability{' --short' if r['short'] else ''}` "
        "(harness: `tests/support/soak.py`).",
        "",
        "## Summary",
        "",
        "| what | value |",
        "|---|---:|",
        f"| soak reads (checked byte for byte) | {reads['reads']:,} in {s['seconds']:.0f} s |",
        f"| exact | {reads['exact']:,} |",
        f"| **wrong** (a byte differs, or short/zero-filled presented as success) | **{reads['wrong']}** |",
        f"| EIO | {reads['eio']:,} |",
        f"| other errors | {sum(reads['other_errors'].values())} {reads['other_errors'] or ''} |",
        f"| **deadline overruns** (syscall > {s['deadline_s']:g} s) | **{reads['overruns']}** |",
        f"| slowest syscall / p99 / p50 | {reads['max_syscall_seconds']:.2f} s / "
        f"{reads.get('syscall_p99_seconds', 0):.3f} s / {reads.get('syscall_p50_seconds', 0):.4f} s |",
        f"| faults injected | {sum(s['faults_injected'].values()):,} |",
        f"| daemon RSS start -> end (after {rss['warmup_s']:g} s warm-up) | {_mib(rss['start'])} -> "
        f"{_mib(rss['end'])} ({rss['growth_pct']:+.1f} %; max {_mib(rss['max'])}) |",
        f"| after the faults stop: files read whole, exact | {s['after_faults']['exact']} of "
        f"{s['image_files']} |",
        f"| crash iterations (SIGKILL under readers) | {c['iterations']} |",
        f"| kill -> workload end, max / p50 | {c['kill_to_end_s'].get('max', 0):.2f} s / "
        f"{c['kill_to_end_s'].get('p50', 0):.2f} s |",
        f"| hangs (workload not ended {c['hang_after_s']:g} s after the kill) | {c['hangs']} |",
        f"| crash-loop reads / wrong | {c['reads']['reads']:,} / **{c['reads']['wrong']}** |",
        f"| **leftovers** after umount (mounts, state dirs) | **{len(c['leftovers'])}** |",
        f"| cache entries after the loop / damaged (re-hashed) / temp files left | "
        f"{c['cache_check']['entries']} / {c['cache_check']['damaged']} / {c['cache_check']['tmp_files']} |",
        f"| cache reuse: bytes fetched by a mount reading everything, then by the next | "
        f"{c['reuse']['reuse-a']['bytes_fetched']:,} / **{c['reuse']['reuse-b']['bytes_fetched']:,}** |",
        "",
        "## Faults injected per kind (soak)",
        "",
        "Each blob request (`/blobs/sha256:`) met the rules in this order; the first that fired won. "
        "`fired` is the proxy rule's own count. The trickle is measured apart (below): a trickled "
        "request holds its frames until the client's low-speed limit gives it up (5 s), which would "
        "stretch a soak's reads past their deadline while it lasts.",
        "",
        "| kind | probability | fired |",
        "|---|---:|---:|",
        *(f"| {k} | {s['fault_probability'][k]:g} | {v:,} |" for k, v in s["faults_injected"].items()),
        "",
        "## Soak set-up",
        "",
        f"* Image: {s['image_files']} files, {_mib(s['image_bytes'])} in two layers, "
        f"{s['chunk']} frames; readers: {s['processes']} processes x {s['threads_per_process']} "
        f"threads + {s['threads_in_parent']} threads; 20 % whole files, the rest random ranges "
        "(log-uniform lengths up to 1 MiB) of random files.",
        f"* Mount: `--read-timeout {s['read_timeout_s']:g} --cache-size {s['cache_size']} "
        f"--memory-cache {s['memory_cache']}`; `drop_caches` every {s['drop_caches_every_s']:g} s; "
        f"stalls last 3 x the read timeout; trickle sends 1 byte/s.",
        f"* Deadline: {s['deadline_rule']}.",
        f"* RSS: {rss['how']}; {rss['samples']} samples.",
        f"* Daemon counters at the end of the faulty phase: `{json.dumps(s['stats_during'])}`.",
        "",
        "## Crashes and other trouble",
        "",
        f"* {c['iterations']} times: mount (cache shared by all iterations, `--cache-size` small so "
        "entries keep being written and evicted), drop caches, start readers "
        f"({c['readers']}), SIGKILL the daemon 0.3-2 s later, time until every reader has ended, "
        "`lazyerofs umount`, look for mounts under the test paths and the state dir in /run/lazyerofs.",
        f"* Every read of the loop was checked, those racing the kill included: {c['reads']['exact']:,} "
        f"exact, {c['reads']['eio']:,} EIO, other errors {c['reads']['other_errors']}, "
        f"{c['reads']['wrong']} wrong.",
        f"* umount failures: {len(c['umount_failures'])}; kill -> end is measured until every reader "
        "thread and process has ended (each stops at its first error).",
        f"* Cache reuse: `{json.dumps(c['reuse'])}`.",
    ]
    for name, title in (
        ("cache_deleted", "Cache directory deleted under a live mount"),
        ("cache_filled", "Cache file system filled under a live mount (8 MiB tmpfs)"),
        ("registry_restart", "Registry stopped and restarted mid-read"),
    ):
        x = r.get(name)
        if x is None:
            continue
        if "error" in x:
            lines.append(f"* {title}: **harness error** {x['error']}")
            continue
        parts = [
            f"{k}: {v['reads']} reads, {v['exact']} exact, {v['eio']} EIO, {v['wrong']} wrong, "
            f"{v['overruns']} overruns"
            for k, v in x.items()
            if isinstance(v, dict) and "reads" in v and "exact" in v
        ]
        lines.append(f"* {title}: {'; '.join(parts)}; leftovers {len(x['leftovers'])}.")
    t = r.get("trickle")
    if t and "error" not in t:
        tries = "; ".join(f"{'after healing: ' if a['healed'] else 'trickled: '}{a['outcome']} in {a['seconds']:g} s, "
                          f"{a['requests_sent']} requests" for a in t["attempts"])  # fmt: skip
        lines.append(
            f"* Trickle (1 byte/s), outside the soak: fired {t['fired']}; 4 KiB reads of one frame of the layer "
            f"file: {tries}. Recovered once the network healed: **{'yes' if t['recovered'] else 'NO'}**"
            + ("" if t["recovered"] else " (finding: the trickled fetch is never abandoned, so its frame stays "
               "in flight and every read of it fails at --read-timeout without a new request)") + "."
        )
    cj = r.get("clock_jump")
    if isinstance(cj, dict):
        lines += ["* Clock jumps: see [the section below](#clock-jumps-under-a-live-mount).", ""]
    else:
        lines += [
            "* Clock jump: **not done**. Changing the system clock on a shared machine would disturb "
            "every other job on it, and no safe per-process substitute (libfaketime) is installed here.",
            "",
        ]
    lines += _clock_markdown(cj)
    fz = r.get("fuzz")
    if fz:
        lines += [
            "## Fuzzing (copied from benchmarks/results/fuzz.json)",
            "",
            f"{fz['total_inputs']:,} inputs in total, {fz['total_findings']} findings. Inputs per parser:",
            "",
            "| parser | inputs |",
            "|---|---:|",
            *(f"| {k} | {v:,} |" for k, v in fz["per_parser"].items()),
            "",
        ]
    if reads["overrun_samples"] or c["reads"]["overrun_samples"]:
        lines += ["## Overrun samples", "", *(f"* {x}" for x in reads["overrun_samples"] + c["reads"]["overrun_samples"]), ""]
    if reads["wrong_samples"] or c["reads"]["wrong_samples"]:
        lines += ["## Wrong reads", "", *(f"* {x}" for x in reads["wrong_samples"] + c["reads"]["wrong_samples"]), ""]
    return "\n".join(lines)


def _clock_markdown(cj: Any) -> list[str]:
    if not isinstance(cj, dict):
        return []
    if "error" in cj:
        return ["## Clock jumps under a live mount", "", f"**harness error** {cj['error']}", ""]
    lines = [
        "## Clock jumps under a live mount",
        "",
        f"Made by `python -m benchmarks.reliability --only clockjump` ({cj['wall_seconds']:.0f} s wall, load "
        f"{cj['load_start']} -> {cj['load_end']}); merged into this file beside the other parts.",
        "",
        f"The daemon runs under libfaketime ({cj['library']}, Debian package `faketime`), preloaded into "
        "`lazyerofs mount` so its forked daemon has it; the offset it adds is a file the library rereads at "
        "every clock reading, moved while readers read. The machine's clock is never touched. "
        f"Image: {cj['image_files']} files, {cj['image_bytes'] / (1 << 20):.1f} MiB, {cj['chunk']} frames; "
        f"mounts `--read-timeout {cj['read_timeout_s']:g} --cache-size {cj['cache_size']} --memory-cache 1MiB "
        "--no-prefetch` (the cache is smaller than the image: reads keep fetching across the jump); readers "
        f"2 processes x 2 threads + 2 threads, `drop_caches` every second; the clock moves {cj['lead_seconds']:g} s "
        f"after the readers start, they stop {cj['phase_seconds']:g} s later. Deadline per syscall: "
        f"{cj['deadline_s']:g} s. After each jump: daemon alive, every file read whole, every `stat` "
        "(rootfs files and the FUSE files) compared with before the first jump.",
        "",
        "| mount | clock moved | reads | exact | EIO | **wrong** | **overruns** | slowest syscall | "
        "requests during | after: exact | alive | stat changed | daemon's clock seen |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for kind, m in cj["mounts"].items():
        for j in m["jumps"]:
            d, a = j["during"], j["after"]
            days = j["jump_s"] / 86400
            moved = "no jump" if days == 0 else f"{days:+g} day{'s' if abs(days) != 1 else ''}"
            seen = j["seen_offset_s"]
            lines.append(
                f"| {kind} | {moved} (to {j['to_s'] / 86400:+g} d) | {d['reads']:,} | {d['exact']:,} | {d['eio']} | "
                f"**{d['wrong']}** | **{d['overruns']}** | {d['max_syscall_seconds']:.2f} s | "
                f"{(j['daemon_during'] or {}).get('requests', '?')} | {a['exact']} of {cj['image_files']} | "
                f"{'yes' if j['alive'] else '**NO**'} | {j['stat_changed_count']} | "
                f"{'?' if seen is None else f'{seen / 86400:+.2f} d'} |"
            )
    lines += [""]
    for kind, m in cj["mounts"].items():
        lines.append(f"* `{kind}`: {m['clock']}; libfaketime in the daemon: {'yes' if m['preloaded'] else '**no**'}; "
                     f"umount rc {m['umount_rc']}, leftovers {len(m['leftovers'])}.")  # fmt: skip
    lines += ["", *(f"* {n}" for n in cj.get("notes", [])), ""]
    return lines


@contextlib.contextmanager
def _registry_in(prefix: str, keep: bool) -> Iterator[tuple[LocalRegistry, Path]]:
    """A docker-registry in a fresh work directory; both go at the end
    (the directory stays with ``keep``)."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    registry = LocalRegistry(work / "storage")
    try:
        registry.start()
        yield registry, work
    finally:
        registry.stop()
        if keep:
            soak.log(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def _save(name: str, result: dict[str, Any]) -> None:
    """Write the JSON so far (a later part that fails loses nothing before it)."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.reliability", description=__doc__.split("\n\n")[0])
    p.add_argument("--soak-seconds", type=float, default=None, help="soak length (default 600, --short 45)")
    p.add_argument("--min-reads", type=int, default=None, help="soak goes on until this many reads (default 10000, --short 200)")
    p.add_argument("--crash-iterations", type=int, default=None, help="daemon kills (default 100, --short 5)")
    p.add_argument("--read-timeout", type=float, default=4.0, help="the mounts' --read-timeout (default 4)")
    p.add_argument("--short", action="store_true", help="the CI form; writes reliability-short.*")
    p.add_argument("--keep", action="store_true", help="keep the work directory (daemon logs)")
    p.add_argument("--only", choices=["clockjump"], help="run this part alone and merge it into the existing result")
    p.add_argument("--clock-seconds", type=float, default=None, help="readers per clock jump (default 20, --short 5)")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("needs root (FUSE, kernel EROFS and overlay mounts, drop_caches)")
    if args.only == "clockjump":
        return _only_clock_jump(args)
    seconds = args.soak_seconds if args.soak_seconds is not None else (45 if args.short else 600)
    min_reads = args.min_reads if args.min_reads is not None else (200 if args.short else 10_000)
    iterations = args.crash_iterations if args.crash_iterations is not None else (5 if args.short else 100)
    # NetProxy.stop() cancels its connection tasks; asyncio logs each as an error. Noise here.
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    started = time.monotonic()
    load_start = [round(x, 2) for x in os.getloadavg()]
    name = "reliability-short" if args.short else "reliability"
    result: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, kernel {platform.release()}, "
                   f"Python {platform.python_version()}",
        "short": args.short, "load_start": load_start,
    }  # fmt: skip
    with _registry_in("lazyerofs-reliability-", args.keep) as (registry, work):
        files, max_size = (50, 1 << 20) if args.short else (120, 2 << 20)
        image = soak.build_image(registry, work / "image", "soak", files=files, max_size=max_size)
        soak.log(f"image: {len(image.files)} files, {image.total_bytes >> 20} MiB, layers {image.layer_sizes}")
        rt = args.read_timeout
        result["soak"] = soak.run_soak(registry, image, work / "soak", seconds=seconds, min_reads=min_reads,
                                       read_timeout=rt, warmup=10 if args.short else 60)  # fmt: skip
        _save(name, result)
        result["crashes"] = soak.run_crashes(registry, image, work / "crash", iterations=iterations, read_timeout=rt)
        _save(name, result)
        scenarios = {
            "cache_deleted": lambda: soak.run_cache_deleted(registry, image, work / "deleted", read_timeout=rt),
            "cache_filled": lambda: soak.run_cache_filled(registry, image, work / "filled", read_timeout=rt),
            "registry_restart": lambda: soak.run_registry_restart(registry, image, work / "restart", read_timeout=rt),
            "trickle": lambda: soak.run_trickle(registry, image, work / "trickle", read_timeout=3.0),
        }
        for key, run in scenarios.items():
            try:
                result[key] = run()
            except Exception as exc:  # one broken scenario must not lose the others' figures
                result[key] = {"error": f"{type(exc).__name__}: {exc}", "leftovers": []}
            _save(name, result)
        result["clock_jump"] = _clock_jump(registry, work / "clock", args)
        _save(name, result)
        fuzz = _fuzz_counts()
        if fuzz is not None:
            result["fuzz"] = fuzz
    result["wall_seconds"] = round(time.monotonic() - started, 1)
    result["load_end"] = [round(x, 2) for x in os.getloadavg()]
    _save(name, result)
    (RESULTS / f"{name}.md").write_text(_markdown(result))
    print(_markdown(result))
    s, c = result["soak"], result["crashes"]
    ok = (
        s["reads"]["wrong"] == 0 and c["reads"]["wrong"] == 0 and s["reads"]["overruns"] == 0
        and not c["leftovers"] and c["hangs"] == 0 and c["reuse"]["reuse-b"]["bytes_fetched"] == 0
        and s["after_faults"]["exact"] == s["image_files"]
    )  # fmt: skip
    return 0 if ok else 1


def _clock_jump(registry: LocalRegistry, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Part 3's clock jumps on an image of their own; an error is recorded, not raised."""
    library = soak.faketime_library()
    if library is None:
        return {"error": "libfaketime is not installed (Debian package faketime)"}
    started, load_start = time.monotonic(), [round(x, 2) for x in os.getloadavg()]
    seconds = args.clock_seconds if args.clock_seconds is not None else (5.0 if args.short else 20.0)
    cache_size = "4MiB"
    try:
        files, max_size = (40, 1 << 20) if args.short else (60, 2 << 20)
        image = soak.build_image(registry, work / "image", "clock", files=files, max_size=max_size)
        out = soak.run_clock_jump(registry.host, image, work, library=library, seconds=seconds,
                                  read_timeout=args.read_timeout, cache_size=cache_size)  # fmt: skip
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    out.update(
        image_files=len(image.files), image_bytes=image.total_bytes, chunk=image.chunk, cache_size=cache_size,
        wall_seconds=round(time.monotonic() - started, 1), load_start=load_start,
        load_end=[round(x, 2) for x in os.getloadavg()], notes=CLOCK_NOTES,
    )  # fmt: skip
    return out


CLOCK_NOTES = [
    "What each clock drives in the daemon. CLOCK_MONOTONIC (`time.monotonic`, `trio.current_time`): every "
    "`--read-timeout` and request deadline (`trio.fail_after`), retry back-off, bearer-token expiry "
    "(`oci/auth.py`: the server's `expires_in` counted on this clock), the redirect cache's TTL, the link "
    "estimate (`fetch/policy.py`), profile recording. The wall clock (`time.time`): the FUSE files' "
    "mtime/ctime/atime (read once, at mount), cache entries' atime/mtime (LRU order), the age of stale "
    "temp files in the cache, log lines. The rootfs files' times come from the EROFS images.",
    "`wall`: CLOCK_MONOTONIC stays true (`FAKETIME_DONT_FAKE_MONOTONIC=1`), as under an NTP step or "
    "`date -s`. `both`: libfaketime 0.9.10 reports CLOCK_MONOTONIC as the faked wall time, so both move "
    "together; only forward moves are run there, since the kernel's monotonic clock never goes back (a "
    "forward jump is what a VM resumed after a long pause sees).",
    "`wall` also sets `FAKETIME_WAIT_MS=5`: Python's GIL waits on a CLOCK_MONOTONIC condition variable, "
    "and libfaketime 0.9.10 measures that deadline against its faked clock even when it leaves the "
    "monotonic clock alone, so without it every GIL wait ends at once and the daemon runs 20-40x slower "
    "(reads past `--read-timeout` before any jump). An artefact of the tool, not of lazyerofs.",
    "'Daemon's clock seen': the daemon stamps each cache entry it writes with its own wall clock "
    "(mtime) while the kernel stamps the change with the true one (ctime); the newest entry's difference "
    "shows the jump reached the daemon.",
]


def _only_clock_jump(args: argparse.Namespace) -> int:
    """Run part 3's clock jumps alone and merge them into the existing
    results/<name>.{json,md}, keeping every other part's figures."""
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    name = "reliability-short" if args.short else "reliability"
    try:
        result: dict[str, Any] = json.loads((RESULTS / f"{name}.json").read_text())
    except (OSError, ValueError):
        result = {"short": args.short}
    with _registry_in("lazyerofs-clockjump-", args.keep) as (registry, work):
        result["clock_jump"] = _clock_jump(registry, work / "clock", args)
    _save(name, result)
    (RESULTS / f"{name}.md").write_text(_markdown(result))
    print("\n".join(_clock_markdown(result["clock_jump"])))
    cj = result["clock_jump"]
    if "error" in cj:
        return 1
    jumps = [j for m in cj["mounts"].values() for j in m["jumps"]]
    ok = all(
        j["alive"] and j["during"]["wrong"] == 0 and j["during"]["overruns"] == 0 and j["stat_changed_count"] == 0
        and j["after"]["exact"] == cj["image_files"]
        for j in jumps
    ) and all(not m["leftovers"] for m in cj["mounts"].values())  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
