"""Reliability at volume: a fault soak and a crash loop through the kernel;
writes results/reliability.{json,md}.

    python -m benchmarks.reliability [--soak-seconds N] [--min-reads N] [--crash-iterations N] [--short]

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

The harness is ``tests/support/soak.py``; ``tests/test_reliability_short.py``
runs the same in a short form. ``--short`` writes reliability-short.* so
the full result is not overwritten. Needs root, /dev/fuse, docker-registry.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
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
    lines += [
        "* Clock jump: **not done**. Changing the system clock on a shared machine would disturb "
        "every other job on it, and no safe per-process substitute (libfaketime) is installed here.",
        "",
    ]
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
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("needs root (FUSE, kernel EROFS and overlay mounts, drop_caches)")
    seconds = args.soak_seconds if args.soak_seconds is not None else (45 if args.short else 600)
    min_reads = args.min_reads if args.min_reads is not None else (200 if args.short else 10_000)
    iterations = args.crash_iterations if args.crash_iterations is not None else (5 if args.short else 100)
    # NetProxy.stop() cancels its connection tasks; asyncio logs each as an error. Noise here.
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    work = Path(tempfile.mkdtemp(prefix="lazyerofs-reliability-"))
    started = time.monotonic()
    load_start = [round(x, 2) for x in os.getloadavg()]
    registry = LocalRegistry(work / "storage")
    name = "reliability-short" if args.short else "reliability"
    result: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, kernel {platform.release()}, "
                   f"Python {platform.python_version()}",
        "short": args.short, "load_start": load_start,
    }  # fmt: skip
    try:
        registry.start()
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
        result["clock_jump"] = "not done: the system clock is never changed on this shared machine"
        fuzz = _fuzz_counts()
        if fuzz is not None:
            result["fuzz"] = fuzz
    finally:
        registry.stop()
        if args.keep:
            soak.log(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
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


if __name__ == "__main__":
    sys.exit(main())
