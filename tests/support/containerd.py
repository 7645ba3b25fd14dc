"""A real containerd (Debian's, with runc) and the lazyerofs snapshotter,
each started in a temp dir with its own root, state and socket.

Also a small python3 rootfs made from this machine's own Debian python3
(the interpreter, the libraries it links, its stdlib): a real program for
containers to run, built in a second instead of a debootstrap's minutes.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

__all__ = ["Containerd", "Snapshotter", "ctr", "push_tar_image", "python_rootfs"]

ENV_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

PYTHON = "/usr/bin/python3.11"
# Parts of the stdlib a container test never imports.
_STDLIB_SKIP = {"test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "__pycache__", "config-3.11-x86_64-linux-gnu", "dist-packages", "site-packages"}


def python_rootfs(dest: Path) -> tuple[Path, Path]:
    """Two layer trees, ``dest/base`` (libc, loader, /etc, /bin/sh) and
    ``dest/python`` (python3 and its stdlib), bottom first."""
    base, py = dest / "base", dest / "python"
    if (py / "usr/bin/python3").exists():
        return base, py
    libs = subprocess.run(["ldd", PYTHON, "/bin/sh"], capture_output=True, text=True, check=True).stdout
    paths = {PYTHON, "/bin/sh"}
    for line in libs.splitlines():
        words = line.split()
        for w in words:
            if w.startswith("/") and not w.endswith(":"):
                paths.add(w)
    for p in sorted(paths):
        if p == PYTHON:
            continue
        real = os.path.realpath(p)
        target = base / p.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(real, target)
    for d in ("etc", "tmp", "proc", "dev", "sys", "run", "root", "usr/bin", "lib64"):
        (base / d).mkdir(parents=True, exist_ok=True)
    (base / "tmp").chmod(0o1777)
    (base / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/sh\n")
    (base / "etc/group").write_text("root:x:0:\nnogroup:x:65534:\n")
    (py / "usr/bin").mkdir(parents=True)
    shutil.copy2(PYTHON, py / "usr/bin/python3.11")
    os.symlink("python3.11", py / "usr/bin/python3")
    shutil.copytree(
        "/usr/lib/python3.11",
        py / "usr/lib/python3.11",
        symlinks=True,
        ignore=lambda _d, names: [n for n in names if n in _STDLIB_SKIP],
    )
    return base, py


def tar_gzip(tree: Path, dest: Path) -> tuple[bytes, str]:
    """(tar.gz bytes, diff_id) of ``tree``, as docker/buildkit would make the layer."""
    tar = subprocess.run(
        ["tar", "--numeric-owner", "--xattrs", "--sort=name", "--mtime=@0", "-C", str(tree), "-cf", "-", "."],
        capture_output=True,
        check=True,
    ).stdout
    diff_id = "sha256:" + hashlib.sha256(tar).hexdigest()
    blob = gzip.compress(tar, compresslevel=6, mtime=0)
    dest.write_bytes(blob)
    return blob, diff_id


def push_tar_image(trees: list[Path], ref_text: str, work: Path) -> dict[str, Any]:
    """Push ``trees`` (bottom first) as an ordinary OCI image with tar+gzip layers."""
    import trio

    from lazyfs.oci import RegistryClient, parse_reference

    layers = []
    for tree in trees:
        blob, diff_id = tar_gzip(tree, work / f"{tree.name}.tar.gz")
        layers.append((blob, diff_id))
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Env": [ENV_PATH]},
            "rootfs": {"type": "layers", "diff_ids": [d for _b, d in layers]},
        }
    ).encode()
    descs = [
        {
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": "sha256:" + hashlib.sha256(b).hexdigest(),
            "size": len(b),
        }
        for b, _d in layers
    ]
    config_desc = {
        "mediaType": "application/vnd.oci.image.config.v1+json",
        "digest": "sha256:" + hashlib.sha256(config).hexdigest(),
        "size": len(config),
    }
    manifest = json.dumps(
        {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json", "config": config_desc, "layers": descs}
    ).encode()
    ref = parse_reference(ref_text)

    async def go() -> None:
        async with RegistryClient() as client:
            for (blob, _d), desc in zip(layers, descs, strict=True):
                await client.push_blob(ref, blob, desc["digest"], len(blob))
            await client.push_blob(ref, config, config_desc["digest"], len(config))
            await client.push_manifest(ref, manifest, "application/vnd.oci.image.manifest.v1+json")

    trio.run(go)
    return {"blob_bytes": sum(d["size"] for d in descs), "layers": len(descs)}


def ctr(address: str, *args: str, namespace: str = "default", timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        ["ctr", "--address", address, "--namespace", namespace, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"ctr {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def _wait_socket(path: Path, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited ({proc.returncode}): {log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{proc.args[0]} did not create {path} in {timeout}s: {log.read_text()[-3000:]}")
        time.sleep(0.05)


def _stop(proc: subprocess.Popen[bytes] | None, timeout: float = 15) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class Snapshotter:
    """``lazyerofs snapshotter`` in the foreground, as a child process."""

    def __init__(self, work: Path, *, extra: tuple[str, ...] = ()) -> None:
        self.root = work / "sn-root"
        self.address = work / "sn.sock"
        self.cache = work / "sn-cache"
        self.log = work / "snapshotter.log"
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if self.address.exists():
            self.address.unlink()
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "lazyfs.cli", "--log-level", "info", "snapshotter",
                 "--address", str(self.address), "--root", str(self.root),
                 "--cache-dir", str(self.cache), *self.extra],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        _wait_socket(self.address, self.proc, self.log, 30)

    def stop(self) -> None:
        _stop(self.proc)
        self.proc = None

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def teardown(self) -> None:
        """Stop it and unmount everything under its root (a finalizer)."""
        self.stop()
        if self.root.exists():
            subprocess.run(
                [sys.executable, "-m", "lazyfs.cli", "snapshotter", "--root", str(self.root), "--unmount-all"],
                capture_output=True, timeout=120,
            )  # fmt: skip


class Containerd:
    """Debian's containerd with everything under ``work``: root, state,
    socket, and a config naming the snapshotter as a proxy plugin."""

    def __init__(self, work: Path, snapshotter: Snapshotter) -> None:
        self.work = work
        self.address = str(work / "containerd.sock")
        self.config = work / "containerd.toml"
        self.log = work / "containerd.log"
        self.root = work / "ctd-root"
        self.state = work / "ctd-state"
        self.snapshotter = snapshotter
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.config.write_text(
            "version = 2\n"
            f'root = "{self.root}"\n'
            f'state = "{self.state}"\n'
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
            "[grpc]\n"
            f'  address = "{self.address}"\n'
            "[ttrpc]\n"
            f'  address = "{self.address}.ttrpc"\n'
            "[debug]\n"
            f'  address = "{self.address}.debug"\n'
            "[proxy_plugins]\n"
            "  [proxy_plugins.lazyerofs]\n"
            '    type = "snapshot"\n'
            f'    address = "{self.snapshotter.address}"\n'
        )
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(["containerd", "--config", str(self.config)], stdout=log, stderr=subprocess.STDOUT)
        _wait_socket(Path(self.address), self.proc, self.log, 30)
        deadline = time.monotonic() + 30
        while ctr(self.address, "version", check=False).returncode != 0:
            if time.monotonic() > deadline:
                raise RuntimeError(f"containerd does not answer: {self.log.read_text()[-3000:]}")
            time.sleep(0.1)

    def wait_snapshotter(self, timeout: float = 30) -> None:
        """Until containerd reaches the snapshotter again (after a restart its
        gRPC client is in reconnect backoff, a few seconds at most)."""
        deadline = time.monotonic() + timeout
        while ctr(self.address, "snapshots", "--snapshotter", "lazyerofs", "ls", check=False).returncode != 0:
            if time.monotonic() > deadline:
                raise RuntimeError(f"containerd does not reach the snapshotter again in {timeout}s")
            time.sleep(0.2)

    def ctr(self, *args: str, **kw: object) -> subprocess.CompletedProcess[str]:
        return ctr(self.address, *args, **kw)  # type: ignore[arg-type]

    def teardown(self) -> None:
        """Kill every task, stop containerd, unmount what it left."""
        if self.proc is not None and self.proc.poll() is None:
            for ns in ("default",):
                tasks = ctr(self.address, "tasks", "ls", "-q", namespace=ns, check=False).stdout.split()
                for t in tasks:
                    ctr(self.address, "tasks", "kill", "-s", "KILL", t, namespace=ns, check=False)
                    ctr(self.address, "tasks", "delete", "-f", t, namespace=ns, check=False)
        _stop(self.proc)
        self.proc = None
        # Shims outlive containerd; theirs are under our state dir.
        subprocess.run(["pkill", "-KILL", "-f", f"containerd-shim.*{self.address}"], check=False)
        prefix = str(self.work.resolve()) + "/"
        with open("/proc/self/mountinfo") as f:
            points = [line.split()[4] for line in f]
        for point in reversed(points):
            if point.startswith(prefix) and "/sn-root/" not in point:
                subprocess.run(["umount", "-l", point], check=False, capture_output=True)


@pytest.fixture
def containerd_env(tmp_path: Path) -> Iterator[tuple[Containerd, Snapshotter]]:
    """containerd + the lazyerofs snapshotter, both torn down (and every
    mount under the temp dir undone) even when the test fails."""
    for tool in ("containerd", "ctr", "runc"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool} (scripts/setup.sh installs Debian's containerd and runc)")
    if os.geteuid() != 0:
        pytest.skip("needs root")
    work = Path(f"/tmp/lzc-{os.getpid()}-{time.monotonic_ns() % 10**6}")  # short: socket paths <= 108 bytes
    work.mkdir()
    # Only what containers read: tests count fetched bytes.
    sn = Snapshotter(work, extra=("--no-prefetch",))
    ctd = Containerd(work, sn)
    try:
        sn.start()
        ctd.start()
        yield ctd, sn
    finally:
        ctd.teardown()
        sn.teardown()
        shutil.rmtree(work, ignore_errors=True)
