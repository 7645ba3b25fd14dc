"""Run a real OCI registry (Debian's ``docker-registry``) on loopback.

For the demo, the benchmarks and the tests: a private instance on a free
port with its own storage directory, started and stopped by the caller.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

import httpx

from lazyfs.errors import LazyErofsError
from lazyfs.format.digest import check_digest

__all__ = ["LocalRegistry", "free_port"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalRegistry:
    """A ``docker-registry`` process serving ``storage`` on 127.0.0.1:``port``.

    ``auth_yaml`` is inserted verbatim under ``auth:`` (htpasswd or token).
    Stop and start keep the port and the storage, so a test can take the
    registry away mid-run and bring it back.
    """

    def __init__(self, storage: str | os.PathLike[str], *, port: int | None = None, auth_yaml: str = "") -> None:
        self.storage = Path(storage)
        self.port = port or free_port()
        self.auth_yaml = auth_yaml
        self.proc: subprocess.Popen[bytes] | None = None
        self.config = self.storage.parent / f"registry-{self.port}.yml"
        self.log = self.storage.parent / f"registry-{self.port}.log"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def blob_path(self, digest: str) -> Path:
        """Where the registry stores a blob (tests tamper with it here)."""
        algo, hexd = check_digest(digest).split(":", 1)
        return self.storage / "docker/registry/v2/blobs" / algo / hexd[:2] / hexd / "data"

    def _write_config(self) -> None:
        auth = f"auth:\n{self.auth_yaml}\n" if self.auth_yaml else ""
        self.config.write_text(
            "version: 0.1\n"
            "log:\n  level: error\n  accesslog:\n    disabled: true\n"
            "storage:\n"
            f"  filesystem:\n    rootdirectory: {self.storage}\n"
            "  delete:\n    enabled: true\n"
            "  maintenance:\n    uploadpurging:\n      enabled: false\n"
            f"http:\n  addr: 127.0.0.1:{self.port}\n  secret: lazyerofs-test-secret\n"
            f"{auth}"
        )

    def start(self, timeout: float = 20.0) -> None:
        binary = shutil.which("docker-registry")
        if binary is None:
            raise LazyErofsError("docker-registry not found: install Debian's docker-registry (scripts/setup.sh)")
        self.storage.mkdir(parents=True, exist_ok=True)
        self._write_config()
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [binary, "serve", str(self.config)], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise LazyErofsError(f"docker-registry exited: {self.log.read_text()[-2000:]}")
            with contextlib.suppress(httpx.TransportError):
                httpx.get(f"{self.url}/v2/", timeout=1.0)
                return
            time.sleep(0.05)
        self.stop()
        raise LazyErofsError(f"docker-registry did not answer on {self.host} within {timeout:g}s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> LocalRegistry:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
