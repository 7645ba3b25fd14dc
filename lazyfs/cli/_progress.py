"""A one-line progress bar on stderr, shown only on a terminal."""

from __future__ import annotations

import sys
import time

from lazyfs.units import format_size

__all__ = ["Progress"]


class Progress:
    """A one-line progress bar on stderr (only when it is a terminal or forced)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.started = time.monotonic()

    def show(self, label: str, done: int, total: int, nbytes: int, *, unit: str = "frames") -> None:
        if not self.enabled:
            return
        width = 30
        filled = width * done // total if total else width
        rate = nbytes / max(time.monotonic() - self.started, 1e-6)
        sys.stderr.write(f"\r{label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} {unit} {format_size(int(rate))}/s ")
        sys.stderr.flush()

    def done(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
