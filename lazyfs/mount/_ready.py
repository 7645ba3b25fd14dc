"""The readiness pipe between a forked daemon and the ``lazyerofs mount``
that waits for it: one JSON object a line.

Until the mount is ready (or has failed), every record of level WARNING or
above also goes up the pipe, and the waiting parent prints it on the user's
terminal: an unverified layer is not news only the log hears. Then one final
``{"ok": true}`` or ``{"error": ...}`` and EOF.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys

__all__ = ["ReadyPipe", "wait_ready"]

# One line of the pipe: {"warning": str} | {"ok": true} | {"error": str}.
Message = dict[str, object]


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
