"""The readiness pipe between a forked daemon and the ``lazyerofs mount``
that waits for it: one JSON object a line.

Until the mount is ready (or has failed), every record of level WARNING or
above also goes up the pipe, and the waiting parent prints it on the user's
terminal: an unverified layer is not news only the log hears. Then one final
``{"ok": true}`` or ``{"error": ...}`` and EOF.

:class:`Timeline` records when each startup step of a mount finished, on the
system-wide monotonic clock, so the steps of the command and of its daemon
line up with each other and with a benchmark's own clock.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time

__all__ = ["ReadyPipe", "Timeline", "wait_ready"]

# One line of the pipe: {"warning": str} | {"ok": true} | {"error": str}.
Message = dict[str, object]


class Timeline:
    """When each startup step ended, in seconds since the command started.

    ``start`` is ``time.monotonic()`` at the command's first line (CLOCK_MONOTONIC
    is one clock for every process on the host, so a forked daemon and a
    benchmark measuring from outside read the same clock).
    """

    def __init__(self, start: float | None = None) -> None:
        self.start = time.monotonic() if start is None else start
        self.marks: dict[str, float] = {}

    def mark(self, step: str) -> None:
        self.marks[step] = time.monotonic() - self.start

    def as_dict(self) -> dict[str, object]:
        """``{"start": <monotonic>, "steps": {step: seconds since start}}`` (for stats)."""
        return {"start": self.start, "steps": {k: round(v, 6) for k, v in self.marks.items()}}

    def summary(self) -> str:
        """``step +0.012s, ...``: what each step took, for the log."""
        parts, last = [], 0.0
        for step, at in self.marks.items():
            parts.append(f"{step} +{at - last:.3f}s")
            last = at
        return ", ".join(parts)


class ReadyPipe(logging.Handler):
    """The daemon's end of the pipe, installed as a root log handler."""

    def __init__(self, fd: int) -> None:
        super().__init__(logging.WARNING)
        self._file = os.fdopen(fd, "wb")

    def emit(self, record: logging.LogRecord) -> None:  # called under self.lock
        self._send({"warning": record.getMessage()})

    def _send(self, message: Message) -> None:
        if self._file.closed:
            return
        try:
            self._file.write(json.dumps(message).encode() + b"\n")
            self._file.flush()
        except OSError:
            pass  # the parent is gone: nobody to tell

    def finish(self, error: str | None) -> None:
        """Send the final word (ready, or why not), close, stop forwarding."""
        with self.lock:  # type: ignore[union-attr]
            if self._file.closed:
                return
            self._send({"ok": True} if error is None else {"error": error})
            with contextlib.suppress(OSError):
                self._file.close()
        logging.getLogger().removeHandler(self)


def printable(text: str) -> str:
    """Text from the daemon (and so maybe from a registry) for a terminal:
    control characters escaped."""
    return "".join(c if c.isprintable() or c == "\n" else repr(c)[1:-1] for c in text)


def wait_ready(read_fd: int, pid: int) -> int:
    """Parent side of :class:`ReadyPipe`: print forwarded warnings, then
    return 0 once the daemon says the mount is ready, else print its error
    and return 1."""
    error = None
    ready = False
    with os.fdopen(read_fd, "rb") as r:
        for raw in r:
            line = raw.decode(errors="replace").rstrip("\n")
            try:
                message = json.loads(line)
            except json.JSONDecodeError:
                message = {"error": line}
            if not isinstance(message, dict):
                message = {"error": line}
            if "warning" in message:
                print(f"lazyerofs: warning: {printable(str(message['warning']))}", file=sys.stderr, flush=True)
            elif message.get("ok") is True:
                ready = True
            else:
                error = str(message.get("error", line))
    if ready:
        return 0
    os.waitpid(pid, 0)
    print(f"lazyerofs: error: {printable(error or 'daemon exited before the mount was ready')}", file=sys.stderr)
    return 1
