"""Raw EROFS images: make one with ``mkfs.erofs``, recognise one by its superblock.

Images are reproducible: the same tree gives the same bytes. mkfs.erofs 1.5
otherwise stamps the build time and draws a random filesystem UUID, so
:func:`make_erofs` fixes both (see there).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import struct
import subprocess
import uuid as uuid_mod
from pathlib import Path

from lazyfs.errors import FormatError, LazyErofsError

__all__ = [
    "EROFS_MAGIC",
    "image_uuid",
    "is_erofs_image",
    "make_erofs",
    "newest_mtime",
    "source_date_epoch_from_env",
]

EROFS_MAGIC = 0xE0F5E1E2
EROFS_SUPER_OFFSET = 1024

# Superblock fields (erofs_fs.h), relative to EROFS_SUPER_OFFSET.
_SB_CHECKSUM = 4  # u32 crc32c of the superblock block from offset 1024, this field zeroed
_SB_FEATURE_COMPAT = 8  # u32
_SB_BLKSZBITS = 12  # u8
_SB_UUID = 48  # u8[16]
_FEATURE_COMPAT_SB_CHKSUM = 0x1
_NIL_UUID = "00000000-0000-0000-0000-000000000000"


def is_erofs_image(path: str | os.PathLike[str]) -> bool:
    """True if the file starts with an EROFS superblock (magic at byte 1024)."""
    with open(path, "rb") as f:
        f.seek(EROFS_SUPER_OFFSET)
        head = f.read(4)
    return len(head) == 4 and struct.unpack("<I", head)[0] == EROFS_MAGIC


def source_date_epoch_from_env() -> int | None:
    """``SOURCE_DATE_EPOCH`` as an int, None when unset or empty.

    Raises:
        FormatError: set to anything but a non-negative decimal integer
            (the reproducible-builds spec asks a build to fail then).
    """
    value = os.environ.get("SOURCE_DATE_EPOCH", "")
    if not value:
        return None
    if not (value.isascii() and value.isdigit()):
        raise FormatError(f"SOURCE_DATE_EPOCH={value!r} is not a non-negative whole number of seconds")
    return int(value)


def newest_mtime(src_dir: str | os.PathLike[str]) -> int:
    """The newest mtime of anything in ``src_dir`` (itself included, symlinks
    not followed), rounded up to a whole second; 0 for a tree older than 1970.

    Used as the build time when no epoch is given: mkfs.erofs clamps mtimes
    newer than the build time, and rounding up keeps every mtime, nanoseconds
    included, exactly as it is.
    """
    newest = 0
    pending = [os.fspath(src_dir)]
    while pending:
        path = pending.pop()
        try:
            st = os.lstat(path)
            newest = max(newest, -(-st.st_mtime_ns // 1_000_000_000))
            if not stat.S_ISDIR(st.st_mode):
                continue
            with os.scandir(path) as it:
                for entry in it:
                    if entry.is_dir(follow_symlinks=False):
                        pending.append(entry.path)
                    else:
                        ns = entry.stat(follow_symlinks=False).st_mtime_ns
                        newest = max(newest, -(-ns // 1_000_000_000))
        except OSError as exc:
            raise FormatError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    return newest


def make_erofs(
    src_dir: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    extra_args: list[str] | None = None,
    source_date_epoch: int | None = None,
) -> uuid_mod.UUID:
    """Build an uncompressed EROFS image of ``src_dir`` (owners, modes, symlinks,
    xattrs and mtimes kept). Compression is the seekable blob's job, so the
    image itself stays plain: the kernel then reads it without decompressing.

    The image is reproducible: the same tree and epoch give the same bytes.

    * Time: the epoch is ``source_date_epoch``, else ``SOURCE_DATE_EPOCH``,
      else the tree's :func:`newest_mtime`. It becomes the build time, and
      mkfs.erofs clamps every mtime newer than it to it (as ``tar
      --clamp-mtime`` does); older mtimes are the user's content and stay.
      So without an epoch all mtimes are kept, and with one a freshly
      checked-out tree gives the same image whenever it was checked out.
    * UUID: the image is made with the nil UUID, then given the first 16
      bytes of that image's SHA-256 as a v4-style UUID (superblock checksum
      updated), the same bytes ``mkfs.erofs -U`` with that UUID writes.
    * Order: mkfs.erofs sorts directory entries by name.

    ``extra_args`` must not set ``-U`` or ``-T``: the UUID is rewritten after
    mkfs, and ``-T`` would overwrite every mtime.

    Returns:
        The filesystem UUID written.
    """
    if not Path(src_dir).is_dir():
        raise FormatError(f"{src_dir}: not a directory")
    if source_date_epoch is None:
        source_date_epoch = source_date_epoch_from_env()
    if source_date_epoch is None:
        source_date_epoch = newest_mtime(src_dir)
    if source_date_epoch < 0:
        raise FormatError(f"source date epoch {source_date_epoch} is negative")
    tool = shutil.which("mkfs.erofs")
    if tool is None:
        raise LazyErofsError("mkfs.erofs not found: install erofs-utils (scripts/setup.sh does)")
    cmd = [tool, "--quiet", "-U", _NIL_UUID, *(extra_args or []), os.fspath(out_path), os.fspath(src_dir)]
    # mkfs.erofs 1.5 reads SOURCE_DATE_EPOCH as "build time, and clamp mtimes
    # to it"; its -T instead overwrites every mtime, losing the user's.
    env = {**os.environ, "SOURCE_DATE_EPOCH": str(source_date_epoch)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise LazyErofsError(f"mkfs.erofs failed ({proc.returncode}): {proc.stderr.strip()}")
    with open(out_path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").digest()
    fs_uuid = uuid_mod.UUID(bytes=digest[:16], version=4)
    set_image_uuid(out_path, fs_uuid)
    return fs_uuid


def image_uuid(path: str | os.PathLike[str]) -> uuid_mod.UUID:
    """The filesystem UUID in a raw EROFS image's superblock."""
    with open(path, "rb") as f:
        f.seek(EROFS_SUPER_OFFSET + _SB_UUID)
        return uuid_mod.UUID(bytes=f.read(16))


def set_image_uuid(path: str | os.PathLike[str], fs_uuid: uuid_mod.UUID) -> None:
    """Rewrite the UUID in a raw EROFS image's superblock, and its checksum
    when the image has one (mkfs.erofs sets it by default).

    The old checksum is checked first, so an image whose superblock this
    does not understand is refused rather than silently broken.
    """
    with open(path, "r+b") as f:
        head = bytearray(f.read(EROFS_SUPER_OFFSET + 128))
        if len(head) < EROFS_SUPER_OFFSET + 128 or struct.unpack_from("<I", head, EROFS_SUPER_OFFSET)[0] != EROFS_MAGIC:
            raise FormatError(f"{path}: not a raw EROFS image (no superblock magic)")
        sb = EROFS_SUPER_OFFSET
        features = struct.unpack_from("<I", head, sb + _SB_FEATURE_COMPAT)[0]
        head[sb + _SB_UUID : sb + _SB_UUID + 16] = fs_uuid.bytes
        if features & _FEATURE_COMPAT_SB_CHKSUM:
            block_size = 1 << head[sb + _SB_BLKSZBITS]
            f.seek(0)
            block = bytearray(f.read(block_size))
            if len(block) != block_size:
                raise FormatError(f"{path}: superblock block is truncated")
            stored = struct.unpack_from("<I", block, sb + _SB_CHECKSUM)[0]
            struct.pack_into("<I", block, sb + _SB_CHECKSUM, 0)
            if _sb_checksum(block[sb:]) != stored:
                raise FormatError(f"{path}: EROFS superblock checksum does not match")
            block[sb + _SB_UUID : sb + _SB_UUID + 16] = fs_uuid.bytes
            struct.pack_into("<I", head, sb + _SB_CHECKSUM, _sb_checksum(block[sb:]))
        f.seek(sb)
        f.write(head[sb:])


def _crc32c_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC32C = _crc32c_table()


def _sb_checksum(data: bytes | bytearray) -> int:
    """EROFS's superblock checksum: the kernel's ``crc32c(~0, ...)``, which is
    CRC-32C without its final inversion."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc
