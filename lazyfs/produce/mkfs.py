"""Raw EROFS images: make one with ``mkfs.erofs``, recognise one by its superblock."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
from pathlib import Path

from lazyfs.errors import FormatError, LazyErofsError

__all__ = ["EROFS_MAGIC", "is_erofs_image", "make_erofs"]

EROFS_MAGIC = 0xE0F5E1E2
EROFS_SUPER_OFFSET = 1024


def is_erofs_image(path: str | os.PathLike[str]) -> bool:
    """True if the file starts with an EROFS superblock (magic at byte 1024)."""
    with open(path, "rb") as f:
        f.seek(EROFS_SUPER_OFFSET)
        head = f.read(4)
    return len(head) == 4 and struct.unpack("<I", head)[0] == EROFS_MAGIC


def make_erofs(
    src_dir: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    extra_args: list[str] | None = None,
) -> None:
    """Build an uncompressed EROFS image of ``src_dir`` (owners, modes, symlinks,
    xattrs and mtimes kept). Compression is the seekable blob's job, so the
    image itself stays plain: the kernel then reads it without decompressing.
    """
    if not Path(src_dir).is_dir():
        raise FormatError(f"{src_dir}: not a directory")
    tool = shutil.which("mkfs.erofs")
    if tool is None:
        raise LazyErofsError("mkfs.erofs not found: install erofs-utils (scripts/setup.sh does)")
    cmd = [tool, "--quiet", *(extra_args or []), os.fspath(out_path), os.fspath(src_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise LazyErofsError(f"mkfs.erofs failed ({proc.returncode}): {proc.stderr.strip()}")
