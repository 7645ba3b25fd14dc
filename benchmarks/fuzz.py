"""Fuzz every parser of foreign bytes with a budget; write results/fuzz.{json,md}.

    python -m benchmarks.fuzz [--inputs N] [--seconds S] [--target NAME ...] [--jobs J]

The input budget is split between targets by weight (slow, whole-flow targets
such as a client resolve over a mock registry get fewer inputs than pure
parsers); each target runs in its own forked, watched worker
(tests/fuzzing/engine.py), ``--jobs`` of them at a time. ``--seconds`` caps
the whole run; each target gets its share of it.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from tests.fuzzing import seeds
from tests.fuzzing.engine import (
    DEFAULT_DEADLINE,
    DEFAULT_HARD_DEADLINE,
    DEFAULT_MEM_BOUND,
    run_isolated,
)
from tests.fuzzing.targets import TARGETS

RESULTS = Path(__file__).resolve().parent / "results"


def _run(name: str, inputs: int, seconds: float, seed: int) -> dict[str, Any]:
    stats = run_isolated(name, inputs=inputs, seconds=seconds, seed=seed)
    d = stats.to_dict()
    d["what"] = TARGETS[name].what
    d["budget"] = inputs
    return d


def _markdown(result: dict[str, Any]) -> str:
    lines = [
        "# Fuzzing the parsers of foreign bytes",
        "",
        f"{result['total_inputs']:,} inputs in {result['wall_seconds']:.0f} s wall "
        f"({result['jobs']} workers, {result['machine']}); "
        f"{result['total_findings']} findings.",
        "",
        f"Verdicts: a lazyerofs error (`LazyErofsError`) or a clean parse passes; any other "
        f"exception, an input over {result['deadline_s']} s (deadline), a worker with no progress for "
        f"{result['hard_deadline_s']:.0f} s (hang), or an input that raises peak RSS by more than "
        f"{result['mem_bound_bytes'] >> 20} MiB (memory bound) is a finding. Workers run under "
        "RLIMIT_AS = start size + 3 GiB.",
        "",
        "| target | inputs | inputs/s | parsed | refused (project errors) | findings | deadline overruns "
        "| slowest input | max peak-RSS rise | peak RSS | RSS start -> end |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for t in result["targets"]:
        refused = ", ".join(f"{k} {v:,}" for k, v in sorted(t["refused"].items())) or "-"
        overruns = sum(f["count"] for f in t["findings"] if f["kind"] in ("deadline", "hang"))
        lines.append(
            f"| {t['target']} | {t['inputs']:,} | {t['rate']:,} | {t['passed']:,} | {refused} | "
            f"{len(t['findings'])} | {overruns} | {t['slowest'] * 1000:.1f} ms | "
            f"{t['max_peak_growth'] >> 20} MiB | {t['peak_rss'] >> 20} MiB | "
            f"{t['rss_start'] >> 20} -> {t['rss_end'] >> 20} MiB |"
        )
    lines += ["", "## What each target feeds", ""]
    lines += [f"* `{t['target']}`: {t['what']}" for t in result["targets"]]
    findings = [f for t in result["targets"] for f in t["findings"]]
    lines += ["", "## Findings", ""]
    if not findings:
        lines.append("None in this run.")
    for f in findings:
        lines.append(f"* `{f['target']}` {f['kind']} {f['exc_type']} at {f['where']} x{f['count']}: "
                     f"{f['message'][:200]} (input {f['input_len']} bytes, sha256 {f['input_sha256'][:16]})")
    lines += ["", "Not covered: " + result["not_covered"], ""]
    return "\n".join(lines)


NOT_COVERED = (
    "lazyfs/fetch/verity_tail.py open_verity_tail's own skippable-header read (its superblock and "
    "tree checks are covered through verity_superblock); lazyfs/oci/referrers.py (referrer "
    "indexes and artifact manifests; its JSON goes through fetch_manifest, covered by "
    "client_resolve); lazyfs/produce/convert.py's source config and index parsing; the "
    "gzip/zstd layer decompression in produce/unpack.py; erofs images themselves (parsed by the "
    "kernel, not by lazyerofs)."
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--inputs", type=int, default=1_000_000, help="total inputs over all targets")
    ap.add_argument("--seconds", type=float, default=1500.0, help="wall-time cap of the whole run")
    ap.add_argument("--target", action="append", choices=sorted(TARGETS), help="only these (repeatable)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--seed", type=int, default=int(time.time()))
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)

    names = args.target or sorted(TARGETS)
    seeds.real_blobs()  # build once here; forked workers inherit it
    weight = sum(TARGETS[n].weight for n in names)
    # Each target's share of the wall time: its share of the budget, times the jobs.
    plan = {n: max(1, round(args.inputs * TARGETS[n].weight / weight)) for n in names}
    began = time.monotonic()
    results = []
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        futures = {
            pool.submit(_run, n, plan[n], args.seconds * args.jobs * TARGETS[n].weight / weight,
                        args.seed + i): n
            for i, n in enumerate(names)
        }  # fmt: skip
        for fut in concurrent.futures.as_completed(futures):
            r = fut.result()
            results.append(r)
            print(f"{r['target']:18} {r['inputs']:>9,} inputs {r['rate']:>7,}/s "
                  f"findings {len(r['findings'])}", flush=True)
    results.sort(key=lambda r: r["target"])
    result = {
        "seed": args.seed, "jobs": args.jobs, "wall_seconds": round(time.monotonic() - began, 1),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "deadline_s": DEFAULT_DEADLINE, "hard_deadline_s": DEFAULT_HARD_DEADLINE,
        "mem_bound_bytes": DEFAULT_MEM_BOUND,
        "total_inputs": sum(r["inputs"] for r in results),
        "total_findings": sum(len(r["findings"]) for r in results),
        "targets": results, "not_covered": NOT_COVERED,
    }  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fuzz.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "fuzz.md").write_text(_markdown(result))
    print(f"{result['total_inputs']:,} inputs, {result['total_findings']} findings, "
          f"{result['wall_seconds']} s; wrote {args.out / 'fuzz.md'}")
    return 1 if result["total_findings"] else 0


if __name__ == "__main__":
    sys.exit(main())
