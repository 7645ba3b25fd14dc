"""The main job on an embedded default, end to end, on this machine.

1. start a local OCI registry (Debian's docker-registry) on a free port;
2. build an example two-layer image (Python's standard library as the base
   layer, examples/app as the top layer) and push it as seekable EROFS;
3. mount it lazily with ``lazyerofs mount --rootfs --no-prefetch``: FUSE serves the layer
   files, the kernel EROFS driver mounts them, overlayfs stacks them;
4. print a file from the rootfs and the stats: how few bytes were fetched;
5. unmount and stop the registry.

Run as root: ``make demo`` (which sets up everything first).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

from lazyfs.units import format_size

# The local registry harness lives with the tests (it is not shipped).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.support.localregistry import LocalRegistry

HERE = Path(__file__).resolve().parent
LAZYEROFS = str(Path(sys.executable).parent / "lazyerofs")


def run(*args: str, quiet: bool = False) -> str:
    print(f"$ lazyerofs {' '.join(args)}", flush=True)
    proc = subprocess.run([LAZYEROFS, *args], capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        sys.exit(f"demo: lazyerofs {args[0]} failed:\n{proc.stderr}")
    if proc.stdout.strip() and not quiet:
        print("  " + proc.stdout.strip().replace("\n", "\n  "))
    return proc.stdout


def base_layer(dst: Path) -> None:
    """Python's standard library, without tests and caches: ~30 MiB of real files."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    shutil.copytree(
        stdlib,
        dst / "usr" / "lib" / stdlib.name,
        symlinks=True,
        ignore=shutil.ignore_patterns("test", "tests", "__pycache__", "site-packages", "idlelib", "tkinter"),
    )


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="lazyerofs-demo-"))
    mnt, rootfs = work / "mnt", work / "rootfs"
    mnt.mkdir()
    rootfs.mkdir()
    mounted = False
    try:
        with LocalRegistry(work / "registry") as registry:
            print(f"registry: docker-registry on {registry.host}")
            base_layer(work / "base")
            shutil.copytree(HERE / "app", work / "top" / "app")
            ref = f"{registry.host}/demo/python-app:v1"
            run("push", "--chunk-size", "1MiB", str(work / "base"), str(work / "top"), ref)

            started = time.monotonic()
            # --no-prefetch: only what is read crosses the network, to show it. By
            # default the rest of the image follows in the background.
            run("mount", ref, str(mnt), "--rootfs", str(rootfs), "--cache-dir", str(work / "cache"), "--no-prefetch")
            mounted = True
            print(f"mounted in {time.monotonic() - started:.2f}s; rootfs at {rootfs}")
            print(f"\n$ cat {rootfs}/app/hello.txt")
            print((rootfs / "app" / "hello.txt").read_text())

            stats = json.loads(run("stats", str(mnt), quiet=True))
            total = sum(layer.get("blob_size", layer["size"]) for layer in stats["layers"])
            print(
                f"fetched {format_size(stats['bytes_fetched'])} of {format_size(total)} "
                f"({100 * stats['bytes_fetched'] / total:.1f}%) in {stats['requests']} requests; "
                f"{stats['frames_fetched']} frames verified (SHA-512) and cached"
            )
            for layer in stats["layers"]:
                print(
                    f"  layer {layer['index']}: {layer['frames_present']}/{layer['frames_total']} frames present, "
                    f"{format_size(layer['bytes_fetched'])} fetched"
                )
            run("umount", str(mnt))
            mounted = False
    finally:
        if mounted:
            subprocess.run([LAZYEROFS, "umount", str(mnt)], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
