"""Human sizes and the default cache location.

Kept apart from the store so the CLI can format numbers without opening a
cache, and so ``lazyfs.units`` has one spelling of sizes for every command.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

__all__ = ["default_cache_dir", "format_size", "parse_size"]

# Binary units for the IEC names and for a bare letter ("10G", as docker and
# dd read it); decimal units only where the name says so ("10GB").
_UNITS = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "kib": 1 << 10,
    "kb": 10**3,
    "m": 1 << 20,
    "mib": 1 << 20,
    "mb": 10**6,
    "g": 1 << 30,
    "gib": 1 << 30,
    "gb": 10**9,
    "t": 1 << 40,
    "tib": 1 << 40,
    "tb": 10**12,
    "p": 1 << 50,
    "pib": 1 << 50,
    "pb": 10**15,
}
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*")
_NAMES = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def parse_size(text: str) -> int:
    """Parse ``"10GiB"``, ``"512M"``, ``"1.5 GB"`` or ``"4096"`` into bytes.

    A bare letter means the binary unit (``10G`` is 10 GiB) because that is
    what people mean when they size a cache; ``KB``/``MB``/``GB`` are decimal.

    Raises:
        ValueError: the text is not a size (argparse turns this into a usage
            error when ``parse_size`` is a ``type=``).
    """
    match = _SIZE_RE.fullmatch(text)
    if match is None:
        raise ValueError(f"not a size: {text!r}")
    number, unit = match.groups()
    factor = _UNITS.get(unit.lower())
    if factor is None:
        raise ValueError(f"unknown size unit {unit!r} in {text!r}")
    return int(float(number) * factor) if "." in number else int(number) * factor


def format_size(n: int) -> str:
    """``10737418240`` -> ``"10.0 GiB"``; plain bytes below 1 KiB."""
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for name in _NAMES[1:]:
        value /= 1024
        if value < 1024 or name == _NAMES[-1]:
            return f"{value:.1f} {name}"
    raise AssertionError("unreachable")


def default_cache_dir() -> Path:
    """Where the chunk cache lives unless told otherwise.

    ``$LAZYEROFS_CACHE_DIR`` wins so a snapshotter and the CLI can agree on
    one directory; root gets the system location, everyone else their own
    (``$XDG_CACHE_HOME`` honoured, else ``~/.cache``).
    """
    env = os.environ.get("LAZYEROFS_CACHE_DIR")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/cache/lazyerofs")
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "lazyerofs"
