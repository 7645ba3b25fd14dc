"""How fast ``lazyerofs convert`` turns a tar+gzip image into seekable EROFS.

The source image is made from real files of this machine (no synthetic
data: compressibility and file-size mix matter for gzip, tar staging,
mkfs.erofs and zstd alike), three layers bottom first:

    stdlib   /usr/lib/python3.11 and /usr/share/zoneinfo   many small files
    headers  /usr/include and /usr/share/doc               many small files
    toolchain  /usr/lib/gcc                                 fewer, large files

each a ``tar --sort=name --numeric-owner`` stream compressed with ``gzip -6``
(cached under ``benchmarks/.work/convert/``). It is pushed to a real
``docker-registry`` on loopback (:class:`tests.support.localregistry.LocalRegistry`)
and converted by ``lazyerofs convert --json`` in a child process, so the
peak RSS measured (``wait4``) is the converter's own plus its children's
(mkfs.erofs) and nothing of this script. Throughput is MB (10^6 bytes) of
uncompressed tar per second of the whole command, manifest to manifest.
The same image is also converted with ``--via-mkfs`` (tar staging tree +
mkfs.erofs, the older road), ``--mkfs-runs`` times, for comparison.

Stages, per layer, are the wall times the converter reports: ``stage``
(download with digest check, decompression, and the EROFS image written from
the tar with its frames compressed as they become final, all overlapping;
with --via-mkfs: tar staging), ``mkfs`` (--via-mkfs only), ``encode`` (what
is left of the encoding: frame 0, the metadata's frames, the blob) and
``push``. With ``--isolate`` each step is also timed alone on the largest
layer, one at a time, to show what each costs by itself.

Run as root: ``.venv/bin/python -m benchmarks.convert_bench`` (a few minutes
the first time, while the source image is built). Writes
``benchmarks/results/convert.{json,md}`` (``--tag X`` writes ``convert-X.*``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from lazyfs.oci import RegistryClient, RegistryOptions, parse_reference
from tests.support.localregistry import LocalRegistry

HERE = Path(__file__).resolve().parent
WORK = HERE / ".work" / "convert"
RESULTS = HERE / "results"
GZ = "application/vnd.oci.image.layer.v1.tar+gzip"

LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("stdlib", ("usr/lib/python3.11", "usr/share/zoneinfo")),
    ("headers", ("usr/include", "usr/share/doc")),
    ("toolchain", ("usr/lib/gcc",)),
)
SPEC_VERSION = 1


def _sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()


def build_source(work: Path) -> list[dict[str, Any]]:
    """The layers' .tar.gz files (cached), with sizes and digests."""
    work.mkdir(parents=True, exist_ok=True)
    meta_path = work / "layers.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("spec") == SPEC_VERSION and all(Path(m["path"]).exists() for m in meta["layers"]):
            return meta["layers"]
    layers = []
    for name, paths in LAYERS:
        present = [p for p in paths if (Path("/") / p).exists()]
        if not present:
            raise SystemExit(f"none of {paths} exists on this machine")
        out = work / f"{name}.tar.gz"
        tar_path = work / f"{name}.tar"
        print(f"[source] tar + gzip -6 of {' '.join(present)}", flush=True)
        subprocess.run(
            ["tar", "-C", "/", "--sort=name", "--numeric-owner", "--xattrs", "-cf", str(tar_path), *present],
            check=True,
        )
        with open(out, "wb") as f:
            subprocess.run(["gzip", "-6", "-n", "-c", str(tar_path)], stdout=f, check=True)
        tar_size = tar_path.stat().st_size
        tar_digest = _sha256_file(tar_path)
        tar_path.unlink()
        files = int(
            subprocess.run(
                ["sh", "-c", f"find {' '.join('/' + p for p in present)} -xdev | wc -l"],
                capture_output=True, text=True, check=True,
            ).stdout
        )  # fmt: skip
        layers.append({
            "name": name, "paths": present, "path": str(out), "size": out.stat().st_size,
            "digest": _sha256_file(out), "tar_size": tar_size, "diff_id": tar_digest,
            "entries": files,
        })  # fmt: skip
    meta_path.write_text(json.dumps({"spec": SPEC_VERSION, "layers": layers}, indent=2))
    return layers


async def push_source(host: str, layers: list[dict[str, Any]]) -> str:
    ref = parse_reference(f"{host}/bench/source:v1")
    config = json.dumps({
        "architecture": "amd64", "os": "linux", "config": {},
        "rootfs": {"type": "layers", "diff_ids": [layer["diff_id"] for layer in layers]},
        "history": [{"created_by": f"layer {layer['name']}"} for layer in layers],
    }).encode()  # fmt: skip
    config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest, "size": len(config)},
        "layers": [{"mediaType": GZ, "digest": layer["digest"], "size": layer["size"]} for layer in layers],
    }).encode()  # fmt: skip
    async with RegistryClient(RegistryOptions()) as client:
        for layer in layers:
            await client.push_blob(ref, layer["path"], layer["digest"], layer["size"])
        await client.push_blob(ref, config, config_digest, len(config))
        await client.push_manifest(ref, manifest, "application/vnd.oci.image.manifest.v1+json")
    return str(ref)


def run_convert(
    src: str, dst: str, workdir: Path, extra: list[str], code: str = ""
) -> tuple[dict[str, Any], float, int, float]:
    """``lazyerofs convert --json`` in a child: (report, wall seconds, peak RSS in
    bytes, CPU seconds of the converter and its children)."""
    cmd = [sys.executable, "-m", "lazyfs.cli", "convert", "--json", "--workdir", str(workdir), *extra, src, dst]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.monotonic()
        env = {**os.environ, "PYTHONPATH": code} if code else None  # another tree's lazyfs
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=code or None)
        _, status, rusage = os.wait4(proc.pid, 0)
        wall = time.monotonic() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise SystemExit(f"convert failed ({proc.returncode}): {err.read().decode(errors='replace')[-3000:]}")
        report = json.loads(out.read())
    return report, wall, rusage.ru_maxrss * 1024, rusage.ru_utime + rusage.ru_stime


def isolate(layer: dict[str, Any], src: str, host: str, workdir: Path) -> dict[str, dict[str, float]]:
    """Each step of converting ``layer`` alone, one after the other (seconds)."""
    from lazyfs.format import encode_image
    from lazyfs.produce.erofs_writer import write_erofs_from_tar
    from lazyfs.produce.mkfs import make_erofs
    from lazyfs.produce.tarstage import stage_tar

    out: dict[str, float] = {}
    cpu: dict[str, float] = {}
    ref = parse_reference(src)
    clock = [time.monotonic(), os.times()]

    def lap(step: str) -> None:
        now, times = time.monotonic(), os.times()
        before = clock[1]
        out[step] = now - clock[0]
        cpu[step] = sum(times[:4]) - sum(before[:4])
        clock[:] = [time.monotonic(), os.times()]
    desc = {"mediaType": GZ, "digest": layer["digest"], "size": layer["size"]}

    async def download() -> None:
        async with RegistryClient(RegistryOptions()) as client:
            async def sink(piece: bytes) -> None:
                pass

            await client.blob(ref, desc).stream(sink)

    clock[:] = [time.monotonic(), os.times()]
    trio.run(download)
    lap("download+digest")

    tar_path = workdir / "iso.tar"
    clock[:] = [time.monotonic(), os.times()]
    from lazyfs.produce.unpack import _inflate  # ISA-L's where installed, else zlib

    d = _inflate.decompressobj(wbits=31)
    with open(layer["path"], "rb") as f, open(tar_path, "wb") as g:
        while piece := f.read(1 << 20):
            g.write(d.decompress(piece))
    lap(f"gunzip ({_inflate.__name__.split('.')[-1]})")

    direct = workdir / "iso-direct.erofs"
    clock[:] = [time.monotonic(), os.times()]
    with open(tar_path, "rb") as f:
        write_erofs_from_tar(f, direct, layer="iso", source_date_epoch=0, uuid_seed=layer["digest"].encode())
    lap("tar -> EROFS image (direct writer)")
    direct.unlink()

    stage = workdir / "iso-stage"
    stage.mkdir()
    clock[:] = [time.monotonic(), os.times()]
    with open(tar_path, "rb") as f:
        stage_tar(f, str(stage), layer="iso")
    lap("--via-mkfs: tar staging")
    tar_path.unlink()

    image = workdir / "iso.erofs"
    clock[:] = [time.monotonic(), os.times()]
    make_erofs(stage, image, source_date_epoch=0)
    lap("--via-mkfs: mkfs.erofs (+uuid)")
    shutil.rmtree(stage)

    clock[:] = [time.monotonic(), os.times()]
    with open(image, "rb") as f:
        hashlib.file_digest(f, "sha256")
    lap("sha256 of image")

    blob = workdir / "iso.blob"
    clock[:] = [time.monotonic(), os.times()]
    result = encode_image(image, blob, fsync=False)
    lap("encode (zstd+sha512, 2 threads)")
    image.unlink()

    async def push() -> None:
        dst = parse_reference(f"{host}/bench/isolated:v1")
        async with RegistryClient(RegistryOptions()) as client:
            await client.push_blob(dst, blob, result.descriptor["digest"], result.descriptor["size"])

    clock[:] = [time.monotonic(), os.times()]
    trio.run(push)
    lap("push")
    blob.unlink()
    return {k: {"seconds": round(v, 3), "cpu_seconds": round(cpu[k], 3)} for k, v in out.items()}


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "mkfs.erofs": subprocess.run(
            ["mkfs.erofs", "--version"], capture_output=True, text=True
        ).stdout.strip() or "?",
    }


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# convert benchmark",
        "",
        f"`lazyerofs convert` of a {len(result['layers'])}-layer tar+gzip image "
        f"({result['tar_bytes'] / 1e6:.0f} MB of tar, {result['source_bytes'] / 1e6:.0f} MB gzip, "
        f"{result['entries']} entries) pushed to a local docker-registry; "
        f"{result['machine']['cpus']} CPUs. Best of {result['runs']} runs.",
        "",
        f"**{result['tar_mb_per_s']:.1f} MB/s** of uncompressed tar "
        f"({result['seconds']:.2f} s wall, {result['cpu_seconds']:.1f} CPU-s), peak RSS "
        f"{result['peak_rss_bytes'] / 2**20:.0f} MiB (the converter and its children). Runs (wall s, CPU s, "
        "1-min load average before): "
        + ", ".join(f"{r['seconds']:.1f}/{r['cpu_seconds']:.1f}/{r['load_before']:.1f}" for r in result["all_runs"])
        + ". The machine is shared: a load above 2 means other work took CPU from the run.",
        "",
        "Per layer (wall seconds; stages overlap across layers): `stage` is download + gunzip + "
        "the EROFS image written from the tar, its frames compressed as they become final; "
        "`encode` what is left of the encoding once the image is complete.",
        "",
        *_layer_table(result["layers"]),
    ]
    mk = result.get("via_mkfs")
    if mk:
        lines += [
            "",
            f"The older road in the same run, `--via-mkfs` (tar staging tree + mkfs.erofs 1.5, "
            f"then the whole encoding), best of {mk['runs']}: **{mk['tar_mb_per_s']:.1f} MB/s** "
            f"({mk['seconds']:.2f} s wall, {mk['cpu_seconds']:.1f} CPU-s), peak RSS "
            f"{mk['peak_rss_bytes'] / 2**20:.0f} MiB. Same layers:",
            "",
            *_layer_table(mk["layers"]),
        ]
    if result.get("isolated"):
        iso = result["isolated"]
        lines += [
            "",
            f"Each step alone on layer `{iso['layer']}` ({iso['tar_bytes'] / 1e6:.0f} MB tar), "
            "for where the time goes:",
            "",
            "| step | wall s | CPU s | MB/s of tar (wall) |",
            "|---|---:|---:|---:|",
        ]
        for step, t in iso["steps"].items():
            lines.append(
                f"| {step} | {t['seconds']:.2f} | {t['cpu_seconds']:.2f} | "
                f"{iso['tar_bytes'] / 1e6 / max(t['seconds'], 1e-9):.0f} |"
            )
    if result.get("before"):
        b = result["before"]
        lines += ["", f"Before this change (same image and machine): {b}"]
    lines.append("")
    return "\n".join(lines)


def _layer_table(layers: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| layer | tar MB | entries | image MB | blob MB | stage s | wait s | mkfs s | encode s | push s | total s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for layer in layers:
        st = layer["stages"]
        lines.append(
            f"| {layer['name']} | {layer['tar_bytes'] / 1e6:.0f} | {layer['entries']} | "
            f"{layer['image_size'] / 1e6:.0f} | {layer['size'] / 1e6:.0f} | "
            + " | ".join(f"{st.get(k, 0):.2f}" for k in ("stage", "wait", "mkfs", "encode", "push"))
            + f" | {layer['seconds']:.2f} |"
        )
    return lines


def _best_of(
    runs: int, src: str, host: str, registry: LocalRegistry, tmp: Path, extra: list[str], code: str, label: str
) -> tuple[tuple[dict[str, Any], float, int, float], list[dict[str, Any]], int]:
    """Convert ``runs`` times: (the fastest (report, wall, peak RSS, CPU), every run, max RSS)."""
    best: tuple[dict[str, Any], float, int, float] | None = None
    rss = 0
    all_runs = []
    for i in range(runs):
        dst = f"{host}/bench/converted:{label}{i}"
        load = os.getloadavg()[0]
        report, wall, peak, cpu = run_convert(src, dst, tmp, ["--plain-http", *extra], code)
        rss = max(rss, peak)
        tar_bytes = report["tar_bytes"]
        all_runs.append({"seconds": round(wall, 3), "cpu_seconds": round(cpu, 3),
                         "load_before": load, "load_after": os.getloadavg()[0]})  # fmt: skip
        print(f"[{label} run {i}] {tar_bytes / 1e6 / wall:.1f} MB/s ({wall:.2f}s, {cpu:.1f} CPU-s), "
              f"peak RSS {peak / 2**20:.0f} MiB, load {load:.1f}", flush=True)  # fmt: skip
        if best is None or wall < best[1]:
            best = (report, wall, peak, cpu)
        # A fresh destination repository each run, but the registry dedups blobs
        # by digest across repositories: remove them so every run really uploads.
        shutil.rmtree(tmp / "registry" / "docker/registry/v2/repositories/bench/converted", ignore_errors=True)
        for layer in report["platforms"][0]["layers"]:
            shutil.rmtree(registry.blob_path(layer["digest"]).parent, ignore_errors=True)
    assert best is not None
    return best, all_runs, rss


def _layers_of(report: dict[str, Any], layers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    plat = report["platforms"][0]
    return [
        {"name": src_layer["name"], "stages": layer.get("stages") or {}, **{k: layer[k] for k in (
            "tar_bytes", "entries", "image_size", "size", "seconds")}}
        for src_layer, layer in zip(layers, plat["layers"], strict=True)
    ]  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=2, help="conversions to run; the best is kept")
    ap.add_argument("--isolate", action="store_true", help="also time each step alone")
    ap.add_argument("--mkfs-runs", type=int, default=1, help="conversions with --via-mkfs, for comparison (0: none)")
    ap.add_argument("--tag", default="", help="write convert-TAG.{json,md}")
    ap.add_argument("--before", default="", help="a line about the previous result, for the report")
    ap.add_argument("--code", default="", help="run the converter from this tree (PYTHONPATH), e.g. an old checkout")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: convert's staging tree keeps owners and devices")
    layers = build_source(WORK)
    tmp = Path(tempfile.mkdtemp(prefix="convert-bench-", dir=WORK))
    try:
        with LocalRegistry(tmp / "registry") as registry:
            src = trio.run(push_source, registry.host, layers)
            best, runs, rss = _best_of(args.runs, src, registry.host, registry, tmp, [], args.code, "direct")
            report, wall, peak, cpu = best
            plat = report["platforms"][0]
            result: dict[str, Any] = {
                "machine": machine(),
                "runs": args.runs,
                "source_bytes": sum(layer["size"] for layer in layers),
                "tar_bytes": report["tar_bytes"],
                "entries": sum(layer["entries"] for layer in plat["layers"]),
                "seconds": round(wall, 3),
                "converter_seconds": report["seconds"],
                "tar_mb_per_s": round(report["tar_bytes"] / 1e6 / wall, 1),
                "cpu_seconds": round(cpu, 3),
                "all_runs": runs,
                "peak_rss_bytes": peak,
                "max_peak_rss_bytes": rss,
                "layers": _layers_of(report, layers),
                "before": args.before,
            }
            if args.mkfs_runs:
                (mreport, mwall, mpeak, mcpu), mruns, _ = _best_of(
                    args.mkfs_runs, src, registry.host, registry, tmp, ["--via-mkfs"], args.code, "mkfs"
                )
                result["via_mkfs"] = {
                    "runs": args.mkfs_runs, "seconds": round(mwall, 3), "cpu_seconds": round(mcpu, 3),
                    "tar_mb_per_s": round(mreport["tar_bytes"] / 1e6 / mwall, 1), "peak_rss_bytes": mpeak,
                    "all_runs": mruns, "layers": _layers_of(mreport, layers),
                }  # fmt: skip
            if args.isolate:
                big = max(range(len(layers)), key=lambda i: layers[i]["tar_size"])
                steps = isolate(layers[big], src, registry.host, tmp)
                result["isolated"] = {
                    "layer": layers[big]["name"], "tar_bytes": layers[big]["tar_size"], "steps": steps,
                }  # fmt: skip
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    RESULTS.mkdir(exist_ok=True)
    stem = "convert" + (f"-{args.tag}" if args.tag else "")
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{stem}.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
