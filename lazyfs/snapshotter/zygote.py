"""A pre-imported ``lazyerofs mount``: image mounts without the start-up cost.

Starting a Python process and importing trio, httpx, pyfuse3 and the fetch
path costs 0.3-0.5 s of CPU, and the snapshotter pays it on the critical
path of a container's start (the first layer of a new image). So the
snapshotter keeps one helper process that has imported all of it once and
then forks a child per mount request; the child runs ``lazyerofs mount``
from the imports already in memory. The helper is single-threaded (fork is
safe there, unlike in the gRPC server's thread pool) and serves one request
at a time; the snapshotter falls back to a fresh process when it is busy or
gone.

Protocol on the helper's stdin/stdout: one JSON object per line each way,
``{"argv": [...], "stdin": str | null}`` -> ``{"rc": int, "stderr": str}``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence

__all__ = ["Zygote", "main"]


class Zygote:
    """The snapshotter's side: start the helper, send it mount commands."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "lazyfs.snapshotter.zygote"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.stdin:
                proc.stdin.close()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def run(self, argv: Sequence[str], stdin: str | None, timeout: float) -> tuple[int, str] | None:
        """(exit status, stderr) of ``lazyerofs ARGV``, or None when the
        helper is busy or gone before taking the request (then the caller
        starts a process itself). A request taken and not answered within
        ``timeout`` is a failure (status 124), not a reason to run it again."""
        if not self._lock.acquire(blocking=False):
            return None
        try:
            proc = self._proc
            if proc is None or proc.poll() is not None or proc.stdin is None or proc.stdout is None:
                return None
            try:
                proc.stdin.write(json.dumps({"argv": list(argv), "stdin": stdin}).encode() + b"\n")
                proc.stdin.flush()
            except OSError:
                return None
            answer: list[bytes] = []
            reader = threading.Thread(target=lambda: answer.append(proc.stdout.readline()), daemon=True)  # type: ignore[union-attr]
            reader.start()
            reader.join(timeout)
            if reader.is_alive() or not answer or not answer[0]:
                # Hung or dead after taking the request: never trust it again,
                # and do not run the mount a second time (it may still come up).
                proc.kill()
                self._proc = None
                return 124, f"lazyerofs: error: the mount did not finish within {timeout:g}s"
            reply = json.loads(answer[0])
            return int(reply["rc"]), str(reply["stderr"])
        finally:
            self._lock.release()


def _serve_one(argv: list[str], stdin: str | None) -> tuple[int, str]:
    with tempfile.TemporaryFile() as err, tempfile.TemporaryFile() as inp:
        if stdin is not None:
            inp.write(stdin.encode())
            inp.seek(0)
        pid = os.fork()
        if pid == 0:  # the child: `lazyerofs ARGV` from the imports in memory
            code = 1
            try:
                os.dup2(inp.fileno(), 0)
                os.dup2(err.fileno(), 2)
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, 1)
                # The daemon this forks must not hold the helper's files.
                for fd in (devnull, inp.fileno(), err.fileno()):
                    os.close(fd)
                import time

                import lazyfs.cli as cli

                cli.STARTED = time.monotonic()
                sys.stdin = open(0, closefd=False)  # noqa: SIM115 - the child's own stdin
                code = cli.main(argv)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        err.seek(0)
        return os.waitstatus_to_exitcode(status), err.read().decode(errors="replace")


def main() -> int:
    # Everything a mount imports, once.
    import lazyfs.cli.mount
    import lazyfs.fetch
    import lazyfs.mount.daemon
    import lazyfs.mount.fuse
    import lazyfs.mount.image
    import lazyfs.oci  # noqa: F401

    for line in sys.stdin.buffer:
        try:
            request = json.loads(line)
            rc, err = _serve_one([str(a) for a in request["argv"]], request.get("stdin"))
        except (ValueError, KeyError, TypeError, OSError) as exc:
            rc, err = 1, f"lazyerofs: error: bad request to the mount helper: {exc}"
        sys.stdout.write(json.dumps({"rc": rc, "stderr": err}) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
